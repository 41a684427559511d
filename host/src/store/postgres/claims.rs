//! The lease side of the batch ledger (migration 0013): fan-out leases the deliveries it
//! starts as the items of one `herald_claims` row per pass, instead of a delivery row
//! each. Only a delivery that is its event's only one can be an item, so an item is open
//! exactly while its event is READY and no delivery row carries its id.
//!
//! An item leaves the claim in one of four ways: closed at its first attempt as delivered
//! or skipped (an outcome batch entry, [`super::outcome_batches`]); failed, given back,
//! or its claim's lease ran out (it becomes a `herald_deliveries` row under its own id,
//! [`MATERIALIZE`], and goes on as any delivery). A claim none of whose items is open is
//! deleted; one whose lease ran out is recovered by the next claim of any instance.
//!
//! Per-entity order across the two shapes: fan-out reads this instance's open items from
//! memory ([`ClaimBook`]) and other owners' (and expired) claims from the table, only when
//! its take says any exist; the claim's order check reads open items of every claim.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;

use super::QueryContext;
use crate::store::batch::NewDelivery;
use crate::store::{Completion, StoreResult};

/// Items per claim: a claim item's delivery id is -(claim_id × ITEM_SPAN + position).
/// Migration 0013's views compute the same ids.
pub const ITEM_SPAN: i64 = 4096;

/// The delivery id of the item at `position` of `claim_id`.
pub(crate) fn item_id(claim_id: i64, position: usize) -> i64 {
    -(claim_id * ITEM_SPAN + position as i64)
}

/// The claim and position a delivery id names, if it is a claim item's.
fn item_of(delivery_id: i64) -> Option<(i64, usize)> {
    (delivery_id < 0).then(|| {
        let n = -delivery_id;
        (n / ITEM_SPAN, (n % ITEM_SPAN) as usize)
    })
}

pub(crate) fn claim_of(delivery_id: i64) -> Option<i64> {
    item_of(delivery_id).map(|(claim, _)| claim)
}

/// The claims these delivery ids name, sorted, once each.
pub(crate) fn claims_of(delivery_ids: &[i64]) -> Vec<i64> {
    let mut claims: Vec<i64> = delivery_ids.iter().filter_map(|id| claim_of(*id)).collect();
    claims.sort_unstable();
    claims.dedup();
    claims
}

pub const INSERT_CLAIM: &str =
    "INSERT INTO herald_claims (owner, locked_until, event_ids, routes, \
       entity_types, entity_ids, ordered, idempotency_keys) \
     VALUES ($1, now() + make_interval(secs => $2), $3, $4, $5, $6, $7, $8) \
     RETURNING claim_id, created_at";

/// A claim's items: `c` the claim, `u` its items, `u.n` the 1-based position.
const ITEMS: &str = "unnest(c.event_ids, c.routes, c.entity_types, c.entity_ids, c.ordered, \
     c.idempotency_keys) WITH ORDINALITY \
     AS u(event_id, route, entity_type, entity_id, ordered, key, n)";
const ITEM_ID: &str = "-(c.claim_id * 4096 + u.n - 1)";

/// Fan-out's take of new events, also saying whether any delivery row is open and whether
/// any claim is not this instance's live one ($5 the owner): when neither, no lane needs
/// reading from the database. One statement, so a drain pays no round trip for it.
pub static TAKE_NEW_EVENTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}, (SELECT EXISTS (SELECT 1 FROM herald_deliveries \
             WHERE status IN ('PENDING', 'RETRY'))) AS open_rows, \
           (SELECT EXISTS (SELECT 1 FROM herald_claims \
             WHERE owner <> $5 OR locked_until <= now())) AS other_claims \
         FROM read",
        super::plans::TAKE_NEW_EVENTS
            .strip_suffix(" FROM read")
            .unwrap_or(super::plans::TAKE_NEW_EVENTS)
    )
});

