//! The event store: the producers' `events` table plus the host-owned delivery books.
//!
//! One trait, two backends (SQLite, the embedded default; Postgres, for production and for
//! several instances). Both implement the same semantics and run the same test suite.

mod batch;
mod error;
mod fan_out;
mod filters;
mod model;
pub mod postgres;
mod rows;
pub mod sqlite;
mod time;
mod url;

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

pub use error::{StoreError, StoreResult};
pub use model::*;
pub use url::{redact_url, StoreUrl};

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Create the SQLite file when it does not exist (only `init` and `migrate` do).
    pub create_if_missing: bool,
    /// Postgres: lease and record fan-out's started one-route deliveries per batch
    /// (migration 0013). `serve` turns it on unless [`BATCH_LEDGER_ENV`] says otherwise;
    /// every instance reads both shapes whatever it writes.
    pub batch_ledger: bool,
}

/// The environment variable that can turn the Postgres batch ledger off for `serve` (and
/// the bench): `0`, `false` or `off`; `1`, `true`, `on` or unset leave it on.
pub const BATCH_LEDGER_ENV: &str = "HERALD_BATCH_LEDGER";

/// Whether [`BATCH_LEDGER_ENV`] leaves the batch ledger on; another value is an error that
/// names the variable.
pub fn batch_ledger_from_env() -> StoreResult<bool> {
    match std::env::var(BATCH_LEDGER_ENV) {
        Err(_) => Ok(true),
        Ok(value) => match value.trim().to_ascii_lowercase().as_str() {
            "0" | "false" | "off" => Ok(false),
            "" | "1" | "true" | "on" => Ok(true),
            _ => Err(StoreError::Invalid(format!(
                "{BATCH_LEDGER_ENV}={value:?}: expected 1, true, on, 0, false or off"
            ))),
        },
    }
}

#[async_trait]
pub trait EventStore: Send + Sync {
    fn backend(&self) -> Backend;

    /// Apply the embedded migrations; running it again is a no-op.
    async fn migrate(&self) -> StoreResult<()>;

    /// Fails with [`StoreError::NotMigrated`] when the schema is behind this binary.
    async fn check_schema(&self) -> StoreResult<()>;

    /// Append one event; returns its id.
    async fn append(&self, event: &NewEvent) -> StoreResult<i64> {
        let ids = self.append_batch(std::slice::from_ref(event)).await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| StoreError::Invariant("append returned no id".into()))
    }

    /// Append events in one transaction: all or none. Ids are returned in input order.
    async fn append_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>>;

    /// Turn READY events that have no deliveries yet into deliveries, oldest first, up to
    /// `request.limit` events. Events without a route become SKIPPED, repeated producer
    /// keys DUPLICATE, malformed events (unreadable columns, payloads over
    /// `request.max_event_bytes`) DEAD, each with the reason. One bad row never fails
    /// the pass.
    async fn fan_out(
        &self,
        request: &FanOutRequest,
        router: &Router<'_>,
    ) -> StoreResult<FanOutReport> {
        Ok(self.fan_out_starting(request, None, router).await?.0)
    }

    /// [`EventStore::fan_out`], and with `start` lease the new deliveries that are due at
    /// once (route not paused; on an ordered route, no earlier open delivery of the entity)
    /// to `start.owner` as their first attempt, up to `start.limit`, and return them to
    /// run now: one transaction instead of a fan-out and a claim.
    ///
    /// A store may also lease, up to `request.queue_behind`, more to queue: due ones
    /// beyond `start.limit`, and new deliveries of ordered lanes whose every earlier open
    /// delivery `start.owner` holds, each behind the lane's latest: the owner runs it once
    /// that one closes, with no claim.
    async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, FanOutStarts)>;

    /// Lease due deliveries. A delivery on an ordered route is only due when no earlier
    /// event of the same entity still has an open delivery on that route.
    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>>;

    /// Whether fan-out should take no more events than the caller can lease: true for a
    /// store that leases started deliveries per batch and pays a row for any other.
    fn paces_fan_out(&self) -> bool {
        false
    }

    /// Write each completion in one transaction with its attempt row, ledger entry,
    /// emitted events and the event's new status.
    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>>;

    /// Extend the leases `owner` still holds on these deliveries by `lease` from now, so
    /// long work is not taken over. Returns how many were extended.
    async fn renew_leases(
        &self,
        owner: &str,
        delivery_ids: &[i64],
        lease: Duration,
    ) -> StoreResult<u64>;

    /// Record that `instance_id` is alive (insert or refresh its row).
    async fn heartbeat(&self, instance_id: &str, version: &str) -> StoreResult<()>;

    /// Remove an instance's row on a clean stop.
    async fn deregister(&self, instance_id: &str) -> StoreResult<()>;

    /// Instances seen within `within`, with the leases each holds, oldest first.
    async fn instances(&self, within: Duration) -> StoreResult<Vec<Instance>>;

    /// Wake `wake` whenever events are inserted, for as long as `wake` lives. Returns
    /// false when the backend cannot notify: polling alone finds new events. Where
    /// producers send wake-ups only on request (Postgres), `wake` hears them only between
    /// [`EventStore::request_wake_ups`] and the next fan-out that stops them.
    async fn watch_new_events(&self, wake: Weak<Notify>) -> StoreResult<bool> {
        let _ = wake;
        Ok(false)
    }

    /// Before a dispatcher sleeps for want of new events: ask producers to send the
    /// wake-ups of [`EventStore::watch_new_events`], and say whether a producer transaction
    /// that may have inserted events without seeing the request is still in flight (what
    /// it commits, no wake-up announces). Asking again only checks again. Backends whose
    /// wake-ups need no request ask nothing.
    async fn request_wake_ups(&self) -> StoreResult<WakeUpRequest> {
        Ok(WakeUpRequest::Unneeded)
    }

    /// How much work waits: READY events and deliveries waiting for a retry. Both counts
    /// walk a partial index, so a scrape stays cheap while the backlog is small.
    async fn backlog(&self) -> StoreResult<Backlog>;

    /// Quarantine `plugin` unless it already is. Returns whether this call did it, so
    /// only one instance reports it.
    async fn quarantine(&self, plugin: &str, reason: &str, faults: u32) -> StoreResult<bool>;

    /// Every quarantined plugin, oldest first.
    async fn quarantined(&self) -> StoreResult<Vec<Quarantine>>;

    /// Lift a quarantine. Returns whether `plugin` was quarantined.
    async fn resume(&self, plugin: &str) -> StoreResult<bool>;

    /// Give leases back without counting the attempt (graceful shutdown).
    async fn release(&self, owner: &str, delivery_ids: &[i64]) -> StoreResult<u64>;

    async fn list_events(&self, filter: &EventFilter) -> StoreResult<Vec<Event>>;

    async fn event_detail(&self, event_id: i64) -> StoreResult<Option<EventDetail>>;

    /// The aggregate's log, oldest first.
    async fn entity_history(&self, entity_type: &str, entity_id: &str) -> StoreResult<Vec<Event>> {
        self.list_events(&EventFilter {
            entity: Some((entity_type.to_string(), entity_id.to_string())),
            oldest_first: true,
            limit: u32::MAX,
            ..EventFilter::default()
        })
        .await
    }

    async fn list_deliveries(&self, filter: &DeliveryFilter) -> StoreResult<Vec<Delivery>>;

    /// Send DEAD deliveries again: due now, with a fresh attempt budget. Their events go
    /// back to READY. Returns how many were redriven.
    async fn redrive(&self, selection: &RedriveSelection) -> StoreResult<u64>;
}

