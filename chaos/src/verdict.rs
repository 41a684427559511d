//! The end of a run: what the store and the sink say, checked against the promises
//! (nothing lost, one effect per event, per-entity order, nothing stuck, no panic).

use std::collections::{HashMap, HashSet};

use crate::db::{DeliveryRow, EventRow};
use crate::sink::Application;

/// Examples printed per violated check.
pub const EXAMPLES: usize = 5;

/// The retry policy's own words when it gives up (`RetryPolicy::after_failure`): a DEAD
/// delivery with them died by policy; any other DEAD is a fault.
const GAVE_UP: &str = "gave up";

#[derive(Debug, Default)]
pub struct Checks {
    pub events_produced: i64,
    pub events_in_store: usize,
    /// Events neither applied at the sink nor DEAD by policy (missing ones included).
    pub lost: Vec<String>,
    pub dead_by_policy: usize,
    /// Of those, how many had their effect applied anyway (a time-out, then the retries
    /// ran out).
    pub dead_but_applied: usize,
    pub dead_not_by_policy: Vec<String>,
    /// Events with more than one delivery key, or applied under more than one key, or
    /// keys the sink applied that Herald never issued.
    pub double_effects: Vec<String>,
    pub order_violations: Vec<String>,
    /// Deliveries neither SUCCESS nor DEAD, events still READY or FAILED.
    pub stuck: Vec<String>,
    pub panics: Vec<String>,
    /// Instances that exited without being told to, or not cleanly on SIGTERM.
    pub crashes: Vec<String>,
    /// Requests the sink could not read (no key, id or entity).
    pub unreadable: usize,
}

impl Checks {
    /// `(name, count, examples)` of every check, in report order.
    pub fn rows(&self) -> Vec<(&'static str, usize, &[String])> {
        vec![
            ("events lost", self.lost.len(), &self.lost),
            (
                "keys delivered more than once in effect",
                self.double_effects.len(),
                &self.double_effects,
            ),
            (
                "per-entity order violations",
                self.order_violations.len(),
                &self.order_violations,
            ),
            (
                "deliveries stuck (not SUCCESS or DEAD by policy)",
                self.stuck.len(),
                &self.stuck,
            ),
            ("host panics", self.panics.len(), &self.panics),
            ("host crashes", self.crashes.len(), &self.crashes),
            ("unreadable requests", self.unreadable, &[]),
        ]
    }

    pub fn passed(&self) -> bool {
        self.rows().iter().all(|(_, count, _)| *count == 0)
    }
}

pub struct Evidence<'a> {
    pub events_produced: i64,
    pub events: &'a [EventRow],
    pub deliveries: &'a [DeliveryRow],
    pub applications: &'a [Application],
    pub unreadable: usize,
}

