use herald_sdk::prelude::*;
use herald_sdk::testing::{event, Harness, Run};
use saga_compensator::SagaCompensator;
use serde_json::{json, Value};

const COMPENSATIONS: &str =
    r#"{"payment.capture": "payment.refund", "stock.reserve": "stock.release"}"#;

fn dead_letter(data: Value) -> Event {
    event("herald.delivery.dead")
        .id(99)
        .entity("payment", "p-1")
        .header("traceparent", "00-trace-span-01")
        .data(data)
        .build()
}

fn capture_died() -> Value {
    json!({
        "event_id": 42,
        "event_type": "payment.capture",
        "entity_type": "payment",
        "entity_id": "p-1",
        "route": "psp",
        "reason": "HTTP 400: card expired",
        "data": { "amount_cents": 1250 },
    })
}

fn compensate(event: Event) -> Run {
    Harness::new()
        .config("compensations", COMPENSATIONS)
        .run::<SagaCompensator>(event)
}

#[test]
fn describes_itself() {
    let info = SagaCompensator::describe();
    assert_eq!(info.name, "saga-compensator");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.event_types, ["herald.delivery.dead"]);
}

#[test]
fn emits_the_compensation_for_the_same_entity() {
    let run = compensate(dead_letter(capture_died()));
    assert_eq!(
        run.outcome,
        Outcome::delivered_with("emitted payment.refund for event 42")
    );
    let [refund] = &run.emitted[..] else {
        panic!("expected one event, got {:?}", run.emitted);
    };
    assert_eq!(refund.event_type, "payment.refund");
    assert_eq!(
        (refund.entity_type.as_str(), refund.entity_id.as_str()),
        ("payment", "p-1")
    );
    assert_eq!(
        refund.data_json(),
        json!({
            "compensates": 42,
            "reason": "HTTP 400: card expired",
            "original": { "amount_cents": 1250 },
        })
    );
    assert_eq!(
        refund.idempotency_key.as_deref(),
        Some("compensate:42:payment.refund")
    );
    assert_eq!(
        refund.headers,
        [("traceparent".to_owned(), "00-trace-span-01".to_owned())]
    );
}

#[test]
fn the_entity_comes_from_the_dead_event() {
    let mut data = capture_died();
    data["event_type"] = json!("stock.reserve");
    data["entity_type"] = json!("sku");
    data["entity_id"] = json!("TEA-42");
    let run = compensate(dead_letter(data));
    assert_eq!(run.emitted[0].event_type, "stock.release");
    assert_eq!(run.emitted[0].entity_type, "sku");
    assert_eq!(run.emitted[0].entity_id, "TEA-42");
}

#[test]
fn no_mapping_is_skipped() {
    let mut data = capture_died();
    data["event_type"] = json!("payment.refund");
    let run = compensate(dead_letter(data));
    assert_eq!(
        run.outcome,
        Outcome::skip("no compensation for `payment.refund`")
    );
    assert!(run.emitted.is_empty());
}

#[test]
fn other_event_types_are_skipped() {
    let run = compensate(event("payment.capture").data(capture_died()).build());
    assert!(matches!(run.outcome, Outcome::Skip { .. }));
    assert!(run.emitted.is_empty());
}

#[test]
fn malformed_dead_letters_are_dead() {
    let run = compensate(dead_letter(json!({ "event_id": "42" })));
    let Outcome::Dead { reason } = &run.outcome else {
        panic!("expected dead, got {:?}", run.outcome);
    };
    assert!(reason.contains("herald.delivery.dead"), "{reason}");
    assert!(reason.contains("invalid type"), "{reason}");
}

#[test]
fn missing_original_data_becomes_null() {
    let mut data = capture_died();
    data.as_object_mut().unwrap().remove("data");
    let run = compensate(dead_letter(data));
    assert_eq!(run.emitted[0].data_json()["original"], Value::Null);
}

#[test]
fn bad_config_is_dead() {
    for config in [None, Some("not json"), Some(r#"["payment.refund"]"#)] {
        let mut harness = Harness::new();
        if let Some(value) = config {
            harness = harness.config("compensations", value);
        }
        let run = harness.run::<SagaCompensator>(dead_letter(capture_died()));
        let Outcome::Dead { reason } = &run.outcome else {
            panic!("{config:?}: expected dead, got {:?}", run.outcome);
        };
        assert!(reason.contains("compensations"), "{config:?}: {reason}");
    }
}

#[test]
fn a_refused_emit_is_dead() {
    let run = Harness::new()
        .config("compensations", COMPENSATIONS)
        .emit_limit(0)
        .run::<SagaCompensator>(dead_letter(capture_died()));
    assert!(matches!(run.outcome, Outcome::Dead { .. }));
}
