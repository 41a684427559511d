//! What a fan-out pass or a batch of completions writes, worked out once for both
//! backends. The backends only turn these rows into their own batched SQL.

use std::collections::HashMap;
use std::time::Duration;

use super::fan_out::{settle_from_deliveries, Candidate, Disposition, RouteState};
use super::{delivery_key, Completion, DeliveryStatus, EventStatus, FanOutReport, Outcome, Router};

/// A delivery fan-out creates.
pub(crate) struct NewDelivery {
    pub event_id: i64,
    pub route: String,
    pub entity_type: String,
    pub entity_id: String,
    pub ordered: bool,
    pub idempotency_key: String,
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
                    });
                }
            }
        }
    }
    plan
}

/// A delivery whose completion matched its lease, as the delivery update returned it.
pub(crate) struct Recorded {
    pub delivery_id: i64,
    pub event_id: i64,
    pub route: String,
    pub idempotency_key: String,
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

/// The new status of each event, from all of its deliveries.
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
