//! The values that cross the store boundary. Nothing here knows about SQL or plugins.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Lifecycle of a row in the `events` table, as producers and operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventStatus {
    /// Written by a producer, not yet finished by every route.
    Ready,
    /// Every route delivered (or the plugin decided to skip).
    Success,
    /// At least one route failed and waits for a retry.
    Failed,
    /// At least one route gave up, or the event itself is malformed.
    Dead,
    /// No route matches the event.
    Skipped,
    /// Another event already carries the same producer idempotency key.
    Duplicate,
}

impl EventStatus {
    pub const ALL: [EventStatus; 6] = [
        EventStatus::Ready,
        EventStatus::Success,
        EventStatus::Failed,
        EventStatus::Dead,
        EventStatus::Skipped,
        EventStatus::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Ready => "READY",
            EventStatus::Success => "SUCCESS",
            EventStatus::Failed => "FAILED",
            EventStatus::Dead => "DEAD",
            EventStatus::Skipped => "SKIPPED",
            EventStatus::Duplicate => "DUPLICATE",
        }
    }
}

/// Lifecycle of one (event, route) delivery, owned by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    /// Never attempted, or attempted by an instance that died before finishing.
    Pending,
    /// Failed at least once; eligible again at `next_attempt_at`.
    Retry,
    Success,
    /// The plugin decided the event needs no effect on this route.
    Skipped,
    Dead,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Retry,
        DeliveryStatus::Success,
        DeliveryStatus::Skipped,
        DeliveryStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "PENDING",
            DeliveryStatus::Retry => "RETRY",
            DeliveryStatus::Success => "SUCCESS",
            DeliveryStatus::Skipped => "SKIPPED",
            DeliveryStatus::Dead => "DEAD",
        }
    }

    pub fn is_open(self) -> bool {
        matches!(self, DeliveryStatus::Pending | DeliveryStatus::Retry)
    }
}

/// What one attempt ended with, as written to the attempts log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    Dead,
    Skipped,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 4] = [
        AttemptOutcome::Delivered,
        AttemptOutcome::Retry,
        AttemptOutcome::Dead,
        AttemptOutcome::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "DELIVERED",
            AttemptOutcome::Retry => "RETRY",
            AttemptOutcome::Dead => "DEAD",
            AttemptOutcome::Skipped => "SKIPPED",
        }
    }
}

/// An unknown status name; the message lists the valid ones.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {kind} '{given}' (expected one of: {expected})")]
pub struct UnknownName {
    kind: &'static str,
    given: String,
    expected: String,
}

macro_rules! name_parsing {
    ($ty:ty, $kind:literal) => {
        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$ty>::ALL
                    .into_iter()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| UnknownName {
                        kind: $kind,
                        given: s.to_string(),
                        expected: <$ty>::ALL.map(|v| v.as_str()).join(", "),
                    })
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
name_parsing!(EventStatus, "event status");
name_parsing!(DeliveryStatus, "delivery status");
name_parsing!(AttemptOutcome, "attempt outcome");

/// The status of an event follows from its deliveries: retrying wins over pending, pending
/// over dead, and an event whose every route finished cleanly is a success.
pub fn event_status_from_deliveries(statuses: &[DeliveryStatus]) -> EventStatus {
    let any = |s: DeliveryStatus| statuses.contains(&s);
    if any(DeliveryStatus::Retry) {
        EventStatus::Failed
    } else if any(DeliveryStatus::Pending) {
        EventStatus::Ready
    } else if any(DeliveryStatus::Dead) {
        EventStatus::Dead
    } else {
        EventStatus::Success
    }
}

/// An event as a producer hands it over. `event_data` and `headers` are JSON values, so a
/// malformed payload cannot be built through this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: String,
    pub event_data: serde_json::Value,
    #[serde(default)]
    pub event_target: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
}

impl NewEvent {
    pub fn new(
        event_type: impl Into<String>,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        event_data: serde_json::Value,
    ) -> Self {
        NewEvent {
            event_type: event_type.into(),
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            event_data,
            event_target: None,
            idempotency_key: None,
            headers: None,
        }
    }

    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.event_target = Some(target.into());
        self
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The identity columns must say something: they are the routing and ordering keys.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("event_type", &self.event_type),
            ("entity_type", &self.entity_type),
            ("entity_id", &self.entity_id),
        ] {
            if value.trim().is_empty() {
                return Err(format!("{name} is empty"));
            }
        }
        Ok(())
    }

    pub(crate) fn headers_json(&self) -> String {
        match &self.headers {
            Some(map) => serde_json::Value::Object(map.clone()).to_string(),
            None => "{}".to_string(),
        }
    }
}

