//! Scenarios 2 and 3, drain: N preloaded events, one route, `dispatcher.drain()` timed
//! from its start until every event is SUCCESS; with the peak resident memory of the
//! process during the drain (scenario 7).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{one_line, preload, with_env, Ctx};
use crate::cpu::CpuTimes;
use crate::progress::DrainWatch;
use crate::report::{count, rate, ratio, secs, Table};
use crate::setup::{noop_route, webhook_route, Backend, Env};
use crate::sink::Sink;
use crate::tuning::{DRAIN_DISPATCH, ENTITIES};
use crate::{rss, tuning};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Noop,
    Webhook,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Noop => "noop",
            Plugin::Webhook => "webhook",
        }
    }
}

struct Drained {
    elapsed: Duration,
    /// Busy CPU time of every process (Herald, the database, the sink) per event.
    cpu_us_per_event: Option<f64>,
    peak_mib: Option<f64>,
    requests: Option<u64>,
}

pub async fn table(ctx: &mut Ctx, backends: &[Backend], plugin: Plugin) -> Table {
    let n = ctx.sizes.events;
    let title = match plugin {
        Plugin::Noop => format!(
            "2. Drain, no-op plugin ({} events over {} entities)",
            count(n),
            count(ENTITIES)
        ),
        Plugin::Webhook => format!(
            "3. Drain, webhook plugin to a loopback HTTP sink ({} events over {} entities)",
            count(n),
            count(ENTITIES)
        ),
    };
    let mut headers = vec![
        "backend",
        "events",
        "seconds",
        "events/s",
        "vs ceiling",
        "vs ledger ceiling",
        "CPU µs/event",
        "peak RSS MiB",
    ];
    if plugin == Plugin::Webhook {
        headers.push("sink requests");
    }
    let mut table = Table::new(title, &headers);
    table.note(format!(
        "`[dispatch]` {}; route ordering = \"{}\"; timed from `dispatcher.drain()` until \
         every event is SUCCESS (preloading not counted). CPU µs/event: the busy time of \
         every process on the machine during the drain (what the hypervisor stole not \
         counted), per event; it moves less with the hour than events/s. Peak RSS: \
         VmHWM of the whole bench process, reset just before the drain.",
        one_line(DRAIN_DISPATCH),
        tuning::ROUTE_ORDERING
    ));
    for &backend in backends {
        let scenario = plugin.name();
        let plugins = ctx.plugins.clone();
        let bound = ctx.sizes.time_bound;
        let measured = with_env(ctx, backend, scenario, async |env: &Env| {
            drain(env, &plugins, plugin, n, bound).await
        })
        .await;
        match measured {
            Ok(drained) => {
                let per_sec = n as f64 / drained.elapsed.as_secs_f64();
                let versus = |ceilings: &HashMap<Backend, f64>| {
                    ceilings
                        .get(&backend)
                        .map_or("-".to_string(), |ceiling| ratio(per_sec / ceiling))
                };
                let mut row = vec![
                    backend.name().to_string(),
                    count(n),
                    secs(drained.elapsed),
                    rate(per_sec),
                    versus(&ctx.ceiling),
                    versus(&ctx.ledger_ceiling),
                    drained
                        .cpu_us_per_event
                        .map_or("n/a".to_string(), |us| format!("{us:.1}")),
                    drained
                        .peak_mib
                        .map_or("n/a".to_string(), |mib| format!("{mib:.0}")),
                ];
                if let Some(requests) = drained.requests {
                    row.push(count(requests));
                }
                table.row(row);
            }
            Err(err) => ctx.fail(&mut table, backend.name(), &err),
        }
    }
    if ctx.ceiling.is_empty() || ctx.ledger_ceiling.is_empty() {
        table.note(
            "(vs ceiling, vs ledger ceiling: run those scenarios in the same run for the ratios)",
        );
    }
    table
}

async fn drain(
    env: &Env,
    plugins: &std::path::Path,
    plugin: Plugin,
    n: u64,
    bound: Duration,
) -> anyhow::Result<Drained> {
    let sink = match plugin {
        Plugin::Noop => None,
        Plugin::Webhook => Some(Sink::start(false).await?),
    };
    let routes = match &sink {
        None => noop_route("bench.*"),
        Some(sink) => webhook_route("bench.*", sink),
    };
    env.install_plugins(plugins, &[plugin.name()])?;
    let service = env.herald(DRAIN_DISPATCH, &routes).await?;
    preload(env, "events", "bench.drain", n).await?;

    let reset = rss::reset_peak();
    let watch = DrainWatch::start(
        env.db.clone(),
        n,
        &format!("drain {} {}", env.backend.name(), plugin.name()),
    )
    .await;
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let drained = tokio::time::timeout(bound, service.dispatcher.drain()).await;
    let elapsed = started.elapsed();
    let cpu_us_per_event = cpu_before
        .zip(CpuTimes::now())
        .and_then(|(before, after)| before.busy_us_per(&after, n));
    let peak_mib = rss::peak_mib().filter(|_| reset);
    watch.finish();
    match drained {
        Err(_) => bail!(
            "the drain did not finish within {bound:?}: {}",
            env.db.status_summary().await
        ),
        Ok(result) => result.context("dispatch")?,
    }

    let success = env.db.events_with_status("SUCCESS").await?;
    if success != n as i64 {
        bail!(
            "after the drain {success} of {n} events are SUCCESS: {}",
            env.db.status_summary().await
        );
    }
    let requests = sink.as_ref().map(Sink::requests);
    if let Some(requests) = requests {
        if requests < n {
            bail!("the sink got {requests} requests for {n} delivered events");
        }
    }
    Ok(Drained {
        elapsed,
        cpu_us_per_event,
        peak_mib,
        requests,
    })
}
