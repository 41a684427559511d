//! The statements of fan-out and outcome transactions, and how they are planned; and one
//! that is planned on each run but written to the same rule: the claim. (The batch
//! ledger's statements are in [`super::claims`] and [`super::outcome_batches`].)
//!
//! Each of them runs inside a transaction begun with [`PLAN_ONCE`]: planned once per
//! connection, the plan reused, no sequential scans. Planning was the largest cost of
//! small batches: at 1,000 events/s, one or two events per fan-out pass and per outcome
//! group, Postgres spent 2.5 s of every 10 planning these statements against 2.8 s
//! running them (docs/benchmarks-history.md, the second refresh).
//!
//! A generic plan, though, is made when a connection first runs the statement, maybe
//! while the tables are new and small, and kept until the next ANALYZE of a table it
//! reads. Left to choose, Postgres had kept such a plan for closing deliveries, and a
//! 100,000-event drain spent 5.7 s scanning deliveries to close 150 at a time. So every
//! statement here is written so that, with sequential scans off, no plan of it can read
//! a table but through the ids, the lane or the key it names: by primary key with the ids
//! as an array (`= ANY`), by the lane index, or by a key's index. A test
//! (`tests/store_postgres.rs`) plans each of them on empty tables and checks every scan.

use std::sync::LazyLock;

use crate::store::COMPLETED_KEY_COLUMNS;

/// How the transactions of fan-out and of outcomes begin.
///
/// Without JIT: `enable_seqscan = off` does not forbid a sequential scan, it prices one
/// at 10^10, and a statement that has no other way (the event trigger's read of the
/// one-row wake-up sequence, run for every emitted event and dead notice an outcome
/// inserts) then costs far past `jit_above_cost`. Postgres compiled each such read with
/// LLVM, 25–160 ms apiece: a drain beside a route whose deliveries all went DEAD ran at
/// 700 events/s instead of 15,000 (docs/benchmarks-history.md, the fifteenth refresh).
/// None of these statements is long enough for JIT to pay.
pub const PLAN_ONCE: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// Append one event (the producer API, and the events a plugin emits).
pub const INSERT_EVENT: &str =
    "INSERT INTO events (event_target, event_type, entity_type, entity_id, event_data, \
     idempotency_key, headers) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb) \
     RETURNING event_id";

/// Fan-out: take the next new events off the queue (`take_candidates`). The queue's ids
/// are picked into an array that then leads the delete, and the deleted ids the read of
/// `events`, both by primary key: joined instead, a generic plan could merge them with a
/// walk over every event. Deleting a queue row writes no index entry, and the `events`
/// row is not written at all (migration 0008). An id whose event is gone or no longer
/// READY (deleted or settled by an operator) leaves the queue and is not fanned out.
/// With `$4`, producers stop sending wake-ups (migration 0011), in the same statement so a
/// woken dispatcher pays no round trip for it; the sequence is not transactional, so that
/// holds at once, whatever becomes of this transaction. The payload and headers are turned
/// into text once per event, in a subquery the planner cannot flatten (`OFFSET 0`):
/// flattened, each use of the text (two lengths and the value) ran `jsonb`'s output
/// function again, three times per column and event.
pub const TAKE_NEW_EVENTS: &str =
    "WITH turn AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($2, hashtext(current_schema())) AS held, \
       CASE WHEN $4 THEN setval('herald_wake_ups_requested', 0) END AS wake_ups), \
     taken AS (DELETE FROM herald_fan_out_queue q \
       WHERE q.event_id = ANY (ARRAY(SELECT event_id FROM herald_fan_out_queue, turn \
         WHERE turn.held ORDER BY event_id LIMIT $1)) \
       RETURNING q.event_id), \
     read AS (SELECT e.event_id, e.event_type, e.event_target, e.entity_type, e.entity_id, \
         t.data, t.headers, e.idempotency_key, e.created_at \
       FROM events e CROSS JOIN LATERAL (SELECT e.event_data::text AS data, \
         e.headers::text AS headers OFFSET 0) t \
       WHERE e.event_id = ANY (ARRAY(SELECT event_id FROM taken)) \
         AND e.event_status = 'READY') \
     SELECT event_id, event_type, event_target, entity_type, entity_id, \
       coalesce(octet_length(data), 0)::bigint AS event_data_bytes, \
       CASE WHEN octet_length(data) <= $3 THEN data END AS event_data, \
       coalesce(octet_length(headers), 0)::bigint AS headers_bytes, \
       CASE WHEN octet_length(headers) <= $3 THEN headers END AS headers, \
       idempotency_key, created_at \
     FROM read";