pub fn check(evidence: &Evidence<'_>) -> Checks {
    let mut checks = Checks {
        events_produced: evidence.events_produced,
        events_in_store: evidence.events.len(),
        unreadable: evidence.unreadable,
        ..Checks::default()
    };
    let missing = evidence.events_produced - evidence.events.len() as i64;
    if missing != 0 {
        checks.lost.push(format!(
            "{missing} event(s) produced but not in the store ({} produced, {} stored)",
            evidence.events_produced,
            evidence.events.len()
        ));
    }

    let mut keys_of_event: HashMap<i64, Vec<&DeliveryRow>> = HashMap::new();
    for delivery in evidence.deliveries {
        keys_of_event
            .entry(delivery.event_id)
            .or_default()
            .push(delivery);
    }
    let issued: HashSet<&str> = evidence
        .deliveries
        .iter()
        .map(|d| d.idempotency_key.as_str())
        .collect();
    let mut applied_keys_of_event: HashMap<i64, HashSet<&str>> = HashMap::new();
    for application in evidence.applications {
        applied_keys_of_event
            .entry(application.event_id)
            .or_default()
            .insert(application.key.as_str());
        if !issued.contains(application.key.as_str()) {
            checks.double_effects.push(format!(
                "key {} applied for event {} but Herald has no delivery with it",
                application.key, application.event_id
            ));
        }
    }

    for event in evidence.events {
        let deliveries = keys_of_event
            .get(&event.event_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if deliveries.len() != 1 {
            checks.double_effects.push(format!(
                "event {} has {} deliveries on one route (expected exactly one key)",
                event.event_id,
                deliveries.len()
            ));
        }
        let applied = applied_keys_of_event.get(&event.event_id);
        if applied.is_some_and(|keys| keys.len() > 1) {
            checks.double_effects.push(format!(
                "event {} applied under {} different keys",
                event.event_id,
                applied.map_or(0, HashSet::len)
            ));
        }
        let dead: Vec<&&DeliveryRow> = deliveries.iter().filter(|d| d.status == "DEAD").collect();
        for delivery in &dead {
            let reason = delivery.last_error.as_deref().unwrap_or("");
            if reason.contains(GAVE_UP) {
                checks.dead_by_policy += 1;
                if applied.is_some() {
                    checks.dead_but_applied += 1;
                }
            } else {
                // Not SUCCESS and not DEAD by policy: stuck, in the issue's words.
                let note = format!(
                    "event {} DEAD after {} attempt(s), not by policy: {reason}",
                    event.event_id, delivery.attempts
                );
                checks.stuck.push(note.clone());
                checks.dead_not_by_policy.push(note);
            }
        }
        for delivery in deliveries {
            if delivery.status != "SUCCESS" && delivery.status != "DEAD" {
                checks.stuck.push(format!(
                    "event {} delivery {} after {} attempt(s) (last error: {})",
                    event.event_id,
                    delivery.status,
                    delivery.attempts,
                    delivery.last_error.as_deref().unwrap_or("none")
                ));
            }
        }
        if event.event_status == "READY" || event.event_status == "FAILED" {
            checks.stuck.push(format!(
                "event {} is {} ({})",
                event.event_id,
                event.event_status,
                event.status_reason.as_deref().unwrap_or("no reason")
            ));
        }
        let dead_by_policy = !dead.is_empty()
            && dead.iter().all(|d| {
                d.last_error
                    .as_deref()
                    .is_some_and(|reason| reason.contains(GAVE_UP))
            });
        if applied.is_none() && !dead_by_policy {
            checks.lost.push(format!(
                "event {} ({}, {}) never applied at the sink",
                event.event_id, event.entity_id, event.event_status
            ));
        }
    }
    let entity_of: HashMap<i64, &str> = evidence
        .events
        .iter()
        .map(|e| (e.event_id, e.entity_id.as_str()))
        .collect();
    let mut latest: HashMap<&str, i64> = HashMap::new();
    for application in evidence.applications {
        if entity_of
            .get(&application.event_id)
            .is_some_and(|entity| *entity != application.entity)
        {
            checks.order_violations.push(format!(
                "event {} arrived as entity {}, the store says {}",
                application.event_id,
                application.entity,
                entity_of
                    .get(&application.event_id)
                    .copied()
                    .unwrap_or_default()
            ));
        }
        match latest.get_mut(application.entity.as_str()) {
            Some(last) if application.event_id <= *last => checks.order_violations.push(format!(
                "{}: event {} applied after event {}",
                application.entity, application.event_id, last
            )),
            Some(last) => *last = application.event_id,
            None => {
                latest.insert(application.entity.as_str(), application.event_id);
            }
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_id: i64, entity: &str, status: &str) -> EventRow {
        EventRow {
            event_id,
            entity_id: entity.into(),
            event_status: status.into(),
            status_reason: None,
        }
    }

    fn delivery(event_id: i64, status: &str, last_error: Option<&str>) -> DeliveryRow {
        DeliveryRow {
            event_id,
            idempotency_key: format!("herald-{event_id}-r"),
            status: status.into(),
            last_error: last_error.map(str::to_string),
            attempts: 1,
        }
    }

    fn applied(event_id: i64, entity: &str) -> Application {
        Application {
            key: format!("herald-{event_id}-r"),
            event_id,
            entity: entity.into(),
        }
    }

    fn judge(
        events: &[EventRow],
        deliveries: &[DeliveryRow],
        applications: &[Application],
    ) -> Checks {
        check(&Evidence {
            events_produced: events.len() as i64,
            events,
            deliveries,
            applications,
            unreadable: 0,
        })
    }

    #[test]
    fn a_clean_run_passes() {
        let events = [event(1, "e-1", "SUCCESS"), event(2, "e-1", "SUCCESS")];
        let deliveries = [delivery(1, "SUCCESS", None), delivery(2, "SUCCESS", None)];
        let checks = judge(
            &events,
            &deliveries,
            &[applied(1, "e-1"), applied(2, "e-1")],
        );
        assert!(checks.passed(), "{checks:?}");
    }

    #[test]
    fn an_event_never_applied_is_lost_unless_dead_by_policy() {
        let events = [event(1, "e-1", "SUCCESS"), event(2, "e-2", "DEAD")];
        let deliveries = [
            delivery(1, "SUCCESS", None),
            delivery(2, "DEAD", Some("HTTP 500; gave up after 50 attempt(s)")),
        ];
        let checks = judge(&events, &deliveries, &[]);
        assert_eq!(checks.lost.len(), 1, "{checks:?}");
        assert_eq!(checks.dead_by_policy, 1);
        assert!(checks.stuck.is_empty());
    }

    #[test]
    fn dead_for_another_reason_is_stuck() {
        let events = [event(1, "e-1", "DEAD")];
        let deliveries = [delivery(1, "DEAD", Some("HTTP 400: bad request"))];
        let checks = judge(&events, &deliveries, &[]);
        assert_eq!(checks.stuck.len(), 1);
        assert_eq!(checks.lost.len(), 1);
        assert!(!checks.passed());
    }

    #[test]
    fn a_later_event_applied_first_is_an_order_violation() {
        let events = [event(1, "e-1", "SUCCESS"), event(2, "e-1", "SUCCESS")];
        let deliveries = [delivery(1, "SUCCESS", None), delivery(2, "SUCCESS", None)];
        let checks = judge(
            &events,
            &deliveries,
            &[applied(2, "e-1"), applied(1, "e-1")],
        );
        assert_eq!(checks.order_violations.len(), 1, "{checks:?}");
    }

    #[test]
    fn an_event_applied_under_two_keys_took_effect_twice() {
        let events = [event(1, "e-1", "SUCCESS")];
        let deliveries = [delivery(1, "SUCCESS", None)];
        let mut other = applied(1, "e-1");
        other.key = "another-key".into();
        let checks = judge(&events, &deliveries, &[applied(1, "e-1"), other]);
        // The stray key, and the event applied under two keys.
        assert_eq!(checks.double_effects.len(), 2, "{checks:?}");
    }

    #[test]
    fn open_deliveries_and_events_are_stuck() {
        let events = [event(1, "e-1", "FAILED")];
        let deliveries = [delivery(1, "RETRY", Some("HTTP 500"))];
        let checks = judge(&events, &deliveries, &[applied(1, "e-1")]);
        assert_eq!(checks.stuck.len(), 2, "{checks:?}");
        assert!(checks.lost.is_empty());
    }
}
