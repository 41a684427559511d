//! The embedded store: one SQLite file in WAL mode. Reads and the writes outside the
//! dispatch path go through an sqlx pool; the dispatch path's writes through [`writer`].
//!
//! SQLite has one writer at a time, so claims cannot collide.

mod watch;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::Notify;

use super::error::QueryContext;
use super::filters::{push_delivery_filter, push_event_filter};
use super::rows::{self, column_error, StoreRow};
use super::time::{from_sqlite_text, sqlite_offset, sqlite_offset_back, SQLITE_NOW};
use super::{
    Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion, CompletionResult, Delivery,
    DeliveryFilter, Event, EventDetail, EventFilter, EventStore, FanOutReport, FanOutRequest,
    FanOutStarts, Instance, NewEvent, OpenOptions, Quarantine, RedriveSelection, Router,
    StoreError, StoreResult,
};
use watch::NewEventWatch;
use writer::Writer;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

const EVENT_COLUMNS: &str = "event_id, event_target, event_type, entity_type, entity_id, \
     event_data, event_status, status_reason, idempotency_key, headers, created_at";

pub struct SqliteStore {
    /// Reads, and the few writes outside the dispatch path (leases renewed, heartbeats,
    /// quarantines).
    pool: SqlitePool,
    /// Fan-out, claims, outcomes, appends and redrives.
    writer: Writer,
    /// Wakes a listening dispatcher on new events; watches while the store lives.
    watch: std::sync::Mutex<Option<NewEventWatch>>,
    path: PathBuf,
}

