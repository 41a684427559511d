//! The dispatch path's writes on SQLite (fan-out, claims, outcomes, appends, redrives),
//! on one connection of their own, each transaction run as one synchronous call.
//!
//! Why not through sqlx: sqlx runs a SQLite connection on a worker thread of its own,
//! and every statement and every row it returns crosses between that thread and the
//! calling task. These transactions are chains of statements, each waiting for the one
//! before, so the chain spent most of its time in those hand-offs (thread scheduling was
//! a third of the drain's profile, SQLite's own work 6 %). Called in-process, a
//! statement costs a few microseconds, so the statements here are small, prepared once
//! per connection, and run once per row instead of once per batch through JSON. The
//! no-op drain gained 13 % (docs/benchmarks-history.md, the seventh refresh); SQLite's
//! own work is now half of its profile.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, Statement, Transaction};
use tokio::sync::Mutex;

use crate::store::batch::{
    self, Closed, DeliveryState, DeliveryUpdate, NewDelivery, Recorded, Settlement,
};
use crate::store::error::QueryContext;
use crate::store::fan_out::Candidate;
use crate::store::model::{DeliveryStatus, EventStatus};
use crate::store::rows::{self, StoreRow};
use crate::store::time::{from_sqlite_text, to_sqlite_text};
use crate::store::{
    ClaimRequest, ClaimedDelivery, Completion, CompletionResult, FanOutReport, FanOutRequest,
    LedgerEntry, NewEvent, RedriveSelection, Router, StoreError, StoreResult,
    COMPLETED_KEY_COLUMNS,
};

/// Statements kept prepared: every statement below, with room to spare.
const PREPARED_STATEMENTS: usize = 64;

/// The joins [`COMPLETED_KEY_COLUMNS`] reads. SQLite runs a join as nested loops, so each
/// is one look-up per claimed delivery: the ledger's key, and the attempt by its rowid.
const COMPLETED_KEY_JOINS: &str = " \
     LEFT JOIN herald_idempotency i ON i.route = d.route \
       AND i.idempotency_key = d.idempotency_key \
     LEFT JOIN herald_attempts a ON a.attempt_id = (SELECT min(x.attempt_id) \
       FROM herald_attempts x WHERE x.delivery_id = d.delivery_id \
         AND x.outcome IN ('DELIVERED', 'SKIPPED'))";

/// The one connection that writes for dispatch. Kept open for the store's life: a SQLite
/// connection drops its page cache whenever another connection has written since its
/// last transaction, and with these writes spread over a pool nearly every transaction
/// began by reading its pages again.
pub(super) struct Writer {
    /// Held for a whole transaction: it is also this process's turn to write, so its own
    /// writers queue here instead of in SQLite's busy handler, which sleeps and retries.
    connection: Mutex<WriterConnection>,
}

struct WriterConnection {
    connection: Connection,
    /// What `PRAGMA synchronous` is set to now, so it is changed only when a transaction
    /// asks for the other.
    commit: Commit,
}

/// How a transaction's commit reaches the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// The WAL is flushed before the commit returns (`synchronous = FULL`): outcomes, the
    /// attempts log, the ledger, appended and emitted events survive a power cut once
    /// Herald reports them.
    Flushed,
    /// Written to the WAL without waiting for its flush (`synchronous = NORMAL`): fan-out
    /// and claims, which only derive deliveries from events and take leases, as on
    /// Postgres (`synchronous_commit = off` there). A process crash loses nothing; a power
    /// cut or an OS crash may roll such a commit back, and then the deliveries are fanned
    /// out or claimed again and run under the same idempotency keys, as after any crash
    /// between an attempt and its record. Every flushed commit flushes the WAL written
    /// before it, so an outcome is never durable while the lease it closes is not.
    Unflushed,
}

impl Commit {
    fn synchronous(self) -> &'static str {
        match self {
            Commit::Flushed => "FULL",
            Commit::Unflushed => "NORMAL",
        }
    }
}

