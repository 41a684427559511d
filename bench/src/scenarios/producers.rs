//! Scenario 9, producers beside Herald: several connections each insert one event per
//! transaction, as fast as they can, as an application's request handlers would, while
//! Herald delivers the events through the no-op plugin. What Herald's insert trigger
//! costs the application shows in the producers' commit rate and commit latency.
//! Postgres only: SQLite lets one writer in at a time, whatever the trigger does.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::{one_line, settle, with_env, Ctx};
use crate::report::{count, millis, quantile, rate, Table};
use crate::setup::{noop_route, Backend, Db, Env};
use crate::tuning::{Sizes, PRODUCERS, PRODUCERS_DISPATCH};

const EVENT_TYPE: &str = "bench.produced";

struct Produced {
    commits: u64,
    per_sec: f64,
    /// Sorted: from the insert sent (connection in hand) to its commit's answer.
    latencies: Vec<Duration>,
}

pub async fn table(ctx: &mut Ctx, backends: &[Backend]) -> Table {
    let sizes = ctx.sizes.clone();
    let mut table = Table::new(
        format!(
            "9. Producers beside Herald: {PRODUCERS} connections inserting one event per \
             transaction for {} s while Herald delivers them",
            sizes.producers_for.as_secs_f64()
        ),
        &[
            "backend",
            "commits",
            "commits/s",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
    );
    table.note(format!(
        "Each producer inserts in a loop, autocommit, with no pause; Herald runs beside \
         them with one no-op route and `[dispatch]` {}, and every event is delivered \
         before the scenario ends. Postgres only (SQLite has one writer at a time).",
        one_line(PRODUCERS_DISPATCH)
    ));
    for &backend in backends.iter().filter(|b| **b == Backend::Postgres) {
        let plugins = ctx.plugins.clone();
        let measured = with_env(ctx, backend, "producers", async |env: &Env| {
            measure(env, &plugins, &sizes).await
        })
        .await;
        match measured {
            Ok(m) => {
                let at = |q: f64| quantile(&m.latencies, q).map_or("-".to_string(), millis);
                table.row(vec![
                    backend.name().to_string(),
                    count(m.commits),
                    rate(m.per_sec),
                    at(0.5),
                    at(0.99),
                    at(1.0),
                ]);
            }
            Err(err) => ctx.fail(&mut table, backend.name(), &err),
        }
    }
    table
}

async fn measure(env: &Env, plugins: &Path, sizes: &Sizes) -> anyhow::Result<Produced> {
    env.install_plugins(plugins, &["noop"])?;
    let service = env
        .herald(PRODUCERS_DISPATCH, &noop_route("bench.*"))
        .await?;
    let (stop, stopped) = watch::channel(false);
    let runner = {
        let service = service.clone();
        tokio::spawn(async move { service.dispatcher.run(stopped).await })
    };
    let produced = produce(&env.db, sizes).await;
    let delivered = match &produced {
        Ok(_) => settle(&env.db, sizes.time_bound).await,
        Err(_) => Ok(()),
    };
    let _ = stop.send(true);
    runner.await.context("the dispatcher task")?;
    delivered?;
    produced
}

async fn produce(db: &Db, sizes: &Sizes) -> anyhow::Result<Produced> {
    // One insert per producer first, all at once: the pool opens its connections now, not
    // while the clock runs.
    super::insert_at_once(db, EVENT_TYPE, 0..=PRODUCERS as i64 - 1).await?;

    let started = Instant::now();
    let until = started + sizes.producers_for;
    let producers: Vec<_> = (0..PRODUCERS as i64)
        .map(|producer| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut seq = PRODUCERS as i64 + producer;
                while Instant::now() < until {
                    let sent = db.insert_one(EVENT_TYPE, seq).await?;
                    latencies.push(sent.elapsed());
                    seq += PRODUCERS as i64;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for producer in producers {
        latencies.extend(producer.await.context("producer task")??);
    }
    let produced_for = started.elapsed();
    latencies.sort_unstable();
    let commits = latencies.len() as u64;
    Ok(Produced {
        commits,
        per_sec: commits as f64 / produced_for.as_secs_f64(),
        latencies,
    })
}
