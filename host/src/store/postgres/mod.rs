//! The production store: Postgres, safe for several Herald instances at once.
//!
//! Claims use `FOR UPDATE SKIP LOCKED`, so concurrent claimers never take the same
//! delivery. Fan-out is serialised by a transaction-scoped advisory lock: if two instances
//! fanned out an entity's events in parallel, the later event's deliveries could commit
//! first and be claimed before the earlier event's exist, breaking per-entity order.
//!
//! The statements of fan-out and outcome transactions, and why each is written as it is
//! (they are planned once per connection), live in [`plans`].

pub mod claims;
mod fan_out_tx;
pub mod outcome_batches;
pub mod plans;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row};
use tokio::sync::Notify;

use plans::{
    CLOSE_DELIVERIES, EVENTS_DELIVERIES, INSERT_DELIVERIES, INSERT_EVENT, KEY_HOLDERS, LANE_STATES,
    LOCK_DELIVERIES, LOCK_EVENTS, LOG_ATTEMPTS, PLAN_ONCE, RECORD_KEYS, SETTLE_EVENTS,
    STARTED_LEDGER,
};

use super::batch::{self, Closed, DeliveryUpdate, LaneState, NewDelivery, Recorded, Settlement};
use super::error::QueryContext;
use super::fan_out::Candidate;
use super::filters::{push_delivery_filter, push_event_filter};
use super::rows::{self, column_error, StoreRow};
use super::{
    redact_url, Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion, CompletionResult,
    Delivery, DeliveryFilter, DeliveryStatus, Event, EventDetail, EventFilter, EventStore,
    FanOutReport, FanOutRequest, FanOutStarts, Instance, LedgerEntry, NewEvent, Outcome,
    Quarantine, RedriveSelection, Router, StoreError, StoreResult, WakeUpRequest,
};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The channel the `events` insert trigger notifies (migration 0002), while an instance
/// has asked for it (migration 0011).
const NEW_EVENTS_CHANNEL: &str = "herald_events";

/// First key of the advisory lock that serialises fan-out across instances ("fano" in
/// ASCII); the second is the event store's schema, so stores in different schemas of one
/// database (tests run so) do not take turns with each other.
const FAN_OUT_LOCK: i32 = 0x6661_6e6f;

/// Ask producers for wake-ups; true once none that may have missed the request is still
/// in flight (migration 0011).
const REQUEST_WAKE_UPS: &str = "SELECT herald_request_wake_ups()";

const EVENT_COLUMNS: &str = "event_id, event_target, event_type, entity_type, entity_id, \
     event_data::text AS event_data, event_status, status_reason, idempotency_key, \
     headers::text AS headers, created_at";

pub struct PostgresStore {
    pool: PgPool,
    /// Connections whose commits do not wait for the WAL flush, for the transactions that
    /// only take leases (fan-out, claims). Losing such a commit in a database crash loses
    /// a lease, never an outcome: a later synchronous commit (every outcome's) flushes all
    /// WAL before it, so an outcome is durable only with the lease it records; a lost
    /// lease means the delivery runs again under the same idempotency key, as after any
    /// crash between an attempt and its record. What it saves is a WAL flush on the path
    /// from an event's insert to its plugin call.
    lease_pool: PgPool,
    url: String,
    /// This process's open claim items (the batch ledger's leases, [`claims`]).
    book: claims::ClaimBook,
    /// The transaction the last fan-out pass began as it committed.
    next_fan_out: fan_out_tx::NextFanOut,
    /// Whether fan-out leases its started one-route deliveries as claim items. Off, the
    /// store still reads, orders behind, recovers and records other instances' items.
    batch_ledger: bool,
    /// Whether a claim row has been seen (or made) here: until then a claim is one
    /// statement without recovery or the claims' order check, which takes nothing while
    /// any claim exists ([`claims::CLAIM_UNLESS_CLAIMS`]).
    claims_seen: std::sync::atomic::AtomicBool,
}