impl Writer {
    /// Opens the writer on an existing store file (the caller creates it).
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_handler(Some(wait_briefly_for_the_lock))?;
        // FULL: an appended event or a recorded effect survives power loss, not just a
        // process crash; the same settings as the store's pool.
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", true)?;
        // The schema's CHECK constraints (a status or an outcome among its names) stay for
        // every other connection: producers, operators, Herald's own pool. This one writes
        // those columns only from Herald's enums, whose every name the constraints accept
        // (`tests/store_sqlite.rs` holds the two lists together). SQLite checks `IN (…)`
        // of more than two names by building a temporary index of them on each run of a
        // statement, and this connection runs its statements once per row: the no-op
        // drain made 20 % more without it (docs/benchmarks-history.md, the eighth refresh).
        connection.pragma_update(None, "ignore_check_constraints", true)?;
        connection.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        Ok(Writer {
            connection: Mutex::new(WriterConnection {
                connection,
                commit: Commit::Flushed,
            }),
        })
    }

    /// Run `body` in a write transaction (`BEGIN IMMEDIATE`: the write lock up front, so
    /// it never fails to upgrade a stale read snapshot) and commit what it wrote.
    async fn write<T>(
        &self,
        committing: &'static str,
        commit: Commit,
        body: impl FnOnce(&Transaction<'_>, &Now) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut writer = self.connection.lock().await;
        off_the_runtime(|| {
            if writer.commit != commit {
                writer
                    .connection
                    .pragma_update(None, "synchronous", commit.synchronous())
                    .doing("choosing how the commit is flushed")?;
                writer.commit = commit;
            }
            let tx = writer
                .connection
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .doing("starting a write transaction")?;
            let value = body(&tx, &Now::read())?;
            tx.commit().doing(committing)?;
            Ok(value)
        })
    }

    pub async fn append_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
        self.write("committing appended events", Commit::Flushed, |tx, now| {
            events
                .iter()
                .map(|event| insert_event(tx, now, event))
                .collect()
        })
        .await
    }

    pub async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, Vec<ClaimedDelivery>)> {
        self.write("committing fan-out", Commit::Unflushed, |tx, now| {
            let candidates = take_candidates(tx, request)?;
            let holders = key_holders(tx, &candidates)?;
            let mut plan = batch::plan_fan_out(candidates, &holders, router);
            if let Some(grant) = start.filter(|grant| grant.limit > 0) {
                let startable = batch::start_candidates(&plan.deliveries, grant);
                let blocked = blocked_lanes(tx, &plan.deliveries, &startable)?;
                batch::mark_started(&mut plan.deliveries, &startable, &blocked, grant.limit);
            }
            let ids = insert_deliveries(tx, now, &plan.deliveries, start)?;
            batch::confirm_started(&mut plan.deliveries, &ids);
            let ledger = started_ledger(tx, &plan.deliveries)?;
            apply_settlements(tx, &plan.settlements)?;
            let started = batch::started_claims(&plan, &ids, &ledger)?;
            Ok((plan.report, started))
        })
        .await
    }

    pub async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        self.write("committing a claim", Commit::Unflushed, |tx, now| {
            // Read first, then lease what was read: in this write transaction nothing
            // else changes the rows between the two.
            // The due index gives the claim order directly; left to itself SQLite picks
            // the status index and sorts every open delivery on each claim.
            let mut select = tx
                .prepare_cached(&format!(
                    "SELECT d.delivery_id, d.route, d.attempts + 1 AS attempts, \
                     d.idempotency_key, {COMPLETED_KEY_COLUMNS}, \
                     e.event_id, e.event_target, e.event_type, e.entity_type, e.entity_id, \
                     e.event_data, e.event_status, e.status_reason, \
                     e.idempotency_key AS producer_key, e.headers, e.created_at \
                     FROM herald_deliveries d JOIN events e ON e.event_id = d.event_id \
                     {COMPLETED_KEY_JOINS} \
                     WHERE d.delivery_id IN (\
                       SELECT d.delivery_id FROM herald_deliveries d \
                         INDEXED BY herald_deliveries_due \
                       WHERE d.status IN ('PENDING', 'RETRY') \
                         AND d.next_attempt_at <= ?3 \
                         AND (d.locked_until IS NULL OR d.locked_until <= ?3) \
                         AND (NOT d.ordered OR NOT EXISTS (\
                           SELECT 1 FROM herald_deliveries p WHERE p.route = d.route \
                           AND p.entity_type = d.entity_type AND p.entity_id = d.entity_id \
                           AND p.event_id < d.event_id AND p.status IN ('PENDING', 'RETRY'))) \
                         AND d.route NOT IN (SELECT value FROM json_each(?1)) \
                       ORDER BY d.next_attempt_at, d.delivery_id LIMIT ?2) \
                     ORDER BY d.next_attempt_at, d.delivery_id"
                ))
                .doing("claiming deliveries")?;
            let paused = serde_json::Value::from(request.paused_routes.clone()).to_string();
            let columns = Columns::of(&select);
            let mut found = select
                .query(params![paused, i64::from(request.limit), now.text])
                .doing("claiming deliveries")?;
            let mut claimed = Vec::new();
            while let Some(row) = found.next().doing("claiming deliveries")? {
                claimed.push(rows::claimed(&columns.on(row))?);
            }
            let mut lease = tx
                .prepare_cached(
                    "UPDATE herald_deliveries SET locked_by = ?1, locked_until = ?2, \
                     attempts = attempts + 1, updated_at = ?3 \
                     WHERE delivery_id = ?4",
                )
                .doing("leasing claimed deliveries")?;
            let until = now.after(request.lease)?;
            for delivery in &claimed {
                lease
                    .execute(params![
                        request.owner,
                        until,
                        now.text,
                        delivery.delivery_id
                    ])
                    .doing("leasing claimed deliveries")?;
            }
            Ok(claimed)
        })
        .await
    }

    pub async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        self.write("committing outcomes", Commit::Flushed, |tx, now| {
            let closed = close_deliveries(tx, now, completions)?;
            let matched = batch::matched(completions, &closed.recorded);
            log_attempts(tx, now, &matched)?;
            let held: HashSet<i64> = closed.recorded.iter().map(|r| r.delivery_id).collect();
            let mut results = Vec::with_capacity(completions.len());
            for completion in completions {
                if !held.contains(&completion.delivery_id) {
                    results.push(CompletionResult::LeaseLost);
                    continue;
                }
                let emitted = completion
                    .outcome
                    .emitted()
                    .iter()
                    .map(|event| insert_event(tx, now, event))
                    .collect::<StoreResult<Vec<_>>>()?;
                for event in &completion.host_events {
                    insert_event(tx, now, event)?;
                }
                results.push(CompletionResult::Committed { emitted });
            }
            settle_closed(tx, closed)?;
            Ok(results)
        })
        .await
    }

    pub async fn redrive(&self, selection: &RedriveSelection) -> StoreResult<u64> {
        self.write("committing a redrive", Commit::Flushed, |tx, now| {
            let mut redrive = tx
                .prepare_cached(
                    "UPDATE herald_deliveries SET status = 'PENDING', attempts = 0, \
                     next_attempt_at = ?3, last_error = NULL, updated_at = ?3 \
                     WHERE status = 'DEAD' AND (?1 IS NULL OR delivery_id = ?1) \
                       AND (?2 IS NULL OR route = ?2) \
                     RETURNING event_id",
                )
                .doing("redriving dead deliveries")?;
            let events = redrive
                .query_map(
                    params![selection.delivery_id, selection.route, now.text],
                    |row| row.get::<_, i64>(0),
                )
                .doing("redriving dead deliveries")?
                .collect::<Result<Vec<_>, _>>()
                .doing("redriving dead deliveries")?;
            let redriven = events.len() as u64;
            resettle_events(tx, events)?;
            Ok(redriven)
        })
        .await
    }
}

