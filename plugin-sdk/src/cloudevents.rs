//! CloudEvents 1.0 (<https://cloudevents.io>) JSON envelopes, for sinks that speak it
//! (Knative, Azure Event Grid, many brokers).
//!
//! Sent over HTTP as one JSON document, the envelope is "structured mode": use the
//! content type [`CONTENT_TYPE`].

use serde_json::{json, Value};

use crate::Event;

/// The content type of a structured-mode CloudEvent in JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The event as a CloudEvents 1.0 JSON envelope.
///
/// - `id`: the store's event id, so every route and every retry sends the same id and
///   consumers can drop repeats by (`source`, `id`);
/// - `source`: yours to choose, a URI reference naming the producer, e.g.
///   `/orders-service` or `https://shop.example.com/orders`;
/// - `type`: the event type;
/// - `subject`: `<entity_type>/<entity_id>`;
/// - `time`: when the producer wrote it (RFC 3339);
/// - `data`: the payload as JSON, `datacontenttype` `application/json`;
/// - `traceparent`: the producer's trace context, when it has one (the distributed
///   tracing extension).
pub fn envelope(event: &Event, source: &str) -> Value {
    let mut envelope = json!({
        "specversion": "1.0",
        "id": event.id.to_string(),
        "source": source,
        "type": event.event_type,
        "subject": format!("{}/{}", event.entity_type, event.entity_id),
        "time": event.created_at_rfc3339(),
        "datacontenttype": "application/json",
        "data": event.data_json(),
    });
    if let (Some(traceparent), Some(map)) = (event.header("traceparent"), envelope.as_object_mut())
    {
        map.insert("traceparent".into(), traceparent.into());
    }
    envelope
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::event;

    #[test]
    fn builds_the_envelope() {
        let event = event("order.created")
            .id(42)
            .entity("order", "o-1")
            .created_at_ms(1_714_564_800_250)
            .data(json!({ "total": 12 }))
            .build();
        assert_eq!(
            envelope(&event, "/shop"),
            json!({
                "specversion": "1.0",
                "id": "42",
                "source": "/shop",
                "type": "order.created",
                "subject": "order/o-1",
                "time": "2024-05-01T12:00:00.250Z",
                "datacontenttype": "application/json",
                "data": { "total": 12 },
            })
        );
    }

    #[test]
    fn carries_the_trace_context() {
        let event = event("order.created")
            .header("traceparent", "00-abc-def-01")
            .build();
        assert_eq!(envelope(&event, "/shop")["traceparent"], "00-abc-def-01");
    }
}
