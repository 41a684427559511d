//! The production store: Postgres, safe for several Herald instances at once.
//!
//! Claims use `FOR UPDATE SKIP LOCKED`, so concurrent claimers never take the same
//! delivery. Fan-out is serialised by a transaction-scoped advisory lock: if two instances
//! fanned out an entity's events in parallel, the later event's deliveries could commit
//! first and be claimed before the earlier event's exist, breaking per-entity order.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row};
use tokio::sync::Notify;

use super::error::QueryContext;
use super::fan_out::{settle_from_deliveries, Candidate, Disposition};
use super::filters::{push_delivery_filter, push_event_filter};
use super::rows::{self, column_error, StoreRow};
use super::sqlite::duration_us;
use super::{
    delivery_key, redact_url, Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion,
    CompletionResult, Delivery, DeliveryFilter, DeliveryStatus, Event, EventDetail, EventFilter,
    EventHead, EventStatus, EventStore, FanOutReport, Instance, NewEvent, Outcome,
    RedriveSelection, Router, StoreError, StoreResult,
};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The channel the `events` insert trigger notifies (migration 0002).
const NEW_EVENTS_CHANNEL: &str = "herald_events";

/// Key of the advisory lock that serialises fan-out across instances ("herald" in ASCII).
const FAN_OUT_LOCK: i64 = 0x6865_7261_6c64;

const EVENT_COLUMNS: &str = "event_id, event_target, event_type, entity_type, entity_id, \
     event_data::text AS event_data, event_status, status_reason, idempotency_key, \
     headers::text AS headers, created_at";

pub struct PostgresStore {
    pool: PgPool,
    url: String,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let redacted = redact_url(url);
        let options: PgConnectOptions = url.parse().map_err(|source| StoreError::Connect {
            url: redacted.clone(),
            source,
        })?;
        // One direct connection first: the pool would retry a refused connection until its
        // acquire timeout, and an operator at a terminal wants the refusal now.
        let probe = PgConnection::connect_with(&options)
            .await
            .map_err(|source| StoreError::Connect {
                url: redacted.clone(),
                source,
            })?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        drop(probe);
        Ok(PostgresStore {
            pool,
            url: redacted,
        })
    }
}

impl StoreRow for PgRow {
    fn text(&self, column: &str) -> StoreResult<String> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn int(&self, column: &str) -> StoreResult<i64> {
        // Ids are BIGINT, counters INTEGER; Postgres decoding is strict about the width.
        self.try_get::<i64, _>(column)
            .or_else(|_| self.try_get::<i32, _>(column).map(i64::from))
            .map_err(|e| column_error(column, e))
    }
    fn flag(&self, column: &str) -> StoreResult<bool> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        self.try_get(column).map_err(|e| column_error(column, e))
    }
}