/// How long a write waits for another connection's write lock (a producer's) before it
/// fails: at least 10 s, as the pool's `busy_timeout` (the first ten pauses are shorter
/// than a millisecond, hence the ten looks more).
const LOCK_WAIT_LOOKS: i32 = 10_010;

/// SQLite's own busy handler sleeps 1, 2, 5, 10, … up to 100 ms between looks: a producer's
/// insert holds the lock for a millisecond or two, and the writer then slept for up to
/// 18 ms after it was free. This one looks again within at most a millisecond.
fn wait_briefly_for_the_lock(looks: i32) -> bool {
    match pause_before_look(looks) {
        Some(pause) => {
            std::thread::sleep(pause);
            true
        }
        None => false,
    }
}

/// The pause before look number `looks + 1`: 100 µs longer each time, at most 1 ms; none
/// once [`LOCK_WAIT_LOOKS`] have been made (the write then fails as "database is locked").
fn pause_before_look(looks: i32) -> Option<Duration> {
    if looks >= LOCK_WAIT_LOOKS {
        return None;
    }
    let micros = 100 * u64::try_from(looks.saturating_add(1)).unwrap_or(1);
    Some(Duration::from_micros(micros.min(1_000)))
}

/// Run `work`, which blocks its thread, without stalling the tasks queued behind it: on a
/// multi-threaded runtime the worker's other tasks move to another thread meanwhile. A
/// single-threaded runtime (tests, the CLI) has no other thread to hand them to.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// A transaction's "now", read once as it begins: every timestamp it writes or compares
/// against is this one, in the stored text format. Asking SQLite instead (`strftime` of
/// 'now') formatted the time again for every row written and every row a claim looked
/// at, 4.7 % of the no-op drain's profile (docs/benchmarks-history.md, the eighth refresh).
struct Now {
    at: DateTime<Utc>,
    text: String,
}