/// The ordered items, on these lanes, of the claims that are not `$4`'s live ones, whose
/// events are READY, and whether any delivery row is open, both as one snapshot sees
/// them. An item that becomes a delivery row is a row before its claim is deleted, so one
/// snapshot shows it in one shape or both; the take's own answer about rows, an earlier
/// snapshot, could miss a row made since from an item this statement no longer sees. (A
/// row for an item read here is counted twice with the rows': that only makes fan-out more
/// careful.) Parameters: routes, entity types, entity ids, owner. The claims table holds
/// only open claims, and is read whole; the events are read by primary key, through an
/// array, so no plan walks them.
pub static LANE_ITEMS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH items AS MATERIALIZED (SELECT {ITEM_ID} AS delivery_id, u.event_id, u.route, \
             u.entity_type, u.entity_id \
           FROM herald_claims c CROSS JOIN LATERAL {ITEMS} \
           WHERE (c.owner <> $4 OR c.locked_until <= now()) AND u.ordered \
             AND (u.route, u.entity_type, u.entity_id) IN \
               (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))), \
         open AS (SELECT i.delivery_id, i.event_id, i.route, i.entity_type, i.entity_id \
           FROM items i WHERE i.event_id IN (SELECT e.event_id FROM events e \
             WHERE e.event_id = ANY (ARRAY(SELECT event_id FROM items)) \
               AND e.event_status = 'READY')) \
         SELECT (SELECT EXISTS (SELECT 1 FROM herald_deliveries \
             WHERE status IN ('PENDING', 'RETRY'))) AS open_rows, \
           o.delivery_id, o.event_id, o.route, o.entity_type, o.entity_id \
         FROM (SELECT 1) AS one LEFT JOIN open o ON true"
    )
});

/// Whose these claims are and whether their lease lasts, holding them against recovery
/// with a key-share lock (outcomes recording items of the same claim do not wait for each
/// other; recovery's and a release's row locks do). Not their items: the book has those
/// of the claims this process made, and a claim's arrays are read whole, however few of
/// its items an outcome records.
pub const LOCK_CLAIMS: &str = "SELECT claim_id, owner, locked_until > now() AS live \
     FROM herald_claims WHERE claim_id = ANY($1) ORDER BY claim_id FOR KEY SHARE";

/// The items of claims the book does not know (made through another store handle).
pub const CLAIM_ITEMS: &str = "SELECT claim_id, created_at, event_ids, routes, ordered, \
       idempotency_keys FROM herald_claims WHERE claim_id = ANY($1)";

/// Turn open claim items into delivery rows, still leased to the claim's owner while its
/// lease lasts. Parameters: delivery ids (NULL: every item), claim ids.
pub static MATERIALIZE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO herald_deliveries (delivery_id, event_id, route, entity_type, entity_id, \
           ordered, idempotency_key, alone, locked_by, locked_until, attempts, \
           next_attempt_at, created_at, updated_at) OVERRIDING SYSTEM VALUE \
         SELECT {ITEM_ID}, u.event_id, u.route, u.entity_type, u.entity_id, u.ordered, \
           u.key, true, CASE WHEN c.locked_until > now() THEN c.owner END, \
           CASE WHEN c.locked_until > now() THEN c.locked_until END, 1, \
           greatest(c.locked_until, now()), c.created_at, now() \
         FROM herald_claims c CROSS JOIN LATERAL {ITEMS} \
         JOIN events e ON e.event_id = u.event_id AND e.event_status = 'READY' \
         WHERE c.claim_id = ANY($2) AND ($1::bigint[] IS NULL OR {ITEM_ID} = ANY($1)) \
         ON CONFLICT DO NOTHING RETURNING delivery_id"
    )
});

/// The same, for the open items of these claims that are not among the delivery ids: what
/// a renewal of the claims must not extend. Parameters: delivery ids still held, claim ids.
pub static MATERIALIZE_UNHELD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    MATERIALIZE.replacen(
        &format!("($1::bigint[] IS NULL OR {ITEM_ID} = ANY($1))"),
        &format!("NOT ({ITEM_ID} = ANY($1))"),
        1,
    )
});

