//! Append events to the store.
//!
//! Emitted events are committed in the same transaction as a `delivered` outcome and
//! discarded with any other outcome, so a plugin can emit first and decide after.
//!
//! ```no_run
//! use herald_sdk::prelude::*;
//!
//! fn handle(event: Event) -> Outcome {
//!     let follow_up = NewEvent::same_entity_as(&event, "order.audited")
//!         .data(serde_json::json!({ "source_event": event.id }));
//!     match emit::emit(follow_up) {
//!         Ok(()) => Outcome::delivered(),
//!         Err(err) => Outcome::dead(format!("emit: {err}")),
//!     }
//! }
//! ```

use std::fmt;

use serde::Serialize;

use crate::Event;

/// An event to append. Build it with [`NewEvent::new`] or [`NewEvent::same_entity_as`]
/// and the chained setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: String,
    /// The payload as JSON text; `{}` until [`NewEvent::data`] sets it.
    pub data: String,
    pub target: Option<String>,
    /// Lets the host drop this event if one with the same key was stored before, e.g.
    /// when a redriven event emits its follow-up again.
    pub idempotency_key: Option<String>,
    pub headers: Vec<(String, String)>,
    /// A problem found while building, reported by [`emit`] so the builder can stay a
    /// plain chain.
    build_error: Option<String>,
}

impl NewEvent {
    pub fn new(
        event_type: impl Into<String>,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            data: "{}".into(),
            target: None,
            idempotency_key: None,
            headers: Vec::new(),
            build_error: None,
        }
    }

    /// An event about the same entity as `event`, carrying its `traceparent` header
    /// (when it has one) so the trace continues through the follow-up.
    pub fn same_entity_as(event: &Event, event_type: impl Into<String>) -> Self {
        let new = Self::new(event_type, &event.entity_type, &event.entity_id);
        match event.header("traceparent") {
            Some(traceparent) => new.header("traceparent", traceparent),
            None => new,
        }
    }

    /// Serializes `value` as the payload. Should it not serialize, [`emit`] returns
    /// [`EmitError::Invalid`] without emitting anything.
    pub fn data(mut self, value: impl Serialize) -> Self {
        match serde_json::to_string(&value) {
            Ok(data) => self.data = data,
            Err(err) => self.build_error = Some(format!("data: {err}")),
        }
        self
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Appends a header (metadata such as `traceparent` or a tenant).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The payload as a JSON value (`Null` if it is not JSON); meant for tests.
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }
}

/// Why the host refused an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitError {
    /// The event is malformed (e.g. data is not JSON); the message says what.
    Invalid(String),
    /// The per-attempt emit limit was reached.
    LimitReached(u32),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::Invalid(why) => write!(f, "invalid event: {why}"),
            EmitError::LimitReached(limit) => {
                write!(f, "emit limit of {limit} events per attempt reached")
            }
        }
    }
}

impl std::error::Error for EmitError {}

/// Appends `event` to the store, committed only if this attempt ends `delivered`.
pub fn emit(event: NewEvent) -> Result<(), EmitError> {
    if let Some(why) = &event.build_error {
        return Err(EmitError::Invalid(why.clone()));
    }
    crate::backend::emit(event)
}
