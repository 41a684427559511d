//! End to end: events in the store, real wasm plugins, a real HTTP receiver on loopback.

mod common;

use std::time::Duration;

use common::Herald;
use herald::store::{AttemptOutcome, DeliveryStatus, EventStatus, NewEvent, RedriveSelection};
use herald_tests::sink::{Reply, Sink};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

fn webhook_route(name: &str, types: &str, sink: &Sink, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
event_types = ["{types}"]
plugin = "webhook"
allowed_hosts = ["{host}"]
allow_private = true
{extra}
[routes.retry]
backoff_base = "10ms"
backoff_max = "40ms"
[routes.config]
url = "{url}"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"#,
        host = sink.address,
        url = sink.url(&format!("/{name}")),
    )
}

fn echo_route(name: &str, types: &str, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
event_types = ["{types}"]
plugin = "echo"
{extra}
"#
    )
}

fn order(id: &str) -> NewEvent {
    NewEvent::new("order.created", "order", id, json!({ "total": 12.5 }))
}

async fn delivered_once_with_key_and_signature(herald: Herald, sink: Sink) {
    let id = herald.append(order("o-1")).await;
    herald.settle(LIMIT).await;

    let requests = sink.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    let key = request
        .header("idempotency-key")
        .expect("Idempotency-Key header");
    assert_eq!(key, format!("herald-{id}-hooks"));
    assert_eq!(request.header("webhook-id"), Some(key));
    assert!(request
        .header("webhook-signature")
        .is_some_and(|s| s.starts_with("v1,")));
    assert!(
        request.body.windows(4).any(|w| w == b"12.5"),
        "the payload reached the sink"
    );

    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Success);
    assert_eq!(detail.attempts.len(), 1);
    let version = detail.attempts[0]
        .plugin_version
        .clone()
        .unwrap_or_default();
    assert!(
        version.starts_with("sha256:"),
        "attempt records the plugin version: {version}"
    );
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_delivered_once_with_key_and_signature() {
    let sink = Sink::start().await;
    let herald = Herald::sqlite(&webhook_route("hooks", "order.*", &sink, "")).await;
    delivered_once_with_key_and_signature(herald, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_delivered_once_with_key_and_signature() {
    let sink = Sink::start().await;
    let Some(herald) = Herald::postgres(
        "e2e_delivered_once",
        &webhook_route("hooks", "order.*", &sink, ""),
    )
    .await
    else {
        return;
    };
    delivered_once_with_key_and_signature(herald, sink).await;
}

async fn server_errors_are_retried_into_one_effect(herald: Herald, sink: Sink) {
    sink.script([
        Reply::Status(503),
        Reply::WithHeader(429, "retry-after", "0".into()),
        Reply::Status(500),
    ]);
    let id = herald.append(order("o-1")).await;
    herald.settle(LIMIT).await;

    let accepted = sink.accepted();
    assert_eq!(
        accepted.len(),
        1,
        "one effect at the deduplicating sink: {accepted:?}"
    );
    let keys: Vec<_> = sink
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").map(String::from))
        .collect();
    assert_eq!(keys.len(), 4);
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "the key is stable across retries"
    );

    let outcomes: Vec<_> = herald
        .attempts(id)
        .await
        .iter()
        .map(|a| a.outcome)
        .collect();
    use AttemptOutcome::*;
    assert_eq!(outcomes, vec![Retry, Retry, Retry, Delivered]);
    assert_eq!(herald.status(id).await, EventStatus::Success);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_server_errors_are_retried_into_one_effect() {
    let sink = Sink::start().await;
    let herald = Herald::sqlite(&webhook_route("hooks", "order.*", &sink, "")).await;
    server_errors_are_retried_into_one_effect(herald, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_errors_are_retried_into_one_effect() {
    let sink = Sink::start().await;
    let Some(herald) =
        Herald::postgres("e2e_retried", &webhook_route("hooks", "order.*", &sink, "")).await
    else {
        return;
    };
    server_errors_are_retried_into_one_effect(herald, sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_is_dead_and_redrive_delivers_it() {
    let sink = Sink::start().await;
    let herald = Herald::sqlite(&webhook_route("hooks", "order.*", &sink, "")).await;
    sink.script([Reply::WithBody(422, "total must be an integer".into())]);
    let id = herald.append(order("o-1")).await;
    herald.settle(LIMIT).await;

    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Dead);
    let reason = detail.event.status_reason.unwrap_or_default();
    assert!(
        reason.contains("422") && reason.contains("total must be an integer"),
        "{reason}"
    );
    assert_eq!(detail.deliveries[0].status, DeliveryStatus::Dead);
    let notices = herald.events_of_type("herald.delivery.dead").await;
    assert_eq!(notices.len(), 1, "the host announces the dead delivery");

    let redriven = herald
        .store
        .redrive(&RedriveSelection {
            delivery_id: Some(detail.deliveries[0].delivery_id),
            route: None,
        })
        .await
        .expect("redrive");
    assert_eq!(redriven, 1);
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(id).await, EventStatus::Success);
    assert_eq!(sink.requests().len(), 2);
    assert_eq!(sink.accepted().len(), 1);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_producer_key_is_a_duplicate_and_not_delivered() {
    let sink = Sink::start().await;
    let herald = Herald::sqlite(&webhook_route("hooks", "order.*", &sink, "")).await;
    let first = herald.append(order("o-1").with_key("checkout-77")).await;
    let second = herald.append(order("o-1").with_key("checkout-77")).await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(first).await, EventStatus::Success);
    assert_eq!(herald.status(second).await, EventStatus::Duplicate);
    let requests = sink.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("idempotency-key"), Some("checkout-77"));
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_fans_out_to_two_routes() {
    let sink = Sink::start().await;
    let routes = format!(
        "{}{}",
        webhook_route("hooks", "order.*", &sink, ""),
        echo_route("audit", "order.created", "ordering = \"none\"")
    );
    let herald = Herald::sqlite(&routes).await;
    let id = herald.append(order("o-1")).await;
    herald.settle(LIMIT).await;
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Success);
    let mut routes: Vec<_> = detail
        .deliveries
        .iter()
        .map(|d| (d.route.as_str(), d.status))
        .collect();
    routes.sort_by_key(|(route, _)| *route);
    assert_eq!(
        routes,
        vec![
            ("audit", DeliveryStatus::Success),
            ("hooks", DeliveryStatus::Success)
        ]
    );
    let receipt = detail
        .attempts
        .iter()
        .find(|a| a.route == "audit")
        .and_then(|a| a.detail.clone());
    assert_eq!(receipt, Some(format!("audit:1:herald-{id}-audit")));
    assert_eq!(sink.requests().len(), 1);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_event_is_skipped_visibly() {
    let herald = Herald::sqlite(&echo_route("audit", "order.*", "")).await;
    let id = herald
        .append(NewEvent::new("user.created", "user", "u-1", json!({})))
        .await;
    herald.settle(LIMIT).await;
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Skipped);
    assert_eq!(
        detail.event.status_reason.as_deref(),
        Some("no route matches event_type 'user.created'")
    );
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emits_commit_only_with_a_delivered_outcome() {
    let herald =
        Herald::sqlite(&echo_route("audit", "order.*", "[routes.retry]\nbackoff_base = \"5ms\"\nbackoff_max = \"10ms\"\n[routes.config]\nemit_type = \"audit.recorded\"")).await;
    let id = herald
        .append(NewEvent::new(
            "order.created",
            "order",
            "o-1",
            json!({ "fail_until_attempt": 3 }),
        ))
        .await;
    herald.settle(LIMIT).await;
    let outcomes: Vec<_> = herald
        .attempts(id)
        .await
        .iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![
            AttemptOutcome::Retry,
            AttemptOutcome::Retry,
            AttemptOutcome::Delivered
        ]
    );
    let emitted = herald.events_of_type("audit.recorded").await;
    assert_eq!(
        emitted.len(),
        1,
        "the two failed attempts' emits were discarded"
    );
    let headers: serde_json::Value =
        serde_json::from_str(emitted[0].headers.as_deref().unwrap_or("{}")).expect("headers");
    assert_eq!(headers["causation_id"], json!(id.to_string()));
    herald.finish().await;
}

fn retrying_echo_route() -> String {
    echo_route(
        "audit",
        "order.*",
        "[routes.retry]\nbackoff_base = \"20ms\"\nbackoff_max = \"40ms\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_entity_waits_for_its_retrying_event_while_others_flow() {
    let herald = Herald::sqlite(&retrying_echo_route()).await;
    an_entity_waits_for_its_retrying_event_while_others_flow(herald).await;
}

/// On Postgres, fan-out leases A's later events behind its first as it fans them out
/// together; the first's retry must give them back rather than let them run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_entity_waits_for_its_retrying_event_while_others_flow() {
    let Some(herald) = Herald::postgres("e2e_entity_waits", &retrying_echo_route()).await else {
        return;
    };
    an_entity_waits_for_its_retrying_event_while_others_flow(herald).await;
}

async fn an_entity_waits_for_its_retrying_event_while_others_flow(herald: Herald) {
    let a1 = herald
        .append(NewEvent::new(
            "order.created",
            "order",
            "A",
            json!({ "fail_until_attempt": 3 }),
        ))
        .await;
    let a2 = herald
        .append(NewEvent::new("order.paid", "order", "A", json!({})))
        .await;
    let a3 = herald
        .append(NewEvent::new("order.shipped", "order", "A", json!({})))
        .await;
    let b1 = herald
        .append(NewEvent::new("order.created", "order", "B", json!({})))
        .await;
    herald.settle(LIMIT).await;

    let mut log = Vec::new();
    for id in [a1, a2, a3, b1] {
        for attempt in herald.attempts(id).await {
            log.push((attempt.attempt_id, id, attempt.outcome));
        }
    }
    log.sort_by_key(|(attempt_id, _, _)| *attempt_id);
    let a_order: Vec<i64> = log
        .iter()
        .filter(|(_, id, _)| *id != b1)
        .map(|(_, id, _)| *id)
        .collect();
    assert_eq!(
        a_order,
        vec![a1, a1, a1, a2, a3],
        "A's events ran strictly in order: {log:?}"
    );
    let b_position = log.iter().position(|(_, id, _)| *id == b1).expect("b1 ran");
    let a1_success = log
        .iter()
        .position(|(_, id, outcome)| *id == a1 && *outcome == AttemptOutcome::Delivered)
        .expect("a1 delivered");
    assert!(
        b_position < a1_success,
        "B did not wait for A's retries: {log:?}"
    );
    herald.finish().await;
}

/// On Postgres fan-out takes no more events than this instance can lease, and an entity's
/// later events wait in the lane queue behind its first: with one slot (a queue of 16) and
/// 40 events per entity, the queue is full long before the backlog is fanned out. One
/// drain still delivers everything, each entity's events in order: a pass that can lease
/// nothing waits for a claim to make room, rather than ending the drain's round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_drain_delivers_a_backlog_larger_than_the_lane_queue_in_order() {
    let Some(herald) = Herald::postgres_with_dispatch(
        "e2e_drain_past_full_queue",
        "concurrency = 1\nbatch_size = 50\nlease = \"30s\"\npoll_interval = \"20ms\"",
        &echo_route("audit", "order.*", ""),
    )
    .await
    else {
        return;
    };
    let entities = ["A", "B", "C"];
    let mut ids: Vec<(&str, i64)> = Vec::new();
    for _ in 0..40 {
        for entity in entities {
            ids.push((entity, herald.append(order(entity)).await));
        }
    }
    tokio::time::timeout(LIMIT, herald.service.dispatcher.drain())
        .await
        .expect("the drain ended")
        .expect("drain");
    let all: Vec<i64> = ids.iter().map(|(_, id)| *id).collect();
    assert!(herald.all_succeeded(&all).await, "one drain delivered all");
    for entity in entities {
        let mut started = Vec::new();
        for (_, id) in ids.iter().filter(|(e, _)| *e == entity) {
            let attempts = herald.attempts(*id).await;
            assert_eq!(attempts.len(), 1, "event {id}: {attempts:?}");
            started.push(attempts[0].started_at);
        }
        assert!(started.is_sorted(), "{entity} in order: {started:?}");
    }
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upcaster_output_flows_on_to_the_webhook() {
    let sink = Sink::start().await;
    let routes = format!(
        "{}\n[[routes]]\nname = \"upcast\"\nevent_types = [\"order.created.v1\"]\nplugin = \"upcaster\"\n[routes.config]\nfrom = \"order.created.v1\"\nto = \"order.created.v2\"\n",
        webhook_route("hooks", "order.created.v2", &sink, "")
    );
    let herald = Herald::sqlite(&routes).await;
    let id = herald
        .append(NewEvent::new(
            "order.created.v1",
            "order",
            "o-9",
            json!({ "amount_cents": 1250, "currency": "EUR" }),
        ))
        .await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(id).await, EventStatus::Success);
    let upcast = herald.events_of_type("order.created.v2").await;
    assert_eq!(upcast.len(), 1);
    assert_eq!(upcast[0].entity_id, "o-9");
    let requests = sink.requests();
    assert_eq!(
        requests.len(),
        1,
        "the v2 event was delivered to the webhook"
    );
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_triggers_the_saga_compensation() {
    let sink = Sink::start().await;
    let routes = format!(
        "{}\n[[routes]]\nname = \"saga\"\nevent_types = [\"herald.delivery.dead\"]\nplugin = \"saga-compensator\"\n[routes.config]\ncompensations = {{ \"payment.capture\" = \"payment.refund\" }}\n",
        webhook_route("capture", "payment.capture", &sink, "")
    );
    let herald = Herald::sqlite(&routes).await;
    sink.script([Reply::Status(410)]);
    let id = herald
        .append(NewEvent::new(
            "payment.capture",
            "payment",
            "p-1",
            json!({ "amount": 30 }),
        ))
        .await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(id).await, EventStatus::Dead);
    let refunds = herald.events_of_type("payment.refund").await;
    assert_eq!(refunds.len(), 1, "the compensation event was emitted");
    assert_eq!(refunds[0].entity_id, "p-1");
    let data: serde_json::Value =
        serde_json::from_str(refunds[0].event_data.as_deref().unwrap_or("null")).expect("json");
    assert_eq!(data["compensates"], json!(id));
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_key_is_not_run_again_when_its_delivery_is_claimed_again() {
    let sink = Sink::start().await;
    let herald = Herald::sqlite(&webhook_route("hooks", "order.*", &sink, "")).await;
    let id = herald.append(order("o-1")).await;
    herald.settle(LIMIT).await;
    assert_eq!(sink.requests().len(), 1);

    // Re-open the finished delivery, as a replay or a confused operator would.
    let raw = sqlx::SqlitePool::connect(&herald.store_url)
        .await
        .expect("raw pool");
    sqlx::query("UPDATE herald_deliveries SET status = 'PENDING'")
        .execute(&raw)
        .await
        .expect("reopen");
    herald.settle(LIMIT).await;

    assert_eq!(sink.requests().len(), 1, "the plugin did not run again");
    let attempts = herald.attempts(id).await;
    assert_eq!(attempts.len(), 2);
    let note = attempts[1].detail.clone().unwrap_or_default();
    assert!(note.starts_with("not run again: key 'herald-"), "{note}");
    assert_eq!(attempts[1].plugin_version, None, "no plugin ran");
    herald.finish().await;
}

/// Receipts of the delivered attempts of these events, in event order.
async fn receipts(herald: &Herald, ids: &[i64]) -> Vec<String> {
    let mut receipts = Vec::new();
    for id in ids {
        let attempts = herald.attempts(*id).await;
        let delivered = attempts
            .iter()
            .find(|a| a.outcome == AttemptOutcome::Delivered)
            .unwrap_or_else(|| panic!("event {id} was not delivered: {attempts:?}"));
        receipts.push(delivered.detail.clone().unwrap_or_default());
    }
    receipts
}

async fn count_calls_of_100_events(events_per_instance: Option<u32>) -> Vec<u32> {
    let setting = events_per_instance
        .map(|n| format!("events_per_instance = {n}"))
        .unwrap_or_default();
    let herald = Herald::sqlite(&echo_route(
        "counted",
        "order.*",
        &format!("{setting}\n[routes.config]\ncount_calls = \"yes\""),
    ))
    .await;
    let mut ids = Vec::new();
    // One claim of 100 over 32 slots: four events per task.
    for n in 0..100 {
        ids.push(herald.append(order(&format!("o-{n}"))).await);
    }
    herald.settle(LIMIT).await;
    receipts(&herald, &ids)
        .await
        .iter()
        .map(|receipt| {
            receipt
                .strip_prefix("calls:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("receipt {receipt}"))
        })
        .collect()
}

/// An instance serves several events in a row (what makes a call cheap), never more than
/// the route allows; `events_per_instance = 1` gives every event a fresh instance, so
/// nothing a plugin keeps in globals reaches the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_reused_up_to_the_route_setting() {
    let reused = count_calls_of_100_events(None).await;
    assert!(
        reused.iter().any(|calls| *calls > 1),
        "by default an instance serves more than one event: {reused:?}"
    );
    let capped = count_calls_of_100_events(Some(3)).await;
    assert!(capped.iter().all(|calls| *calls <= 3), "{capped:?}");
    assert!(capped.contains(&3), "{capped:?}");
    let isolated = count_calls_of_100_events(Some(1)).await;
    assert!(isolated.iter().all(|calls| *calls == 1), "{isolated:?}");
}

/// A panic in the middle of a batch fails only its own event, with the panic message in
/// the attempts log; the events after it run in a fresh instance and are delivered, and
/// each event's emits stay its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_mid_batch_fails_only_its_event_and_emits_stay_per_event() {
    let herald = Herald::sqlite(&echo_route(
        "echoes",
        "order.*",
        "[routes.retry]\nmax_attempts = 1\n[routes.config]\nemit_type = \"echo.order\"\ncount_calls = \"yes\"",
    ))
    .await;
    // One claim of 100 over 32 slots: tasks of four events, 4..=7 in one of them.
    let mut ids = Vec::new();
    for n in 0..100 {
        let data = if n == 5 {
            json!({ "panic": "boom at five" })
        } else {
            json!({ "n": n })
        };
        ids.push(
            herald
                .append(NewEvent::new(
                    "order.created",
                    "order",
                    format!("o-{n}"),
                    data,
                ))
                .await,
        );
    }
    herald.settle(LIMIT).await;
    for (n, id) in ids.iter().enumerate() {
        let detail = herald.detail(*id).await;
        assert_eq!(detail.attempts.len(), 1, "event {n}: one attempt");
        if n == 5 {
            assert_eq!(detail.event.event_status, EventStatus::Dead);
            let reason = detail.attempts[0].detail.clone().unwrap_or_default();
            assert!(reason.contains("boom at five"), "{reason}");
        } else {
            assert_eq!(detail.event.event_status, EventStatus::Success, "event {n}");
        }
    }
    let echoes = herald.events_of_type("echo.order").await;
    assert_eq!(echoes.len(), 99, "one echo per delivered event");
    let after = receipts(&herald, &ids[6..8]).await;
    assert_eq!(
        after,
        ["calls:1", "calls:2"],
        "the events after the panic ran in a fresh instance"
    );
    let mut echoed: Vec<i64> = echoes
        .iter()
        .map(|e| {
            let data: serde_json::Value =
                serde_json::from_str(e.event_data.as_deref().unwrap_or("null")).unwrap_or_default();
            data["echo_of"].as_i64().unwrap_or_default()
        })
        .collect();
    echoed.sort_unstable();
    let mut expected: Vec<i64> = ids.iter().copied().filter(|id| *id != ids[5]).collect();
    expected.sort_unstable();
    assert_eq!(echoed, expected);
}
