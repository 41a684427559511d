use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use herald_sdk::prelude::*;
use herald_sdk::testing::{event, Harness, Run};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use webhook::Webhook;

const URL: &str = "https://hooks.example.com/orders";
// Base64 of the 24 bytes "herald-test-signing-key!".
const SECRET: &str = "whsec_aGVyYWxkLXRlc3Qtc2lnbmluZy1rZXkh";
/// 2024-05-01T12:00:00Z, the host's clock in these tests.
const NOW_MS: i64 = 1_714_564_800_000;

fn order_created() -> Event {
    event("order.created")
        .id(42)
        .entity("order", "o-1")
        .target("billing")
        .data(json!({ "amount_cents": 1250, "currency": "EUR" }))
        .created_at_ms(NOW_MS - 250)
        .now_ms(NOW_MS)
        .idempotency_key("orders-webhook:42")
        .build()
}

fn deliver(harness: Harness) -> Run {
    harness.config("url", URL).run::<Webhook>(order_created())
}

#[test]
fn describes_itself() {
    let info = Webhook::describe();
    assert_eq!(info.name, "webhook");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let keys: Vec<_> = info
        .config_keys
        .iter()
        .map(|k| (k.name.as_str(), k.required, k.secret))
        .collect();
    assert_eq!(
        keys,
        [
            ("url", true, false),
            ("secret", false, true),
            ("timeout_ms", false, false)
        ]
    );
}

#[test]
fn success_is_delivered_with_the_status_as_receipt() {
    let run = deliver(Harness::new().respond(Response::new(204)));
    assert_eq!(run.outcome, Outcome::delivered_with("HTTP 204"));

    let [request] = &run.requests[..] else {
        panic!("expected one request, got {:?}", run.requests);
    };
    assert_eq!(request.method, "POST");
    assert_eq!(request.url, URL);
    assert_eq!(request.timeout, None);
    assert_eq!(request.get_header("content-type"), Some("application/json"));
    assert_eq!(
        request.get_header("idempotency-key"),
        Some("orders-webhook:42")
    );
    assert_eq!(request.get_header("webhook-id"), Some("orders-webhook:42"));
    assert_eq!(request.get_header("webhook-timestamp"), Some("1714564800"));
    assert_eq!(request.get_header("webhook-signature"), None);

    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        json!({
            "id": 42,
            "type": "order.created",
            "timestamp": "2024-05-01T11:59:59.750Z",
            "entity": { "type": "order", "id": "o-1" },
            "target": "billing",
            "data": { "amount_cents": 1250, "currency": "EUR" },
        })
    );
}

#[test]
fn any_2xx_is_delivered() {
    let run = deliver(Harness::new().respond(Response::new(200).with_body("ok")));
    assert_eq!(run.outcome, Outcome::delivered_with("HTTP 200"));
}

#[test]
fn signature_is_present_and_verifiable() {
    let run = deliver(
        Harness::new()
            .config("secret", SECRET)
            .respond(Response::new(200)),
    );
    assert_eq!(run.outcome, Outcome::delivered_with("HTTP 200"));
    let request = &run.requests[0];
    let id = request.get_header("webhook-id").unwrap();
    let timestamp = request.get_header("webhook-timestamp").unwrap();
    let signature = request.get_header("webhook-signature").unwrap();

    // Verify as a receiver would, with nothing from the SDK.
    let mut mac = Hmac::<Sha256>::new_from_slice(b"herald-test-signing-key!").unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(signature, expected);
}

#[test]
fn gone_is_dead() {
    let run = deliver(Harness::new().respond(Response::new(410).with_body("endpoint disabled")));
    assert_eq!(
        run.outcome,
        Outcome::dead("HTTP 410: endpoint disabled (the receiver asks us to stop)")
    );
}

#[test]
fn too_many_requests_retries_after_retry_after_seconds() {
    let run = deliver(
        Harness::new().respond(
            Response::new(429)
                .with_header("Retry-After", "120")
                .with_body("slow down"),
        ),
    );
    assert_eq!(
        run.outcome,
        Outcome::retry_after(Duration::from_secs(120), "HTTP 429: slow down")
    );
}

#[test]
fn retry_after_as_http_date_is_measured_from_the_host_clock() {
    // 90 seconds after NOW_MS.
    let run =
        deliver(Harness::new().respond(
            Response::new(503).with_header("retry-after", "Wed, 01 May 2024 12:01:30 GMT"),
        ));
    assert_eq!(
        run.outcome,
        Outcome::retry_after(Duration::from_secs(90), "HTTP 503")
    );
}