impl Now {
    fn read() -> Self {
        let at = Utc::now();
        Now {
            at,
            text: to_sqlite_text(at),
        }
    }

    /// `after` past now, e.g. when a lease runs out or a retry is due. Refused past the
    /// year 9999, where the text would stop sorting as time does.
    fn after(&self, after: Duration) -> StoreResult<String> {
        chrono::Duration::from_std(after)
            .ok()
            .and_then(|after| self.at.checked_add_signed(after))
            .filter(|at| at.year() <= 9999)
            .map(to_sqlite_text)
            .ok_or_else(|| StoreError::Invalid(format!("{after:?} from now is past the year 9999")))
    }
}

/// A statement's column names, read once per run. rusqlite finds a column by name by
/// asking SQLite for each column's name in turn, a C string measured and checked on every
/// look-up; a claim reads some 20 columns of every row by name, and that search was 5 % of
/// the SQLite drain's profile (docs/benchmarks-history.md, the ninth refresh).
struct Columns(Vec<String>);

impl Columns {
    fn of(statement: &Statement<'_>) -> Self {
        Columns(
            statement
                .column_names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        )
    }

    /// `row`, read by the names of this statement's columns.
    fn on<'a, 's>(&'a self, row: &'a Row<'s>) -> NamedRow<'a, 's> {
        NamedRow { columns: self, row }
    }
}

/// A row of a statement whose [`Columns`] were read.
struct NamedRow<'a, 's> {
    columns: &'a Columns,
    row: &'a Row<'s>,
}

