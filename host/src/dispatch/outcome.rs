//! Translating between the store's view of a delivery and the plugin's, both ways.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{route_failure, Route};
use crate::runtime::{CallReport, Event as PluginEvent, Outcome as PluginOutcome};
use crate::store::{ClaimedDelivery, NewEvent, Outcome};

/// The event as the plugin sees it.
pub(super) fn plugin_event(delivery: &ClaimedDelivery) -> PluginEvent {
    let event = &delivery.event;
    let headers = event
        .headers
        .as_deref()
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
        .map(|map| {
            map.into_iter()
                .map(|(name, value)| match value {
                    Value::String(text) => (name, text),
                    other => (name, other.to_string()),
                })
                .collect()
        })
        .unwrap_or_default();
    PluginEvent {
        id: event.event_id,
        event_type: event.event_type.clone(),
        target: event.event_target.clone(),
        entity_type: event.entity_type.clone(),
        entity_id: event.entity_id.clone(),
        data: event.event_data.clone().unwrap_or_else(|| "null".into()),
        headers,
        created_at_ms: event.created_at.timestamp_millis(),
        now_ms: chrono::Utc::now().timestamp_millis(),
        attempt: u32::try_from(delivery.attempt).unwrap_or(u32::MAX),
        idempotency_key: delivery.idempotency_key.clone(),
        route: delivery.route.clone(),
    }
}

/// Most bytes of a plugin's receipt or reason the ledger keeps (in the attempts log, the
/// delivery's last error, the event's status reason and a dead notice). Enough for any
/// message meant for an operator; a plugin answering with megabytes would otherwise have
/// the host hold and write them, several times over.
pub const MAX_DETAIL_BYTES: usize = 4096;

/// The plugin's verdict, or its fault, as the outcome the store records.
pub(super) fn store_outcome(
    route: &Route,
    delivery: &ClaimedDelivery,
    report: CallReport,
) -> Outcome {
    match report.outcome {
        Ok(PluginOutcome::Delivered(receipt)) => Outcome::Delivered {
            receipt: receipt.map(recordable),
            emitted: report
                .emitted
                .into_iter()
                .map(|event| with_causation(event, delivery))
                .collect(),
        },
        Ok(PluginOutcome::Skip(reason)) => Outcome::Skipped {
            reason: recordable(reason),
        },
        Ok(PluginOutcome::Dead(reason)) => Outcome::Dead {
            reason: recordable(reason),
        },
        Ok(PluginOutcome::Retry(request)) => route_failure(
            route,
            delivery,
            recordable(request.reason),
            request.after_ms.map(Duration::from_millis),
        ),
        Err(fault) => route_failure(route, delivery, recordable(fault.to_string()), None),
    }
}

/// A plugin's text as every store can keep it: NUL characters (which Postgres `text`
/// refuses, making the whole outcome unrecordable) replaced by U+FFFD, and at most
/// `MAX_DETAIL_BYTES`, with a marker saying how long it was.
fn recordable(text: String) -> String {
    let mut text = if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    };
    if text.len() > MAX_DETAIL_BYTES {
        let full = text.len();
        let cut = (0..=MAX_DETAIL_BYTES)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str(&format!(" …[truncated: {full} bytes in all]"));
    }
    text
}

/// Emitted events point back at the event that caused them and carry its trace.
fn with_causation(mut event: NewEvent, cause: &ClaimedDelivery) -> NewEvent {
    let headers = event.headers.get_or_insert_with(Map::new);
    headers
        .entry("causation_id")
        .or_insert_with(|| Value::String(cause.event.event_id.to_string()));
    if let Some(traceparent) = cause
        .event
        .headers
        .as_deref()
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
        .and_then(|map| map.get("traceparent").cloned())
    {
        headers.entry("traceparent").or_insert(traceparent);
    }
    event
}

/// The `herald.delivery.dead` event the host appends when a delivery goes DEAD, for saga
/// compensators. Its key makes a second death of the same delivery (after a redrive) a
/// DUPLICATE, so a compensation runs once. Dead notices do not beget dead notices.
pub fn dead_notice(delivery: &ClaimedDelivery, reason: &str) -> Option<NewEvent> {
    let event = &delivery.event;
    if event.event_type.starts_with("herald.") {
        return None;
    }
    let data = event
        .event_data
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .unwrap_or(Value::Null);
    let mut notice = NewEvent::new(
        "herald.delivery.dead",
        event.entity_type.clone(),
        event.entity_id.clone(),
        json!({
            "event_id": event.event_id,
            "event_type": event.event_type,
            "entity_type": event.entity_type,
            "entity_id": event.entity_id,
            "route": delivery.route,
            "reason": reason,
            "data": data,
        }),
    )
    .with_key(format!("herald.dead:{}:{}", event.event_id, delivery.route));
    notice.headers = Some(Map::from_iter([(
        "causation_id".to_string(),
        Value::String(event.event_id.to_string()),
    )]));
    Some(notice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordable_text_has_no_nul_and_is_bounded() {
        assert_eq!(recordable("a\0b".into()), "a\u{FFFD}b");
        let long = recordable("é".repeat(MAX_DETAIL_BYTES));
        assert!(long.len() < MAX_DETAIL_BYTES + 64, "{}", long.len());
        assert!(long.ends_with(&format!(
            " …[truncated: {} bytes in all]",
            2 * MAX_DETAIL_BYTES
        )));
        assert_eq!(recordable("short".into()), "short");
    }
}
