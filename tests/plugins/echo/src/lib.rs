//! Test plugin `echo`: a well-behaved plugin whose behaviour the host's tests script
//! through the event data and the route config.
//!
//! In order:
//! 1. logs `echo <id> attempt <n> on <route>` at info;
//! 2. data `{"fail_until_attempt": N}`: retry while the attempt is below N, after
//!    `retry_after_ms` when the data also has it;
//! 3. data `{"dead": "why"}`: dead with that reason;
//! 4. config `emit_type` set: emits `emit_count` (default 1) events of that type for
//!    the same entity, data `{"echo_of": <id>, "data": <the event's data>}`; a refused
//!    emit is dead with the host's error;
//! 5. data `{"panic": "why"}`: panics with that message (a trap);
//! 6. delivered, receipt `<route>:<attempt>:<idempotency_key>`, or, with config
//!    `count_calls` set, `calls:<n>`: how many events this instance has handled, which
//!    shows whether instances are reused between events, or, with config
//!    `receipt = "event"`, the event exactly as the plugin received it, as JSON
//!    (`event_type`, `target`, `entity_type`, `entity_id`, `data` as the raw text,
//!    `headers` as `[name, value]` pairs, `idempotency_key`): what the host handed over
//!    ends up in the attempts log, for tests of what survives the trip.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use herald_sdk::prelude::*;
use serde_json::{json, Value};

struct Echo;

/// Events this instance has handled: state a plugin keeps in a global.
static CALLS: AtomicU32 = AtomicU32::new(0);

impl Plugin for Echo {
    fn describe() -> PluginInfo {
        PluginInfo::new("echo", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::optional(
                "emit_type",
                "Emit events of this type for the same entity.",
            ))
            .config(ConfigKey::optional(
                "emit_count",
                "How many events to emit (default 1).",
            ))
            .config(ConfigKey::optional(
                "count_calls",
                "Receipt `calls:<n>`: events this instance has handled.",
            ))
            .config(ConfigKey::optional(
                "receipt",
                "`event`: the receipt is the event as received, as JSON.",
            ))
    }

    fn handle(event: Event) -> Outcome {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        log::info(format!(
            "echo {} attempt {} on {}",
            event.id, event.attempt, event.route
        ));
        let data = event.data_json();

        if let Some(until) = data.get("fail_until_attempt").and_then(Value::as_u64) {
            if u64::from(event.attempt) < until {
                let reason = format!("attempt {} of {until}", event.attempt);
                return match data.get("retry_after_ms").and_then(Value::as_u64) {
                    Some(ms) => Outcome::retry_after(Duration::from_millis(ms), reason),
                    None => Outcome::retry(reason),
                };
            }
        }

        if let Some(reason) = data.get("dead") {
            return Outcome::dead(match reason {
                Value::String(reason) => reason.clone(),
                other => other.to_string(),
            });
        }

        if let Some(why) = data.get("panic").and_then(Value::as_str) {
            panic!("{why}");
        }

        if let Some(emit_type) = config::get("emit_type") {
            let count = match config::parse::<u32>("emit_count") {
                Ok(count) => count.unwrap_or(1),
                Err(err) => return Outcome::dead(err.to_string()),
            };
            for _ in 0..count {
                let echo = NewEvent::same_entity_as(&event, &emit_type)
                    .data(json!({ "echo_of": event.id, "data": data }));
                if let Err(err) = emit::emit(echo) {
                    return Outcome::dead(format!("emit: {err}"));
                }
            }
        }

        if config::get("receipt").as_deref() == Some("event") {
            return Outcome::delivered_with(as_received(&event).to_string());
        }
        if config::get("count_calls").is_some() {
            return Outcome::delivered_with(format!("calls:{calls}"));
        }
        Outcome::delivered_with(format!(
            "{}:{}:{}",
            event.route, event.attempt, event.idempotency_key
        ))
    }
}

/// The event as this plugin got it; the payload stays the raw text, unparsed.
fn as_received(event: &Event) -> Value {
    json!({
        "event_type": event.event_type,
        "target": event.target,
        "entity_type": event.entity_type,
        "entity_id": event.entity_id,
        "data": event.raw_data,
        "headers": event.headers,
        "idempotency_key": event.idempotency_key,
    })
}

herald_sdk::export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use super::*;
    use herald_sdk::testing::{event, Harness};

    #[test]
    fn delivers_with_route_attempt_and_key() {
        let run = Harness::new().run::<Echo>(
            event("t")
                .route("r")
                .attempt(3)
                .idempotency_key("k")
                .build(),
        );
        assert_eq!(run.outcome, Outcome::delivered_with("r:3:k"));
        assert!(run.emitted.is_empty());
        assert_eq!(run.logs.len(), 1);
    }

    #[test]
    fn retries_until_the_attempt() {
        let data = json!({ "fail_until_attempt": 3, "retry_after_ms": 50 });
        let second = Harness::new().run::<Echo>(event("t").attempt(2).data(&data).build());
        assert_eq!(
            second.outcome,
            Outcome::retry_after(Duration::from_millis(50), "attempt 2 of 3")
        );
        let third = Harness::new().run::<Echo>(event("t").attempt(3).data(&data).build());
        assert!(matches!(third.outcome, Outcome::Delivered { .. }));
    }

    #[test]
    fn receipt_can_be_the_event_as_received() {
        let run = Harness::new().config("receipt", "event").run::<Echo>(
            event("a'b")
                .entity("t;", "--1")
                .idempotency_key("k%")
                .build(),
        );
        let Outcome::Delivered {
            receipt: Some(receipt),
        } = run.outcome
        else {
            panic!("not delivered with a receipt: {:?}", run.outcome);
        };
        let received: Value = serde_json::from_str(&receipt).expect("receipt is JSON");
        assert_eq!(received["event_type"], "a'b");
        assert_eq!(received["entity_type"], "t;");
        assert_eq!(received["entity_id"], "--1");
        assert_eq!(received["idempotency_key"], "k%");
    }

    #[test]
    fn dies_on_request() {
        let run = Harness::new().run::<Echo>(event("t").data(json!({ "dead": "no" })).build());
        assert_eq!(run.outcome, Outcome::dead("no"));
    }

    #[test]
    fn emits_for_the_same_entity() {
        let run = Harness::new()
            .config("emit_type", "t.echoed")
            .config("emit_count", "2")
            .emit_limit(1)
            .run::<Echo>(event("t").entity("order", "o-1").build());
        assert_eq!(run.emitted.len(), 1);
        assert_eq!(run.emitted[0].event_type, "t.echoed");
        assert_eq!(run.emitted[0].entity_id, "o-1");
        assert_eq!(
            run.emitted[0].data_json(),
            json!({ "echo_of": 1, "data": {} })
        );
        assert_eq!(
            run.outcome,
            Outcome::dead("emit: emit limit of 1 events per attempt reached")
        );
    }
}
