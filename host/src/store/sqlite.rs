//! The embedded store: one SQLite file in WAL mode.
//!
//! SQLite has one writer at a time, so claims cannot collide; every read-then-write
//! transaction starts with `BEGIN IMMEDIATE` so it takes the write lock up front instead of
//! failing to upgrade a stale read snapshot.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, MutexGuard};

use super::batch::{self, DeliveryUpdate, NewDelivery, Recorded, Settlement};
use super::error::QueryContext;
use super::fan_out::Candidate;
use super::filters::{push_delivery_filter, push_event_filter};
use super::model::EventStatus;
use super::rows::{self, column_error, StoreRow};
use super::time::{
    from_sqlite_text, sqlite_offset, sqlite_offset_back, to_sqlite_text, SQLITE_NOW,
};
use super::{
    Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion, CompletionResult, Delivery,
    DeliveryFilter, Event, EventDetail, EventFilter, EventStore, FanOutReport, FanOutRequest,
    Instance, LedgerEntry, NewEvent, OpenOptions, Quarantine, RedriveSelection, Router, StoreError,
    StoreResult, COMPLETED_KEY_COLUMNS,
};

/// The joins [`COMPLETED_KEY_COLUMNS`] reads. SQLite runs a join as nested loops, so each
/// is one look-up per claimed delivery: the ledger's key, and the attempt by its rowid.
const COMPLETED_KEY_JOINS: &str = " \
     LEFT JOIN herald_idempotency i ON i.route = d.route \
       AND i.idempotency_key = d.idempotency_key \
     LEFT JOIN herald_attempts a ON a.attempt_id = (SELECT min(x.attempt_id) \
       FROM herald_attempts x WHERE x.delivery_id = d.delivery_id \
         AND x.outcome IN ('DELIVERED', 'SKIPPED'))";

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

const EVENT_COLUMNS: &str = "event_id, event_target, event_type, entity_type, entity_id, \
     event_data, event_status, status_reason, idempotency_key, headers, created_at";