impl PostgresStore {
    pub async fn connect(url: &str, batch_ledger: bool) -> StoreResult<Self> {
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
            .connect_lazy_with(options.clone());
        // Fan-out runs one pass at a time on this pool, so every round trip of a pass is on
        // the drain's critical path, and a check before each acquire was one of its five
        // or six (benchmarks history, twenty-fifth refresh). A connection back from a
        // pass within the last second was checked as it was released; one idle longer is
        // checked again. What fails here (a pass, a claim, a renewal) is retried, and
        // leaves nothing leased.
        let lease_pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= RECHECK_IDLE_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        drop(probe);
        Ok(PostgresStore {
            pool,
            lease_pool,
            url: redacted,
            book: claims::ClaimBook::default(),
            next_fan_out: fan_out_tx::NextFanOut::default(),
            batch_ledger,
            claims_seen: std::sync::atomic::AtomicBool::new(batch_ledger),
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
    sqlx::query_scalar(INSERT_EVENT)
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

/// How long a lease-pool connection may sit idle before it is checked again when taken.
const RECHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Take the next new events off the fan-out queue, oldest first (in the caller's
/// transaction, so a failed pass leaves them queued). Only while holding the fan-out lock:
/// when another instance holds it, nothing is taken (its pass covers these events). The
/// lock is taken in the same statement, which saves a round trip on every pass.
/// A payload over the size limit is measured in the database (as the text a plugin would
/// get, converted once) and not sent over.
async fn take_candidates(
    conn: &mut PgConnection,
    request: &FanOutRequest,
    owner: &str,
) -> StoreResult<(Vec<Candidate>, StoredLanes)> {
    let rows = sqlx::query(&claims::TAKE_NEW_EVENTS)
        .bind(i64::from(request.limit))
        .bind(FAN_OUT_LOCK)
        .bind(request.max_bytes_sql())
        .bind(request.stop_wake_ups)
        .bind(owner)
        .fetch_all(conn)
        .await
        .doing("reading new events")?;
    let stored = match rows.first() {
        Some(row) => StoredLanes {
            open_rows: row.flag("open_rows")?,
            other_claims: row.flag("other_claims")?,
        },
        None => StoredLanes::default(),
    };
    let mut candidates = rows
        .iter()
        .map(|row| rows::candidate(row, request.max_event_bytes))
        .collect::<StoreResult<Vec<_>>>()?;
    candidates.sort_by_key(|c| c.head.event_id);
    Ok((candidates, stored))
}

/// Run one of the claim statements (they share their parameters: owner, lease in seconds,
/// limit, paused routes).
async fn claim_rows<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    statement: &str,
    request: &ClaimRequest,
) -> StoreResult<Vec<PgRow>> {
    sqlx::query(statement)
        .bind(&request.owner)
        .bind(request.lease.as_secs_f64())
        .bind(i64::from(request.limit))
        .bind(&request.paused_routes)
        .fetch_all(executor)
        .await
        .doing("claiming deliveries")
}

/// Which stored shapes may hold an open delivery on some lane, as fan-out's take found:
/// only those are read for the lanes of new deliveries.
#[derive(Debug, Default, Clone, Copy)]
struct StoredLanes {
    /// Some delivery row is open.
    open_rows: bool,
    /// Some claim is another owner's, or its lease ran out.
    other_claims: bool,
}

/// For each candidate with a producer key, the earliest other event holding that key:
/// an earlier event, or a later one that an earlier pass already handled (its
/// transaction committed first). Either way the candidate repeats it. (This pass has
/// taken its own candidates off the queue already; among them only the id order counts.)
async fn key_holders(
    conn: &mut PgConnection,
    candidates: &[Candidate],
) -> StoreResult<HashMap<i64, i64>> {
    let (ids, keys): (Vec<i64>, Vec<&str>) = candidates
        .iter()
        .filter_map(|c| Some((c.head.event_id, c.idempotency_key.as_deref()?)))
        .unzip();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let holders: Vec<(i64, Option<i64>)> = sqlx::query_as(KEY_HOLDERS)
        .bind(&ids)
        .bind(&keys)
        .fetch_all(conn)
        .await
        .doing("checking idempotency keys")?;
    Ok(holders
        .into_iter()
        .filter_map(|(id, holder)| Some((id, holder?)))
        .collect())
}

/// Insert the deliveries, those marked `start` leased to `start`'s owner on their first
/// attempt unless an earlier open delivery of their entity on their (ordered) route is
/// still open: then they wait for a claim like the rest. Returns the ids of the started
/// ones by (event, route).
async fn insert_deliveries(
    conn: &mut PgConnection,
    deliveries: &[&NewDelivery],
    start: Option<&ClaimRequest>,
) -> StoreResult<HashMap<(i64, String), i64>> {
    if deliveries.is_empty() {
        return Ok(HashMap::new());
    }
    let column = |f: fn(&NewDelivery) -> &str| deliveries.iter().map(|d| f(d)).collect::<Vec<_>>();
    let started: Vec<(i64, i64, String)> = sqlx::query_as(INSERT_DELIVERIES)
        .bind(deliveries.iter().map(|d| d.event_id).collect::<Vec<_>>())
        .bind(column(|d| &d.route))
        .bind(column(|d| &d.entity_type))
        .bind(column(|d| &d.entity_id))
        .bind(deliveries.iter().map(|d| d.ordered).collect::<Vec<_>>())
        .bind(column(|d| &d.idempotency_key))
        .bind(deliveries.iter().map(|d| d.start).collect::<Vec<_>>())
        .bind(start.map(|s| s.owner.as_str()))
        .bind(start.map_or(0.0, |s| s.lease.as_secs_f64()))
        .bind(deliveries.iter().map(|d| d.alone).collect::<Vec<_>>())
        .fetch_all(conn)
        .await
        .doing("creating deliveries")?;
    Ok(started
        .into_iter()
        .map(|(delivery_id, event_id, route)| ((event_id, route), delivery_id))
        .collect())
}

/// The state of each lane whose first new delivery is at `heads` (indexes into
/// `deliveries`), as `owner` may lease behind it: its open delivery rows, the open items of
/// other owners' (and expired) claims, both only when `stored` says any exist, and
/// `owner`'s own open items, from the book.
async fn lane_states(
    conn: &mut PgConnection,
    (book, turn): (&claims::ClaimBook, &claims::FanOutTurn<'_>),
    deliveries: &[NewDelivery],
    heads: &[usize],
    owner: &str,
    stored: StoredLanes,
) -> StoreResult<HashMap<usize, LaneState>> {
    let firsts: Vec<&NewDelivery> = heads.iter().filter_map(|&i| deliveries.get(i)).collect();
    if firsts.is_empty() {
        return Ok(HashMap::new());
    }
    // Other owners' claims first, then rows: an item turned into a row since the claims
    // were read is found as the row (an open row is never deleted).
    let (others, open_rows) = if stored.other_claims {
        let keys: Vec<(&str, &str, &str)> = firsts
            .iter()
            .map(|d| {
                (
                    d.route.as_str(),
                    d.entity_type.as_str(),
                    d.entity_id.as_str(),
                )
            })
            .collect();
        claims::other_lane_items(&mut *conn, &keys, owner).await?
    } else {
        // No other claim existed when the take ran, and none can be made while this
        // fan-out holds its lock: a row made since can only come from one of this owner's
        // items, which the book still counts.
        (HashMap::new(), stored.open_rows)
    };
    let column = |f: fn(&NewDelivery) -> &str| firsts.iter().map(|d| f(d)).collect::<Vec<_>>();
    let mut lanes: Vec<claims::OwnLane> = if open_rows {
        let rows: Vec<(i64, i64, Option<i64>, Option<i64>)> = sqlx::query_as(LANE_STATES)
            .bind(firsts.iter().map(|d| d.event_id).collect::<Vec<_>>())
            .bind(column(|d| &d.route))
            .bind(column(|d| &d.entity_type))
            .bind(column(|d| &d.entity_id))
            .bind(owner)
            .fetch_all(&mut *conn)
            .await
            .doing("reading the lanes of new deliveries")?;
        rows.into_iter()
            .map(|(open, held, latest, latest_event)| claims::OwnLane {
                open,
                held,
                latest: latest.zip(latest_event),
            })
            .collect()
    } else {
        vec![claims::OwnLane::default(); firsts.len()]
    };
    if lanes.len() != firsts.len() {
        return Err(StoreError::Invariant(format!(
            "the lanes of {} new deliveries read as {} rows",
            firsts.len(),
            lanes.len()
        )));
    }
    let later = |latest: Option<(i64, i64)>, event: i64| latest.is_none_or(|(_, e)| event > e);
    for (first, lane) in firsts.iter().zip(lanes.iter_mut()) {
        let own = book.lane_before(
            turn,
            owner,
            (&first.route, &first.entity_type, &first.entity_id),
            first.event_id,
        );
        lane.open += own.open;
        lane.held += own.held;
        if let Some((delivery, event)) = own.latest.filter(|(_, e)| later(lane.latest, *e)) {
            lane.latest = Some((delivery, event));
        }
        let key = (
            first.route.clone(),
            first.entity_type.clone(),
            first.entity_id.clone(),
        );
        for item in others.get(&key).into_iter().flatten() {
            if item.event_id >= first.event_id {
                continue;
            }
            lane.open += 1;
            if later(lane.latest, item.event_id) {
                lane.latest = Some((item.delivery_id, item.event_id));
            }
        }
    }
    Ok(heads
        .iter()
        .zip(lanes)
        .map(|(&index, lane)| {
            let state = match lane.latest {
                _ if lane.open == 0 => LaneState::Free,
                Some((latest, _)) if lane.held == lane.open => LaneState::Held(latest),
                _ => LaneState::Busy,
            };
            (index, state)
        })
        .collect())
}

/// What the ledger holds for the producer keys of the deliveries fan-out started, by
/// (route, key). (A derived key names its own new delivery: no ledger can hold it yet.)
async fn started_ledger(
    conn: &mut PgConnection,
    deliveries: &[NewDelivery],
) -> StoreResult<HashMap<(String, String), LedgerEntry>> {
    let keyed: Vec<&NewDelivery> = deliveries
        .iter()
        .filter(|d| d.start && d.producer_keyed)
        .collect();
    if keyed.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(STARTED_LEDGER)
        .bind(keyed.iter().map(|d| d.route.as_str()).collect::<Vec<_>>())
        .bind(
            keyed
                .iter()
                .map(|d| d.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(conn)
        .await
        .doing("reading the ledger for started deliveries")?;
    let entries = rows
        .iter()
        .map(rows::ledger)
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(rows::ledger_by_key(entries.into_iter().flatten()))
}

async fn apply_settlements(conn: &mut PgConnection, settlements: &[Settlement]) -> StoreResult<()> {
    if settlements.is_empty() {
        return Ok(());
    }
    sqlx::query(SETTLE_EVENTS)
        .bind(settlements.iter().map(|s| s.event_id).collect::<Vec<_>>())
        .bind(
            settlements
                .iter()
                .map(|s| s.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            settlements
                .iter()
                .map(|s| s.reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(conn)
        .await
        .doing("updating events' status")?;
    Ok(())
}

/// Every delivery of these events, in event and delivery order.
async fn events_deliveries(conn: &mut PgConnection, event_ids: &[i64]) -> StoreResult<Vec<PgRow>> {
    sqlx::query(EVENTS_DELIVERIES)
        .bind(event_ids)
        .fetch_all(conn)
        .await
        .doing("reading events' deliveries")
}

/// Settle the events of the deliveries this transaction has just closed.
///
/// An event whose only delivery closed here is settled from the row the close returned:
/// nothing else can change its status (fan-out wrote all of an event's deliveries at
/// once, and this transaction holds the one row lock). A drain of events with one route
/// each reads no delivery to settle them.
///
/// An event with several deliveries, all of them closed here, needs no lock of its own
/// either: this transaction holds the row lock of each of them ([`lock_deliveries`] took
/// it), so no other transaction can change any of them, or settle the event from them,
/// before this one commits; they are read to settle it. Only the events with a delivery
/// not closed here take the locked path of [`resettle_events`], which reads their
/// deliveries again under the lock.
async fn settle_closed(conn: &mut PgConnection, closed: Closed) -> StoreResult<()> {
    let event_ids = closed.events_to_read();
    let Closed {
        recorded,
        alone: mut states,
    } = closed;
    let mut shared: HashSet<i64> = HashSet::new();
    if !event_ids.is_empty() {
        let closed_here: HashSet<i64> = recorded.iter().map(|r| r.delivery_id).collect();
        for row in &events_deliveries(&mut *conn, &event_ids).await? {
            let state = rows::delivery_state(row)?;
            if !closed_here.contains(&row.int("delivery_id")?) {
                shared.insert(state.0);
            }
            states.push(state);
        }
    }
    states.retain(|(event_id, ..)| !shared.contains(event_id));
    states.sort_by_key(|(event_id, ..)| *event_id);
    apply_settlements(&mut *conn, &batch::resettle(states)).await?;
    resettle_events(conn, shared.into_iter().collect()).await
}

/// Recompute the events' status from their deliveries, inside the caller's transaction.
/// The event rows are locked first, in id order: two transactions completing different
/// routes of the same events then neither deadlock nor decide from each other's stale
/// rows (the second reads after the first commits).
async fn resettle_events(conn: &mut PgConnection, mut event_ids: Vec<i64>) -> StoreResult<()> {
    event_ids.sort_unstable();
    event_ids.dedup();
    if event_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(LOCK_EVENTS)
        .bind(&event_ids)
        .execute(&mut *conn)
        .await
        .doing("locking events to settle")?;
    let rows = events_deliveries(&mut *conn, &event_ids).await?;
    let states = rows
        .iter()
        .map(rows::delivery_state)
        .collect::<StoreResult<Vec<_>>>()?;
    apply_settlements(conn, &batch::resettle(states)).await
}

/// Lock these deliveries in id order. Every statement that updates many deliveries by id
/// (closing outcomes, renewing and releasing leases) takes its row locks in this order, so
/// two of them never wait for each other in a cycle (Postgres would abort one as a
/// deadlock, and the outcomes it carried would run again).
async fn lock_deliveries(conn: &mut PgConnection, ids: &[i64]) -> StoreResult<()> {
    sqlx::query(LOCK_DELIVERIES)
        .bind(ids)
        .execute(conn)
        .await
        .doing("locking deliveries")?;
    Ok(())
}

/// Close the deliveries whose lease still holds; returns what each matched one is.
async fn close_deliveries(
    conn: &mut PgConnection,
    completions: &[Completion],
) -> StoreResult<Closed> {
    let updates: Vec<DeliveryUpdate> = completions.iter().map(DeliveryUpdate::of).collect();
    let ids: Vec<i64> = completions.iter().map(|c| c.delivery_id).collect();
    lock_deliveries(&mut *conn, &ids).await?;
    let rows = sqlx::query(CLOSE_DELIVERIES)
        .bind(&ids)
        .bind(
            completions
                .iter()
                .map(|c| c.owner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(completions.iter().map(|c| c.attempt).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.retry_after.as_secs_f64())
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|u| u.error).collect::<Vec<_>>())
        .fetch_all(conn)
        .await
        .doing("recording delivery outcomes")?;
    let mut closed = Closed::default();
    for row in &rows {
        let (recorded, alone) = rows::closed(row)?;
        closed.push(recorded, alone);
    }
    Ok(closed)
}

/// The attempts log and the idempotency ledger for the completions that held.
async fn log_attempts(
    conn: &mut PgConnection,
    matched: &[(&Completion, &Recorded)],
) -> StoreResult<()> {
    if matched.is_empty() {
        return Ok(());
    }
    let outcome = |c: &Completion| c.outcome.attempt_outcome().as_str();
    sqlx::query(LOG_ATTEMPTS)
        .bind(
            matched
                .iter()
                .map(|(c, _)| c.delivery_id)
                .collect::<Vec<_>>(),
        )
        .bind(matched.iter().map(|(_, r)| r.event_id).collect::<Vec<_>>())
        .bind(
            matched
                .iter()
                .map(|(_, r)| r.route.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(matched.iter().map(|(c, _)| c.attempt).collect::<Vec<_>>())
        .bind(matched.iter().map(|(c, _)| outcome(c)).collect::<Vec<_>>())
        .bind(
            matched
                .iter()
                .map(|(c, _)| c.outcome.detail())
                .collect::<Vec<_>>(),
        )
        .bind(
            matched
                .iter()
                .map(|(c, _)| c.plugin_version.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            matched
                .iter()
                .map(|(c, _)| c.owner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            matched
                .iter()
                .map(|(c, _)| c.started_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            matched
                .iter()
                .map(|(c, _)| batch::duration_us(c.duration))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await
        .doing("writing the attempts log")?;
    record_keys(conn, matched).await
}

/// The idempotency ledger for the completions that held.
async fn record_keys(
    conn: &mut PgConnection,
    matched: &[(&Completion, &Recorded)],
) -> StoreResult<()> {
    let outcome = |c: &Completion| c.outcome.attempt_outcome().as_str();
    let keyed = batch::ledger_entries(matched);
    if keyed.is_empty() {
        return Ok(());
    }
    sqlx::query(RECORD_KEYS)
        .bind(
            keyed
                .iter()
                .map(|(_, r)| r.route.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            keyed
                .iter()
                .map(|(_, r)| r.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(keyed.iter().map(|(_, r)| r.event_id).collect::<Vec<_>>())
        .bind(keyed.iter().map(|(c, _)| outcome(c)).collect::<Vec<_>>())
        .bind(
            keyed
                .iter()
                .map(|(c, _)| c.outcome.detail())
                .collect::<Vec<_>>(),
        )
        .execute(conn)
        .await
        .doing("recording idempotency keys")?;
    Ok(())
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

    async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, FanOutStarts)> {
        let mut tx = self.next_fan_out.begin(&self.lease_pool).await?;
        let turn = self.book.begin_fan_out();
        let owner = start.map_or("", |grant| grant.owner.as_str());
        let (candidates, stored) = take_candidates(&mut tx, request, owner).await?;
        if stored.other_claims {
            self.claims_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if candidates.is_empty() {
            return Ok((FanOutReport::default(), FanOutStarts::default()));
        }
        let holders = key_holders(&mut tx, &candidates).await?;
        let mut plan = batch::plan_fan_out(candidates, &holders, router);
        if let Some(grant) = start.filter(|grant| grant.limit > 0 || request.queue_behind > 0) {
            let heads = batch::lane_heads(&plan.deliveries, grant);
            let lanes = lane_states(
                &mut tx,
                (&self.book, &turn),
                &plan.deliveries,
                &heads,
                &grant.owner,
                stored,
            )
            .await?;
            batch::lease_new_deliveries(&mut plan.deliveries, &lanes, grant, request.queue_behind);
        }
        // A started delivery that is its event's only one is leased as a claim item; the
        // rest are delivery rows.
        let (itemized, rows): (Vec<&NewDelivery>, Vec<&NewDelivery>) = plan
            .deliveries
            .iter()
            .partition(|d| self.batch_ledger && d.start && d.alone && start.is_some());
        let mut ids = insert_deliveries(&mut tx, &rows, start).await?;
        if let Some(grant) = start {
            ids.extend(
                claims::lease(&mut tx, &self.book, &itemized, &grant.owner, grant.lease).await?,
            );
        }
        batch::confirm_started(&mut plan.deliveries, &ids);
        let ledger = started_ledger(&mut tx, &plan.deliveries).await?;
        apply_settlements(&mut tx, &plan.settlements).await?;
        self.next_fan_out.commit(tx).await?;
        drop(turn);
        let starts = batch::fan_out_starts(&plan, &ids, &ledger)?;
        Ok((plan.report, starts))
    }

    fn paces_fan_out(&self) -> bool {
        self.batch_ledger
    }

    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        if !self.claims_seen.load(std::sync::atomic::Ordering::Relaxed) {
            // Another instance may have claims this one has not seen (its fan-out takes
            // nothing while another holds the lock, and a restart forgets): the claim
            // takes nothing while any exist, and then this instance looks for good.
            let rows = claim_rows(&self.lease_pool, &claims::CLAIM_UNLESS_CLAIMS, request).await?;
            if !rows.is_empty() {
                return rows.iter().map(rows::claimed).collect();
            }
            let any_claim: bool = sqlx::query_scalar(claims::ANY_CLAIM)
                .fetch_one(&self.lease_pool)
                .await
                .doing("looking for claims")?;
            if !any_claim {
                return Ok(Vec::new());
            }
            self.claims_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut tx = self.lease_pool.begin().await.doing("starting a claim")?;
        claims::recover_lost(&mut tx).await?;
        let rows = claim_rows(&mut *tx, &claims::CLAIM_DELIVERIES, request).await?;
        tx.commit().await.doing("committing a claim")?;
        rows.iter().map(rows::claimed).collect()
    }

    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        let mut tx = self
            .pool
            .begin_with(PLAN_ONCE)
            .await
            .doing("starting to record outcomes")?;
        let held = claims::lock_held(&mut tx, &self.book, completions).await?;
        // Held items still open and closed at this first attempt go into one outcome batch,
        // their events settled first (which finds them open); a held item that failed
        // becomes a delivery row, recorded with every other completion. With no item held
        // (every completion without the batch ledger) the completions are recorded as they
        // came, not copied.
        let mut batched = Vec::new();
        let mut failed_items = Vec::new();
        let per_row: Cow<'_, [Completion]> = if held.is_empty() {
            Cow::Borrowed(completions)
        } else {
            let closing: Vec<(&Completion, &claims::HeldItem)> = completions
                .iter()
                .filter(|c| c.outcome.completes_key())
                .filter_map(|c| Some((c, held.get(&c.delivery_id)?)))
                .collect();
            let open = outcome_batches::settle_open(&mut tx, &closing).await?;
            let mut per_row = Vec::new();
            for completion in completions {
                match held.get(&completion.delivery_id) {
                    Some(item) if open.contains(&completion.delivery_id) => {
                        batched.push((completion, item))
                    }
                    Some(_) if !completion.outcome.completes_key() => {
                        failed_items.push(completion.delivery_id);
                        per_row.push(completion.clone());
                    }
                    // Not an item, or one no longer open: whatever row it is now decides.
                    _ => per_row.push(completion.clone()),
                }
            }
            Cow::Owned(per_row)
        };
        if !failed_items.is_empty() {
            let claims: Vec<i64> = claims::claims_of(&failed_items);
            claims::materialize(&mut tx, &failed_items, &claims).await?;
        }
        outcome_batches::record(&mut tx, &batched).await?;
        let closed = if per_row.is_empty() {
            Closed::default()
        } else {
            close_deliveries(&mut tx, &per_row).await?
        };
        let matched = batch::matched(&per_row, &closed.recorded);
        log_attempts(&mut tx, &matched).await?;
        let committed: HashSet<i64> = closed
            .recorded
            .iter()
            .map(|r| r.delivery_id)
            .chain(batched.iter().map(|(c, _)| c.delivery_id))
            .collect();
        let mut results = Vec::with_capacity(completions.len());
        for completion in completions {
            if !committed.contains(&completion.delivery_id) {
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
        settle_closed(&mut tx, closed).await?;
        claims::delete_spent(&mut tx, &self.book).await?;
        tx.commit().await.doing("committing outcomes")?;
        // Every claim item among these ended here: closed, left open as a row, or lost.
        let (closed, open): (Vec<_>, Vec<_>) = completions
            .iter()
            .zip(&results)
            .filter(|(c, _)| claims::claim_of(c.delivery_id).is_some())
            .partition(|(c, result)| {
                matches!(result, CompletionResult::Committed { .. })
                    && !matches!(c.outcome, Outcome::Retry { .. })
            });
        self.book
            .ended(closed.into_iter().map(|(c, _)| c.delivery_id), true);
        self.book
            .ended(open.into_iter().map(|(c, _)| c.delivery_id), false);
        Ok(results)
    }

    async fn backlog(&self) -> StoreResult<Backlog> {
        // No index names `event_status` (migration 0007), so READY events are counted
        // through the ways an event is READY: still queued for fan-out (migration 0008),
        // or fanned out with a delivery row or a claim item still open (0013). All are
        // look-ups that grow with the backlog, not with the table.
        let row = sqlx::query(
            "SELECT \
             (SELECT count(*) FROM herald_fan_out_queue q JOIN events e USING (event_id) \
                 WHERE e.event_status = 'READY') \
             + (SELECT count(*) FROM events e WHERE e.event_status = 'READY' \
                 AND e.event_id IN (SELECT event_id FROM herald_deliveries \
                     WHERE status IN ('PENDING', 'RETRY') \
                   UNION SELECT unnest(event_ids) FROM herald_claims)) AS ready_events, \
             (SELECT count(*) FROM herald_deliveries WHERE status = 'RETRY') AS waiting_retry",
        )
        .fetch_one(&self.pool)
        .await
        .doing("counting the backlog")?;
        rows::backlog(&row)
    }

    async fn release(&self, owner: &str, delivery_ids: &[i64]) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.doing("starting a release")?;
        // A claim item is given back as a delivery row, which the release then unlocks.
        claims::materialize_own(&mut tx, owner, delivery_ids).await?;
        let released = sqlx::query(
            "UPDATE herald_deliveries SET locked_by = NULL, locked_until = NULL, \
             attempts = attempts - 1, next_attempt_at = least(next_attempt_at, now()) \
             WHERE delivery_id IN (SELECT delivery_id \
               FROM herald_deliveries WHERE delivery_id = ANY($1) AND locked_by = $2 \
               AND status IN ('PENDING', 'RETRY') ORDER BY delivery_id FOR UPDATE)",
        )
        .bind(delivery_ids)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .doing("releasing leases")?;
        tx.commit().await.doing("committing a release")?;
        self.book.ended(delivery_ids.iter().copied(), false);
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
             WHERE delivery_id IN (SELECT delivery_id FROM herald_deliveries \
               WHERE locked_by = $2 AND delivery_id = ANY($3) \
               AND status IN ('PENDING', 'RETRY') ORDER BY delivery_id FOR UPDATE)",
        )
        .bind(lease.as_secs_f64())
        .bind(owner)
        .bind(delivery_ids)
        .execute(&self.pool)
        .await
        .doing("renewing leases")?;
        let items = claims::renew(&self.pool, &self.book, owner, delivery_ids, lease).await?;
        Ok(renewed.rows_affected() + items)
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
        let rows = sqlx::query(
            "SELECT i.instance_id, i.version, i.started_at, i.last_seen, \
             (SELECT count(*) FROM herald_deliveries d WHERE d.locked_by = i.instance_id \
              AND d.locked_until > now() AND d.status IN ('PENDING', 'RETRY')) \
             + (SELECT count(*) FROM herald_open_claim_items c \
              WHERE c.owner = i.instance_id AND c.locked_until > now()) AS leases_held \
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

    async fn request_wake_ups(&self) -> StoreResult<WakeUpRequest> {
        let settled: bool = sqlx::query_scalar(REQUEST_WAKE_UPS)
            .fetch_one(&self.pool)
            .await
            .doing("asking producers for wake-ups")?;
        Ok(if settled {
            WakeUpRequest::Settled
        } else {
            WakeUpRequest::Pending
        })
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
        let deliveries = sqlx::query(outcome_batches::EVENT_DELIVERIES)
            .bind(event_id)
            .fetch_all(&self.pool)
            .await
            .doing("reading an event's deliveries")?;
        let attempts = sqlx::query(outcome_batches::EVENT_ATTEMPTS)
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
        // Batch entries are only ever closed as delivered or skipped: a list of other
        // statuses does not read the batches.
        let source = match filter.status {
            Some(DeliveryStatus::Success | DeliveryStatus::Skipped) | None => {
                "herald_delivery_records"
            }
            Some(_) => "herald_open_delivery_records",
        };
        let mut query = QueryBuilder::<Postgres>::new(format!("SELECT * FROM {source}"));
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
        let redriven = events.len() as u64;
        resettle_events(&mut tx, events).await?;
        tx.commit().await.doing("committing a redrive")?;
        Ok(redriven)
    }
}