/// Fan-out: the earliest other holder of each candidate's producer key (`key_holders`).
/// The `+ 0` keeps the primary key's order from leading the look-up: the key's index
/// finds the few holders, which are then sorted.
pub const KEY_HOLDERS: &str =
    "SELECT c.id, (SELECT o.event_id FROM events o WHERE o.idempotency_key = c.key \
       AND o.event_id <> c.id AND o.event_status <> 'DUPLICATE' \
       AND (o.event_id < c.id OR o.event_status <> 'READY' \
         OR (o.event_id <> ALL($1) AND NOT EXISTS (SELECT 1 FROM herald_fan_out_queue q \
           WHERE q.event_id = o.event_id))) \
       ORDER BY o.event_id + 0 LIMIT 1) \
     FROM UNNEST($1::bigint[], $2::text[]) AS c(id, key)";

/// Fan-out: what each ordered lane holds before the batch's first new delivery of it
/// (`lane_states`): how many earlier deliveries are open, how many of those the fan-out's
/// owner holds under a live lease, and the latest of them (delivery and event). One probe of the lane index
/// per lane; the aggregate gives a row for every lane, an empty one too.
pub const LANE_STATES: &str = "SELECT h.open_before, h.held_before, h.latest, h.latest_event \
     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
       AS u(event_id, route, entity_type, entity_id, n) \
     CROSS JOIN LATERAL (SELECT count(*) AS open_before, \
         count(*) FILTER (WHERE p.locked_by = $5 AND p.locked_until > now()) AS held_before, \
         (array_agg(p.delivery_id ORDER BY p.event_id DESC))[1] AS latest, \
         max(p.event_id) AS latest_event \
       FROM herald_deliveries p WHERE p.route = u.route \
         AND p.entity_type = u.entity_type AND p.entity_id = u.entity_id \
         AND p.event_id < u.event_id AND p.status IN ('PENDING', 'RETRY')) AS h \
     ORDER BY u.n";

/// Fan-out: insert the deliveries, leasing those marked to start (decided from
/// [`LANE_STATES`]; fan-out runs under its advisory lock, so no other fan-out adds to a
/// lane in between, and a claim only leases a lane's head).
///
/// A leased delivery is next due when its lease runs out, and says so: its
/// `next_attempt_at` is the lease's end, not the insert. The claim walks the due index
/// up to now; with every running delivery dated now, each claim in a drain stepped over
/// all of them, leased and of no use to it (0.8 ms a claim, 7 % of Postgres's statement
/// time in a no-op drain: docs/benchmarks-history.md, the fifteenth refresh). Release
/// and close bring the date back to now at the latest ([`CLOSE_DELIVERIES`], `release`).
pub const INSERT_DELIVERIES: &str = "WITH created AS (\
       INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
         idempotency_key, alone, locked_by, locked_until, attempts, next_attempt_at) \
       SELECT event_id, route, entity_type, entity_id, ordered, key, alone, \
         CASE WHEN start THEN $8 END, \
         CASE WHEN start THEN now() + make_interval(secs => $9) END, \
         CASE WHEN start THEN 1 ELSE 0 END, \
         CASE WHEN start THEN now() + make_interval(secs => $9) ELSE now() END \
       FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bool[], \
           $6::text[], $7::bool[], $10::bool[]) AS u(event_id, route, entity_type, \
           entity_id, ordered, key, start, alone) \
       RETURNING delivery_id, event_id, route, locked_by IS NOT NULL AS started) \
     SELECT delivery_id, event_id, route FROM created WHERE started";

/// Fan-out: what the ledger holds for the producer keys of the started deliveries. One
/// probe per key: the `LIMIT` keeps the look-up from becoming a join, which a plan made
/// while the ledger was small could answer by hashing the whole ledger.
pub const STARTED_LEDGER: &str = "SELECT i.route, i.idempotency_key, i.outcome AS ledger_outcome, \
       i.event_id AS ledger_event_id, i.detail AS ledger_detail, \
       i.completed_at AS ledger_completed_at \
     FROM UNNEST($1::text[], $2::text[]) AS k(route, key) \
     CROSS JOIN LATERAL (SELECT * FROM herald_idempotency l \
       WHERE l.route = k.route AND l.idempotency_key = k.key LIMIT 1) AS i";

