//! What fan-out decides for one READY event, independent of the database.

use chrono::{DateTime, Utc};

use super::{Event, EventHead, EventStatus, RoutePlan, Router};

/// A READY event without deliveries, as read by fan-out.
pub(crate) struct Candidate {
    pub head: EventHead,
    /// The stored payload (`None`: NULL), or why it was not read (unreadable, too big).
    pub event_data: Result<Option<String>, String>,
    pub idempotency_key: Option<String>,
    pub headers: Option<String>,
    pub created_at: DateTime<Utc>,
    /// What else is wrong with the row as stored (columns that are not text, headers
    /// that are not a JSON object, ...), found while reading it.
    pub problems: Vec<String>,
}

pub(crate) enum Disposition {
    Deliver(Vec<RoutePlan>),
    /// Settle the event without deliveries, with the reason an operator will read.
    Settle {
        status: EventStatus,
        reason: String,
    },
}

impl Candidate {
    /// Malformed events are refused first, then repeated keys, then unrouted events.
    /// `key_holder` is an earlier event holding the same producer key, if any.
    pub fn decide(&self, key_holder: Option<i64>, router: &Router<'_>) -> Disposition {
        if let Some(problem) = self.data_problem() {
            return Disposition::Settle {
                status: EventStatus::Dead,
                reason: problem,
            };
        }
        if let (Some(holder), Some(key)) = (key_holder, &self.idempotency_key) {
            return Disposition::Settle {
                status: EventStatus::Duplicate,
                reason: format!("duplicate of event {holder} (idempotency_key '{key}')"),
            };
        }
        let routes = router(&self.head);
        if routes.is_empty() {
            let target = match &self.head.event_target {
                Some(target) => format!(" and event_target '{target}'"),
                None => String::new(),
            };
            return Disposition::Settle {
                status: EventStatus::Skipped,
                reason: format!(
                    "no route matches event_type '{}'{target}",
                    self.head.event_type
                ),
            };
        }
        Disposition::Deliver(routes)
    }

    /// The event as a plugin gets it, for deliveries fan-out starts itself.
    pub fn into_event(self) -> Event {
        Event {
            event_id: self.head.event_id,
            event_target: self.head.event_target,
            event_type: self.head.event_type,
            entity_type: self.head.entity_type,
            entity_id: self.head.entity_id,
            event_data: self.event_data.ok().flatten(),
            event_status: EventStatus::Ready,
            status_reason: None,
            idempotency_key: self.idempotency_key,
            headers: self.headers,
            created_at: self.created_at,
        }
    }

    /// Everything wrong with the event, in one reason; `None` when it can be delivered.
    fn data_problem(&self) -> Option<String> {
        let payload = match &self.event_data {
            Err(problem) => Some(problem.clone()),
            Ok(None) => Some("event_data is NULL".to_string()),
            Ok(Some(text)) => serde_json::from_str::<serde::de::IgnoredAny>(text)
                .err()
                .map(|err| format!("event_data is not valid JSON: {err}")),
        };
        let all: Vec<&str> = self
            .problems
            .iter()
            .map(String::as_str)
            .chain(payload.as_deref())
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// One delivery of an event: its status, route and last error.
pub(crate) type RouteState = (super::DeliveryStatus, String, Option<String>);

/// The event's status and reason after its deliveries changed: the reason names the
/// route whose state decided the status.
pub(crate) fn settle_from_deliveries(deliveries: &[RouteState]) -> (EventStatus, Option<String>) {
    use super::DeliveryStatus;
    let statuses: Vec<DeliveryStatus> = deliveries.iter().map(|(s, _, _)| *s).collect();
    let status = super::event_status_from_deliveries(&statuses);
    let deciding = match status {
        EventStatus::Failed => Some(DeliveryStatus::Retry),
        EventStatus::Dead => Some(DeliveryStatus::Dead),
        _ => None,
    };
    let reason = deciding.and_then(|wanted| {
        deliveries
            .iter()
            .find(|(s, _, _)| *s == wanted)
            .map(|(_, route, error)| {
                format!(
                    "route {route}: {}",
                    error.as_deref().unwrap_or("no reason given")
                )
            })
    });
    (status, reason)
}
