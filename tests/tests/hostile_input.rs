//! Hostile input, end to end: events no producer should write, characters that break
//! hand-built SQL, payloads over the size limit, and plugins asking for private
//! addresses. Each lands in a visible state with the reason, nothing crashes or loops,
//! and the events around them are delivered.

mod common;

use std::time::Duration;

use common::Herald;
use herald::store::{AttemptOutcome, EventStatus, NewEvent};
use herald_tests::sink::{Reply, Sink};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// The echo plugin on `order.*`, answering with the event as it received it.
const ECHO_ROUTE: &str = "\n[[routes]]\nname = \"orders\"\nevent_types = [\"order.*\"]\nplugin = \"echo\"\n[routes.retry]\nmax_attempts = 1\n[routes.config]\nreceipt = \"event\"\n";

/// A producer's raw INSERT, on whichever database the Herald runs on.
async fn insert(herald: &Herald, columns: &str, values: &str) -> i64 {
    let sql = format!("INSERT INTO events ({columns}) VALUES ({values}) RETURNING event_id");
    let result = if herald.store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&herald.store_url)
            .await
            .expect("raw sqlite pool");
        sqlx::query_scalar(&sql).fetch_one(&pool).await
    } else {
        let pool = sqlx::PgPool::connect(&herald.store_url)
            .await
            .expect("raw pg pool");
        sqlx::query_scalar(&sql).fetch_one(&pool).await
    };
    result.unwrap_or_else(|err| panic!("{sql}: {err}"))
}

fn is_sqlite(herald: &Herald) -> bool {
    herald.store_url.starts_with("sqlite:")
}

/// The event is DEAD with exactly this reason, and no plugin ever saw it.
async fn dead_unseen(herald: &Herald, id: i64) -> String {
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Dead, "{detail:?}");
    assert!(detail.deliveries.is_empty(), "{detail:?}");
    assert!(detail.attempts.is_empty(), "{detail:?}");
    detail.event.status_reason.unwrap_or_default()
}

/// What the echo plugin received for this event: the receipt of its one attempt.
async fn as_received(herald: &Herald, id: i64) -> Value {
    let detail = herald.detail(id).await;
    assert_eq!(
        detail.event.event_status,
        EventStatus::Success,
        "{detail:?}"
    );
    assert_eq!(detail.attempts.len(), 1, "{detail:?}");
    let receipt = detail.attempts[0].detail.clone().unwrap_or_default();
    serde_json::from_str(&receipt).unwrap_or_else(|err| panic!("receipt {receipt}: {err}"))
}

const SEED: &str = "event_type, entity_type, entity_id, event_data";

