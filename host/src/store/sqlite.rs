//! The embedded store: one SQLite file in WAL mode.
//!
//! SQLite has one writer at a time, so claims cannot collide; every read-then-write
//! transaction starts with `BEGIN IMMEDIATE` so it takes the write lock up front instead of
//! failing to upgrade a stale read snapshot.

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

use super::error::QueryContext;
use super::fan_out::{settle_from_deliveries, Candidate, Disposition};
use super::filters::{push_delivery_filter, push_event_filter};
use super::rows::{self, column_error, StoreRow};
use super::time::{
    from_sqlite_text, sqlite_offset, sqlite_offset_back, to_sqlite_text, SQLITE_NOW,
};
use super::{
    delivery_key, Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion, CompletionResult,
    Delivery, DeliveryFilter, DeliveryStatus, Event, EventDetail, EventFilter, EventHead,
    EventStatus, EventStore, FanOutReport, Instance, NewEvent, OpenOptions, RedriveSelection,
    Router, StoreError, StoreResult,
};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

const EVENT_COLUMNS: &str = "event_id, event_target, event_type, entity_type, entity_id, \
     event_data, event_status, status_reason, idempotency_key, headers, created_at";

pub struct SqliteStore {
    pool: SqlitePool,
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
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(connect)
            .await
            .map_err(|source| StoreError::Connect {
                url: format!("sqlite://{}", path.display()),
                source,
            })?;
        Ok(SqliteStore {
            pool,
            path: path.to_path_buf(),
        })
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .doing("starting a write transaction")
    }
}

