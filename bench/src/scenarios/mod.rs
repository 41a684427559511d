//! The scenarios. Each builds its own database per backend, measures, tears it down
//! and returns its table; a failure on one backend is reported in its row and the run goes
//! on (the exit code says something failed).

mod batch_ledger;
mod ceiling;
mod drain;
mod hotswap;
mod latency;
mod ledger_ceiling;
mod neighbour;
mod overhead;
mod producers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::cpu::CpuTimes;
use crate::report::Table;
use crate::setup::{Backend, Db, Env};
use crate::tuning::Sizes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Scenario {
    Ceiling,
    LedgerCeiling,
    BatchLedger,
    Noop,
    Webhook,
    Latency,
    Overhead,
    Hotswap,
    Neighbour,
    Producers,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::Ceiling,
        Scenario::LedgerCeiling,
        Scenario::BatchLedger,
        Scenario::Noop,
        Scenario::Webhook,
        Scenario::Latency,
        Scenario::Overhead,
        Scenario::Hotswap,
        Scenario::Neighbour,
        Scenario::Producers,
    ];
}

/// What the scenarios share: sizes, the built plugins, and figures later scenarios
/// compare with.
pub struct Ctx {
    pub sizes: Sizes,
    /// Where `tests/build-plugins` put the plugins.
    pub plugins: PathBuf,
    /// Rows/s of the ceiling relay per backend, for the drains' ratio.
    pub ceiling: HashMap<Backend, f64>,
    /// Rows/s of the ledger ceiling's relay per backend, for the drains' second ratio.
    pub ledger_ceiling: HashMap<Backend, f64>,
    pub failures: usize,
}

impl Ctx {
    /// Count a failed measurement, say it on stderr and put it in the table.
    fn fail(&mut self, table: &mut Table, first: &str, err: &anyhow::Error) {
        self.failures += 1;
        eprintln!("{first}: {err:#}");
        table.failed(first, err);
    }
}

/// Run one scenario; its table ends with the machine's CPU shares over the run.
pub async fn run(ctx: &mut Ctx, scenario: Scenario, backends: &[Backend]) -> Table {
    let before = CpuTimes::now();
    let mut table = run_one(ctx, scenario, backends).await;
    let shares = before.zip(CpuTimes::now());
    if let Some(shares) = shares.and_then(|(before, after)| before.share_until(&after)) {
        table.note(format!(
            "The machine's CPU over the whole scenario (set-up too, every process): {shares}."
        ));
    }
    table
}

async fn run_one(ctx: &mut Ctx, scenario: Scenario, backends: &[Backend]) -> Table {
    match scenario {
        Scenario::Ceiling => ceiling::table(ctx, backends).await,
        Scenario::LedgerCeiling => ledger_ceiling::table(ctx, backends).await,
        Scenario::BatchLedger => batch_ledger::table(ctx, backends).await,
        Scenario::Noop => drain::table(ctx, backends, drain::Plugin::Noop).await,
        Scenario::Webhook => drain::table(ctx, backends, drain::Plugin::Webhook).await,
        Scenario::Latency => latency::table(ctx, backends).await,
        Scenario::Overhead => overhead::table(ctx).await,
        Scenario::Hotswap => hotswap::table(ctx, backends).await,
        Scenario::Neighbour => neighbour::table(ctx, backends).await,
        Scenario::Producers => producers::table(ctx, backends).await,
    }
}

/// Run `measure` on a fresh [`Env`] and tear the env down whatever the outcome.
async fn with_env<T, F>(
    ctx: &Ctx,
    backend: Backend,
    scenario: &str,
    measure: F,
) -> anyhow::Result<T>
where
    F: AsyncFnOnce(&Env) -> anyhow::Result<T>,
{
    let env = Env::create(backend, scenario, ctx.sizes.payload_bytes).await?;
    let result = measure(&env).await;
    env.finish().await;
    result
}

/// `[dispatch]` text on one line, for a table's note.
fn one_line(toml: &str) -> String {
    toml.lines().collect::<Vec<_>>().join(", ")
}

/// Preload events `1..=n` of `event_type` into `table`, in chunks, with a progress bar.
async fn preload(env: &Env, table: &str, event_type: &str, n: u64) -> anyhow::Result<()> {
    preload_mixed(env, table, event_type, None, n).await
}

/// [`preload`], with every `every`-th event of `other_type` (see [`crate::setup::Db::insert_mixed`]).
async fn preload_mixed(
    env: &Env,
    table: &str,
    event_type: &str,
    other: Option<(&str, i64)>,
    n: u64,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let bar = crate::progress::bar(n, &format!("insert {} {table}", env.backend.name()));
    let mut first = 1u64;
    while first <= n {
        let last = (first + crate::tuning::PRELOAD_CHUNK - 1).min(n);
        env.db
            .insert_mixed(
                table,
                event_type,
                other,
                (first as i64, last as i64),
                env.payload_bytes,
            )
            .await
            .with_context(|| format!("inserting rows {first}..={last} into {table}"))?;
        bar.set_position(last);
        first = last + 1;
    }
    bar.finish_and_clear();
    if env.backend == Backend::Postgres {
        // What autovacuum would have done to a table this size by now.
        env.db.execute(&format!("ANALYZE {table}")).await?;
    }
    Ok(())
}

/// Wait until nothing is READY any more, at most `bound`.
async fn settle(db: &Db, bound: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        if db.ready_events().await? == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "events still READY after {bound:?}: {}",
                db.status_summary().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Insert one event per `seq`, all at once, each on a connection of the pool: a warm-up
/// that makes the pool open its connections before a clock runs.
async fn insert_at_once(
    db: &Db,
    event_type: &'static str,
    seqs: std::ops::RangeInclusive<i64>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let inserts: Vec<_> = seqs
        .map(|seq| {
            let db = db.clone();
            tokio::spawn(async move { db.insert_one(event_type, seq).await })
        })
        .collect();
    for insert in inserts {
        insert
            .await
            .context("warm-up task")?
            .context("warm-up insert")?;
    }
    Ok(())
}
