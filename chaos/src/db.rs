//! The run's own connections to the private cluster: producing events the way a service
//! does (plain INSERTs), and reading Herald's tables to follow and judge the run. Every
//! caller that runs while faults happen polls and retries; a Postgres restart makes
//! queries fail for a moment, and the pool reconnects by itself.

use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::herald::EVENT_TYPE;

#[derive(Clone)]
pub struct Db {
    pool: PgPool,
}

/// Where the run stands in the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub events: i64,
    /// Events READY or FAILED.
    pub open_events: i64,
    /// Deliveries PENDING or RETRY.
    pub open_deliveries: i64,
}

impl Backlog {
    pub fn settled(&self, produced: i64) -> bool {
        self.events == produced && self.open_events == 0 && self.open_deliveries == 0
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub event_id: i64,
    pub entity_id: String,
    pub event_status: String,
    pub status_reason: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub event_id: i64,
    pub idempotency_key: String,
    pub status: String,
    pub last_error: Option<String>,
    pub attempts: i32,
}

impl Db {
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .context("connecting to the private cluster")?;
        Ok(Db { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Insert events `first..=last` in one statement (one transaction), entity
    /// `e-<n % entities>` and data `{"n": n}`. A failure may still have committed (the
    /// connection can drop between COMMIT and its answer when Postgres restarts), so
    /// before saying "not inserted" the range is looked up: an event is produced once.
    pub async fn produce(&self, first: i64, last: i64, entities: i64) -> anyhow::Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
             SELECT $1, 'chaos', 'e-' || (g % $4), jsonb_build_object('n', g) \
             FROM generate_series($2::bigint, $3::bigint) AS g ORDER BY g",
        )
        .bind(EVENT_TYPE)
        .bind(first)
        .bind(last)
        .bind(entities)
        .execute(&self.pool)
        .await;
        if inserted.is_ok() {
            return Ok(true);
        }
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE (event_data->>'n')::bigint BETWEEN $1 AND $2",
        )
        .bind(first)
        .bind(last)
        .fetch_one(&self.pool)
        .await
        .context("checking whether a failed insert committed")?;
        match found {
            0 => Ok(false),
            n if n == last - first + 1 => Ok(true),
            n => bail!("events {first}..={last}: {n} of them exist after a failed insert"),
        }
    }

    pub async fn backlog(&self) -> anyhow::Result<Backlog> {
        let (events, open_events, open_deliveries): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events), \
               (SELECT count(*) FROM events WHERE event_status IN ('READY', 'FAILED')), \
               (SELECT count(*) FROM herald_open_delivery_records \
               WHERE status IN ('PENDING', 'RETRY'))",
        )
        .fetch_one(&self.pool)
        .await
        .context("counting the backlog")?;
        Ok(Backlog {
            events,
            open_events,
            open_deliveries,
        })
    }

    pub async fn instance_registered(&self, id: &str) -> anyhow::Result<bool> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM herald_instances WHERE instance_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    /// Whether instance `id` has heartbeated after `since` (the store's clock).
    pub async fn heartbeat_after(&self, id: &str, since: DateTime<Utc>) -> anyhow::Result<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM herald_instances WHERE instance_id = $1 AND last_seen > $2",
        )
        .bind(id)
        .bind(since)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    pub async fn now(&self) -> anyhow::Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Open deliveries whose lease `id` holds (or held: an expired lease keeps its owner
    /// until another instance claims the delivery).
    pub async fn leases_of(&self, id: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM herald_open_delivery_records \
             WHERE locked_by = $1 AND status IN ('PENDING', 'RETRY')",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether instance `id` has recorded an attempt on plugin version `version`.
    pub async fn ran_version(&self, id: &str, version: &str) -> anyhow::Result<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM herald_attempt_records WHERE instance = $1 AND plugin_version = $2 \
             LIMIT 1",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    pub async fn events(&self) -> anyhow::Result<Vec<EventRow>> {
        sqlx::query_as(
            "SELECT event_id, entity_id, event_status, status_reason FROM events \
             ORDER BY event_id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the events")
    }

    pub async fn deliveries(&self) -> anyhow::Result<Vec<DeliveryRow>> {
        sqlx::query_as(
            "SELECT event_id, idempotency_key, status, last_error, attempts \
             FROM herald_delivery_records ORDER BY delivery_id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the deliveries")
    }

    /// Attempts per instance id, and per outcome.
    pub async fn attempts(&self) -> anyhow::Result<(Vec<(String, i64)>, Vec<(String, i64)>)> {
        let by_instance = sqlx::query_as(
            "SELECT instance, count(*) FROM herald_attempt_records GROUP BY instance \
             ORDER BY instance",
        )
        .fetch_all(&self.pool)
        .await
        .context("counting attempts per instance")?;
        let by_outcome = sqlx::query_as(
            "SELECT outcome, count(*) FROM herald_attempt_records GROUP BY outcome \
             ORDER BY outcome",
        )
        .fetch_all(&self.pool)
        .await
        .context("counting attempts per outcome")?;
        Ok((by_instance, by_outcome))
    }

    /// Distinct plugin versions that ran attempts.
    pub async fn versions_run(&self) -> anyhow::Result<i64> {
        sqlx::query_scalar("SELECT count(DISTINCT plugin_version) FROM herald_attempt_records")
            .fetch_one(&self.pool)
            .await
            .context("counting plugin versions")
    }
}