impl StoreRow for NamedRow<'_, '_> {
    fn text(&self, column: &str) -> StoreResult<String> {
        self.opt_text(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {column}: unexpected NULL")))
    }
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
        // A TEXT column takes any bytes, and a BLOB too: say which column holds what.
        match value(self, column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                String::from_utf8(bytes.to_vec()).map(Some).map_err(|bad| {
                    StoreError::Corrupt(format!(
                        "{column} is not valid UTF-8 ({})",
                        bad.utf8_error()
                    ))
                })
            }
            other => Err(mismatch(column, "text", other)),
        }
    }
    fn shown_text(&self, column: &str) -> StoreResult<Option<String>> {
        match value(self, column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
            }
            other => Err(mismatch(column, "text", other)),
        }
    }
    fn int(&self, column: &str) -> StoreResult<i64> {
        match value(self, column)? {
            ValueRef::Integer(number) => Ok(number),
            other => Err(mismatch(column, "an integer", other)),
        }
    }
    fn flag(&self, column: &str) -> StoreResult<bool> {
        Ok(self.int(column)? != 0)
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

fn value<'r>(named: &'r NamedRow<'_, '_>, column: &str) -> StoreResult<ValueRef<'r>> {
    let index = named
        .columns
        .0
        .iter()
        .position(|name| name == column)
        .ok_or_else(|| StoreError::Corrupt(format!("column {column}: no such column")))?;
    named
        .row
        .get_ref(index)
        .map_err(|err| StoreError::Corrupt(format!("column {column}: {err}")))
}

fn mismatch(column: &str, expected: &str, found: ValueRef<'_>) -> StoreError {
    StoreError::Corrupt(format!(
        "column {column}: expected {expected}, found {}",
        found.data_type()
    ))
}

fn insert_event(tx: &Transaction<'_>, now: &Now, event: &NewEvent) -> StoreResult<i64> {
    event.validate().map_err(StoreError::Invalid)?;
    tx.prepare_cached(
        "INSERT INTO events (event_target, event_type, entity_type, entity_id, event_data, \
         idempotency_key, headers, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut insert| {
        insert.execute(params![
            event.event_target,
            event.event_type,
            event.entity_type,
            event.entity_id,
            event.event_data.to_string(),
            event.idempotency_key,
            event.headers_json(),
            now.text,
        ])
    })
    .doing("appending an event")?;
    Ok(tx.last_insert_rowid())
}

/// Take the next new events, oldest first, and move the fan-out cursor past them (in the
/// caller's transaction, so a failed pass leaves them new). An event that is not READY
/// when fan-out reaches it is passed over; no path makes an event READY again.
/// Sizes are counted in bytes (`CAST AS BLOB`; `length` of text counts characters), and a
/// payload over the limit is not read at all.
fn take_candidates(tx: &Transaction<'_>, request: &FanOutRequest) -> StoreResult<Vec<Candidate>> {
    let mut take = tx
        .prepare_cached(
            "SELECT event_id, event_status, event_type, event_target, entity_type, entity_id, \
               coalesce(length(CAST(event_data AS BLOB)), 0) AS event_data_bytes, \
               CASE WHEN length(CAST(event_data AS BLOB)) <= ?2 THEN event_data END \
                 AS event_data, \
               coalesce(length(CAST(headers AS BLOB)), 0) AS headers_bytes, \
               CASE WHEN length(CAST(headers AS BLOB)) <= ?2 THEN headers END AS headers, \
               idempotency_key, created_at \
             FROM events WHERE event_id > (SELECT last_event_id FROM herald_fan_out_cursor) \
             ORDER BY event_id LIMIT ?1",
        )
        .doing("reading new events")?;
    let columns = Columns::of(&take);
    let mut found = take
        .query(params![i64::from(request.limit), request.max_bytes_sql()])
        .doing("reading new events")?;
    let mut candidates = Vec::new();
    let mut last = None;
    while let Some(row) = found.next().doing("reading new events")? {
        let row = columns.on(row);
        last = Some(row.int("event_id")?);
        if row.text("event_status")? == EventStatus::Ready.as_str() {
            candidates.push(rows::candidate(&row, request.max_event_bytes)?);
        }
    }
    if let Some(last) = last {
        tx.prepare_cached("UPDATE herald_fan_out_cursor SET last_event_id = ?1")
            .and_then(|mut cursor| cursor.execute([last]))
            .doing("moving the fan-out cursor")?;
    }
    Ok(candidates)
}