/// A stored event. `event_data` is the stored text, which on SQLite may be anything a
/// producer wrote; `None` means the column is NULL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub event_id: i64,
    pub event_target: Option<String>,
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: String,
    pub event_data: Option<String>,
    pub event_status: EventStatus,
    /// Why the host set the status, for SKIPPED, DUPLICATE, DEAD and FAILED.
    pub status_reason: Option<String>,
    pub idempotency_key: Option<String>,
    pub headers: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// The event for scripts and the API: its fields, with `event_data` and `headers` as
    /// JSON values when the stored text parses (on SQLite a producer may write anything;
    /// then the text stays a string).
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        embed_stored_json(&mut value);
        Ok(value)
    }
}

impl EventDetail {
    /// As [`Event::to_json`], with the deliveries and attempts.
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        embed_stored_json(&mut value);
        Ok(value)
    }
}

fn embed_stored_json(value: &mut serde_json::Value) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    for key in ["event_data", "headers"] {
        if let Some(serde_json::Value::String(text)) = object.get(key) {
            if let Ok(parsed) = serde_json::from_str::<serde_json::Value>(text) {
                object.insert(key.to_string(), parsed);
            }
        }
    }
}

/// The routing-relevant part of an event, handed to the router during fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHead {
    pub event_id: i64,
    pub event_type: String,
    pub event_target: Option<String>,
    pub entity_type: String,
    pub entity_id: String,
}

/// One route an event is fanned out to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub route: String,
    /// Whether deliveries on this route keep per-entity order.
    pub ordered: bool,
}

impl RoutePlan {
    pub fn ordered(route: impl Into<String>) -> Self {
        RoutePlan {
            route: route.into(),
            ordered: true,
        }
    }

    pub fn unordered(route: impl Into<String>) -> Self {
        RoutePlan {
            route: route.into(),
            ordered: false,
        }
    }
}

/// Decides the routes of an event; an empty list means no route matches.
pub type Router<'a> = dyn Fn(&EventHead) -> Vec<RoutePlan> + Send + Sync + 'a;

/// What one fan-out pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FanOutReport {
    /// Events that received at least one delivery.
    pub routed: usize,
    pub deliveries: usize,
    pub skipped: usize,
    pub duplicates: usize,
    /// Events refused as malformed (e.g. `event_data` is NULL, not JSON or over the size
    /// limit, a column is not valid UTF-8).
    pub malformed: usize,
}

impl FanOutReport {
    pub fn events(&self) -> usize {
        self.routed + self.skipped + self.duplicates + self.malformed
    }
}

/// The default of `[dispatch] max_event_bytes`: 1 MiB. The common ceiling of what a
/// plugin forwards to (Kafka's default message size is 1 MB; webhook receivers and API
/// gateways commonly refuse larger bodies), far above a typical outbox event (a few KB),
/// and low enough that a runaway producer's 10 MB row does not travel into a plugin's
/// memory again on every attempt.
pub const DEFAULT_MAX_EVENT_BYTES: u64 = 1 << 20;

/// Ask for a fan-out pass over up to `limit` new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanOutRequest {
    pub limit: u32,
    /// An event whose `event_data` or `headers` text is longer than this (in bytes) is
    /// DEAD, without its payload being read or handed to a plugin.
    pub max_event_bytes: u64,
    /// With a start grant: how many new deliveries fan-out may lease for the grant's
    /// owner to queue ([`FanOutStarts::queued`]), beyond those it starts at once.
    pub queue_behind: u32,
    /// Producers stop sending the wake-ups a dispatcher asked for before it slept
    /// ([`EventStore::request_wake_ups`](super::EventStore::request_wake_ups)): it is
    /// awake, and looks for new events itself until it sleeps again.
    pub stop_wake_ups: bool,
}

