//! Scenario 8, a faulting neighbour: the no-op drain again, with some of the events going
//! to a second route whose plugin faults on every attempt (retried, then DEAD). Timed until
//! every no-op event is SUCCESS, and compared with the same drain without the neighbour:
//! how much of its throughput a healthy route keeps while another plugin misbehaves.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{one_line, preload_mixed, with_env, Ctx};
use crate::report::{count, rate, ratio, secs, Table};
use crate::setup::{noop_route, Backend, Env};
use crate::tuning::{FINISH_POLL, NEIGHBOUR_DISPATCH, PROGRESS_EVERY};

/// A misbehaving route beside the no-op one.
#[derive(Debug, Clone, Copy)]
struct Neighbour {
    /// The test plugin (`tests/plugins/`) and what it does.
    plugin: &'static str,
    fault: &'static str,
    /// Every `every`-th event goes to it.
    every: i64,
    /// Extra route keys, e.g. a short time limit.
    route_keys: &'static str,
    /// `[dispatch] quarantine_after`: 0 lets it fault all run long (the worst case);
    /// Herald's default pauses it after 10 faults in a row.
    quarantine_after: u32,
}

const PANIC: Neighbour = Neighbour {
    plugin: "panic",
    fault: "panics",
    every: 10,
    route_keys: "",
    quarantine_after: 0,
};
const SPIN: Neighbour = Neighbour {
    plugin: "spin",
    fault: "loops until its 100 ms time limit",
    every: 100,
    route_keys: "time_limit = \"100ms\"\n",
    quarantine_after: 0,
};
const DEFAULT_QUARANTINE: u32 = 10;

const NEIGHBOURS: [Neighbour; 4] = [
    PANIC,
    SPIN,
    Neighbour {
        quarantine_after: DEFAULT_QUARANTINE,
        ..PANIC
    },
    Neighbour {
        quarantine_after: DEFAULT_QUARANTINE,
        ..SPIN
    },
];

/// Attempts the neighbour gets per event: it faults on each, then is DEAD.
const NEIGHBOUR_ATTEMPTS: u32 = 3;

pub async fn table(ctx: &mut Ctx, backends: &[Backend]) -> Table {
    let n = ctx.sizes.events;
    let mut table = Table::new(
        format!(
            "8. A faulting neighbour: the no-op drain ({} events) beside a route whose plugin faults",
            count(n)
        ),
        &[
            "backend",
            "neighbour",
            "quarantine_after",
            "no-op events",
            "seconds",
            "no-op events/s",
            "vs alone",
            "neighbour attempts",
        ],
    );
    table.note(format!(
        "`[dispatch]` {}, quarantine_after as shown; every neighbour event is attempted up to \
         {NEIGHBOUR_ATTEMPTS} times (10 ms backoff), each a fault, then DEAD, unless \
         quarantine pauses the neighbour's route first. Timed from `dispatcher.drain()` until \
         every no-op event is SUCCESS.",
        one_line(NEIGHBOUR_DISPATCH)
    ));
    for &backend in backends {
        let mut alone: Option<f64> = None;
        let runs = std::iter::once(None).chain(NEIGHBOURS.iter().copied().map(Some));
        for neighbour in runs {
            let plugins = ctx.plugins.clone();
            let bound = ctx.sizes.time_bound;
            let label = neighbour.map_or("none", |n| n.plugin);
            let measured = with_env(ctx, backend, "neighbour", async |env: &Env| {
                drain_beside(env, &plugins, neighbour, n, bound).await
            })
            .await;
            match measured {
                Ok(run) => {
                    let per_sec = run.noop_events as f64 / run.elapsed.as_secs_f64();
                    let versus = match alone {
                        None => {
                            alone = Some(per_sec);
                            ratio(1.0)
                        }
                        Some(alone) => ratio(per_sec / alone),
                    };
                    let described = neighbour.map_or("none".to_string(), |n| {
                        format!("`{}` (1 in {}, {})", n.plugin, n.every, n.fault)
                    });
                    table.row(vec![
                        backend.name().to_string(),
                        described,
                        neighbour.map_or("-".to_string(), |n| n.quarantine_after.to_string()),
                        count(run.noop_events),
                        secs(run.elapsed),
                        rate(per_sec),
                        versus,
                        count(run.neighbour_attempts),
                    ]);
                }
                Err(err) => ctx.fail(&mut table, &format!("{} {label}", backend.name()), &err),
            }
        }
    }
    table
}