impl StoreRow for SqliteRow {
    fn text(&self, column: &str) -> StoreResult<String> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
        self.try_get(column).map_err(|e| column_error(column, e))
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

async fn settle_event(
    conn: &mut SqliteConnection,
    event_id: i64,
    status: EventStatus,
    reason: Option<&str>,
) -> StoreResult<()> {
    sqlx::query("UPDATE events SET event_status = $1, status_reason = $2 WHERE event_id = $3")
        .bind(status.as_str())
        .bind(reason)
        .bind(event_id)
        .execute(conn)
        .await
        .doing("updating an event's status")?;
    Ok(())
}

/// Recompute an event's status from its deliveries, inside the caller's transaction.
async fn resettle_event(conn: &mut SqliteConnection, event_id: i64) -> StoreResult<()> {
    let rows = sqlx::query(
        "SELECT status, route, last_error FROM herald_deliveries WHERE event_id = $1 \
         ORDER BY delivery_id",
    )
    .bind(event_id)
    .fetch_all(&mut *conn)
    .await
    .doing("reading an event's deliveries")?;
    let deliveries = rows
        .iter()
        .map(|row| {
            Ok((
                row.parsed::<DeliveryStatus>("status")?,
                row.text("route")?,
                row.opt_text("last_error")?,
            ))
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let (status, reason) = settle_from_deliveries(&deliveries);
    settle_event(conn, event_id, status, reason.as_deref()).await
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
        let mut tx = self.begin_write().await?;
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            ids.push(insert_event(&mut tx, event).await?);
        }
        tx.commit().await.doing("committing appended events")?;
        Ok(ids)
    }

    async fn fan_out(&self, limit: u32, router: &Router<'_>) -> StoreResult<FanOutReport> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT event_id, event_type, event_target, entity_type, entity_id, event_data, \
             idempotency_key FROM events e WHERE event_status = 'READY' AND NOT EXISTS \
             (SELECT 1 FROM herald_deliveries d WHERE d.event_id = e.event_id) \
             ORDER BY event_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .doing("reading new events")?;
        let mut report = FanOutReport::default();
        for row in &rows {
            let candidate = Candidate {
                head: EventHead {
                    event_id: row.int("event_id")?,
                    event_type: row.text("event_type")?,
                    event_target: row.opt_text("event_target")?,
                    entity_type: row.text("entity_type")?,
                    entity_id: row.text("entity_id")?,
                },
                event_data: row.opt_text("event_data")?,
                idempotency_key: row.opt_text("idempotency_key")?,
            };
            let event_id = candidate.head.event_id;
            let key_holder: Option<i64> = match &candidate.idempotency_key {
                None => None,
                // An earlier event with the key, or a later one that was already handled
                // (its transaction committed first): either way this one repeats it.
                Some(key) => sqlx::query_scalar(
                    "SELECT event_id FROM events o WHERE idempotency_key = $1 \
                     AND event_id <> $2 AND event_status <> 'DUPLICATE' \
                     AND (event_id < $2 OR event_status <> 'READY' OR EXISTS \
                     (SELECT 1 FROM herald_deliveries d WHERE d.event_id = o.event_id)) \
                     ORDER BY event_id LIMIT 1",
                )
                .bind(key)
                .bind(event_id)
                .fetch_optional(&mut *tx)
                .await
                .doing("checking an idempotency key")?,
            };
            match candidate.decide(key_holder, router) {
                Disposition::Settle { status, reason } => {
                    match status {
                        EventStatus::Duplicate => report.duplicates += 1,
                        EventStatus::Skipped => report.skipped += 1,
                        _ => report.malformed += 1,
                    }
                    settle_event(&mut tx, event_id, status, Some(&reason)).await?;
                }
                Disposition::Deliver(routes) => {
                    report.routed += 1;
                    report.deliveries += routes.len();
                    for plan in routes {
                        let key = delivery_key(
                            candidate.idempotency_key.as_deref(),
                            event_id,
                            &plan.route,
                        );
                        sqlx::query(
                            "INSERT INTO herald_deliveries (event_id, route, entity_type, \
                             entity_id, ordered, idempotency_key) VALUES ($1, $2, $3, $4, $5, $6)",
                        )
                        .bind(event_id)
                        .bind(&plan.route)
                        .bind(&candidate.head.entity_type)
                        .bind(&candidate.head.entity_id)
                        .bind(plan.ordered)
                        .bind(key)
                        .execute(&mut *tx)
                        .await
                        .doing("creating deliveries")?;
                    }
                }
            }
        }
        tx.commit().await.doing("committing fan-out")?;
        Ok(report)
    }

    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        let mut tx = self.begin_write().await?;
        let claimed: Vec<(i64,)> = sqlx::query_as(&format!(
            "UPDATE herald_deliveries SET locked_by = $1, \
             locked_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2), \
             attempts = attempts + 1, updated_at = {SQLITE_NOW} \
             WHERE delivery_id IN (\
               SELECT d.delivery_id FROM herald_deliveries d \
               WHERE d.status IN ('PENDING', 'RETRY') AND d.next_attempt_at <= {SQLITE_NOW} \
                 AND (d.locked_until IS NULL OR d.locked_until <= {SQLITE_NOW}) \
                 AND (NOT d.ordered OR NOT EXISTS (\
                   SELECT 1 FROM herald_deliveries p WHERE p.route = d.route \
                   AND p.entity_type = d.entity_type AND p.entity_id = d.entity_id \
                   AND p.event_id < d.event_id AND p.status IN ('PENDING', 'RETRY'))) \
               ORDER BY d.next_attempt_at, d.delivery_id LIMIT $3) \
             RETURNING delivery_id"
        ))
        .bind(&request.owner)
        .bind(sqlite_offset(request.lease))
        .bind(i64::from(request.limit))
        .fetch_all(&mut *tx)
        .await
        .doing("claiming deliveries")?;
        if claimed.is_empty() {
            tx.commit().await.doing("committing a claim")?;
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT d.delivery_id, d.route, d.attempts, d.idempotency_key, \
             i.outcome AS ledger_outcome, i.event_id AS ledger_event_id, \
             i.detail AS ledger_detail, i.completed_at AS ledger_completed_at, \
             e.event_id, e.event_target, e.event_type, e.entity_type, e.entity_id, \
             e.event_data, e.event_status, e.status_reason, e.idempotency_key AS producer_key, \
             e.headers, e.created_at \
             FROM herald_deliveries d JOIN events e ON e.event_id = d.event_id \
             LEFT JOIN herald_idempotency i ON i.route = d.route \
               AND i.idempotency_key = d.idempotency_key \
             WHERE d.delivery_id IN (",
        );
        let mut ids = query.separated(", ");
        for (id,) in &claimed {
            ids.push_bind(*id);
        }
        query.push(") ORDER BY d.next_attempt_at, d.delivery_id");
        let rows = query
            .build()
            .fetch_all(&mut *tx)
            .await
            .doing("reading claimed deliveries")?;
        tx.commit().await.doing("committing a claim")?;
        rows.iter().map(rows::claimed).collect()
    }

    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        let mut tx = self.begin_write().await?;
        let mut results = Vec::with_capacity(completions.len());
        for completion in completions {
            let outcome = &completion.outcome;
            let retry_after = match outcome {
                super::Outcome::Retry { after, .. } => *after,
                _ => Duration::ZERO,
            };
            let failure = match outcome {
                super::Outcome::Retry { reason, .. } | super::Outcome::Dead { reason } => {
                    Some(reason.as_str())
                }
                _ => None,
            };
            let updated = sqlx::query(&format!(
                "UPDATE herald_deliveries SET status = $1, \
                 next_attempt_at = CASE WHEN $1 = 'RETRY' \
                   THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2) ELSE next_attempt_at END, \
                 locked_by = NULL, locked_until = NULL, last_error = $3, \
                 updated_at = {SQLITE_NOW} \
                 WHERE delivery_id = $4 AND locked_by = $5 AND attempts = $6 \
                   AND status IN ('PENDING', 'RETRY') \
                 RETURNING event_id, route, idempotency_key"
            ))
            .bind(outcome.delivery_status().as_str())
            .bind(sqlite_offset(retry_after))
            .bind(failure)
            .bind(completion.delivery_id)
            .bind(&completion.owner)
            .bind(completion.attempt)
            .fetch_optional(&mut *tx)
            .await
            .doing("recording a delivery outcome")?;
            let Some(updated) = updated else {
                results.push(CompletionResult::LeaseLost);
                continue;
            };
            let event_id = updated.int("event_id")?;
            let route = updated.text("route")?;
            let key = updated.text("idempotency_key")?;
            sqlx::query(
                "INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
                 detail, plugin_version, instance, started_at, duration_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(completion.delivery_id)
            .bind(event_id)
            .bind(&route)
            .bind(completion.attempt)
            .bind(outcome.attempt_outcome().as_str())
            .bind(outcome.detail())
            .bind(&completion.plugin_version)
            .bind(&completion.owner)
            .bind(to_sqlite_text(completion.started_at))
            .bind(duration_us(completion.duration))
            .execute(&mut *tx)
            .await
            .doing("writing the attempts log")?;
            if outcome.completes_key() {
                sqlx::query(
                    "INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome, \
                     detail) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(&route)
                .bind(&key)
                .bind(event_id)
                .bind(outcome.attempt_outcome().as_str())
                .bind(outcome.detail())
                .execute(&mut *tx)
                .await
                .doing("recording the idempotency key")?;
            }
            let mut emitted = Vec::with_capacity(outcome.emitted().len());
            for event in outcome.emitted() {
                emitted.push(insert_event(&mut tx, event).await?);
            }
            for event in &completion.host_events {
                insert_event(&mut tx, event).await?;
            }
            resettle_event(&mut tx, event_id).await?;
            results.push(CompletionResult::Committed { emitted });
        }
        tx.commit().await.doing("committing outcomes")?;
        Ok(results)
    }

    async fn backlog(&self) -> StoreResult<Backlog> {
        let row = sqlx::query(super::BACKLOG_SQL)
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
            sqlx::query("SELECT * FROM herald_attempts WHERE event_id = $1 ORDER BY attempt_id")
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
        let mut tx = self.begin_write().await?;
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
        let mut distinct = events.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for event_id in distinct {
            resettle_event(&mut tx, event_id).await?;
        }
        tx.commit().await.doing("committing a redrive")?;
        Ok(events.len() as u64)
    }
}

/// A list of ids as one JSON array parameter, read back with `json_each`.
fn id_list(ids: &[i64]) -> String {
    let items: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(","))
}

pub(crate) fn duration_us(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