/// For each candidate with a producer key, the earliest other event holding that key: an
/// earlier event, or a later one already settled. Either way the candidate repeats it.
/// (Events reach fan-out in the order they committed: SQLite has one writer, and
/// AUTOINCREMENT never hands out an id twice.)
fn key_holders(tx: &Transaction<'_>, candidates: &[Candidate]) -> StoreResult<HashMap<i64, i64>> {
    let mut holders = HashMap::new();
    let mut holder_of = tx
        .prepare_cached(
            "SELECT event_id FROM events o WHERE idempotency_key = ?1 \
             AND event_id <> ?2 AND event_status <> 'DUPLICATE' \
             AND (event_id < ?2 OR event_status <> 'READY') \
             ORDER BY event_id LIMIT 1",
        )
        .doing("checking an idempotency key")?;
    for candidate in candidates {
        let Some(key) = &candidate.idempotency_key else {
            continue;
        };
        let holder: Option<i64> = holder_of
            .query_row(params![key, candidate.head.event_id], |row| row.get(0))
            .optional()
            .doing("checking an idempotency key")?;
        if let Some(holder) = holder {
            holders.insert(candidate.head.event_id, holder);
        }
    }
    Ok(holders)
}

/// Which of `candidates` (indexes into `deliveries`; only ordered routes can be) wait
/// behind an earlier open delivery of their entity on their route.
fn blocked_lanes(
    tx: &Transaction<'_>,
    deliveries: &[NewDelivery],
    candidates: &[usize],
) -> StoreResult<HashSet<usize>> {
    let mut lane_open = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM herald_deliveries \
               WHERE route = ?1 AND entity_type = ?2 AND entity_id = ?3 AND event_id < ?4 \
               AND status IN ('PENDING', 'RETRY'))",
        )
        .doing("checking the entities' open deliveries")?;
    let mut blocked = HashSet::new();
    for &index in candidates {
        let Some(delivery) = deliveries.get(index).filter(|d| d.ordered) else {
            continue;
        };
        let open: bool = lane_open
            .query_row(
                params![
                    delivery.route,
                    delivery.entity_type,
                    delivery.entity_id,
                    delivery.event_id
                ],
                |row| row.get(0),
            )
            .doing("checking the entities' open deliveries")?;
        if open {
            blocked.insert(index);
        }
    }
    Ok(blocked)
}

/// Insert the deliveries, those marked `start` leased to `start`'s owner on their first
/// attempt, and next due when that lease runs out (as on Postgres: the claim's walk of
/// the due index then stops before them). Returns the ids of the started ones by (event,
/// route).
fn insert_deliveries(
    tx: &Transaction<'_>,
    now: &Now,
    deliveries: &[NewDelivery],
    start: Option<&ClaimRequest>,
) -> StoreResult<HashMap<(i64, String), i64>> {
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
             idempotency_key, locked_by, locked_until, attempts, next_attempt_at, created_at, \
             updated_at, alone) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, coalesce(?8, ?10), \
             ?10, ?10, ?11)",
        )
        .doing("creating deliveries")?;
    let lease = match start {
        Some(start) => Some((start.owner.as_str(), now.after(start.lease)?)),
        None => None,
    };
    let mut ids = HashMap::new();
    for delivery in deliveries {
        let (owner, until, attempts) = match (&lease, delivery.start) {
            (Some((owner, until)), true) => (Some(*owner), Some(until.as_str()), 1),
            _ => (None, None, 0),
        };
        insert
            .execute(params![
                delivery.event_id,
                delivery.route,
                delivery.entity_type,
                delivery.entity_id,
                delivery.ordered,
                delivery.idempotency_key,
                owner,
                until,
                attempts,
                now.text,
                delivery.alone,
            ])
            .doing("creating deliveries")?;
        if owner.is_some() {
            ids.insert(
                (delivery.event_id, delivery.route.clone()),
                tx.last_insert_rowid(),
            );
        }
    }
    Ok(ids)
}