/// Delete the claims none of whose events is READY any more (a materialized item's row
/// carries it on), unless another transaction holds one: it may still be recording, and
/// the claim is deleted later, by this or by recovery.
/// (The count is a subquery Postgres cannot turn into a join: it reads each claim's
/// events by primary key.)
pub const DELETE_SPENT: &str = "DELETE FROM herald_claims WHERE claim_id IN (\
       SELECT c.claim_id FROM herald_claims c WHERE c.claim_id = ANY($1) \
         AND (SELECT count(*) FROM events e WHERE e.event_id = ANY(c.event_ids) \
           AND e.event_status = 'READY' AND NOT EXISTS (SELECT 1 FROM herald_deliveries d \
             WHERE d.event_id = e.event_id)) = 0 \
       FOR UPDATE SKIP LOCKED) RETURNING claim_id";

/// The claims whose lease ran out, for recovery; those another transaction holds are
/// left to a later claim.
const LOST_CLAIMS: &str = "SELECT claim_id FROM herald_claims WHERE locked_until <= now() \
     ORDER BY claim_id FOR UPDATE SKIP LOCKED";

/// A claim of this owner, locked to give items back.
const OWN_CLAIMS: &str = "SELECT claim_id FROM herald_claims WHERE owner = $1 \
     AND claim_id = ANY($2) ORDER BY claim_id FOR UPDATE";

/// This owner's live claims among these, locked to renew them.
const LOCK_LIVE_CLAIMS: &str = "SELECT claim_id FROM herald_claims WHERE owner = $1 \
     AND claim_id = ANY($2) AND locked_until > now() ORDER BY claim_id FOR UPDATE";

const RENEW_CLAIMS: &str =
    "UPDATE herald_claims SET locked_until = now() + make_interval(secs => $1) \
     WHERE claim_id = ANY($2)";

/// The claim's order check, on top of [`super::plans::CLAIM_DELIVERIES`]: a delivery row
/// waits for an earlier open claim item of its lane too. The lanes' first open items are
/// read once per claim, and only if a due ordered row is looked at.
pub static CLAIM_DELIVERIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    super::plans::CLAIM_DELIVERIES
        .replacen(
            "WITH picked AS (",
            "WITH claim_lanes AS MATERIALIZED (SELECT u.route, u.entity_type, u.entity_id, \
               min(u.event_id) AS first_event FROM herald_claims c CROSS JOIN LATERAL \
               unnest(c.event_ids, c.routes, c.entity_types, c.entity_ids, c.ordered) \
               AS u(event_id, route, entity_type, entity_id, ordered) \
               JOIN events e ON e.event_id = u.event_id AND e.event_status = 'READY' \
               WHERE u.ordered GROUP BY 1, 2, 3), picked AS (",
            1,
        )
        .replacen(
            "AND NOT (d.route = ANY($4))",
            "AND (NOT d.ordered OR NOT EXISTS (SELECT 1 FROM claim_lanes l \
               WHERE l.route = d.route AND l.entity_type = d.entity_type \
               AND l.entity_id = d.entity_id AND l.first_event < d.event_id)) \
             AND NOT (d.route = ANY($4))",
            1,
        )
});

/// The claim of an instance that has not seen a claim row yet: the statement without the
/// claims' order check, which claims nothing while any claim exists. The same snapshot
/// that picks the rows sees the claims, so a claim made since this instance last looked
/// cannot let it take a row behind that claim's item.
pub static CLAIM_UNLESS_CLAIMS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    super::plans::CLAIM_DELIVERIES.replacen(
        "AND NOT (d.route = ANY($4))",
        "AND NOT EXISTS (SELECT 1 FROM herald_claims) AND NOT (d.route = ANY($4))",
        1,
    )
});

/// Whether any claim exists.
pub const ANY_CLAIM: &str = "SELECT EXISTS (SELECT 1 FROM herald_claims)";

/// A lane: (owner, route, entity type, entity id).
type LaneKey = (String, String, String, String);