async fn insert_event(conn: &mut PgConnection, event: &NewEvent) -> StoreResult<i64> {
    event.validate().map_err(StoreError::Invalid)?;
    sqlx::query_scalar(
        "INSERT INTO events (event_target, event_type, entity_type, entity_id, event_data, \
         idempotency_key, headers) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb) \
         RETURNING event_id",
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
    conn: &mut PgConnection,
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
async fn resettle_event(conn: &mut PgConnection, event_id: i64) -> StoreResult<()> {
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
impl EventStore for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                url: self.url.clone(),
                source,
            })
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let has_table: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
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
        super::pending_migrations(&MIGRATOR, &applied, self.url.clone())
    }

    async fn append_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
        let mut tx = self.pool.begin().await.doing("starting an append")?;
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            ids.push(insert_event(&mut tx, event).await?);
        }
        tx.commit().await.doing("committing appended events")?;
        Ok(ids)
    }

    async fn fan_out(&self, limit: u32, router: &Router<'_>) -> StoreResult<FanOutReport> {
        let mut tx = self.pool.begin().await.doing("starting fan-out")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(FAN_OUT_LOCK)
            .fetch_one(&mut *tx)
            .await
            .doing("taking the fan-out lock")?;
        if !locked {
            // Another instance is fanning out right now; its pass covers these events.
            return Ok(FanOutReport::default());
        }
        let rows = sqlx::query(
            "SELECT event_id, event_type, event_target, entity_type, entity_id, \
             event_data::text AS event_data, idempotency_key FROM events e \
             WHERE event_status = 'READY' AND NOT EXISTS \
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
        let rows = sqlx::query(
            "WITH picked AS (\
               SELECT d.delivery_id FROM herald_deliveries d \
               WHERE d.status IN ('PENDING', 'RETRY') AND d.next_attempt_at <= now() \
                 AND (d.locked_until IS NULL OR d.locked_until <= now()) \
                 AND (NOT d.ordered OR NOT EXISTS (\
                   SELECT 1 FROM herald_deliveries p WHERE p.route = d.route \
                   AND p.entity_type = d.entity_type AND p.entity_id = d.entity_id \
                   AND p.event_id < d.event_id AND p.status IN ('PENDING', 'RETRY'))) \
               ORDER BY d.next_attempt_at, d.delivery_id LIMIT $3 \
               FOR UPDATE SKIP LOCKED), \
             claimed AS (\
               UPDATE herald_deliveries d SET locked_by = $1, \
                 locked_until = now() + make_interval(secs => $2), \
                 attempts = d.attempts + 1, updated_at = now() \
               FROM picked WHERE d.delivery_id = picked.delivery_id \
               RETURNING d.delivery_id, d.event_id, d.route, d.attempts, d.idempotency_key, \
                 d.next_attempt_at) \
             SELECT c.delivery_id, c.route, c.attempts, c.idempotency_key, \
               i.outcome AS ledger_outcome, i.event_id AS ledger_event_id, \
               i.detail AS ledger_detail, i.completed_at AS ledger_completed_at, \
               e.event_id, e.event_target, e.event_type, e.entity_type, e.entity_id, \
               e.event_data::text AS event_data, e.event_status, e.status_reason, \
               e.idempotency_key AS producer_key, e.headers::text AS headers, e.created_at \
             FROM claimed c JOIN events e ON e.event_id = c.event_id \
             LEFT JOIN herald_idempotency i ON i.route = c.route \
               AND i.idempotency_key = c.idempotency_key \
             ORDER BY c.next_attempt_at, c.delivery_id",
        )
        .bind(&request.owner)
        .bind(request.lease.as_secs_f64())
        .bind(i64::from(request.limit))
        .fetch_all(&self.pool)
        .await
        .doing("claiming deliveries")?;
        rows.iter().map(rows::claimed).collect()
    }

    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .doing("starting to record outcomes")?;
        let mut results = Vec::with_capacity(completions.len());
        for completion in completions {
            let outcome = &completion.outcome;
            let retry_after = match outcome {
                Outcome::Retry { after, .. } => *after,
                _ => Duration::ZERO,
            };
            let failure = match outcome {
                Outcome::Retry { reason, .. } | Outcome::Dead { reason } => Some(reason.as_str()),
                _ => None,
            };
            let updated = sqlx::query(
                "UPDATE herald_deliveries SET status = $1, \
                 next_attempt_at = CASE WHEN $1 = 'RETRY' \
                   THEN now() + make_interval(secs => $2) ELSE next_attempt_at END, \
                 locked_by = NULL, locked_until = NULL, last_error = $3, updated_at = now() \
                 WHERE delivery_id = $4 AND locked_by = $5 AND attempts = $6 \
                   AND status IN ('PENDING', 'RETRY') \
                 RETURNING event_id, route, idempotency_key",
            )
            .bind(outcome.delivery_status().as_str())
            .bind(retry_after.as_secs_f64())
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
            .bind(completion.started_at)
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
             attempts = attempts - 1 WHERE delivery_id = ANY($1) AND locked_by = $2 \
             AND status IN ('PENDING', 'RETRY')",
        )
        .bind(delivery_ids)
        .bind(owner)
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
            "UPDATE herald_deliveries SET locked_until = now() + make_interval(secs => $1) \
             WHERE locked_by = $2 AND delivery_id = ANY($3) AND status IN ('PENDING', 'RETRY')",
        )
        .bind(lease.as_secs_f64())
        .bind(owner)
        .bind(delivery_ids)
        .execute(&self.pool)
        .await
        .doing("renewing leases")?;
        Ok(renewed.rows_affected())
    }

    async fn heartbeat(&self, instance_id: &str, version: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO herald_instances (instance_id, version) VALUES ($1, $2) \
             ON CONFLICT (instance_id) DO UPDATE SET last_seen = now(), \
             version = excluded.version",
        )
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
        let rows = sqlx::query(
            "SELECT i.instance_id, i.version, i.started_at, i.last_seen, \
             (SELECT count(*) FROM herald_deliveries d WHERE d.locked_by = i.instance_id \
              AND d.locked_until > now() AND d.status IN ('PENDING', 'RETRY')) \
              AS leases_held \
             FROM herald_instances i \
             WHERE i.last_seen >= now() - make_interval(secs => $1) \
             ORDER BY i.started_at, i.instance_id",
        )
        .bind(within.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .doing("listing instances")?;
        rows.iter().map(rows::instance).collect()
    }

    async fn watch_new_events(&self, wake: Weak<Notify>) -> StoreResult<bool> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .doing("connecting the new-event listener")?;
        listener
            .listen(NEW_EVENTS_CHANNEL)
            .await
            .doing("listening for new events")?;
        tokio::spawn(async move {
            loop {
                let received = listener.try_recv().await;
                let Some(wake) = wake.upgrade() else {
                    return;
                };
                match received {
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection dropped; the next call reconnects. Notifications sent
                    // meanwhile are lost, so look now instead of waiting for the poll.
                    Ok(None) => {
                        tracing::warn!("new-event listener lost its connection; reconnecting");
                        wake.notify_one();
                    }
                    Err(err) => {
                        tracing::warn!(%err, "new-event listener failed; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(true)
    }

    async fn list_events(&self, filter: &EventFilter) -> StoreResult<Vec<Event>> {
        let mut query =
            QueryBuilder::<Postgres>::new(format!("SELECT {EVENT_COLUMNS} FROM events"));
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
        let mut query = QueryBuilder::<Postgres>::new("SELECT * FROM herald_deliveries");
        push_delivery_filter(&mut query, filter);
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .doing("listing deliveries")?;
        rows.iter().map(rows::delivery).collect()
    }

    async fn redrive(&self, selection: &RedriveSelection) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.doing("starting a redrive")?;
        let mut query = QueryBuilder::<Postgres>::new(
            "UPDATE herald_deliveries SET status = 'PENDING', attempts = 0, \
             next_attempt_at = now(), last_error = NULL, updated_at = now() \
             WHERE status = 'DEAD'",
        );
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