/// What the ledger holds for the producer keys of the deliveries fan-out started, by
/// (route, key). (A derived key names its own new delivery: no ledger can hold it yet.)
fn started_ledger(
    tx: &Transaction<'_>,
    deliveries: &[NewDelivery],
) -> StoreResult<HashMap<(String, String), LedgerEntry>> {
    let mut read = tx
        .prepare_cached(
            "SELECT route, idempotency_key, outcome AS ledger_outcome, \
               event_id AS ledger_event_id, detail AS ledger_detail, \
               completed_at AS ledger_completed_at \
             FROM herald_idempotency WHERE route = ?1 AND idempotency_key = ?2",
        )
        .doing("reading the ledger for started deliveries")?;
    let columns = Columns::of(&read);
    let mut entries = Vec::new();
    for delivery in deliveries.iter().filter(|d| d.start && d.producer_keyed) {
        let mut found = read
            .query(params![delivery.route, delivery.idempotency_key])
            .doing("reading the ledger for started deliveries")?;
        if let Some(row) = found
            .next()
            .doing("reading the ledger for started deliveries")?
        {
            entries.extend(rows::ledger(&columns.on(row))?);
        }
    }
    Ok(rows::ledger_by_key(entries))
}

fn apply_settlements(tx: &Transaction<'_>, settlements: &[Settlement]) -> StoreResult<()> {
    if settlements.is_empty() {
        return Ok(());
    }
    let mut settle = tx
        .prepare_cached(
            "UPDATE events SET event_status = ?1, status_reason = ?2 WHERE event_id = ?3",
        )
        .doing("updating events' status")?;
    for settlement in settlements {
        settle
            .execute(params![
                settlement.status.as_str(),
                settlement.reason,
                settlement.event_id
            ])
            .doing("updating events' status")?;
    }
    Ok(())
}

/// Recompute the events' status from their deliveries, inside the caller's transaction.
fn resettle_events(tx: &Transaction<'_>, mut event_ids: Vec<i64>) -> StoreResult<()> {
    event_ids.sort_unstable();
    event_ids.dedup();
    let states = delivery_states(tx, &event_ids)?;
    apply_settlements(tx, &batch::resettle(states))
}

/// Settle the events of the deliveries just closed: an event whose only delivery closed
/// here from that delivery's row, every other from all its deliveries. (One writer:
/// nothing else changes a delivery before this transaction ends.)
fn settle_closed(tx: &Transaction<'_>, closed: Closed) -> StoreResult<()> {
    let event_ids = closed.events_to_read();
    let mut states = closed.alone;
    states.extend(delivery_states(tx, &event_ids)?);
    states.sort_by_key(|(event_id, ..)| *event_id);
    apply_settlements(tx, &batch::resettle(states))
}

/// Every delivery of these events, event by event as given, each event's in id order.
fn delivery_states(tx: &Transaction<'_>, event_ids: &[i64]) -> StoreResult<Vec<DeliveryState>> {
    if event_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut read = tx
        .prepare_cached(
            "SELECT event_id, status, route, last_error FROM herald_deliveries \
             WHERE event_id = ?1 ORDER BY delivery_id",
        )
        .doing("reading events' deliveries")?;
    let columns = Columns::of(&read);
    let mut states = Vec::with_capacity(event_ids.len());
    for event_id in event_ids {
        let mut found = read.query([event_id]).doing("reading events' deliveries")?;
        while let Some(row) = found.next().doing("reading events' deliveries")? {
            states.push(rows::delivery_state(&columns.on(row))?);
        }
    }
    Ok(states)
}