/// What this store's process knows of its own claims, so fan-out need not read them, and
/// outcomes need not read their items back (a claim's items never change once written).
///
/// It may count an item as open for a while after the database stops: fan-out then only
/// waits where it need not. It must never count less than the database shows, so an item
/// enters the book before its claim commits, and one that ended is still counted by every
/// fan-out that began before it ended: such a fan-out may have asked the database whether
/// any delivery row is open before the item became one. An item whose claim's lease ran
/// out well before now is left to the database, which reads expired claims.
#[derive(Default)]
pub(crate) struct ClaimBook {
    state: Mutex<BookState>,
}

#[derive(Default)]
struct BookState {
    /// Claim → items not yet ended here.
    open: HashMap<i64, usize>,
    /// Claim → its items as written, while any is open here.
    items: HashMap<i64, Arc<ClaimItems>>,
    /// Claim → when its lease ends, as known here (never before the database's end), and
    /// the lease's length.
    leases: HashMap<i64, (Instant, Duration)>,
    /// Claims whose items all ended here, to delete in a later transaction.
    spent: Vec<i64>,
    /// Ordered items by lane: event id → entry.
    lanes: HashMap<LaneKey, BTreeMap<i64, LaneEntry>>,
    /// Ordered item → its lane and event.
    lane_of: HashMap<i64, (LaneKey, i64)>,
    /// Fan-outs begun so far, and those still running.
    fan_outs: u64,
    running: Vec<u64>,
}

/// A claim's items, in the claim's columns.
#[derive(Debug)]
struct ClaimItems {
    created_at: DateTime<Utc>,
    event_ids: Vec<i64>,
    routes: Vec<String>,
    ordered: Vec<bool>,
    keys: Vec<String>,
}

impl ClaimItems {
    fn held(&self, position: usize) -> Option<HeldItem> {
        Some(HeldItem {
            leased_at: self.created_at,
            event_id: *self.event_ids.get(position)?,
            route: self.routes.get(position)?.clone(),
            ordered: *self.ordered.get(position)?,
            idempotency_key: self.keys.get(position)?.clone(),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct LaneEntry {
    delivery_id: i64,
    ended: Option<Ending>,
}

#[derive(Debug, Clone, Copy)]
struct Ending {
    /// Closed (its lane moves on), or left open as a delivery row or to another instance.
    closed: bool,
    /// Fan-outs begun when it ended: those may not have seen it end.
    fan_outs: u64,
}

/// What this process holds on a lane before an event: open items, how many of them
/// under a live lease, and the latest (delivery id, event id).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OwnLane {
    pub open: i64,
    pub held: i64,
    pub latest: Option<(i64, i64)>,
}

/// A fan-out's turn with the book, from [`ClaimBook::begin_fan_out`]; ended when dropped.
pub(crate) struct FanOutTurn<'a> {
    book: &'a ClaimBook,
    ticket: u64,
}

impl Drop for FanOutTurn<'_> {
    fn drop(&mut self) {
        self.book.end_fan_out(self.ticket);
    }
}

impl ClaimBook {
    fn state(&self) -> MutexGuard<'_, BookState> {
        // The state is plain data that every step leaves whole; a panic elsewhere while
        // holding it leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Before a fan-out reads anything.
    pub fn begin_fan_out(&self) -> FanOutTurn<'_> {
        let mut state = self.state();
        state.fan_outs += 1;
        let ticket = state.fan_outs;
        state.running.push(ticket);
        FanOutTurn { book: self, ticket }
    }

    /// Forget the endings no running fan-out began before, and the items left to the
    /// database.
    fn end_fan_out(&self, ticket: u64) {
        let mut state = self.state();
        state.running.retain(|t| *t != ticket);
        let oldest = state.running.iter().min().copied().unwrap_or(u64::MAX);
        let now = Instant::now();
        let BookState {
            lanes,
            lane_of,
            leases,
            ..
        } = &mut *state;
        lanes.retain(|_, items| {
            items.retain(|_, entry| {
                let keep = match entry.ended {
                    Some(ending) => ending.fan_outs >= oldest,
                    None => !left_to_database(leases, entry.delivery_id, now),
                };
                if !keep {
                    lane_of.remove(&entry.delivery_id);
                }
                keep
            });
            !items.is_empty()
        });
    }

