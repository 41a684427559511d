//! What a fan-out pass or a batch of completions writes, worked out once for both
//! backends. The backends only turn these rows into their own batched SQL.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::fan_out::{settle_from_deliveries, Candidate, Disposition, RouteState};
use super::{
    delivery_key, is_derived_key, ClaimRequest, ClaimedDelivery, Completion, DeliveryStatus, Event,
    EventStatus, FanOutReport, FanOutStarts, LedgerEntry, Outcome, QueuedDelivery, Router,
    StoreError, StoreResult,
};

/// A delivery fan-out creates.
pub(crate) struct NewDelivery {
    pub event_id: i64,
    pub route: String,
    pub entity_type: String,
    pub entity_id: String,
    pub ordered: bool,
    pub idempotency_key: String,
    /// Leased to the fan-out's caller on insert (attempt 1), to run at once, or once the
    /// delivery it is `behind` closes.
    pub start: bool,
    /// Set on a leased delivery that must wait for an earlier one of its lane.
    pub behind: Option<Behind>,
    /// The event has a producer key: the ledger may know it from an earlier event.
    pub producer_keyed: bool,
    /// The event's only delivery: its outcome alone settles the event.
    pub alone: bool,
}

/// An event's new status and the reason an operator will read.
pub(crate) struct Settlement {
    pub event_id: i64,
    pub status: EventStatus,
    pub reason: Option<String>,
}

pub(crate) struct FanOutPlan {
    pub deliveries: Vec<NewDelivery>,
    pub settlements: Vec<Settlement>,
    pub report: FanOutReport,
    /// The events that received deliveries, by id.
    pub events: HashMap<i64, Event>,
}

/// Decide every candidate. `key_holders` maps a candidate's event id to an earlier event
/// holding the same producer key.
pub(crate) fn plan_fan_out(
    candidates: Vec<Candidate>,
    key_holders: &HashMap<i64, i64>,
    router: &Router<'_>,
) -> FanOutPlan {
    let mut plan = FanOutPlan {
        deliveries: Vec::with_capacity(candidates.len()),
        settlements: Vec::new(),
        report: FanOutReport::default(),
        events: HashMap::new(),
    };
    for candidate in candidates {
        let event_id = candidate.head.event_id;
        match candidate.decide(key_holders.get(&event_id).copied(), router) {
            Disposition::Settle { status, reason } => {
                match status {
                    EventStatus::Duplicate => plan.report.duplicates += 1,
                    EventStatus::Skipped => plan.report.skipped += 1,
                    _ => plan.report.malformed += 1,
                }
                plan.settlements.push(Settlement {
                    event_id,
                    status,
                    reason: Some(reason),
                });
            }
            Disposition::Deliver(routes) => {
                plan.report.routed += 1;
                plan.report.deliveries += routes.len();
                let alone = routes.len() == 1;
                for route in routes {
                    plan.deliveries.push(NewDelivery {
                        event_id,
                        idempotency_key: delivery_key(
                            candidate.idempotency_key.as_deref(),
                            event_id,
                            &route.route,
                        ),
                        route: route.route,
                        entity_type: candidate.head.entity_type.clone(),
                        entity_id: candidate.head.entity_id.clone(),
                        ordered: route.ordered,
                        start: false,
                        behind: None,
                        producer_keyed: candidate.idempotency_key.is_some(),
                        alone,
                    });
                }
                plan.events.insert(event_id, candidate.into_event());
            }
        }
    }
    plan
}

/// The new deliveries fan-out may start itself under `grant`, as far as this batch alone
/// tells (indexes into `deliveries`): routes that are not paused, and on an ordered route
/// only an entity's first delivery of the batch. The store then drops those whose lane
/// already has an earlier open delivery, and starts at most `grant.limit` of the rest.
pub(crate) fn start_candidates(deliveries: &[NewDelivery], grant: &ClaimRequest) -> Vec<usize> {
    let mut lanes: HashSet<(&str, &str, &str)> = HashSet::new();
    deliveries
        .iter()
        .enumerate()
        .filter(|(_, d)| !grant.paused_routes.contains(&d.route))
        .filter(|(_, d)| {
            !d.ordered || lanes.insert((d.route.as_str(), d.entity_type.as_str(), &d.entity_id))
        })
        .map(|(index, _)| index)
        .collect()
}

/// Mark up to `limit` of `candidates`, less the `blocked` ones, as started.
pub(crate) fn mark_started(
    deliveries: &mut [NewDelivery],
    candidates: &[usize],
    blocked: &HashSet<usize>,
    limit: u32,
) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    for &index in candidates
        .iter()
        .filter(|index| !blocked.contains(index))
        .take(limit)
    {
        if let Some(delivery) = deliveries.get_mut(index) {
            delivery.start = true;
        }
    }
}