impl SqliteStore {
    pub async fn open(path: &Path, options: OpenOptions) -> StoreResult<Self> {
        if !options.create_if_missing && !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(options.create_if_missing)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an appended event or a recorded effect survives power loss, not just a
            // process crash. Batching amortises the extra fsync.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let refused = |source| StoreError::Connect {
            url: format!("sqlite://{}", path.display()),
            source,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(connect)
            .await
            .map_err(refused)?;
        // After the pool, which creates the file and puts it in WAL mode.
        let writer = Writer::open(path).map_err(|source| StoreError::OpenWriter {
            url: format!("sqlite://{}", path.display()),
            source,
        })?;
        Ok(SqliteStore {
            pool,
            writer,
            watch: std::sync::Mutex::new(None),
            path: path.to_path_buf(),
        })
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

impl StoreRow for SqliteRow {
    fn text(&self, column: &str) -> StoreResult<String> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
        // A TEXT column takes any bytes, and a BLOB too: say which column holds what.
        self.try_get(column)
            .or_else(|err| match self.try_get::<Option<Vec<u8>>, _>(column) {
                Ok(bytes) => bytes
                    .map(|bytes| {
                        String::from_utf8(bytes).map_err(|bad| {
                            StoreError::Corrupt(format!("{column} is not valid UTF-8 ({bad})"))
                        })
                    })
                    .transpose(),
                Err(_) => Err(column_error(column, err)),
            })
    }
    fn shown_text(&self, column: &str) -> StoreResult<Option<String>> {
        self.try_get(column).or_else(|err| {
            self.try_get::<Option<Vec<u8>>, _>(column)
                .map(|bytes| bytes.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
                .map_err(|_| column_error(column, err))
        })
    }
    fn int(&self, column: &str) -> StoreResult<i64> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn flag(&self, column: &str) -> StoreResult<bool> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>> {
        from_sqlite_text(&self.text(column)?)
    }
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        self.opt_text(column)?
            .map(|text| from_sqlite_text(&text))
            .transpose()
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                url: self.url(),
                source,
            })
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let has_table: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await
        .doing("checking the schema version")?;
        let applied: Vec<i64> = if has_table {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .doing("checking the schema version")?
        } else {
            Vec::new()
        };
        super::pending_migrations(&MIGRATOR, &applied, self.url())
    }

    async fn append_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
        self.writer.append_batch(events).await
    }

    async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, FanOutStarts)> {
        // One writer makes a claim cheap here; SQLite queues nothing behind held lanes.
        let (report, now) = self.writer.fan_out_starting(request, start, router).await?;
        Ok((
            report,
            FanOutStarts {
                now,
                queued: Vec::new(),
            },
        ))
    }

    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        self.writer.claim(request).await
    }

    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        self.writer.complete(completions).await
    }

    async fn backlog(&self) -> StoreResult<Backlog> {
        let row = sqlx::query(
            "SELECT \
             (SELECT count(*) FROM events WHERE event_status = 'READY') AS ready_events, \
             (SELECT count(*) FROM herald_deliveries WHERE status = 'RETRY') AS waiting_retry",
        )
        .fetch_one(&self.pool)
        .await
        .doing("counting the backlog")?;
        rows::backlog(&row)
    }

    async fn release(&self, owner: &str, delivery_ids: &[i64]) -> StoreResult<u64> {
        let released = sqlx::query(&format!(
            "UPDATE herald_deliveries SET locked_by = NULL, locked_until = NULL, \
             attempts = attempts - 1, next_attempt_at = min(next_attempt_at, {SQLITE_NOW}) \
             WHERE locked_by = $1 \
             AND delivery_id IN (SELECT value FROM json_each($2)) \
             AND status IN ('PENDING', 'RETRY')",
        ))
        .bind(owner)
        .bind(id_list(delivery_ids))
        .execute(&self.pool)
        .await
        .doing("releasing leases")?;
        Ok(released.rows_affected())
    }

    async fn renew_leases(
        &self,
        owner: &str,
        delivery_ids: &[i64],
        lease: Duration,
    ) -> StoreResult<u64> {
        if delivery_ids.is_empty() {
            return Ok(0);
        }
        let renewed = sqlx::query(
            "UPDATE herald_deliveries \
             SET locked_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $1) \
             WHERE locked_by = $2 AND delivery_id IN (SELECT value FROM json_each($3)) \
             AND status IN ('PENDING', 'RETRY')",
        )
        .bind(sqlite_offset(lease))
        .bind(owner)
        .bind(id_list(delivery_ids))
        .execute(&self.pool)
        .await
        .doing("renewing leases")?;
        Ok(renewed.rows_affected())
    }

    async fn heartbeat(&self, instance_id: &str, version: &str) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO herald_instances (instance_id, version) VALUES ($1, $2) \
             ON CONFLICT (instance_id) DO UPDATE SET last_seen = {SQLITE_NOW}, \
             version = excluded.version"
        ))
        .bind(instance_id)
        .bind(version)
        .execute(&self.pool)
        .await
        .doing("recording a heartbeat")?;
        Ok(())
    }

    async fn quarantine(&self, plugin: &str, reason: &str, faults: u32) -> StoreResult<bool> {
        let done = sqlx::query(super::QUARANTINE_SQL)
            .bind(plugin)
            .bind(reason)
            .bind(i64::from(faults))
            .execute(&self.pool)
            .await
            .doing("quarantining a plugin")?;
        Ok(done.rows_affected() > 0)
    }

    async fn quarantined(&self) -> StoreResult<Vec<Quarantine>> {
        let rows = sqlx::query(super::QUARANTINED_SQL)
            .fetch_all(&self.pool)
            .await
            .doing("listing quarantined plugins")?;
        rows.iter().map(rows::quarantine).collect()
    }

    async fn resume(&self, plugin: &str) -> StoreResult<bool> {
        let done = sqlx::query(super::RESUME_SQL)
            .bind(plugin)
            .execute(&self.pool)
            .await
            .doing("resuming a plugin")?;
        Ok(done.rows_affected() > 0)
    }

    async fn deregister(&self, instance_id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM herald_instances WHERE instance_id = $1")
            .bind(instance_id)
            .execute(&self.pool)
            .await
            .doing("deregistering an instance")?;
        Ok(())
    }

    async fn watch_new_events(&self, wake: Weak<Notify>) -> StoreResult<bool> {
        let watch = watch::watch_new_events(&self.path, wake)?;
        // A new watch replaces the one before: one dispatcher listens per store.
        *self.watch.lock().map_err(|_| {
            StoreError::Invariant("the new-event watch's lock is poisoned".into())
        })? = Some(watch);
        Ok(true)
    }

    async fn instances(&self, within: Duration) -> StoreResult<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT i.instance_id, i.version, i.started_at, i.last_seen, \
             (SELECT count(*) FROM herald_deliveries d WHERE d.locked_by = i.instance_id \
              AND d.locked_until > {SQLITE_NOW} AND d.status IN ('PENDING', 'RETRY')) \
              AS leases_held \
             FROM herald_instances i \
             WHERE i.last_seen >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $1) \
             ORDER BY i.started_at, i.instance_id"
        ))
        .bind(sqlite_offset_back(within))
        .fetch_all(&self.pool)
        .await
        .doing("listing instances")?;
        rows.iter().map(rows::instance).collect()
    }

    async fn list_events(&self, filter: &EventFilter) -> StoreResult<Vec<Event>> {
        let mut query = QueryBuilder::<Sqlite>::new(format!("SELECT {EVENT_COLUMNS} FROM events"));
        push_event_filter(&mut query, filter);
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .doing("listing events")?;
        rows.iter().map(rows::event).collect()
    }

    async fn event_detail(&self, event_id: i64) -> StoreResult<Option<EventDetail>> {
        let row = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"
        ))
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .doing("reading an event")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deliveries =
            sqlx::query("SELECT * FROM herald_deliveries WHERE event_id = $1 ORDER BY delivery_id")
                .bind(event_id)
                .fetch_all(&self.pool)
                .await
                .doing("reading an event's deliveries")?;
        let attempts =
            // Through the deliveries: no index of the attempts names the event (migration 0006).
            sqlx::query(
                "SELECT * FROM herald_attempts WHERE delivery_id IN (\
                   SELECT delivery_id FROM herald_deliveries WHERE event_id = $1) \
                 ORDER BY attempt_id",
            )
                .bind(event_id)
                .fetch_all(&self.pool)
                .await
                .doing("reading an event's attempts")?;
        Ok(Some(EventDetail {
            event: rows::event(&row)?,
            deliveries: deliveries
                .iter()
                .map(rows::delivery)
                .collect::<StoreResult<_>>()?,
            attempts: attempts
                .iter()
                .map(rows::attempt)
                .collect::<StoreResult<_>>()?,
        }))
    }

    async fn list_deliveries(&self, filter: &DeliveryFilter) -> StoreResult<Vec<Delivery>> {
        let mut query = QueryBuilder::<Sqlite>::new("SELECT * FROM herald_deliveries");
        push_delivery_filter(&mut query, filter);
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .doing("listing deliveries")?;
        rows.iter().map(rows::delivery).collect()
    }

    async fn redrive(&self, selection: &RedriveSelection) -> StoreResult<u64> {
        self.writer.redrive(selection).await
    }
}

/// A list of ids as one JSON array parameter, read back with `json_each`.
fn id_list(ids: &[i64]) -> String {
    let items: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(","))
}