    /// A claim's items, before its transaction commits.
    fn opened(
        &self,
        owner: &str,
        claim_id: i64,
        written: ClaimItems,
        items: &[(&NewDelivery, i64)],
        lease: Duration,
    ) {
        let mut state = self.state();
        state.open.insert(claim_id, items.len());
        state.items.insert(claim_id, Arc::new(written));
        state
            .leases
            .insert(claim_id, (Instant::now() + lease, lease));
        for (delivery, id) in items.iter().filter(|(d, _)| d.ordered) {
            let lane = (
                owner.to_owned(),
                delivery.route.clone(),
                delivery.entity_type.clone(),
                delivery.entity_id.clone(),
            );
            let entry = LaneEntry {
                delivery_id: *id,
                ended: None,
            };
            state
                .lanes
                .entry(lane.clone())
                .or_default()
                .insert(delivery.event_id, entry);
            state.lane_of.insert(*id, (lane, delivery.event_id));
        }
    }

    /// These items ended here: `closed` (their lane moves on), or left open (a delivery
    /// row now, or another instance's).
    pub fn ended(&self, delivery_ids: impl IntoIterator<Item = i64>, closed: bool) {
        let mut state = self.state();
        let ending = Ending {
            closed,
            fan_outs: state.fan_outs,
        };
        for id in delivery_ids {
            let Some(claim) = claim_of(id) else {
                continue;
            };
            if let Some((lane, event_id)) = state.lane_of.get(&id).cloned() {
                if let Some(entry) = state
                    .lanes
                    .get_mut(&lane)
                    .and_then(|items| items.get_mut(&event_id))
                {
                    entry.ended.get_or_insert(ending);
                }
            }
            if let Some(open) = state.open.get_mut(&claim) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    state.open.remove(&claim);
                    state.items.remove(&claim);
                    state.spent.push(claim);
                }
            }
        }
    }

    fn renewed(&self, claims: &[i64], lease: Duration) {
        let end = Instant::now() + lease;
        let mut state = self.state();
        for claim in claims {
            if let Some(known) = state.leases.get_mut(claim) {
                *known = (end, lease);
            }
        }
    }

    /// This owner's open items on a lane before `event_id`, as the fan-out of `turn`
    /// must count them.
    pub fn lane_before(
        &self,
        turn: &FanOutTurn<'_>,
        owner: &str,
        lane: (&str, &str, &str),
        event_id: i64,
    ) -> OwnLane {
        let state = self.state();
        let key = (
            owner.to_owned(),
            lane.0.to_owned(),
            lane.1.to_owned(),
            lane.2.to_owned(),
        );
        let Some(items) = state.lanes.get(&key) else {
            return OwnLane::default();
        };
        let now = Instant::now();
        let mut own = OwnLane::default();
        for (&event, entry) in items.range(..event_id) {
            let live = claim_of(entry.delivery_id)
                .and_then(|claim| state.leases.get(&claim))
                .is_some_and(|(end, _)| *end > now);
            let held = match entry.ended {
                Some(ending) if ending.fan_outs >= turn.ticket => ending.closed && live,
                Some(_) => continue,
                None if left_to_database(&state.leases, entry.delivery_id, now) => continue,
                None => live,
            };
            own.open += 1;
            own.held += i64::from(held);
            own.latest = Some((entry.delivery_id, event));
        }
        own
    }

    /// The items of those of `claims` the book knows.
    fn items_of(&self, claims: &[i64]) -> HashMap<i64, Arc<ClaimItems>> {
        let state = self.state();
        claims
            .iter()
            .filter_map(|claim| Some((*claim, state.items.get(claim)?.clone())))
            .collect()
    }

    fn take_spent(&self) -> Vec<i64> {
        std::mem::take(&mut self.state().spent)
    }

    fn still_spent(&self, claims: impl IntoIterator<Item = i64>) {
        self.state().spent.extend(claims);
    }
}