/// The delivery a queued one waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behind {
    /// None: it is due, but more are due than the caller can start now.
    Nothing,
    /// Already stored (its id).
    Stored(i64),
    /// Earlier in this batch (its index).
    InBatch(usize),
}

/// An ordered lane as stored, before the batch's first new delivery of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneState {
    /// No earlier delivery is open.
    Free,
    /// The fan-out's owner holds every earlier open delivery; the latest is this one.
    Held(i64),
    /// Someone else holds an earlier open delivery, or no one does yet.
    Busy,
}

/// The ordered deliveries whose lane must be read before leasing (indexes into
/// `deliveries`): the ordered ones among [`start_candidates`].
pub(crate) fn lane_heads(deliveries: &[NewDelivery], grant: &ClaimRequest) -> Vec<usize> {
    start_candidates(deliveries, grant)
        .into_iter()
        .filter(|&index| deliveries.get(index).is_some_and(|d| d.ordered))
        .collect()
}

/// Mark what fan-out leases: up to `grant.limit` deliveries due at once (unordered, or
/// first of a free lane) to start now, and up to `queue_limit` more to queue: due ones
/// beyond that limit, and those behind a delivery the owner holds on the same lane,
/// stored (`lanes`, by index of the lane's first delivery) or leased earlier in this
/// batch. A lane is left alone from its first delivery not leased on, so its order is
/// kept by the claim that later takes that one.
pub(crate) fn lease_new_deliveries(
    deliveries: &mut [NewDelivery],
    lanes: &HashMap<usize, LaneState>,
    grant: &ClaimRequest,
    queue_limit: u32,
) {
    let mut starts = usize::try_from(grant.limit).unwrap_or(usize::MAX);
    let mut queue_room = usize::try_from(queue_limit).unwrap_or(usize::MAX);
    // Each lane of the batch: the index of its last leased delivery, or `None` once one
    // was not leased.
    let mut tails: HashMap<(String, String, String), Option<usize>> = HashMap::new();
    for index in 0..deliveries.len() {
        let Some(delivery) = deliveries.get(index) else {
            continue;
        };
        if grant.paused_routes.contains(&delivery.route) {
            continue;
        }
        if !delivery.ordered {
            if starts > 0 {
                starts -= 1;
                mark(deliveries, index, None);
            } else if queue_room > 0 {
                queue_room -= 1;
                mark(deliveries, index, Some(Behind::Nothing));
            }
            continue;
        }
        let lane = (
            delivery.route.clone(),
            delivery.entity_type.clone(),
            delivery.entity_id.clone(),
        );
        let behind = match tails.get(&lane) {
            Some(Some(previous)) => Some(Some(Behind::InBatch(*previous))),
            Some(None) => None,
            None => match lanes.get(&index) {
                Some(LaneState::Free) => Some(None),
                Some(LaneState::Held(latest)) => Some(Some(Behind::Stored(*latest))),
                Some(LaneState::Busy) | None => None,
            },
        };
        let leased = match behind {
            Some(None) if starts > 0 => {
                starts -= 1;
                mark(deliveries, index, None);
                true
            }
            Some(None) if queue_room > 0 => {
                queue_room -= 1;
                mark(deliveries, index, Some(Behind::Nothing));
                true
            }
            Some(Some(behind)) if queue_room > 0 => {
                queue_room -= 1;
                mark(deliveries, index, Some(behind));
                true
            }
            _ => false,
        };
        tails.insert(lane, leased.then_some(index));
    }
}

fn mark(deliveries: &mut [NewDelivery], index: usize, behind: Option<Behind>) {
    if let Some(delivery) = deliveries.get_mut(index) {
        delivery.start = true;
        delivery.behind = behind;
    }
}

/// The leased deliveries as fan-out returns them: due now, or queued behind another.
pub(crate) fn fan_out_starts(
    plan: &FanOutPlan,
    ids: &HashMap<(i64, String), i64>,
    ledger: &HashMap<(String, String), LedgerEntry>,
) -> StoreResult<FanOutStarts> {
    let leased = started_claims(plan, ids, ledger)?;
    let mut starts = FanOutStarts::default();
    let behinds = plan.deliveries.iter().filter(|d| d.start).map(|d| d.behind);
    for (delivery, behind) in leased.into_iter().zip(behinds) {
        let behind = match behind {
            None => {
                starts.now.push(delivery);
                continue;
            }
            Some(Behind::Nothing) => None,
            Some(Behind::Stored(id)) => Some(id),
            Some(Behind::InBatch(index)) => plan
                .deliveries
                .get(index)
                .and_then(|d| ids.get(&(d.event_id, d.route.clone())))
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    StoreError::Invariant(format!(
                        "fan-out queued a delivery of event {} behind one it did not lease",
                        delivery.event.event_id
                    ))
                })?,
        };
        starts.queued.push(QueuedDelivery { behind, delivery });
    }
    Ok(starts)
}

