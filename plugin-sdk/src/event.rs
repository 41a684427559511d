//! The event a plugin is asked to handle.

use std::fmt;

use serde::de::DeserializeOwned;

/// One delivery of one event to the plugin's route.
///
/// The fields mirror the event store's row plus what the host knows about this attempt
/// (`now_ms`, `attempt`, `idempotency_key`, `route`). It is non-exhaustive so the
/// interface can grow; tests build events with [`crate::testing::event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The store's event id: monotonic, unique.
    pub id: i64,
    /// The routing key, e.g. `order.created`.
    pub event_type: String,
    /// The logical destination service, when the producer named one.
    pub target: Option<String>,
    pub entity_type: String,
    pub entity_id: String,
    /// The payload as the producer wrote it (JSON text). Prefer [`Event::data`] or
    /// [`Event::data_json`].
    pub raw_data: String,
    /// Producer metadata such as `traceparent`, in the producer's order.
    pub headers: Vec<(String, String)>,
    /// When the producer wrote the event, Unix milliseconds.
    pub created_at_ms: i64,
    /// The host's clock when this attempt started, Unix milliseconds. Plugins have no
    /// clock of their own; use this one (e.g. for a `webhook-timestamp`).
    pub now_ms: i64,
    /// 1 on the first attempt of this (event, route).
    pub attempt: u32,
    /// Stable across retries, restarts and instances: pass it on to the sink
    /// (`Idempotency-Key`, `webhook-id`) so the sink can drop repeats.
    pub idempotency_key: String,
    /// The route this delivery belongs to.
    pub route: String,
}

impl Event {
    /// The payload as your own type.
    ///
    /// An error means the producer wrote something the plugin does not understand;
    /// that will not change on a retry, so it usually becomes [`crate::Outcome::dead`].
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        serde_json::from_str(&self.raw_data).map_err(DataError)
    }

    /// The payload as a JSON value.
    ///
    /// The host only stores JSON, so this is the payload as written. Should the text
    /// nevertheless not parse, it comes back as a JSON string holding the raw text,
    /// so a forwarding plugin loses nothing.
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.raw_data)
            .unwrap_or_else(|_| serde_json::Value::String(self.raw_data.clone()))
    }

    /// The first header with this name, compared ASCII case-insensitively as HTTP does.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// [`Event::created_at_ms`] as an RFC 3339 UTC timestamp with milliseconds, e.g.
    /// `2024-05-01T12:00:00.250Z`, the form JSON payloads and CloudEvents use.
    pub fn created_at_rfc3339(&self) -> String {
        crate::time::rfc3339_from_unix_ms(self.created_at_ms)
    }
}

/// Looks a name up in header-like pairs, ASCII case-insensitively.
pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// The event's payload does not have the shape [`Event::data`] was asked for.
///
/// Its message is serde's, with line and column, e.g. `missing field `amount_cents` at
/// line 1 column 20`: put it in the dead letter's reason so whoever reads it can fix
/// the producer.
#[derive(Debug)]
pub struct DataError(serde_json::Error);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
