//! Scenario 4, latency: a producer inserts events at a steady rate, one per transaction,
//! while Herald runs (`dispatcher.run`) and delivers them through the webhook plugin to
//! the loopback sink; created → delivered per event. Created is when the producer had its
//! connection and sent the insert (the event's `created_at`), delivered when the sink
//! received the request.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::{one_line, with_env, Ctx};
use crate::report::{count, millis, quantile, rate, Table};
use crate::setup::{webhook_route, Backend, Env};
use crate::sink::Sink;
use crate::tuning::{Sizes, LATENCY_DISPATCH};

const EVENT_TYPE: &str = "bench.latency";

struct Measured {
    events: usize,
    produced_per_sec: f64,
    /// Sorted.
    latencies: Vec<Duration>,
    /// Where the time went (Postgres only): (stage, p50, p99).
    stages: Vec<(&'static str, Duration, Duration)>,
}

/// The stages of created → plugin call, from the store's own timestamps (each `now()` is
/// its transaction's start): the event's `created_at`, when fan-out wrote or leased its
/// delivery (`d.leased_at`: a delivery row's `created_at`, a batch entry's `leased_at`)
/// and the attempt's `started_at` (the plugin call).
const STAGES: [(&str, &str); 3] = [
    ("insert → fan-out", "d.leased_at - e.created_at"),
    ("fan-out → plugin call", "d.started_at - d.leased_at"),
    ("insert → plugin call", "d.started_at - e.created_at"),
];

/// Every first attempt with when its delivery was written or leased, in both of the
/// Postgres store's shapes (migration 0013).
const FIRST_ATTEMPTS: &str = "(SELECT a.event_id, a.started_at, d.created_at AS leased_at \
       FROM herald_attempts a JOIN herald_deliveries d USING (delivery_id) \
       WHERE a.attempt = 1 \
     UNION ALL SELECT event_id, started_at, leased_at FROM herald_outcome_entries) d";

async fn stages(env: &Env) -> anyhow::Result<Vec<(&'static str, Duration, Duration)>> {
    if env.backend != Backend::Postgres {
        return Ok(Vec::new());
    }
    let mut stages = Vec::new();
    for (name, interval) in STAGES {
        let at = async |q: f64| -> anyhow::Result<Duration> {
            let micros = env
                .db
                .scalar(&format!(
                    "SELECT (percentile_cont({q}) WITHIN GROUP (ORDER BY \
                     extract(epoch FROM {interval})) * 1000000)::bigint \
                     FROM {FIRST_ATTEMPTS} JOIN events e ON e.event_id = d.event_id"
                ))
                .await?;
            Ok(Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
        };
        stages.push((name, at(0.5).await?, at(0.99).await?));
    }
    Ok(stages)
}

pub async fn table(ctx: &mut Ctx, backends: &[Backend]) -> Table {
    let sizes = ctx.sizes.clone();
    let mut table = Table::new(
        format!(
            "4. Latency: created → delivered at {} events/s for {} s (webhook to the loopback sink)",
            count(sizes.latency_rate),
            sizes.latency_for.as_secs_f64()
        ),
        &[
            "backend",
            "wake-up",
            "events",
            "produced/s",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
    );
    table.note(format!(
        "Created: the instant the producer, its pooled connection in hand, sends the INSERT \
         (one event per transaction, paced by a tokio interval). Delivered: the sink's arrival \
         instant. Herald runs `dispatcher.run` with `[dispatch]` {}; the first {} events, \
         inserted at once, warm up and are not counted.",
        one_line(LATENCY_DISPATCH),
        sizes.latency_warmup
    ));
    for &backend in backends {
        let plugins = ctx.plugins.clone();
        let measured = with_env(ctx, backend, "latency", async |env: &Env| {
            measure(env, &plugins, &sizes).await
        })
        .await;
        match measured {
            Ok(m) => {
                if !m.stages.is_empty() {
                    let stages: Vec<String> = m
                        .stages
                        .iter()
                        .map(|(name, p50, p99)| {
                            format!("{name} p50 {} / p99 {} ms", millis(*p50), millis(*p99))
                        })
                        .collect();
                    table.note(format!(
                        "{}, from the store's timestamps: {}.",
                        backend.name(),
                        stages.join("; ")
                    ));
                }
                let at = |q| quantile(&m.latencies, q).map_or("-".to_string(), millis);
                table.row(vec![
                    backend.name().to_string(),
                    match backend {
                        Backend::Postgres => "LISTEN/NOTIFY".to_string(),
                        Backend::Sqlite => "WAL watch".to_string(),
                    },
                    count(m.events as u64),
                    rate(m.produced_per_sec),
                    at(0.50),
                    at(0.99),
                    at(1.0),
                ]);
            }
            Err(err) => ctx.fail(&mut table, backend.name(), &err),
        }
    }
    table
}

async fn measure(env: &Env, plugins: &std::path::Path, sizes: &Sizes) -> anyhow::Result<Measured> {
    let sink = Sink::start(true).await?;
    env.install_plugins(plugins, &["webhook"])?;
    let service = env
        .herald(LATENCY_DISPATCH, &webhook_route("bench.*", &sink))
        .await?;
    let (stop, stopped) = watch::channel(false);
    let runner = {
        let service = service.clone();
        tokio::spawn(async move { service.dispatcher.run(stopped).await })
    };
    let measured = produce(env, &sink, sizes).await;
    let measured = match measured {
        Ok(mut m) => {
            m.stages = stages(env).await?;
            Ok(m)
        }
        Err(err) => Err(err),
    };
    let _ = stop.send(true);
    runner.await.context("the dispatcher task")?;
    measured
}

async fn produce(env: &Env, sink: &Sink, sizes: &Sizes) -> anyhow::Result<Measured> {
    // All at once: the producer's pool opens its connections now, not while the clock
    // runs (opening them inside the measured second cost its first events up to 80 ms).
    let warmup = sizes.latency_warmup as i64;
    super::insert_at_once(&env.db, EVENT_TYPE, 1..=warmup).await?;
    wait_for(sink, 1..=warmup, Duration::from_secs(30)).await?;

    let total = (sizes.latency_rate as f64 * sizes.latency_for.as_secs_f64()).round() as i64;
    let first = warmup + 1;
    let bar = crate::progress::bar(total as u64, &format!("latency {}", env.backend.name()));
    let mut interval =
        tokio::time::interval(Duration::from_secs_f64(1.0 / sizes.latency_rate as f64));
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut inserts = Vec::with_capacity(total as usize);
    for seq in first..first + total {
        interval.tick().await;
        let db = env.db.clone();
        inserts.push(tokio::spawn(async move {
            db.insert_one(EVENT_TYPE, seq)
                .await
                .map(|created| (seq, created))
        }));
        bar.inc(1);
    }
    let mut created = Vec::with_capacity(inserts.len());
    for insert in inserts {
        created.push(insert.await.context("insert task")?.context("insert")?);
    }
    let produced_for = started.elapsed();
    bar.finish_and_clear();

    let arrivals = wait_for(sink, first..=first + total - 1, sizes.time_bound).await?;
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(seq, at)| {
            arrivals
                .get(seq)
                .map(|arrived| arrived.saturating_duration_since(*at))
        })
        .collect();
    latencies.sort_unstable();
    Ok(Measured {
        events: latencies.len(),
        produced_per_sec: total as f64 / produced_for.as_secs_f64(),
        latencies,
        stages: Vec::new(),
    })
}

/// Wait until every `seq` of `range` arrived at the sink; the first arrivals.
async fn wait_for(
    sink: &Sink,
    range: std::ops::RangeInclusive<i64>,
    bound: Duration,
) -> anyhow::Result<std::collections::HashMap<i64, Instant>> {
    let deadline = Instant::now() + bound;
    loop {
        let arrivals = sink.arrivals();
        let missing = range
            .clone()
            .filter(|seq| !arrivals.contains_key(seq))
            .count();
        if missing == 0 {
            return Ok(arrivals);
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} events had not arrived at the sink after {bound:?}",
                range.count()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