/// What asking producers for wake-ups came to ([`EventStore::request_wake_ups`](super::EventStore::request_wake_ups)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeUpRequest {
    /// The backend's wake-ups need no request (or it has none).
    Unneeded,
    /// Asked, and no producer that may have missed the request is in flight: a look at
    /// new events now finds whatever no wake-up will announce.
    Settled,
    /// Asked, but a producer that may have missed the request is still in flight: the
    /// last look is due once it has ended.
    Pending,
}

impl FanOutRequest {
    /// Up to `limit` events, with the default size limit, queueing none.
    pub fn new(limit: u32) -> Self {
        FanOutRequest {
            limit,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            queue_behind: 0,
            stop_wake_ups: false,
        }
    }

    /// The limit as the databases compare it (they count in signed 64-bit integers).
    pub(crate) fn max_bytes_sql(&self) -> i64 {
        i64::try_from(self.max_event_bytes).unwrap_or(i64::MAX)
    }
}

/// Ask for a batch of due deliveries, leased to `owner` for `lease`.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub owner: String,
    pub limit: u32,
    pub lease: Duration,
    /// Routes whose deliveries are left alone (their plugin is quarantined).
    pub paused_routes: Vec<String>,
}

/// A completed-effect record of the idempotency ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub route: String,
    pub idempotency_key: String,
    pub event_id: i64,
    pub outcome: AttemptOutcome,
    pub detail: Option<String>,
    pub completed_at: DateTime<Utc>,
}

/// A delivery leased to the caller, with everything needed to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub route: String,
    /// The attempt number this lease is for (1 on the first claim). Together with the
    /// owner it fences the completion: a stale holder cannot complete a re-claimed delivery.
    pub attempt: i32,
    pub idempotency_key: String,
    /// Set when the ledger already records this (route, key) as completed: the effect
    /// happened and must not happen again.
    pub already_completed: Option<LedgerEntry>,
    pub event: Event,
}

/// The deliveries a fan-out leased to the owner of its start grant.
#[derive(Debug, Default)]
pub struct FanOutStarts {
    /// Due at once: no earlier delivery of their lane is open.
    pub now: Vec<ClaimedDelivery>,
    /// More than the caller could start now: due at once, or each behind an open
    /// delivery the owner already holds on the same ordered lane (in lane order), due
    /// when that one closes and to be given back if it does not.
    pub queued: Vec<QueuedDelivery>,
}

/// A delivery leased at fan-out behind another of its lane that the same owner holds.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedDelivery {
    /// The lane's delivery just before this one; `None`: due now.
    pub behind: Option<i64>,
    pub delivery: ClaimedDelivery,
}

/// The verdict of one attempt, as the store records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The effect happened. Emitted events exist only here, so a failed attempt can never
    /// commit its emits.
    Delivered {
        receipt: Option<String>,
        emitted: Vec<NewEvent>,
    },
    /// Try again after `after`, measured on the database clock.
    Retry {
        after: Duration,
        reason: String,
    },
    Dead {
        reason: String,
    },
    Skipped {
        reason: String,
    },
}

impl Outcome {
    pub fn delivered() -> Self {
        Outcome::Delivered {
            receipt: None,
            emitted: Vec::new(),
        }
    }

    pub fn attempt_outcome(&self) -> AttemptOutcome {
        match self {
            Outcome::Delivered { .. } => AttemptOutcome::Delivered,
            Outcome::Retry { .. } => AttemptOutcome::Retry,
            Outcome::Dead { .. } => AttemptOutcome::Dead,
            Outcome::Skipped { .. } => AttemptOutcome::Skipped,
        }
    }

    pub fn delivery_status(&self) -> DeliveryStatus {
        match self {
            Outcome::Delivered { .. } => DeliveryStatus::Success,
            Outcome::Retry { .. } => DeliveryStatus::Retry,
            Outcome::Dead { .. } => DeliveryStatus::Dead,
            Outcome::Skipped { .. } => DeliveryStatus::Skipped,
        }
    }

    /// The receipt or the reason: the one line an operator reads in the attempts log.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { receipt, .. } => receipt.as_deref(),
            Outcome::Retry { reason, .. }
            | Outcome::Dead { reason }
            | Outcome::Skipped { reason } => Some(reason),
        }
    }

    /// Completed effects go to the idempotency ledger; failures do not, so a redrive runs.
    pub fn completes_key(&self) -> bool {
        matches!(self, Outcome::Delivered { .. } | Outcome::Skipped { .. })
    }

    pub fn emitted(&self) -> &[NewEvent] {
        match self {
            Outcome::Delivered { emitted, .. } => emitted,
            _ => &[],
        }
    }
}