/// Whether an item's claim lease ran out a whole lease ago: the database has shown it
/// expired since (its end is never later than the book's), to every fan-out's read of
/// other and expired claims.
fn left_to_database(
    leases: &HashMap<i64, (Instant, Duration)>,
    delivery_id: i64,
    now: Instant,
) -> bool {
    claim_of(delivery_id)
        .and_then(|claim| leases.get(&claim))
        .is_none_or(|(end, lease)| *end + *lease <= now)
}

/// Lease `deliveries` (started, each its event's only one) as claims of `owner`, at most
/// [`ITEM_SPAN`] items each; their delivery ids by (event, route). The book learns of
/// them at once.
pub(crate) async fn lease(
    conn: &mut PgConnection,
    book: &ClaimBook,
    deliveries: &[&NewDelivery],
    owner: &str,
    lease: Duration,
) -> StoreResult<HashMap<(i64, String), i64>> {
    let mut ids = HashMap::with_capacity(deliveries.len());
    // On failure the book keeps what it learnt: whether the claims committed is not known
    // for certain, and it may count more than there is, never less.
    lease_chunks(conn, book, deliveries, owner, lease, &mut ids).await?;
    Ok(ids)
}

async fn lease_chunks(
    conn: &mut PgConnection,
    book: &ClaimBook,
    deliveries: &[&NewDelivery],
    owner: &str,
    lease: Duration,
    ids: &mut HashMap<(i64, String), i64>,
) -> StoreResult<()> {
    for chunk in deliveries.chunks(ITEM_SPAN as usize) {
        let column = |f: fn(&NewDelivery) -> &str| chunk.iter().map(|d| f(d)).collect::<Vec<_>>();
        // The columns the book keeps are owned: written once, read by every outcome.
        let owned = |f: fn(&NewDelivery) -> &str| -> Vec<String> {
            chunk.iter().map(|d| f(d).to_owned()).collect()
        };
        let event_ids: Vec<i64> = chunk.iter().map(|d| d.event_id).collect();
        let routes = owned(|d| &d.route);
        let ordered: Vec<bool> = chunk.iter().map(|d| d.ordered).collect();
        let keys = owned(|d| &d.idempotency_key);
        let (claim_id, created_at): (i64, DateTime<Utc>) = sqlx::query_as(INSERT_CLAIM)
            .bind(owner)
            .bind(lease.as_secs_f64())
            .bind(&event_ids)
            .bind(&routes)
            .bind(column(|d| &d.entity_type))
            .bind(column(|d| &d.entity_id))
            .bind(&ordered)
            .bind(&keys)
            .fetch_one(&mut *conn)
            .await
            .doing("leasing started deliveries as a claim")?;
        let written = ClaimItems {
            created_at,
            event_ids,
            routes,
            ordered,
            keys,
        };
        let items: Vec<(&NewDelivery, i64)> = chunk
            .iter()
            .enumerate()
            .map(|(position, d)| (*d, item_id(claim_id, position)))
            .collect();
        book.opened(owner, claim_id, written, &items, lease);
        ids.extend(
            items
                .into_iter()
                .map(|(d, id)| ((d.event_id, d.route.clone()), id)),
        );
    }
    Ok(())
}

/// An open ordered item of another owner's claim, or of an expired one.
pub(crate) struct LaneItem {
    pub delivery_id: i64,
    pub event_id: i64,
}