/// Set events' status. `= ANY($1)` lets every plan reach the events by primary key.
pub const SETTLE_EVENTS: &str =
    "UPDATE events e SET event_status = u.status, status_reason = u.reason \
     FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS u(id, status, reason) \
     WHERE e.event_id = u.id AND e.event_id = ANY($1)";

/// Outcome: lock the events to settle, in id order.
pub const LOCK_EVENTS: &str =
    "SELECT 1 FROM events WHERE event_id = ANY($1) ORDER BY event_id FOR UPDATE";

/// Outcome and redrive: every delivery of the events to settle (an outcome reads only
/// those of events with more than one delivery).
pub const EVENTS_DELIVERIES: &str =
    "SELECT delivery_id, event_id, status, route, last_error FROM herald_deliveries \
     WHERE event_id = ANY($1) ORDER BY event_id, delivery_id";

/// Outcome: lock the deliveries to close, in id order.
pub const LOCK_DELIVERIES: &str = "SELECT 1 FROM herald_deliveries WHERE delivery_id = ANY($1) \
     ORDER BY delivery_id FOR UPDATE";

/// Outcome: close the deliveries whose lease still holds. Each comes back with whether it
/// is its event's only delivery (migration 0012) and, for when it is, what settles the
/// event. "Still open" is `NOT IN` the closed states rather than `IN` the open ones, which
/// would let a plan walk a partial index over every open delivery; `= ANY($1)` lets every
/// plan reach them by primary key.
pub const CLOSE_DELIVERIES: &str = "UPDATE herald_deliveries d SET status = u.status, \
     next_attempt_at = CASE WHEN u.status = 'RETRY' \
       THEN now() + make_interval(secs => u.retry_secs) \
       ELSE least(d.next_attempt_at, now()) END, \
     locked_by = NULL, locked_until = NULL, last_error = u.error, updated_at = now() \
     FROM UNNEST($1::bigint[], $2::text[], $3::int[], $4::text[], $5::float8[], \
       $6::text[]) AS u(id, owner, attempt, status, retry_secs, error) \
     WHERE d.delivery_id = u.id AND d.delivery_id = ANY($1) \
       AND d.locked_by = u.owner AND d.attempts = u.attempt \
       AND d.status NOT IN ('SUCCESS', 'SKIPPED', 'DEAD') \
     RETURNING d.delivery_id, d.event_id, d.route, d.idempotency_key, d.alone, d.status, \
       d.last_error";

/// Outcome: the attempts log.
pub const LOG_ATTEMPTS: &str =
    "INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
     detail, plugin_version, instance, started_at, duration_us) \
     SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::text[], \
       $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::bigint[])";

/// Outcome: the idempotency ledger.
pub const RECORD_KEYS: &str =
    "INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome, detail) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[]) \
     ON CONFLICT DO NOTHING";

/// Claim: what is known done for each claimed delivery's key, as the columns
/// [`COMPLETED_KEY_COLUMNS`] reads. Each is a LATERAL look-up with a `LIMIT`, one probe
/// of an index per claimed delivery. As plain joins, Postgres answered the attempts log's
/// by hashing the whole log: on a log of 30,000 attempts that was 7 ms of a 12 ms claim
/// of 356 deliveries, and it grows with the log (the ledger's join could do the same).
///
/// The attempts log is read only for a delivery that was claimed or closed before
/// (`attempted`, from [`CLAIM_DELIVERIES`]): one that never was has no attempt to find,
/// and in a drain that is nearly every delivery. Planned per run, the look-up was a
/// bitmap scan and a sort per delivery: 6 ms of a 17.5 ms claim of 500 (`auto_explain`
/// with timing). A delivery is new while it has no attempt counted and its `updated_at`
/// is still its `created_at` (both the fan-out transaction's `now()`): a claim and a
/// close each set `updated_at` in a later transaction, so a re-open by hand that also
/// zeroes the count is still read.
const CLAIM_COMPLETED_KEYS: &str = " \
     LEFT JOIN LATERAL (SELECT l.outcome, l.event_id, l.detail, l.completed_at \
       FROM herald_idempotency l \
       WHERE l.route = d.route AND l.idempotency_key = d.idempotency_key LIMIT 1) i ON TRUE \
     LEFT JOIN LATERAL (SELECT x.outcome, x.event_id, x.detail, x.recorded_at \
       FROM herald_attempts x \
       WHERE d.attempted AND x.delivery_id = d.delivery_id \
         AND x.outcome IN ('DELIVERED', 'SKIPPED') \
       ORDER BY x.attempt_id LIMIT 1) a ON TRUE";