pub struct SqliteStore {
    /// Reads, and the few writes outside the dispatch path (producers, operators).
    pool: SqlitePool,
    /// The one connection of fan-out, claims and outcomes. A SQLite connection drops its
    /// page cache whenever another connection has written since its last transaction;
    /// with these writes spread over a pool, nearly every transaction began by reading
    /// its pages again (half of a drain's `pread` calls, 8 % of its throughput).
    writer: SqlitePool,
    path: PathBuf,
    write_turn: Mutex<()>,
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
            .connect_with(connect.clone())
            .await
            .map_err(refused)?;
        // Kept open for the store's life: its page cache is what it is for.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect)
            .await
            .map_err(refused)?;
        Ok(SqliteStore {
            pool,
            writer,
            path: path.to_path_buf(),
            write_turn: Mutex::new(()),
        })
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// A write transaction, and this process's turn to write. SQLite has one writer; when
    /// this process's own tasks (fan-out, claims, outcome writers) queue here instead of
    /// in SQLite's busy handler, which sleeps and retries, a contended write starts the
    /// moment the previous one commits.
    async fn begin_write(
        &self,
    ) -> StoreResult<(MutexGuard<'_, ()>, sqlx::Transaction<'static, Sqlite>)> {
        let turn = self.write_turn.lock().await;
        let tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .doing("starting a write transaction")?;
        Ok((turn, tx))
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

async fn insert_event(conn: &mut SqliteConnection, event: &NewEvent) -> StoreResult<i64> {
    event.validate().map_err(StoreError::Invalid)?;
    sqlx::query_scalar(
        "INSERT INTO events (event_target, event_type, entity_type, entity_id, event_data, \
         idempotency_key, headers) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING event_id",
    )
    .bind(&event.event_target)
    .bind(&event.event_type)
    .bind(&event.entity_type)
    .bind(&event.entity_id)
    .bind(event.event_data.to_string())
    .bind(&event.idempotency_key)
    .bind(event.headers_json())
    .fetch_one(conn)
    .await
    .doing("appending an event")
}

/// Rows per multi-row INSERT: well under SQLite's limit of 32,766 bound parameters.
const ROWS_PER_INSERT: usize = 500;

/// Take the next new events, oldest first, and move the fan-out cursor past them (in the
/// caller's transaction, so a failed pass leaves them new). An event that is not READY
/// when fan-out reaches it is passed over; no path makes an event READY again.
/// Sizes are counted in bytes (`CAST AS BLOB`; `length` of text counts characters), and a
/// payload over the limit is not read at all.
async fn take_candidates(
    conn: &mut SqliteConnection,
    request: &FanOutRequest,
) -> StoreResult<Vec<Candidate>> {
    let rows = sqlx::query(
        "SELECT event_id, event_status, event_type, event_target, entity_type, entity_id, \
           coalesce(length(CAST(event_data AS BLOB)), 0) AS event_data_bytes, \
           CASE WHEN length(CAST(event_data AS BLOB)) <= $2 THEN event_data END AS event_data, \
           coalesce(length(CAST(headers AS BLOB)), 0) AS headers_bytes, \
           CASE WHEN length(CAST(headers AS BLOB)) <= $2 THEN headers END AS headers, \
           idempotency_key, created_at \
         FROM events WHERE event_id > (SELECT last_event_id FROM herald_fan_out_cursor) \
         ORDER BY event_id LIMIT $1",
    )
    .bind(i64::from(request.limit))
    .bind(request.max_bytes_sql())
    .fetch_all(&mut *conn)
    .await
    .doing("reading new events")?;
    let Some(last) = rows.last() else {
        return Ok(Vec::new());
    };
    sqlx::query("UPDATE herald_fan_out_cursor SET last_event_id = $1")
        .bind(last.int("event_id")?)
        .execute(&mut *conn)
        .await
        .doing("moving the fan-out cursor")?;
    let mut candidates = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.text("event_status")? == EventStatus::Ready.as_str() {
            candidates.push(rows::candidate(row, request.max_event_bytes)?);
        }
    }
    Ok(candidates)
}

/// For each candidate with a producer key, the earliest other event holding that key: an
/// earlier event, or a later one already settled. Either way the candidate repeats it.
/// (Events reach fan-out in the order they committed: SQLite has one writer, and
/// AUTOINCREMENT never hands out an id twice. One statement per key: SQLite runs
/// in-process.)
async fn key_holders(
    conn: &mut SqliteConnection,
    candidates: &[Candidate],
) -> StoreResult<HashMap<i64, i64>> {
    let mut holders = HashMap::new();
    for candidate in candidates {
        let Some(key) = &candidate.idempotency_key else {
            continue;
        };
        let holder: Option<i64> = sqlx::query_scalar(
            "SELECT event_id FROM events o WHERE idempotency_key = $1 \
             AND event_id <> $2 AND event_status <> 'DUPLICATE' \
             AND (event_id < $2 OR event_status <> 'READY') \
             ORDER BY event_id LIMIT 1",
        )
        .bind(key)
        .bind(candidate.head.event_id)
        .fetch_optional(&mut *conn)
        .await
        .doing("checking an idempotency key")?;
        if let Some(holder) = holder {
            holders.insert(candidate.head.event_id, holder);
        }
    }
    Ok(holders)
}

/// Which of `candidates` (indexes into `deliveries`; only ordered routes can be) wait
/// behind an earlier open delivery of their entity on their route.
async fn blocked_lanes(
    conn: &mut SqliteConnection,
    deliveries: &[NewDelivery],
    candidates: &[usize],
) -> StoreResult<HashSet<usize>> {
    let ordered: Vec<serde_json::Value> = candidates
        .iter()
        .filter_map(|&i| deliveries.get(i).map(|d| (i, d)))
        .filter(|(_, d)| d.ordered)
        .map(|(i, d)| {
            serde_json::json!({
                "i": i,
                "route": d.route,
                "entity_type": d.entity_type,
                "entity_id": d.entity_id,
                "event_id": d.event_id,
            })
        })
        .collect();
    if ordered.is_empty() {
        return Ok(HashSet::new());
    }
    let blocked: Vec<i64> = sqlx::query_scalar(
        "SELECT json_extract(u.value, '$.i') FROM json_each($1) u \
         WHERE EXISTS (SELECT 1 FROM herald_deliveries p \
           WHERE p.route = json_extract(u.value, '$.route') \
           AND p.entity_type = json_extract(u.value, '$.entity_type') \
           AND p.entity_id = json_extract(u.value, '$.entity_id') \
           AND p.event_id < json_extract(u.value, '$.event_id') \
           AND p.status IN ('PENDING', 'RETRY'))",
    )
    .bind(serde_json::Value::from(ordered).to_string())
    .fetch_all(&mut *conn)
    .await
    .doing("checking the entities' open deliveries")?;
    Ok(blocked
        .into_iter()
        .filter_map(|i| usize::try_from(i).ok())
        .collect())
}

/// Insert the deliveries, those marked `start` leased to `start`'s owner on their first
/// attempt. Returns the ids of the started ones by (event, route).
async fn insert_deliveries(
    conn: &mut SqliteConnection,
    deliveries: &[NewDelivery],
    start: Option<&ClaimRequest>,
) -> StoreResult<HashMap<(i64, String), i64>> {
    // Only the started deliveries' ids are needed, and each row a statement returns is a
    // hand-off from SQLite's thread: the rest go in without RETURNING. Kept apart, a full
    // chunk of either kind is one statement text, prepared once per connection.
    let (started, waiting): (Vec<&NewDelivery>, Vec<&NewDelivery>) =
        deliveries.iter().partition(|d| d.start && start.is_some());
    for chunk in waiting.chunks(ROWS_PER_INSERT) {
        delivery_insert(chunk, None)
            .build()
            .execute(&mut *conn)
            .await
            .doing("creating deliveries")?;
    }
    let mut ids = HashMap::new();
    if let Some(start) = start {
        for chunk in started.chunks(ROWS_PER_INSERT) {
            let rows: Vec<(i64, i64, String)> = delivery_insert(chunk, Some(start))
                .push(" RETURNING delivery_id, event_id, route")
                .build_query_as()
                .fetch_all(&mut *conn)
                .await
                .doing("creating deliveries")?;
            ids.extend(
                rows.into_iter()
                    .map(|(delivery_id, event_id, route)| ((event_id, route), delivery_id)),
            );
        }
    }
    Ok(ids)
}

/// The INSERT of `chunk`, leased to `start`'s owner when given, else waiting for a claim.
fn delivery_insert<'a>(
    chunk: &'a [&'a NewDelivery],
    start: Option<&'a ClaimRequest>,
) -> QueryBuilder<'a, Sqlite> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
         idempotency_key, locked_by, locked_until, attempts) ",
    );
    query.push_values(chunk, |mut row, d| {
        row.push_bind(d.event_id)
            .push_bind(&d.route)
            .push_bind(&d.entity_type)
            .push_bind(&d.entity_id)
            .push_bind(d.ordered)
            .push_bind(&d.idempotency_key);
        match start {
            Some(start) => {
                row.push_bind(&start.owner)
                    .push("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ")
                    .push_bind_unseparated(sqlite_offset(start.lease))
                    .push_unseparated(")")
                    .push("1");
            }
            None => {
                row.push("NULL").push("NULL").push("0");
            }
        }
    });
    query
}