async fn hostile_events_are_settled_visibly_and_never_block_others(herald: Herald) {
    let order = |entity: &str, data: Value| NewEvent::new("order.created", "order", entity, data);
    let first = herald.append(order("o-1", json!({ "n": 1 }))).await;
    // 10 MB: ten times the default limit of 1 MiB.
    let huge = herald
        .append(order("o-1", json!({ "blob": "x".repeat(10 << 20) })))
        .await;
    let null = insert(&herald, SEED, "'order.created', 'order', 'o-1', NULL").await;
    let unknown = herald
        .append(NewEvent::new("no.such.type", "order", "o-1", json!({})))
        .await;
    let mut garbled = Vec::new();
    if is_sqlite(&herald) {
        // SQLite's TEXT takes anything; Postgres' jsonb refuses these at the INSERT.
        garbled.push((
            insert(&herald, SEED, "'order.created', 'order', 'o-1', '{\"n\": '").await,
            "event_data is not valid JSON: EOF while parsing a value at line 1 column 6",
        ));
        garbled.push((
            insert(
                &herald,
                SEED,
                "'order.created', 'order', 'o-1', CAST(x'7b22ff227d' AS TEXT)",
            )
            .await,
            "event_data is not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 2)",
        ));
        garbled.push((
            insert(
                &herald,
                "event_type, entity_type, entity_id, event_data, headers",
                "'order.created', 'order', 'o-1', '{}', 'x-tenant: acme'",
            )
            .await,
            "headers is not valid JSON: expected value at line 1 column 1",
        ));
        garbled.push((
            insert(
                &herald,
                SEED,
                "CAST(x'6f726465722efe' AS TEXT), 'order', 'o-1', '{}'",
            )
            .await,
            "event_type is not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 6)",
        ));
    }
    // After all of that, the same entity's next event, and another entity's.
    let last = herald.append(order("o-1", json!({ "n": 2 }))).await;
    let other = herald.append(order("o-2", json!({ "n": 3 }))).await;

    // `settle` drains with `expect`: a fan-out or claim error fails the test here.
    herald.settle(LIMIT).await;

    let reason = dead_unseen(&herald, huge).await;
    let size: u64 = reason
        .strip_prefix("event_data is ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in: {reason}"));
    assert!(size > 10 << 20, "{reason}");
    assert!(
        reason.ends_with(" bytes, over the limit of 1048576 bytes ([dispatch] max_event_bytes)"),
        "{reason}"
    );
    assert_eq!(dead_unseen(&herald, null).await, "event_data is NULL");
    for (id, expected) in garbled {
        assert_eq!(dead_unseen(&herald, id).await, expected, "event {id}");
    }
    let skipped = herald.detail(unknown).await;
    assert_eq!(skipped.event.event_status, EventStatus::Skipped);
    assert_eq!(
        skipped.event.status_reason.as_deref(),
        Some("no route matches event_type 'no.such.type'")
    );
    for (id, n) in [(first, 1), (last, 2), (other, 3)] {
        let received = as_received(&herald, id).await;
        let data: Value = serde_json::from_str(received["data"].as_str().unwrap_or_default())
            .expect("the plugin got JSON");
        assert_eq!(data, json!({ "n": n }), "event {id}");
    }
    // Nothing is left over for another pass to trip on.
    let pass = herald.service.dispatcher.pass().await.expect("pass");
    assert!(pass.is_idle(), "{pass:?}");
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_are_settled_visibly_and_never_block_others_on_sqlite() {
    hostile_events_are_settled_visibly_and_never_block_others(Herald::sqlite(ECHO_ROUTE).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_are_settled_visibly_and_never_block_others_on_postgres() {
    if let Some(herald) = Herald::postgres("hostile_events", ECHO_ROUTE).await {
        hostile_events_are_settled_visibly_and_never_block_others(herald).await;
    }
}

/// Quotes, comment and statement separators, escapes, LIKE wildcards, placeholders (and
/// NUL where the database can hold it).
const META: &str = "'\";--\\%_$1 ' OR '1'='1 /* */";

async fn sql_meta_characters_reach_the_plugin_unchanged(herald: Herald) {
    let nul = if is_sqlite(&herald) { "\0" } else { "" };
    let text = |prefix: &str| format!("{prefix}{META}{nul}");
    let data = json!({ META: text("v"), "list": [META, nul] });
    let mut event = NewEvent::new(text("order."), text("type"), text("id"), data.clone())
        .with_target(text("target"))
        .with_key(text("key"));
    event.headers = Some(serde_json::Map::from_iter([
        (text("h"), json!(text("v"))),
        ("traceparent".into(), json!(META)),
    ]));
    let id = herald.append(event.clone()).await;
    herald.settle(LIMIT).await;

    let received = as_received(&herald, id).await;
    assert_eq!(received["event_type"], json!(event.event_type));
    assert_eq!(received["target"], json!(event.event_target));
    assert_eq!(received["entity_type"], json!(event.entity_type));
    assert_eq!(received["entity_id"], json!(event.entity_id));
    assert_eq!(received["idempotency_key"], json!(event.idempotency_key));
    // Postgres keeps jsonb, which re-prints the text: compare the values.
    let got: Value = serde_json::from_str(received["data"].as_str().unwrap_or_default())
        .expect("the plugin got JSON");
    assert_eq!(got, data);
    let mut headers: Vec<(String, String)> =
        serde_json::from_value(received["headers"].clone()).expect("header pairs");
    headers.sort();
    let mut expected = vec![(text("h"), text("v")), ("traceparent".into(), META.into())];
    expected.sort();
    assert_eq!(headers, expected);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_meta_characters_reach_the_plugin_unchanged_on_sqlite() {
    sql_meta_characters_reach_the_plugin_unchanged(Herald::sqlite(ECHO_ROUTE).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_meta_characters_reach_the_plugin_unchanged_on_postgres() {
    if let Some(herald) = Herald::postgres("hostile_meta", ECHO_ROUTE).await {
        sql_meta_characters_reach_the_plugin_unchanged(herald).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_limit_is_configurable() {
    let herald = Herald::sqlite_wrapped(
        "poll_interval = \"20ms\"\nmax_event_bytes = 64",
        ECHO_ROUTE,
        |store| store,
    )
    .await;
    // `{"pad":"…"}` is 10 bytes around the padding.
    let pad = |bytes: usize| json!({ "pad": "x".repeat(bytes - 10) });
    let within = herald
        .append(NewEvent::new("order.created", "order", "1", pad(64)))
        .await;
    let over = herald
        .append(NewEvent::new("order.created", "order", "1", pad(65)))
        .await;
    herald.settle(LIMIT).await;
    as_received(&herald, within).await;
    assert_eq!(
        dead_unseen(&herald, over).await,
        "event_data is 65 bytes, over the limit of 64 bytes ([dispatch] max_event_bytes)"
    );
    herald.finish().await;
}

fn webhook(name: &str, url: &str, allowed: &str, allow_private: bool) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nevent_types = [\"{name}.*\"]\nplugin = \"webhook\"\nallowed_hosts = [\"{allowed}\"]\nallow_private = {allow_private}\ntime_limit = \"5s\"\n[routes.retry]\nmax_attempts = 1\n[routes.config]\nurl = \"{url}\"\n"
    )
}

/// Each private destination is in the route's `allowed_hosts`, so what refuses it is
/// the address check (after DNS, and on every redirect hop), and the refusal is the
/// detail of the event's one attempt. A route that allows private addresses for its
/// host gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_in_the_attempts_log_unless_allowed() {
    let sink = Sink::start().await;
    let redirecting = Sink::start().await;
    redirecting.script([Reply::WithHeader(
        307,
        "location",
        "http://10.0.0.1/internal".into(),
    )]);
    let port = sink
        .address
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let cases: Vec<(&str, String, String, bool, Vec<String>)> = vec![
        (
            "loopback",
            sink.url("/hook"),
            sink.address.clone(),
            false,
            vec!["127.0.0.1 is a loopback address".into()],
        ),
        (
            "private",
            "http://10.0.0.1/hook".into(),
            "10.0.0.1".into(),
            false,
            vec!["10.0.0.1 is a private address".into()],
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".into(),
            "169.254.169.254".into(),
            false,
            vec!["169.254.169.254 is a link-local address".into()],
        ),
        (
            "loopback6",
            format!("http://[::1]:{port}/hook"),
            format!("[::1]:{port}"),
            false,
            vec!["::1 is a loopback address".into()],
        ),
        (
            "named",
            format!("http://localhost:{port}/hook"),
            format!("localhost:{port}"),
            false,
            vec!["localhost resolves to".into()],
        ),
        (
            // The first hop is allowed (loopback, explicitly); the redirect's target is
            // not in the route's hosts.
            "redirect",
            redirecting.url("/hook"),
            redirecting.address.clone(),
            true,
            vec![
                format!(
                    "redirect from {} to 10.0.0.1:80 refused",
                    redirecting.address
                ),
                "not in the allowed hosts of route 'redirect'".into(),
            ],
        ),
    ];
    let mut routes: String = cases
        .iter()
        .map(|(name, url, allowed, private, _)| webhook(name, url, allowed, *private))
        .collect();
    routes.push_str(&webhook("allowed", &sink.url("/hook"), &sink.address, true));
    let herald = Herald::sqlite(&routes).await;
    let mut ids = Vec::new();
    for (name, ..) in &cases {
        ids.push(
            herald
                .append(NewEvent::new(
                    format!("{name}.x"),
                    "thing",
                    *name,
                    json!({}),
                ))
                .await,
        );
    }
    let allowed = herald
        .append(NewEvent::new("allowed.x", "thing", "allowed", json!({})))
        .await;
    herald.settle(LIMIT).await;

    for (id, (name, _, _, private, needles)) in ids.into_iter().zip(&cases) {
        let detail = herald.detail(id).await;
        assert_eq!(
            detail.event.event_status,
            EventStatus::Dead,
            "{name}: {detail:?}"
        );
        assert_eq!(detail.attempts.len(), 1, "{name}: {detail:?}");
        let attempt = &detail.attempts[0];
        assert_eq!(attempt.outcome, AttemptOutcome::Dead, "{name}");
        let logged = attempt.detail.clone().unwrap_or_default();
        for needle in needles {
            assert!(
                logged.contains(needle.as_str()),
                "{name}: {needle} not in {logged}"
            );
        }
        if !private {
            assert!(
                logged.contains(&format!("route '{name}' does not allow private addresses")),
                "{name}: {logged}"
            );
        }
    }
    let detail = herald.detail(allowed).await;
    assert_eq!(
        detail.event.event_status,
        EventStatus::Success,
        "{detail:?}"
    );
    assert_eq!(detail.attempts[0].outcome, AttemptOutcome::Delivered);
    // Only the allowed route and the redirect's first hop reached a receiver.
    assert_eq!(sink.requests().len(), 1);
    assert_eq!(redirecting.requests().len(), 1);
    herald.finish().await;
}