/// The open items on these lanes (route, entity type, entity id) of claims not `owner`'s
/// live ones, by lane, and whether any delivery row is open, from one snapshot
/// ([`LANE_ITEMS`]).
pub(crate) async fn other_lane_items(
    conn: &mut PgConnection,
    lanes: &[(&str, &str, &str)],
    owner: &str,
) -> StoreResult<(HashMap<(String, String, String), Vec<LaneItem>>, bool)> {
    type Row = (
        bool,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(&LANE_ITEMS)
        .bind(lanes.iter().map(|l| l.0).collect::<Vec<_>>())
        .bind(lanes.iter().map(|l| l.1).collect::<Vec<_>>())
        .bind(lanes.iter().map(|l| l.2).collect::<Vec<_>>())
        .bind(owner)
        .fetch_all(conn)
        .await
        .doing("reading the claimed items of new deliveries' lanes")?;
    let open_rows = rows.first().is_some_and(|row| row.0);
    let mut items: HashMap<(String, String, String), Vec<LaneItem>> = HashMap::new();
    for row in rows {
        if let (
            _,
            Some(delivery_id),
            Some(event_id),
            Some(route),
            Some(entity_type),
            Some(entity_id),
        ) = row
        {
            items
                .entry((route, entity_type, entity_id))
                .or_default()
                .push(LaneItem {
                    delivery_id,
                    event_id,
                });
        }
    }
    Ok((items, open_rows))
}

/// Turn the open items of claims whose lease ran out into deliveries due now, and delete
/// those claims.
pub(crate) async fn recover_lost(conn: &mut PgConnection) -> StoreResult<()> {
    let lost: Vec<i64> = sqlx::query_scalar(LOST_CLAIMS)
        .fetch_all(&mut *conn)
        .await
        .doing("finding claims whose lease ran out")?;
    if lost.is_empty() {
        return Ok(());
    }
    sqlx::query(&MATERIALIZE)
        .bind(None::<Vec<i64>>)
        .bind(&lost)
        .execute(&mut *conn)
        .await
        .doing("turning the open items of lost claims into deliveries")?;
    sqlx::query("DELETE FROM herald_claims WHERE claim_id = ANY($1)")
        .bind(&lost)
        .execute(conn)
        .await
        .doing("deleting lost claims")?;
    Ok(())
}

/// A completion's claim item, under a live claim of the completion's owner.
pub(crate) struct HeldItem {
    /// When fan-out leased it: its claim's creation.
    pub leased_at: DateTime<Utc>,
    pub event_id: i64,
    pub route: String,
    pub ordered: bool,
    pub idempotency_key: String,
}

/// The completions of a first attempt on an item of a live claim their owner holds, by
/// delivery id; the claims are key-share locked until the transaction ends. Whether each
/// item is still open is decided where it is recorded
/// ([`super::outcome_batches::SETTLE_OPEN_ITEMS`]) or turned into a row ([`MATERIALIZE`]),
/// each a later statement than this lock's.
pub(crate) async fn lock_held(
    conn: &mut PgConnection,
    book: &ClaimBook,
    completions: &[Completion],
) -> StoreResult<HashMap<i64, HeldItem>> {
    let firsts = || completions.iter().filter(|c| c.attempt == 1);
    let wanted: Vec<i64> = {
        let ids: Vec<i64> = firsts().map(|c| c.delivery_id).collect();
        claims_of(&ids)
    };
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let leases: Vec<(i64, String, bool)> = sqlx::query_as(LOCK_CLAIMS)
        .bind(&wanted)
        .fetch_all(&mut *conn)
        .await
        .doing("locking the claims of completed items")?;
    let live: HashMap<i64, String> = leases
        .into_iter()
        .filter(|(_, _, live)| *live)
        .map(|(claim, owner, _)| (claim, owner))
        .collect();
    let live_claims: Vec<i64> = live.keys().copied().collect();
    let items = items_of(conn, book, &live_claims).await?;
    let mut held = HashMap::new();
    for completion in firsts() {
        let Some((claim_id, position)) = item_of(completion.delivery_id) else {
            continue;
        };
        if live.get(&claim_id) != Some(&completion.owner) {
            continue;
        }
        if let Some(item) = items.get(&claim_id).and_then(|items| items.held(position)) {
            held.insert(completion.delivery_id, item);
        }
    }
    Ok(held)
}

/// The items of these claims: from the book, and those it does not know from the table.
async fn items_of(
    conn: &mut PgConnection,
    book: &ClaimBook,
    claims: &[i64],
) -> StoreResult<HashMap<i64, Arc<ClaimItems>>> {
    let mut items = book.items_of(claims);
    let unknown: Vec<i64> = claims
        .iter()
        .filter(|claim| !items.contains_key(claim))
        .copied()
        .collect();
    if unknown.is_empty() {
        return Ok(items);
    }
    type Row = (
        i64,
        DateTime<Utc>,
        Vec<i64>,
        Vec<String>,
        Vec<bool>,
        Vec<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(CLAIM_ITEMS)
        .bind(&unknown)
        .fetch_all(conn)
        .await
        .doing("reading the items of claims made elsewhere")?;
    items.extend(
        rows.into_iter()
            .map(|(claim, created_at, event_ids, routes, ordered, keys)| {
                let written = ClaimItems {
                    created_at,
                    event_ids,
                    routes,
                    ordered,
                    keys,
                };
                (claim, Arc::new(written))
            }),
    );
    Ok(items)
}

/// Write the open items `ids` of `claims` as delivery rows, leased while their claim is.
pub(crate) async fn materialize(
    conn: &mut PgConnection,
    ids: &[i64],
    claims: &[i64],
) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(&MATERIALIZE)
        .bind(ids)
        .bind(claims)
        .execute(conn)
        .await
        .doing("turning claim items into deliveries")?;
    Ok(())
}

/// Turn `owner`'s items among `delivery_ids` into leased delivery rows, for a release to
/// give back as it gives back any delivery.
pub(crate) async fn materialize_own(
    conn: &mut PgConnection,
    owner: &str,
    delivery_ids: &[i64],
) -> StoreResult<()> {
    let claims = claims_of(delivery_ids);
    if claims.is_empty() {
        return Ok(());
    }
    let own: Vec<i64> = sqlx::query_scalar(OWN_CLAIMS)
        .bind(owner)
        .bind(&claims)
        .fetch_all(&mut *conn)
        .await
        .doing("locking claims to give items back")?;
    materialize(conn, delivery_ids, &own).await
}

/// Delete the claims the book holds spent; those another transaction holds stay listed.
pub(crate) async fn delete_spent(conn: &mut PgConnection, book: &ClaimBook) -> StoreResult<()> {
    let claims = book.take_spent();
    if claims.is_empty() {
        return Ok(());
    }
    match sqlx::query_scalar::<_, i64>(DELETE_SPENT)
        .bind(&claims)
        .fetch_all(conn)
        .await
        .doing("deleting spent claims")
    {
        Ok(deleted) => {
            book.still_spent(claims.into_iter().filter(|c| !deleted.contains(c)));
            Ok(())
        }
        Err(err) => {
            book.still_spent(claims);
            Err(err)
        }
    }
}

/// Extend the leases of the claims of these items (the deliveries `owner` still holds);
/// how many of the items that covers. A claim's lease is one for all its items, so first
/// its open items that are not among them (this instance gave them up: an outcome it could
/// not record, a give-back that failed, a task that ended early) become delivery rows under
/// the lease they have: it runs out, and a claim takes them, as it would a row's.
pub(crate) async fn renew(
    pool: &sqlx::PgPool,
    book: &ClaimBook,
    owner: &str,
    delivery_ids: &[i64],
    lease: Duration,
) -> StoreResult<u64> {
    let claims = claims_of(delivery_ids);
    if claims.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await.doing("starting to renew claims")?;
    let live: Vec<i64> = sqlx::query_scalar(LOCK_LIVE_CLAIMS)
        .bind(owner)
        .bind(&claims)
        .fetch_all(&mut *tx)
        .await
        .doing("locking claims to renew")?;
    if live.is_empty() {
        return Ok(0);
    }
    let given_up: Vec<i64> = sqlx::query_scalar(&MATERIALIZE_UNHELD)
        .bind(delivery_ids)
        .bind(&live)
        .fetch_all(&mut *tx)
        .await
        .doing("turning items given up into deliveries")?;
    sqlx::query(RENEW_CLAIMS)
        .bind(lease.as_secs_f64())
        .bind(&live)
        .execute(&mut *tx)
        .await
        .doing("renewing claims")?;
    tx.commit().await.doing("committing renewed claims")?;
    book.renewed(&live, lease);
    book.ended(given_up, false);
    Ok(delivery_ids
        .iter()
        .filter(|id| claim_of(**id).is_some_and(|c| live.contains(&c)))
        .count() as u64)
}