/// Claim: lease the due deliveries (oldest first, an ordered lane's head only, none of a
/// paused route) and read each with its event and what is known done for its key.
/// Parameters: owner, lease in seconds, limit, paused routes.
pub static CLAIM_DELIVERIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH picked AS (\
           SELECT d.delivery_id, d.attempts > 0 OR d.updated_at <> d.created_at AS attempted \
           FROM herald_deliveries d \
           WHERE d.status IN ('PENDING', 'RETRY') AND d.next_attempt_at <= now() \
             AND (d.locked_until IS NULL OR d.locked_until <= now()) \
             AND (NOT d.ordered OR NOT EXISTS (\
               SELECT 1 FROM herald_deliveries p WHERE p.route = d.route \
               AND p.entity_type = d.entity_type AND p.entity_id = d.entity_id \
               AND p.event_id < d.event_id AND p.status IN ('PENDING', 'RETRY'))) \
             AND NOT (d.route = ANY($4)) \
           ORDER BY d.next_attempt_at, d.delivery_id LIMIT $3 \
           FOR UPDATE SKIP LOCKED), \
         claimed AS (\
           UPDATE herald_deliveries d SET locked_by = $1, \
             locked_until = now() + make_interval(secs => $2), \
             attempts = d.attempts + 1, updated_at = now() \
           FROM picked WHERE d.delivery_id = picked.delivery_id \
           RETURNING d.delivery_id, d.event_id, d.route, d.attempts, d.idempotency_key, \
             d.next_attempt_at, picked.attempted) \
         SELECT d.delivery_id, d.route, d.attempts, d.idempotency_key, \
           {COMPLETED_KEY_COLUMNS}, \
           e.event_id, e.event_target, e.event_type, e.entity_type, e.entity_id, \
           e.event_data::text AS event_data, e.event_status, e.status_reason, \
           e.idempotency_key AS producer_key, e.headers::text AS headers, e.created_at \
         FROM claimed d JOIN events e ON e.event_id = d.event_id{CLAIM_COMPLETED_KEYS} \
         ORDER BY d.next_attempt_at, d.delivery_id"
    )
});

/// Every statement of fan-out and outcome transactions, by name, for the plan test.
pub fn planned_once() -> Vec<(&'static str, &'static str)> {
    use super::{claims, outcome_batches};
    vec![
        ("insert_event", INSERT_EVENT),
        ("take_new_events", claims::TAKE_NEW_EVENTS.as_str()),
        ("key_holders", KEY_HOLDERS),
        ("lane_states", LANE_STATES),
        ("lane_items", claims::LANE_ITEMS.as_str()),
        ("insert_deliveries", INSERT_DELIVERIES),
        ("insert_claim", claims::INSERT_CLAIM),
        ("started_ledger", STARTED_LEDGER),
        ("settle_events", SETTLE_EVENTS),
        ("lock_events", LOCK_EVENTS),
        ("events_deliveries", EVENTS_DELIVERIES),
        ("lock_claims", claims::LOCK_CLAIMS),
        ("claim_items", claims::CLAIM_ITEMS),
        ("settle_open_items", outcome_batches::SETTLE_OPEN_ITEMS),
        ("materialize", claims::MATERIALIZE.as_str()),
        (
            "insert_outcome_batch",
            outcome_batches::INSERT_OUTCOME_BATCH,
        ),
        ("lock_deliveries", LOCK_DELIVERIES),
        ("close_deliveries", CLOSE_DELIVERIES),
        ("log_attempts", LOG_ATTEMPTS),
        ("record_keys", RECORD_KEYS),
        ("delete_spent_claims", claims::DELETE_SPENT),
    ]
}