struct Run {
    noop_events: u64,
    elapsed: Duration,
    neighbour_attempts: u64,
}

async fn drain_beside(
    env: &Env,
    plugins: &std::path::Path,
    neighbour: Option<Neighbour>,
    n: u64,
    bound: Duration,
) -> anyhow::Result<Run> {
    let mut routes = noop_route("bench.drain");
    let mut names = vec!["noop"];
    if let Some(neighbour) = neighbour {
        routes.push_str(&format!(
            "\n[[routes]]\nname = \"bench-neighbour\"\nevent_types = [\"bench.fault\"]\nplugin = \"{}\"\nordering = \"none\"\n{}[routes.retry]\nmax_attempts = {NEIGHBOUR_ATTEMPTS}\nbackoff_base = \"10ms\"\nbackoff_max = \"10ms\"\n",
            neighbour.plugin, neighbour.route_keys
        ));
        names.push(neighbour.plugin);
    }
    env.install_plugins(plugins, &names)?;
    let quarantine_after = neighbour.map_or(0, |n| n.quarantine_after);
    let dispatch = format!("{NEIGHBOUR_DISPATCH}\nquarantine_after = {quarantine_after}");
    let service = env.herald(&dispatch, &routes).await?;
    let other = neighbour.map(|n| ("bench.fault", n.every));
    preload_mixed(env, "events", "bench.drain", other, n).await?;
    let neighbour_events = neighbour.map_or(0, |nb| n / nb.every as u64);
    let noop_events = n - neighbour_events;

    let bar = crate::progress::bar(
        noop_events,
        &format!("drain {} beside {}", env.backend.name(), names.join("+")),
    );
    let started = Instant::now();
    let draining = {
        let service = service.clone();
        tokio::spawn(async move { service.dispatcher.drain().await })
    };
    // Done when every no-op event is SUCCESS; the neighbour's retries may still run.
    let elapsed = loop {
        let remaining = env.db.ready_events_of_type("bench.drain").await?;
        let success = noop_events.saturating_sub(u64::try_from(remaining).unwrap_or(0));
        bar.set_position(success);
        if remaining == 0 {
            break started.elapsed();
        }
        if started.elapsed() > bound {
            draining.abort();
            bail!(
                "the no-op events were not all delivered within {bound:?}: {}",
                env.db.status_summary().await
            );
        }
        if draining.is_finished() && env.db.ready_events_of_type("bench.drain").await? > 0 {
            // Finished without every no-op event delivered: the status says why.
            let result = draining.await.context("the drain task")?;
            result.context("dispatch")?;
            bail!(
                "the drain ended with no-op events undelivered: {}",
                env.db.status_summary().await
            );
        }
        // Look often near the end (the figure is timed by this loop), seldom while much
        // is left (each look costs the database a walk over what is left).
        let share_left = remaining as f64 / noop_events.max(1) as f64;
        tokio::time::sleep(PROGRESS_EVERY.mul_f64(share_left).max(FINISH_POLL)).await;
    };
    bar.finish_and_clear();
    match tokio::time::timeout(bound, draining).await {
        Err(_) => bail!("the neighbour's retries did not finish within {bound:?}"),
        Ok(joined) => joined.context("the drain task")?.context("dispatch")?,
    }
    // A drain leaves deliveries waiting for a retry that is not due yet; the neighbour's
    // last ones come due within its backoff.
    if quarantine_after == 0 {
        let deadline = Instant::now() + bound;
        while env.db.events_with_status("FAILED").await? > 0 {
            if Instant::now() > deadline {
                bail!(
                    "the neighbour's retries did not finish within {bound:?}: {}",
                    env.db.status_summary().await
                );
            }
            tokio::time::sleep(FINISH_POLL).await;
            service.dispatcher.drain().await.context("dispatch")?;
        }
    }
    let neighbour_attempts = env
        .db
        .scalar(&format!(
            "SELECT count(*) FROM {} WHERE route = 'bench-neighbour'",
            env.db.attempts()
        ))
        .await?;
    let dead = env.db.events_with_status("DEAD").await?;
    // A quarantined neighbour's events wait, open; otherwise each is DEAD by policy.
    if quarantine_after == 0 && dead != neighbour_events as i64 {
        bail!(
            "{dead} events DEAD, expected the neighbour's {neighbour_events}: {}",
            env.db.status_summary().await
        );
    }
    Ok(Run {
        noop_events,
        elapsed,
        neighbour_attempts: u64::try_from(neighbour_attempts).unwrap_or(0),
    })
}
