//! Plugin faults, each from its own test plugin (`tests/plugins/`): a panic, a stack
//! overflow, a giant answer, an emit flood, a log flood, `http.send` in a tight loop and
//! malformed answers. Each fails its attempt with a clear reason in the attempts log, the
//! retry policy applies, and a healthy route keeps delivering meanwhile. What the host
//! stores of a plugin's answer is bounded and always recordable, on SQLite and Postgres.
//! (The host's memory after faults is checked in `plugin_memory.rs`, a process of its own.)
//!
//! Every test keeps each plugin below ten faulting attempts: that many in a row
//! quarantine a plugin.

mod common;

use std::time::Duration;

use common::Herald;
use herald::store::{Attempt, AttemptOutcome, EventStatus, NewEvent};
use herald_tests::sink::Sink;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// What the ledger keeps of a plugin's receipt or reason at most, before the marker and
/// the retry policy's suffix (the host's `MAX_DETAIL_BYTES`).
const MAX_DETAIL_BYTES: usize = 4096;

/// Room for the truncation marker and the retry policy's "; gave up ..." suffix.
const DETAIL_SUFFIX_ROOM: usize = 200;

/// A route for `plugin` on events `<name>.*`: unordered, two attempts 10 ms apart (so the
/// retry policy is seen to apply within a test), `keys` as route keys and `config` as
/// `[routes.config]` lines.
fn route(name: &str, plugin: &str, keys: &str, max_attempts: u32, config: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nevent_types = [\"{name}.*\"]\nplugin = \"{plugin}\"\n\
         ordering = \"none\"\n{keys}\n[routes.retry]\nmax_attempts = {max_attempts}\n\
         backoff_base = \"10ms\"\nbackoff_max = \"10ms\"\n[routes.config]\n{config}\n"
    )
}

fn event(route: &str, entity: &str) -> NewEvent {
    NewEvent::new(format!("{route}.happened"), "thing", entity, json!({}))
}

/// The event's attempts, after checking it ended `status` after `count` attempts.
async fn attempts_of(herald: &Herald, id: i64, status: EventStatus, count: usize) -> Vec<Attempt> {
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, status, "{detail:#?}");
    assert_eq!(detail.attempts.len(), count, "{detail:#?}");
    detail.attempts
}

fn detail(attempt: &Attempt) -> &str {
    attempt.detail.as_deref().unwrap_or_default()
}