/// What the ledger holds for the producer keys of the deliveries fan-out started, by
/// (route, key). (A derived key names its own new delivery: no ledger can hold it yet.)
async fn started_ledger(
    conn: &mut SqliteConnection,
    deliveries: &[NewDelivery],
) -> StoreResult<HashMap<(String, String), LedgerEntry>> {
    let mut rows = Vec::new();
    for delivery in deliveries.iter().filter(|d| d.start && d.producer_keyed) {
        rows.extend(
            sqlx::query(
                "SELECT route, idempotency_key, outcome AS ledger_outcome, \
                   event_id AS ledger_event_id, detail AS ledger_detail, \
                   completed_at AS ledger_completed_at \
                 FROM herald_idempotency WHERE route = $1 AND idempotency_key = $2",
            )
            .bind(&delivery.route)
            .bind(&delivery.idempotency_key)
            .fetch_optional(&mut *conn)
            .await
            .doing("reading the ledger for started deliveries")?,
        );
    }
    rows::ledger_by_key(&rows)
}

async fn apply_settlements(
    conn: &mut SqliteConnection,
    settlements: &[Settlement],
) -> StoreResult<()> {
    if settlements.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = settlements
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.event_id,
                "status": s.status.as_str(),
                "reason": s.reason,
            })
        })
        .collect();
    sqlx::query(
        "UPDATE events SET event_status = u.status, status_reason = u.reason FROM (\
           SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.status') AS status, \
             json_extract(value, '$.reason') AS reason FROM json_each($1)) AS u \
         WHERE events.event_id = u.id",
    )
    .bind(serde_json::Value::Array(rows).to_string())
    .execute(conn)
    .await
    .doing("updating events' status")?;
    Ok(())
}