/// How a claim learns that its delivery's key is already done, as the `ledger_` columns
/// of a claim row (see `rows::ledger`); the same columns on both backends, each joining
/// `i` (the ledger row) and `a` (the attempt) to the claimed delivery `d` its own way. A
/// producer's key is looked up in the ledger, which outlives the events that used it. A
/// derived key names this one delivery, so its own attempts log is its ledger: the first
/// attempt that delivered or skipped it.
pub(crate) const COMPLETED_KEY_COLUMNS: &str = "\
     CASE WHEN i.outcome IS NULL THEN a.outcome ELSE i.outcome END AS ledger_outcome, \
     CASE WHEN i.outcome IS NULL THEN a.event_id ELSE i.event_id END AS ledger_event_id, \
     CASE WHEN i.outcome IS NULL THEN a.detail ELSE i.detail END AS ledger_detail, \
     CASE WHEN i.outcome IS NULL THEN a.recorded_at ELSE i.completed_at END \
       AS ledger_completed_at";

/// Quarantine statements; the same SQL on both backends.
pub(crate) const QUARANTINE_SQL: &str = "INSERT INTO herald_quarantine (plugin, reason, faults) \
     VALUES ($1, $2, $3) ON CONFLICT (plugin) DO NOTHING";
pub(crate) const QUARANTINED_SQL: &str =
    "SELECT plugin, reason, faults, since FROM herald_quarantine ORDER BY since, plugin";
pub(crate) const RESUME_SQL: &str = "DELETE FROM herald_quarantine WHERE plugin = $1";

/// Open the store a URL names: `sqlite://PATH` or `postgres://...`.
pub async fn open(url: &str, options: OpenOptions) -> StoreResult<Box<dyn EventStore>> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => Ok(Box::new(sqlite::SqliteStore::open(&path, options).await?)),
        StoreUrl::Postgres(url) => Ok(Box::new(
            postgres::PostgresStore::connect(&url, options.batch_ledger).await?,
        )),
    }
}

/// Open the store a URL names, creating a missing SQLite file, and bring its schema up to
/// date: what `init`, `migrate` and `serve` do (with the batch ledger as
/// [`BATCH_LEDGER_ENV`] says).
pub async fn open_migrated(url: &str) -> StoreResult<Box<dyn EventStore>> {
    let store = open(
        url,
        OpenOptions {
            create_if_missing: true,
            batch_ledger: batch_ledger_from_env()?,
        },
    )
    .await?;
    store.migrate().await?;
    Ok(store)
}

/// How many embedded migrations the database has not applied yet, as an error when any.
pub(crate) fn pending_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: &[i64],
    url: String,
) -> StoreResult<()> {
    let pending = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .count();
    if pending == 0 {
        Ok(())
    } else {
        Err(StoreError::NotMigrated { url, pending })
    }
}

/// The idempotency key of a delivery: the producer's when given (shared by every route of
/// the event, the ledger is per route), otherwise derived from what never changes.
pub fn delivery_key(producer_key: Option<&str>, event_id: i64, route: &str) -> String {
    match producer_key {
        Some(key) => key.to_string(),
        None => format!("herald-{event_id}-{route}"),
    }
}

/// Whether a delivery's key is the one [`delivery_key`] derives for it, not a producer's.
pub fn is_derived_key(key: &str, event_id: i64, route: &str) -> bool {
    key == delivery_key(None, event_id, route)
}