/// Each attempt failed with `reason` (by prefix); the last gave up on `max_attempts`.
async fn failed_twice_then_dead(herald: &Herald, id: i64, reason: &str) -> Vec<Attempt> {
    let attempts = attempts_of(herald, id, EventStatus::Dead, 2).await;
    assert_eq!(attempts[0].outcome, AttemptOutcome::Retry);
    assert_eq!(attempts[1].outcome, AttemptOutcome::Dead);
    for attempt in &attempts {
        assert!(
            detail(attempt).starts_with(reason),
            "attempt {} of event {id}: expected '{reason}…', got '{}'",
            attempt.attempt,
            detail(attempt)
        );
    }
    assert!(
        detail(&attempts[1]).ends_with("; gave up after 2 attempt(s) (max_attempts = 2)"),
        "{}",
        detail(&attempts[1])
    );
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_fails_its_attempts_with_a_clear_reason_while_a_healthy_route_delivers() {
    let sink = Sink::start().await;
    let http_keys = format!(
        "allowed_hosts = [\"{}\"]\nallow_private = true",
        sink.address
    );
    let routes = [
        route("panic", "panic", "", 2, ""),
        route("overflow", "stack-overflow", "", 2, ""),
        route("giant", "giant-output", "memory_limit_mb = 96", 2, ""),
        route("flood", "emit-flood", "", 2, "count = 5000"),
        route(
            "loop",
            "http-loop",
            &http_keys,
            2,
            &format!("url = \"{}\"", sink.url("/loop")),
        ),
        route(
            "endless-log",
            "log-flood",
            "time_limit = \"500ms\"",
            2,
            "lines = 4294967295\nline_bytes = 65536",
        ),
        route("bomb", "memory-bomb", "memory_limit_mb = 16", 2, ""),
        route("healthy", "noop", "", 1, ""),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;
    let panic = herald.append(event("panic", "p")).await;
    let overflow = herald.append(event("overflow", "o")).await;
    let giant = herald.append(event("giant", "g")).await;
    let flood = herald.append(event("flood", "f")).await;
    let http_loop = herald.append(event("loop", "l")).await;
    let endless_log = herald.append(event("endless-log", "e")).await;
    let bomb = herald.append(event("bomb", "b")).await;
    let mut healthy = Vec::new();
    for n in 0..200 {
        healthy.push(herald.append(event("healthy", &format!("h{n}"))).await);
    }
    herald.settle(LIMIT).await;

    // The healthy route delivered everything while the others were faulting.
    for id in healthy {
        assert_eq!(herald.status(id).await, EventStatus::Success, "event {id}");
    }

    failed_twice_then_dead(
        &herald,
        panic,
        &format!(
            "plugin panicked: deliberate panic on event {panic} (at tests/plugins/panic/src/lib.rs:"
        ),
    )
    .await;
    failed_twice_then_dead(
        &herald,
        overflow,
        "plugin trapped: stack overflow (wasm trap: call stack exhausted)",
    )
    .await;

    let attempts = failed_twice_then_dead(&herald, giant, "GGGG").await;
    for attempt in &attempts {
        let text = detail(attempt);
        assert!(
            text.contains(" …[truncated: 33554432 bytes in all]"),
            "{}",
            &text[text.len().saturating_sub(200)..]
        );
        assert!(text.len() <= MAX_DETAIL_BYTES + DETAIL_SUFFIX_ROOM);
    }
    let stored = herald.detail(giant).await;
    for kept in [
        stored.event.status_reason.as_deref(),
        stored.deliveries[0].last_error.as_deref(),
    ] {
        assert!(kept.unwrap_or_default().len() <= MAX_DETAIL_BYTES + DETAIL_SUFFIX_ROOM);
    }
    let notice = herald.events_of_type("herald.delivery.dead").await;
    assert!(
        notice
            .iter()
            .all(|n| n.event_data.as_deref().unwrap_or_default().len() < 2 * MAX_DETAIL_BYTES),
        "dead notices carry the bounded reason"
    );

    failed_twice_then_dead(
        &herald,
        flood,
        "plugin answered delivered after the host refused 4900 of its emits (first: emit limit of \
         100 events per attempt reached); nothing it emitted is committed",
    )
    .await;
    assert!(herald.events_of_type("flood.emitted").await.is_empty());

    failed_twice_then_dead(
        &herald,
        http_loop,
        "plugin exceeded its limit of 32 HTTP requests per attempt",
    )
    .await;
    assert_eq!(
        sink.requests().len(),
        64,
        "32 requests per attempt reached the receiver, no more"
    );

    failed_twice_then_dead(
        &herald,
        endless_log,
        "plugin exceeded its time limit of 500ms",
    )
    .await;
    failed_twice_then_dead(
        &herald,
        bomb,
        "plugin exceeded its memory limit of 16777216 bytes",
    )
    .await;
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_cut_to_the_budget_and_is_no_fault() {
    let routes = [
        route("log", "log-flood", "", 1, ""),
        route("stderr", "log-flood", "", 1, "stream = \"stderr\""),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;
    let log = herald.append(event("log", "l")).await;
    let stderr = herald.append(event("stderr", "s")).await;
    herald.settle(LIMIT).await;
    for id in [log, stderr] {
        let attempts = attempts_of(&herald, id, EventStatus::Success, 1).await;
        assert_eq!(detail(&attempts[0]), "wrote 200 lines of 1048576 bytes");
    }
    herald.finish().await;
}

/// One route per malformed answer of the `malformed` plugin, and giant answers of
/// `giant-output`; each must end up recorded (nothing stuck, nothing crash-looping) with
/// what it says made storable. Emit cases fault once each (eight, below quarantine).
async fn untrusted_answers_are_recorded_safely(herald: Herald) {
    let mut emits = Vec::new();
    for (case, why) in [
        ("emit-non-json-data", "data is not valid JSON"),
        ("emit-empty-type", "event_type is empty"),
        ("emit-nul-type", "event_type contains a NUL character"),
        ("emit-nul-data", "data contains a NUL character (\\u0000)"),
        (
            "emit-nul-header",
            "header 'x-trace' contains a NUL character",
        ),
        ("emit-empty-header-name", "a header name is empty"),
        ("emit-empty-key", "idempotency_key is empty"),
        (
            "emit-long-type",
            "event_type is 100000 bytes, over the limit of 1024",
        ),
    ] {
        emits.push((herald.append(event(case, "m")).await, why));
    }
    let nul_receipt = herald.append(event("nul-receipt", "m")).await;
    let nul_reason = herald.append(event("nul-reason", "m")).await;
    let nul_skip = herald.append(event("nul-skip", "m")).await;
    let forever = herald.append(event("retry-forever", "m")).await;
    let giant_receipt = herald.append(event("giant-receipt", "m")).await;
    let giant_reason = herald.append(event("giant-reason", "m")).await;
    herald.settle(LIMIT).await;

    for (id, why) in emits {
        let attempts = attempts_of(&herald, id, EventStatus::Dead, 1).await;
        let expected = format!(
            "plugin answered delivered after the host refused 1 of its emits (first: invalid event: {why}"
        );
        assert!(
            detail(&attempts[0]).starts_with(&expected),
            "event {id}: expected '{expected}…', got '{}'",
            detail(&attempts[0])
        );
    }
    assert!(herald.events_of_type("malformed.emitted").await.is_empty());

    let receipt = attempts_of(&herald, nul_receipt, EventStatus::Success, 1).await;
    assert_eq!(detail(&receipt[0]), "receipt\u{FFFD}with a NUL");
    let reason = attempts_of(&herald, nul_reason, EventStatus::Dead, 1).await;
    assert_eq!(detail(&reason[0]), "reason\u{FFFD}with a NUL");
    assert_eq!(
        herald
            .detail(nul_reason)
            .await
            .event
            .status_reason
            .as_deref(),
        Some("route nul-reason: reason\u{FFFD}with a NUL")
    );
    let skip = attempts_of(&herald, nul_skip, EventStatus::Success, 1).await;
    assert_eq!(skip[0].outcome, AttemptOutcome::Skipped);
    assert_eq!(detail(&skip[0]), "skip\u{FFFD}with a NUL");

    // A retry after u64::MAX milliseconds is past any max_age: the policy gives up.
    let forever = attempts_of(&herald, forever, EventStatus::Dead, 1).await;
    assert_eq!(
        detail(&forever[0]),
        "see you never; gave up: the next attempt would be past max_age (1day)"
    );

    let receipt = attempts_of(&herald, giant_receipt, EventStatus::Success, 1).await;
    assert!(detail(&receipt[0]).starts_with("GGGG"));
    assert!(detail(&receipt[0]).ends_with(" …[truncated: 20971520 bytes in all]"));
    assert!(detail(&receipt[0]).len() <= MAX_DETAIL_BYTES + DETAIL_SUFFIX_ROOM);
    let reasons = attempts_of(&herald, giant_reason, EventStatus::Dead, 2).await;
    for attempt in &reasons {
        assert!(detail(attempt).contains(" …[truncated: 20971520 bytes in all]"));
        assert!(detail(attempt).len() <= MAX_DETAIL_BYTES + DETAIL_SUFFIX_ROOM);
    }
    herald.finish().await;
}

fn untrusted_routes() -> String {
    let mut routes: Vec<String> = [
        "emit-non-json-data",
        "emit-empty-type",
        "emit-nul-type",
        "emit-nul-data",
        "emit-nul-header",
        "emit-empty-header-name",
        "emit-empty-key",
        "emit-long-type",
        "nul-receipt",
        "nul-reason",
        "nul-skip",
    ]
    .iter()
    .map(|case| route(case, "malformed", "", 1, &format!("case = \"{case}\"")))
    .collect();
    routes.push(route(
        "retry-forever",
        "malformed",
        "",
        3,
        "case = \"retry-forever\"",
    ));
    let giant = "memory_limit_mb = 96";
    routes.push(route(
        "giant-receipt",
        "giant-output",
        giant,
        1,
        "bytes = 20971520\nas = \"receipt\"",
    ));
    routes.push(route(
        "giant-reason",
        "giant-output",
        giant,
        2,
        "bytes = 20971520",
    ));
    routes.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_answers_are_recorded_safely_on_sqlite() {
    untrusted_answers_are_recorded_safely(Herald::sqlite(&untrusted_routes()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_answers_are_recorded_safely_on_postgres() {
    let Some(herald) = Herald::postgres("plugin_faults_untrusted", &untrusted_routes()).await
    else {
        return;
    };
    untrusted_answers_are_recorded_safely(herald).await;
}