/// Recompute the events' status from their deliveries, inside the caller's transaction.
async fn resettle_events(conn: &mut SqliteConnection, mut event_ids: Vec<i64>) -> StoreResult<()> {
    event_ids.sort_unstable();
    event_ids.dedup();
    if event_ids.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query(
        "SELECT event_id, status, route, last_error FROM herald_deliveries \
         WHERE event_id IN (SELECT value FROM json_each($1)) ORDER BY event_id, delivery_id",
    )
    .bind(id_list(&event_ids))
    .fetch_all(&mut *conn)
    .await
    .doing("reading events' deliveries")?;
    let states = rows
        .iter()
        .map(rows::delivery_state)
        .collect::<StoreResult<Vec<_>>>()?;
    apply_settlements(conn, &batch::resettle(states)).await
}

/// Close the deliveries whose lease still holds; returns what each matched one is. One
/// statement for the batch: the rows travel as one JSON parameter. (The `+` keeps the
/// planner off the status index: walking every open delivery and scanning the JSON for
/// each is quadratic; JSON first with primary-key lookups is linear.)
async fn close_deliveries(
    conn: &mut SqliteConnection,
    completions: &[Completion],
) -> StoreResult<Vec<Recorded>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<serde_json::Value> = completions
        .iter()
        .map(|completion| {
            let update = DeliveryUpdate::of(completion);
            serde_json::json!({
                "id": completion.delivery_id,
                "owner": completion.owner,
                "attempt": completion.attempt,
                "status": update.status.as_str(),
                "offset": sqlite_offset(update.retry_after),
                "error": update.error,
            })
        })
        .collect();
    let rows = sqlx::query(&format!(
        "UPDATE herald_deliveries AS d SET status = u.status, \
         next_attempt_at = CASE WHEN u.status = 'RETRY' \
           THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now', u.offset) ELSE d.next_attempt_at END, \
         locked_by = NULL, locked_until = NULL, last_error = u.error, \
         updated_at = {SQLITE_NOW} \
         FROM (SELECT json_extract(value, '$.id') AS id, \
             json_extract(value, '$.owner') AS owner, \
             json_extract(value, '$.attempt') AS attempt, \
             json_extract(value, '$.status') AS status, \
             json_extract(value, '$.offset') AS offset, \
             json_extract(value, '$.error') AS error FROM json_each($1)) AS u \
         WHERE d.delivery_id = u.id AND d.locked_by = u.owner AND d.attempts = u.attempt \
           AND +d.status IN ('PENDING', 'RETRY') \
         RETURNING delivery_id, event_id, route, idempotency_key"
    ))
    .bind(serde_json::Value::Array(rows).to_string())
    .fetch_all(conn)
    .await
    .doing("recording delivery outcomes")?;
    rows.iter().map(rows::recorded).collect()
}

