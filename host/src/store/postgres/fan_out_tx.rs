//! Fan-out's transactions, each begun in the round trip that committed the one before.
//!
//! A drain runs fan-out one pass at a time, so every round trip of a pass is on its
//! critical path, and on a busy two-core machine each one waits for a core: a `BEGIN` of
//! its own cost 0.8–0.9 ms of a 7–9 ms pass (docs/benchmarks-history.md, the
//! twenty-fifth refresh). A pass that took events therefore commits with
//! `COMMIT; BEGIN; …` in one simple query and leaves the new transaction for the next
//! pass. The kept transaction has run no statement but `SET LOCAL`, so it holds no
//! snapshot, no lock and no transaction id (`pg_stat_activity` shows its connection
//! "idle in transaction" until the next pass); the next pass gives it up (rolls it back)
//! and begins its own when it is older than [`KEPT_FOR`], since its `now()`, which
//! fan-out's leases are measured from, is the moment it began.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use super::plans::PLAN_ONCE;
use crate::store::error::QueryContext;
use crate::store::StoreResult;

/// How old a kept transaction may be when the next pass takes it. A drain's next pass
/// starts within a few milliseconds; a pass that waited longer begins afresh, so a lease
/// starts at most this much before its pass ran.
const KEPT_FOR: Duration = Duration::from_millis(20);

pub type FanOutTx = Transaction<'static, Postgres>;

/// The transaction the last pass began as it committed, if any.
#[derive(Default)]
pub struct NextFanOut {
    kept: Mutex<Option<(Instant, FanOutTx)>>,
}

impl NextFanOut {
    /// A transaction for a fan-out pass: the one kept by the last pass when it is recent,
    /// else a new one.
    pub async fn begin(&self, pool: &PgPool) -> StoreResult<FanOutTx> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((began, tx)) = kept {
            if began.elapsed() <= KEPT_FOR {
                return Ok(tx);
            }
        }
        pool.begin_with(PLAN_ONCE).await.doing("starting fan-out")
    }

    /// Commit a pass, beginning the next pass's transaction in the same round trip. An
    /// error of the commit is the pass's; one of the chained begin only means the next
    /// pass begins its own (dropping `tx` rolls back whatever it began).
    pub async fn commit(&self, mut tx: FanOutTx) -> StoreResult<()> {
        let mut chained = true;
        {
            let mut results = sqlx::raw_sql(COMMIT_AND_BEGIN.as_str()).execute_many(&mut *tx);
            match results.next().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err).doing("committing fan-out"),
                None => {
                    return Err(sqlx::Error::Protocol(
                        "no reply to the fan-out's commit".to_owned(),
                    ))
                    .doing("committing fan-out")
                }
            }
            let mut begun = 0;
            while let Some(result) = results.next().await {
                chained &= result.is_ok();
                begun += 1;
            }
            chained &= begun == plan_once_statements();
        }
        if chained {
            *self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), tx));
        }
        Ok(())
    }
}

/// The commit, then [`PLAN_ONCE`]'s statements.
static COMMIT_AND_BEGIN: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("COMMIT; {PLAN_ONCE}"));

/// How many statements [`PLAN_ONCE`] is (`BEGIN` and its settings), each answered apart.
fn plan_once_statements() -> usize {
    PLAN_ONCE
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .count()
}