/// The result of one attempt, to be written in one transaction with everything it implies.
#[derive(Debug, Clone)]
pub struct Completion {
    pub delivery_id: i64,
    /// The lease holder and attempt from the claim; a mismatch means the lease was lost.
    pub owner: String,
    pub attempt: i32,
    pub outcome: Outcome,
    pub plugin_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    /// Events the host itself appends with this outcome, whatever it is (the
    /// `herald.delivery.dead` notice a saga compensator listens for).
    pub host_events: Vec<NewEvent>,
}

impl Completion {
    pub fn for_claim(claim: &ClaimedDelivery, owner: &str, outcome: Outcome) -> Self {
        Completion {
            delivery_id: claim.delivery_id,
            owner: owner.to_string(),
            attempt: claim.attempt,
            outcome,
            plugin_version: None,
            started_at: Utc::now(),
            duration: Duration::ZERO,
            host_events: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionResult {
    /// Written, with the ids of the events it emitted.
    Committed { emitted: Vec<i64> },
    /// The lease was no longer held by this owner and attempt: nothing was written.
    LeaseLost,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub delivery_id: i64,
    pub event_id: i64,
    pub route: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub ordered: bool,
    pub idempotency_key: String,
    pub next_attempt_at: DateTime<Utc>,
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    pub attempt_id: i64,
    pub delivery_id: i64,
    pub event_id: i64,
    pub route: String,
    pub attempt: i32,
    pub outcome: AttemptOutcome,
    pub detail: Option<String>,
    pub plugin_version: Option<String>,
    pub instance: String,
    pub started_at: DateTime<Utc>,
    pub duration_us: i64,
}

/// An event with its host-side history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: Event,
    pub deliveries: Vec<Delivery>,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub status: Option<EventStatus>,
    pub event_type: Option<String>,
    pub entity: Option<(String, String)>,
    /// Only events with an id below this (paging backwards through newest-first lists).
    pub before_id: Option<i64>,
    pub limit: u32,
    /// Oldest first instead of the default newest first.
    pub oldest_first: bool,
}

/// Work waiting in the store, for the backlog gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Events whose status is READY.
    pub ready_events: u64,
    /// Deliveries whose status is RETRY.
    pub waiting_retry: u64,
}

/// A Herald process as `herald instances` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub instance_id: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Deliveries it holds an unexpired lease on right now.
    pub leases_held: i64,
}

/// A plugin taken out of service after consecutive faults: its routes claim nothing
/// until an operator resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantine {
    pub plugin: String,
    /// The count and the last fault, e.g. "10 consecutive faults; last: plugin trapped: ...".
    pub reason: String,
    pub faults: i64,
    pub since: DateTime<Utc>,
}

/// Which dead deliveries to send again; with neither field set, all of them.
#[derive(Debug, Clone, Default)]
pub struct RedriveSelection {
    pub delivery_id: Option<i64>,
    pub route: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub route: Option<String>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_case_insensitively() {
        for s in EventStatus::ALL {
            assert_eq!(
                s.as_str().to_lowercase().parse::<EventStatus>().ok(),
                Some(s)
            );
        }
        for s in DeliveryStatus::ALL {
            assert_eq!(s.as_str().parse::<DeliveryStatus>().ok(), Some(s));
        }
    }

    #[test]
    fn unknown_status_lists_the_valid_ones() {
        let err = "DONE".parse::<EventStatus>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown event status 'DONE' (expected one of: READY, SUCCESS, FAILED, DEAD, SKIPPED, DUPLICATE)")
        );
    }

    #[test]
    fn event_status_follows_the_least_finished_delivery() {
        use DeliveryStatus::*;
        assert_eq!(
            event_status_from_deliveries(&[Success, Skipped]),
            EventStatus::Success
        );
        assert_eq!(
            event_status_from_deliveries(&[Success, Dead]),
            EventStatus::Dead
        );
        assert_eq!(
            event_status_from_deliveries(&[Dead, Pending]),
            EventStatus::Ready
        );
        assert_eq!(
            event_status_from_deliveries(&[Pending, Retry]),
            EventStatus::Failed
        );
    }
}
