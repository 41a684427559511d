use herald_sdk::prelude::*;
use herald_sdk::testing::{event, Harness, Run};
use serde_json::{json, Value};
use upcaster::Upcaster;

fn upcast(event_type: &str, data: Value) -> Run {
    Harness::new()
        .config("from", "order.created.v1")
        .config("to", "order.created.v2")
        .run::<Upcaster>(
            event(event_type)
                .entity("order", "o-1")
                .target("billing")
                .header("traceparent", "00-trace-span-01")
                .header("tenant", "acme")
                .idempotency_key("upcast-orders:42")
                .data(data)
                .build(),
        )
}

fn dead_reason(run: &Run) -> &str {
    match &run.outcome {
        Outcome::Dead { reason } => reason,
        other => panic!("expected dead, got {other:?}"),
    }
}

#[test]
fn describes_itself() {
    let info = Upcaster::describe();
    assert_eq!(info.name, "upcaster");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(info.config_keys.iter().all(|key| key.required));
}

#[test]
fn emits_the_v2_event_for_the_same_entity() {
    let run = upcast(
        "order.created.v1",
        json!({ "amount_cents": 1250, "currency": "EUR", "customer": "c-7", "lines": [1, 2] }),
    );
    assert_eq!(
        run.outcome,
        Outcome::delivered_with("emitted order.created.v2")
    );
    let [emitted] = &run.emitted[..] else {
        panic!("expected one event, got {:?}", run.emitted);
    };
    assert_eq!(emitted.event_type, "order.created.v2");
    assert_eq!(
        (emitted.entity_type.as_str(), emitted.entity_id.as_str()),
        ("order", "o-1")
    );
    assert_eq!(emitted.target.as_deref(), Some("billing"));
    assert_eq!(
        emitted.idempotency_key.as_deref(),
        Some("upcast:upcast-orders:42")
    );
    assert_eq!(
        emitted.headers,
        [
            ("traceparent".to_owned(), "00-trace-span-01".to_owned()),
            ("tenant".to_owned(), "acme".to_owned())
        ]
    );
    assert_eq!(
        emitted.data_json(),
        json!({
            "total": { "amount": "12.50", "currency": "EUR" },
            "schema": 2,
            "customer": "c-7",
            "lines": [1, 2],
        })
    );
}

#[test]
fn credits_keep_their_sign() {
    let run = upcast(
        "order.created.v1",
        json!({ "amount_cents": -5, "currency": "USD" }),
    );
    assert_eq!(
        run.emitted[0].data_json()["total"],
        json!({ "amount": "-0.05", "currency": "USD" })
    );
}

#[test]
fn other_event_types_are_skipped() {
    let run = upcast(
        "order.created.v2",
        json!({ "amount_cents": 1250, "currency": "EUR" }),
    );
    assert!(
        matches!(run.outcome, Outcome::Skip { .. }),
        "{:?}",
        run.outcome
    );
    assert!(run.emitted.is_empty());
}

#[test]
fn data_that_is_not_v1_is_dead_with_the_serde_error() {
    let missing = upcast("order.created.v1", json!({ "currency": "EUR" }));
    assert!(
        dead_reason(&missing).contains("missing field `amount_cents`"),
        "{}",
        dead_reason(&missing)
    );

    let float = upcast(
        "order.created.v1",
        json!({ "amount_cents": 12.5, "currency": "EUR" }),
    );
    assert!(
        dead_reason(&float).contains("invalid type: floating point `12.5`"),
        "{}",
        dead_reason(&float)
    );

    let not_an_object = upcast("order.created.v1", json!([1250, "EUR"]));
    assert!(dead_reason(&not_an_object).starts_with("not a `order.created.v1` payload: "));
    assert!(missing.emitted.is_empty() && float.emitted.is_empty());
}

#[test]
fn payloads_that_only_look_like_v1_are_dead() {
    let currency = upcast(
        "order.created.v1",
        json!({ "amount_cents": 1, "currency": "euro" }),
    );
    assert!(dead_reason(&currency).contains("ISO 4217"));

    let already_v2 = upcast(
        "order.created.v1",
        json!({ "amount_cents": 1, "currency": "EUR", "schema": 2 }),
    );
    assert!(dead_reason(&already_v2).contains("already has a `schema` field"));
}

#[test]
fn data_that_is_not_json_is_dead() {
    let run = Harness::new()
        .config("from", "order.created.v1")
        .config("to", "order.created.v2")
        .run::<Upcaster>(event("order.created.v1").raw_data("{oops").build());
    assert!(dead_reason(&run).starts_with("not a `order.created.v1` payload: "));
}

#[test]
fn a_refused_emit_is_dead() {
    let run = Harness::new()
        .config("from", "order.created.v1")
        .config("to", "order.created.v2")
        .emit_limit(0)
        .run::<Upcaster>(
            event("order.created.v1")
                .data(json!({ "amount_cents": 1, "currency": "EUR" }))
                .build(),
        );
    assert!(
        dead_reason(&run).contains("emit limit"),
        "{}",
        dead_reason(&run)
    );
}

#[test]
fn bad_config_is_dead() {
    let data = json!({ "amount_cents": 1, "currency": "EUR" });
    let missing = Harness::new()
        .config("from", "order.created.v1")
        .run::<Upcaster>(event("order.created.v1").data(&data).build());
    assert!(dead_reason(&missing).contains("`to`"));

    let looping = Harness::new()
        .config("from", "order.created.v1")
        .config("to", "order.created.v1")
        .run::<Upcaster>(event("order.created.v1").data(&data).build());
    assert!(dead_reason(&looping).contains("both"));
    assert!(looping.emitted.is_empty());
}