/// Keep `start` only on the deliveries the insert did start (`ids`, by (event, route)).
pub(crate) fn confirm_started(deliveries: &mut [NewDelivery], ids: &HashMap<(i64, String), i64>) {
    for delivery in deliveries.iter_mut().filter(|d| d.start) {
        delivery.start = ids.contains_key(&(delivery.event_id, delivery.route.clone()));
    }
}

/// The deliveries fan-out started, as claims on their first attempt. `ids` maps (event,
/// route) to the inserted delivery's id; `ledger` holds the completed effects of the
/// started deliveries' producer keys, by (route, key).
pub(crate) fn started_claims(
    plan: &FanOutPlan,
    ids: &HashMap<(i64, String), i64>,
    ledger: &HashMap<(String, String), LedgerEntry>,
) -> StoreResult<Vec<ClaimedDelivery>> {
    plan.deliveries
        .iter()
        .filter(|d| d.start)
        .map(|d| {
            let missing = |what: &str| {
                StoreError::Invariant(format!(
                    "fan-out started a delivery of event {} on route '{}' without its {what}",
                    d.event_id, d.route
                ))
            };
            let delivery_id = *ids
                .get(&(d.event_id, d.route.clone()))
                .ok_or_else(|| missing("id"))?;
            let event = plan
                .events
                .get(&d.event_id)
                .ok_or_else(|| missing("event"))?;
            Ok(ClaimedDelivery {
                delivery_id,
                route: d.route.clone(),
                attempt: 1,
                idempotency_key: d.idempotency_key.clone(),
                already_completed: ledger
                    .get(&(d.route.clone(), d.idempotency_key.clone()))
                    .cloned(),
                event: event.clone(),
            })
        })
        .collect()
}

/// A delivery whose completion matched its lease, as the delivery update returned it.
pub(crate) struct Recorded {
    pub delivery_id: i64,
    pub event_id: i64,
    pub route: String,
    pub idempotency_key: String,
}

/// What closing a batch of completions returned, and what it tells about their events.
#[derive(Default)]
pub(crate) struct Closed {
    /// Each delivery whose lease held.
    pub recorded: Vec<Recorded>,
    /// The state of each of those that is its event's only delivery: it alone settles the
    /// event. Fan-out writes all of an event's deliveries at once and marks such a one
    /// (Postgres migration 0012, SQLite 0007); the mark never changes after.
    pub alone: Vec<DeliveryState>,
}

impl Closed {
    pub fn push(&mut self, recorded: Recorded, alone: Option<DeliveryState>) {
        self.recorded.push(recorded);
        self.alone.extend(alone);
    }

    /// The events of the closed deliveries that have other deliveries, which the settle
    /// must read: in id order, each once.
    pub fn events_to_read(&self) -> Vec<i64> {
        let alone: HashSet<i64> = self.alone.iter().map(|(event_id, ..)| *event_id).collect();
        let mut event_ids: Vec<i64> = self
            .recorded
            .iter()
            .map(|r| r.event_id)
            .filter(|event_id| !alone.contains(event_id))
            .collect();
        event_ids.sort_unstable();
        event_ids.dedup();
        event_ids
    }
}

/// The completions the idempotency ledger records: delivered or skipped, under a
/// producer's key. A derived key names one delivery only, whose attempts log already
/// says that it completed (claims read it there); a ledger row for it would never be
/// read, and the ledger, which outlives events, would grow by a row for every delivery.
pub(crate) fn ledger_entries<'m, 'c>(
    matched: &'m [(&'c Completion, &'c Recorded)],
) -> Vec<&'m (&'c Completion, &'c Recorded)> {
    matched
        .iter()
        .filter(|(c, r)| {
            c.outcome.completes_key() && !is_derived_key(&r.idempotency_key, r.event_id, &r.route)
        })
        .collect()
}

/// The delivery update's parameters for one completion.
pub(crate) struct DeliveryUpdate<'a> {
    pub status: DeliveryStatus,
    /// Delay before the next attempt; zero unless the outcome is a retry.
    pub retry_after: Duration,
    pub error: Option<&'a str>,
}