#[test]
fn retry_after_in_the_past_or_unreadable() {
    let past =
        deliver(Harness::new().respond(
            Response::new(503).with_header("Retry-After", "Wed, 01 May 2024 11:00:00 GMT"),
        ));
    assert_eq!(
        past.outcome,
        Outcome::retry_after(Duration::ZERO, "HTTP 503")
    );
    let unreadable =
        deliver(Harness::new().respond(Response::new(503).with_header("Retry-After", "soon")));
    assert_eq!(unreadable.outcome, Outcome::retry("HTTP 503"));
}

#[test]
fn server_errors_retry() {
    let run = deliver(Harness::new().respond(Response::new(503).with_body("<h1>down</h1>\n")));
    assert_eq!(run.outcome, Outcome::retry("HTTP 503: <h1>down</h1>"));
    let run = deliver(Harness::new().respond(Response::new(500)));
    assert_eq!(run.outcome, Outcome::retry("HTTP 500"));
    let run = deliver(Harness::new().respond(Response::new(408)));
    assert_eq!(run.outcome, Outcome::retry("HTTP 408"));
}

#[test]
fn client_errors_are_dead_with_a_body_excerpt() {
    let body = format!(
        "{{\"error\": \"amount must be positive\",\n \"detail\": \"{}\"}}",
        "x".repeat(500)
    );
    let run = deliver(Harness::new().respond(Response::new(400).with_body(body)));
    let Outcome::Dead { reason } = &run.outcome else {
        panic!("expected dead, got {:?}", run.outcome);
    };
    assert!(
        reason.starts_with(r#"HTTP 400: {"error": "amount must be positive", "detail": "xxx"#),
        "{reason}"
    );
    let excerpt = reason.trim_start_matches("HTTP 400: ");
    assert_eq!(excerpt.chars().count(), 200);
    assert!(excerpt.ends_with('…'));
}

#[test]
fn other_statuses_are_dead() {
    let run = deliver(Harness::new().respond(Response::new(404)));
    assert_eq!(run.outcome, Outcome::dead("HTTP 404"));
    let run = deliver(Harness::new().respond(Response::new(301)));
    assert_eq!(run.outcome, Outcome::dead("HTTP 301"));
}

#[test]
fn transport_failures_retry() {
    let run = deliver(Harness::new().respond_error(HttpError::Timeout));
    assert_eq!(run.outcome, Outcome::retry("timed out"));
    let run = deliver(Harness::new().respond_error(HttpError::Connect("refused".into())));
    assert_eq!(run.outcome, Outcome::retry("connection failed: refused"));
    let run = deliver(Harness::new().respond_error(HttpError::TooLarge(1024)));
    assert!(matches!(run.outcome, Outcome::Retry { after: None, .. }));
}

#[test]
fn a_denied_destination_is_dead() {
    let run = deliver(Harness::new().respond_error(HttpError::Denied(
        "hooks.example.com is not in allowed_hosts".into(),
    )));
    let Outcome::Dead { reason } = &run.outcome else {
        panic!("expected dead, got {:?}", run.outcome);
    };
    assert!(
        reason.contains("hooks.example.com is not in allowed_hosts"),
        "{reason}"
    );
}

#[test]
fn timeout_ms_is_passed_on() {
    let run = deliver(
        Harness::new()
            .config("timeout_ms", "2500")
            .respond(Response::new(204)),
    );
    assert_eq!(run.requests[0].timeout, Some(Duration::from_millis(2500)));
}

#[test]
fn bad_config_is_dead_without_sending() {
    let no_url = Harness::new().run::<Webhook>(order_created());
    assert_eq!(
        no_url.outcome,
        Outcome::dead("config key `url` is required but not set")
    );

    for (key, value) in [
        ("secret", "whsec_***"),
        ("secret", ""),
        ("timeout_ms", "soon"),
        ("timeout_ms", "0"),
    ] {
        let run = deliver(Harness::new().config(key, value));
        let Outcome::Dead { reason } = &run.outcome else {
            panic!("{key}={value:?}: expected dead, got {:?}", run.outcome);
        };
        assert!(reason.contains(key), "{key}={value:?}: {reason}");
        assert!(run.requests.is_empty());
    }
}