/// Close the deliveries whose lease still holds; returns what each matched one is.
fn close_deliveries(
    tx: &Transaction<'_>,
    now: &Now,
    completions: &[Completion],
) -> StoreResult<Closed> {
    let mut close = tx
        .prepare_cached(
            "UPDATE herald_deliveries SET status = ?1, \
             next_attempt_at = CASE WHEN ?1 = 'RETRY' THEN ?2 ELSE min(next_attempt_at, ?7) END, \
             locked_by = NULL, locked_until = NULL, last_error = ?3, updated_at = ?7 \
             WHERE delivery_id = ?4 AND locked_by = ?5 AND attempts = ?6 \
               AND status IN ('PENDING', 'RETRY') \
             RETURNING delivery_id, event_id, route, idempotency_key, alone, status, \
               last_error",
        )
        .doing("recording delivery outcomes")?;
    let columns = Columns::of(&close);
    let mut closed = Closed::default();
    for completion in completions {
        let update = DeliveryUpdate::of(completion);
        // Only a retry reads it (the statement's CASE): no time to format for the rest.
        let retry_at = match update.status {
            DeliveryStatus::Retry => Some(now.after(update.retry_after)?),
            _ => None,
        };
        let mut found = close
            .query(params![
                update.status.as_str(),
                retry_at,
                update.error,
                completion.delivery_id,
                completion.owner,
                completion.attempt,
                now.text,
            ])
            .doing("recording delivery outcomes")?;
        if let Some(row) = found.next().doing("recording delivery outcomes")? {
            let (recorded, alone) = rows::closed(&columns.on(row))?;
            closed.push(recorded, alone);
        }
    }
    Ok(closed)
}

/// The attempts log and the idempotency ledger for the completions that held.
fn log_attempts(
    tx: &Transaction<'_>,
    now: &Now,
    matched: &[(&Completion, &Recorded)],
) -> StoreResult<()> {
    let mut attempt = tx
        .prepare_cached(
            "INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
             detail, plugin_version, instance, started_at, duration_us, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .doing("writing the attempts log")?;
    for (c, r) in matched {
        attempt
            .execute(params![
                c.delivery_id,
                r.event_id,
                r.route,
                c.attempt,
                c.outcome.attempt_outcome().as_str(),
                c.outcome.detail(),
                c.plugin_version,
                c.owner,
                to_sqlite_text(c.started_at),
                batch::duration_us(c.duration),
                now.text,
            ])
            .doing("writing the attempts log")?;
    }
    let keyed = batch::ledger_entries(matched);
    if keyed.is_empty() {
        return Ok(());
    }
    let mut ledger = tx
        .prepare_cached(
            "INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome, detail, \
             completed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )
        .doing("recording idempotency keys")?;
    for (c, r) in keyed {
        ledger
            .execute(params![
                r.route,
                r.idempotency_key,
                r.event_id,
                c.outcome.attempt_outcome().as_str(),
                c.outcome.detail(),
                now.text,
            ])
            .doing("recording idempotency keys")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_waits_for_the_lock_at_least_10_s_looking_at_least_every_millisecond() {
        let pauses: Vec<Duration> = (0..).map_while(pause_before_look).collect();
        assert_eq!(pauses.len(), LOCK_WAIT_LOOKS as usize);
        assert!(pauses
            .iter()
            .all(|pause| *pause <= Duration::from_millis(1)));
        assert!(pauses.iter().sum::<Duration>() >= Duration::from_secs(10));
    }

    #[test]
    fn a_row_is_read_by_its_columns_names_in_any_order() -> Result<(), Box<dyn std::error::Error>> {
        let connection = Connection::open_in_memory()?;
        let mut select =
            connection.prepare("SELECT 7 AS attempts, 'PENDING' AS status, NULL AS owner")?;
        let columns = Columns::of(&select);
        let mut found = select.query([])?;
        let row = found.next()?.ok_or("the statement returned no row")?;
        let row = columns.on(row);
        assert_eq!(row.opt_text("owner")?, None);
        assert_eq!(row.text("status")?, "PENDING");
        assert_eq!(row.int("attempts")?, 7);
        match row.int("attempt") {
            Err(StoreError::Corrupt(reason)) => {
                assert_eq!(reason, "column attempt: no such column")
            }
            other => panic!("a column the statement has not got was read as {other:?}"),
        }
        Ok(())
    }
}