impl<'a> DeliveryUpdate<'a> {
    pub fn of(completion: &'a Completion) -> Self {
        let outcome = &completion.outcome;
        DeliveryUpdate {
            status: outcome.delivery_status(),
            retry_after: match outcome {
                Outcome::Retry { after, .. } => *after,
                _ => Duration::ZERO,
            },
            error: match outcome {
                Outcome::Retry { reason, .. } | Outcome::Dead { reason } => Some(reason.as_str()),
                _ => None,
            },
        }
    }
}

/// The completions whose lease held, each with what the update returned, in input order.
pub(crate) fn matched<'a>(
    completions: &'a [Completion],
    recorded: &'a [Recorded],
) -> Vec<(&'a Completion, &'a Recorded)> {
    let by_id: HashMap<i64, &Recorded> = recorded.iter().map(|r| (r.delivery_id, r)).collect();
    completions
        .iter()
        .filter_map(|c| by_id.get(&c.delivery_id).map(|r| (c, *r)))
        .collect()
}

/// Microseconds, saturating, for the attempts log.
pub(crate) fn duration_us(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// One delivery of an event as the resettle read returns it: (event, status, route,
/// last error), ordered by event then delivery.
pub(crate) type DeliveryState = (i64, DeliveryStatus, String, Option<String>);

/// The new status of each event, from all of its deliveries (each event's together).
pub(crate) fn resettle(states: Vec<DeliveryState>) -> Vec<Settlement> {
    let mut by_event: Vec<(i64, Vec<RouteState>)> = Vec::new();
    for (event_id, status, route, error) in states {
        match by_event.last_mut() {
            Some((current, deliveries)) if *current == event_id => {
                deliveries.push((status, route, error))
            }
            _ => by_event.push((event_id, vec![(status, route, error)])),
        }
    }
    by_event
        .into_iter()
        .map(|(event_id, deliveries)| {
            let (status, reason) = settle_from_deliveries(&deliveries);
            Settlement {
                event_id,
                status,
                reason,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_delivery(event_id: i64, route: &str, entity: &str, ordered: bool) -> NewDelivery {
        NewDelivery {
            event_id,
            route: route.into(),
            entity_type: "order".into(),
            entity_id: entity.into(),
            ordered,
            idempotency_key: format!("herald-{event_id}-{route}"),
            start: false,
            behind: None,
            producer_keyed: false,
            alone: true,
        }
    }

    fn grant(limit: u32, paused: &[&str]) -> ClaimRequest {
        ClaimRequest {
            owner: "alpha".into(),
            limit,
            lease: Duration::from_secs(60),
            paused_routes: paused.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn leases(deliveries: &[NewDelivery]) -> Vec<(i64, Option<Behind>)> {
        deliveries
            .iter()
            .filter(|d| d.start)
            .map(|d| (d.event_id, d.behind))
            .collect()
    }

    #[test]
    fn a_lane_is_leased_in_order_until_its_first_delivery_that_is_not() {
        let mut deliveries = vec![
            new_delivery(1, "orders", "A", true),
            new_delivery(2, "orders", "B", true),
            new_delivery(3, "orders", "A", true),
            new_delivery(4, "orders", "C", true),
            new_delivery(5, "orders", "C", true),
            new_delivery(6, "orders", "D", true),
            new_delivery(7, "orders", "D", true),
        ];
        assert_eq!(lane_heads(&deliveries, &grant(1, &[])), vec![0, 1, 3, 5]);
        let lanes = HashMap::from([
            (0, LaneState::Free),
            (1, LaneState::Held(40)),
            (3, LaneState::Busy),
            (5, LaneState::Free),
        ]);
        // One start: A's first; then room to queue three.
        lease_new_deliveries(&mut deliveries, &lanes, &grant(1, &[]), 3);
        assert_eq!(
            leases(&deliveries),
            vec![
                (1, None),
                (2, Some(Behind::Stored(40))),
                (3, Some(Behind::InBatch(0))),
                (6, Some(Behind::Nothing)),
            ],
            "C waits behind someone else; D's first is due but past the start limit, \
             and its second is past the room"
        );
    }

    #[test]
    fn paused_routes_and_a_spent_room_lease_nothing() {
        let mut deliveries = vec![
            new_delivery(1, "paused", "A", true),
            new_delivery(2, "bulk", "A", false),
            new_delivery(3, "bulk", "B", false),
            new_delivery(4, "orders", "A", true),
        ];
        assert_eq!(lane_heads(&deliveries, &grant(1, &["paused"])), vec![3]);
        let lanes = HashMap::from([(3, LaneState::Held(9))]);
        lease_new_deliveries(&mut deliveries, &lanes, &grant(1, &["paused"]), 0);
        assert_eq!(leases(&deliveries), vec![(2, None)]);
    }
}