/// The attempts log and the idempotency ledger for the completions that held.
async fn log_attempts(
    conn: &mut SqliteConnection,
    matched: &[(&Completion, &Recorded)],
) -> StoreResult<()> {
    for chunk in matched.chunks(ROWS_PER_INSERT) {
        QueryBuilder::<Sqlite>::new(
            "INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
             detail, plugin_version, instance, started_at, duration_us) ",
        )
        .push_values(chunk, |mut row, (c, r)| {
            row.push_bind(c.delivery_id)
                .push_bind(r.event_id)
                .push_bind(&r.route)
                .push_bind(c.attempt)
                .push_bind(c.outcome.attempt_outcome().as_str())
                .push_bind(c.outcome.detail())
                .push_bind(&c.plugin_version)
                .push_bind(&c.owner)
                .push_bind(to_sqlite_text(c.started_at))
                .push_bind(batch::duration_us(c.duration));
        })
        .build()
        .execute(&mut *conn)
        .await
        .doing("writing the attempts log")?;
    }
    let keyed = batch::ledger_entries(matched);
    for chunk in keyed.chunks(ROWS_PER_INSERT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome, detail) ",
        );
        query.push_values(chunk, |mut row, (c, r)| {
            row.push_bind(&r.route)
                .push_bind(&r.idempotency_key)
                .push_bind(r.event_id)
                .push_bind(c.outcome.attempt_outcome().as_str())
                .push_bind(c.outcome.detail());
        });
        query
            .push(" ON CONFLICT DO NOTHING")
            .build()
            .execute(&mut *conn)
            .await
            .doing("recording idempotency keys")?;
    }
    Ok(())
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
        let (_turn, mut tx) = self.begin_write().await?;
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            ids.push(insert_event(&mut tx, event).await?);
        }
        tx.commit().await.doing("committing appended events")?;
        Ok(ids)
    }

    async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, Vec<ClaimedDelivery>)> {
        let (_turn, mut tx) = self.begin_write().await?;
        let candidates = take_candidates(&mut tx, request).await?;
        let holders = key_holders(&mut tx, &candidates).await?;
        let mut plan = batch::plan_fan_out(candidates, &holders, router);
        if let Some(grant) = start.filter(|grant| grant.limit > 0) {
            let startable = batch::start_candidates(&plan.deliveries, grant);
            let blocked = blocked_lanes(&mut tx, &plan.deliveries, &startable).await?;
            batch::mark_started(&mut plan.deliveries, &startable, &blocked, grant.limit);
        }
        let ids = insert_deliveries(&mut tx, &plan.deliveries, start).await?;
        batch::confirm_started(&mut plan.deliveries, &ids);
        let ledger = started_ledger(&mut tx, &plan.deliveries).await?;
        apply_settlements(&mut tx, &plan.settlements).await?;
        tx.commit().await.doing("committing fan-out")?;
        let started = batch::started_claims(&plan, &ids, &ledger)?;
        Ok((plan.report, started))
    }

    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        let (_turn, mut tx) = self.begin_write().await?;
        // Read first, then lease what was read: in this write transaction nothing else
        // changes the rows between the two, and the lease returns no rows (each row a
        // statement returns is a hand-off from SQLite's thread). Both statements keep one
        // text, so each is prepared once per connection.
        // The due index gives the claim order directly; left to itself SQLite picks the
        // status index and sorts every open delivery on each claim.
        let rows = sqlx::query(&format!(
            "SELECT d.delivery_id, d.route, d.attempts + 1 AS attempts, d.idempotency_key, \
             {COMPLETED_KEY_COLUMNS}, \
             e.event_id, e.event_target, e.event_type, e.entity_type, e.entity_id, \
             e.event_data, e.event_status, e.status_reason, e.idempotency_key AS producer_key, \
             e.headers, e.created_at \
             FROM herald_deliveries d JOIN events e ON e.event_id = d.event_id \
             {COMPLETED_KEY_JOINS} \
             WHERE d.delivery_id IN (\
               SELECT d.delivery_id FROM herald_deliveries d INDEXED BY herald_deliveries_due \
               WHERE d.status IN ('PENDING', 'RETRY') AND d.next_attempt_at <= {SQLITE_NOW} \
                 AND (d.locked_until IS NULL OR d.locked_until <= {SQLITE_NOW}) \
                 AND (NOT d.ordered OR NOT EXISTS (\
                   SELECT 1 FROM herald_deliveries p WHERE p.route = d.route \
                   AND p.entity_type = d.entity_type AND p.entity_id = d.entity_id \
                   AND p.event_id < d.event_id AND p.status IN ('PENDING', 'RETRY'))) \
                 AND d.route NOT IN (SELECT value FROM json_each($1)) \
               ORDER BY d.next_attempt_at, d.delivery_id LIMIT $2) \
             ORDER BY d.next_attempt_at, d.delivery_id"
        ))
        .bind(serde_json::Value::from(request.paused_routes.clone()).to_string())
        .bind(i64::from(request.limit))
        .fetch_all(&mut *tx)
        .await
        .doing("claiming deliveries")?;
        let claimed = rows
            .iter()
            .map(rows::claimed)
            .collect::<StoreResult<Vec<_>>>()?;
        if !claimed.is_empty() {
            let ids: Vec<i64> = claimed.iter().map(|c| c.delivery_id).collect();
            sqlx::query(&format!(
                "UPDATE herald_deliveries SET locked_by = $1, \
                 locked_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2), \
                 attempts = attempts + 1, updated_at = {SQLITE_NOW} \
                 WHERE delivery_id IN (SELECT value FROM json_each($3))"
            ))
            .bind(&request.owner)
            .bind(sqlite_offset(request.lease))
            .bind(id_list(&ids))
            .execute(&mut *tx)
            .await
            .doing("leasing claimed deliveries")?;
        }
        tx.commit().await.doing("committing a claim")?;
        Ok(claimed)
    }

    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        let (_turn, mut tx) = self.begin_write().await?;
        let recorded = close_deliveries(&mut tx, completions).await?;
        let matched = batch::matched(completions, &recorded);
        log_attempts(&mut tx, &matched).await?;
        let held: HashSet<i64> = recorded.iter().map(|r| r.delivery_id).collect();
        let mut results = Vec::with_capacity(completions.len());
        for completion in completions {
            if !held.contains(&completion.delivery_id) {
                results.push(CompletionResult::LeaseLost);
                continue;
            }
            let mut emitted = Vec::with_capacity(completion.outcome.emitted().len());
            for event in completion.outcome.emitted() {
                emitted.push(insert_event(&mut tx, event).await?);
            }
            for event in &completion.host_events {
                insert_event(&mut tx, event).await?;
            }
            results.push(CompletionResult::Committed { emitted });
        }
        resettle_events(&mut tx, recorded.iter().map(|r| r.event_id).collect()).await?;
        tx.commit().await.doing("committing outcomes")?;
        Ok(results)
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
        let released = sqlx::query(
            "UPDATE herald_deliveries SET locked_by = NULL, locked_until = NULL, \
             attempts = attempts - 1 WHERE locked_by = $1 \
             AND delivery_id IN (SELECT value FROM json_each($2)) \
             AND status IN ('PENDING', 'RETRY')",
        )
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
        let (_turn, mut tx) = self.begin_write().await?;
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE herald_deliveries SET status = 'PENDING', attempts = 0, \
             next_attempt_at = {SQLITE_NOW}, last_error = NULL, updated_at = {SQLITE_NOW} \
             WHERE status = 'DEAD'"
        ));
        if let Some(id) = selection.delivery_id {
            query.push(" AND delivery_id = ").push_bind(id);
        }
        if let Some(route) = &selection.route {
            query.push(" AND route = ").push_bind(route.clone());
        }
        query.push(" RETURNING event_id");
        let events: Vec<i64> = query
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .doing("redriving dead deliveries")?;
        let redriven = events.len() as u64;
        resettle_events(&mut tx, events).await?;
        tx.commit().await.doing("committing a redrive")?;
        Ok(redriven)
    }
}

/// A list of ids as one JSON array parameter, read back with `json_each`.
fn id_list(ids: &[i64]) -> String {
    let items: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(","))
}
