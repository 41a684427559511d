//! Faults: plugins that trap, loop, exhaust memory or try to escape the sandbox, SSRF
//! attempts, and a crash between a plugin's success and the commit of its outcome.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::Herald;
use herald::store::{
    Backend, Backlog, ClaimRequest, ClaimedDelivery, Completion, CompletionResult, Delivery,
    DeliveryFilter, Event, EventDetail, EventFilter, EventStatus, EventStore, FanOutReport,
    FanOutRequest, FanOutStarts, Instance, NewEvent, Quarantine, RedriveSelection, Router,
    StoreError, StoreResult,
};
use herald_tests::sink::Sink;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

fn route(name: &str, types: &str, plugin: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nevent_types = [\"{types}\"]\nplugin = \"{plugin}\"\n{extra}\n[routes.retry]\nmax_attempts = 1\n"
    )
}

fn event(event_type: &str, entity: &str) -> NewEvent {
    NewEvent::new(event_type, "thing", entity, json!({}))
}

async fn only_reason(herald: &Herald, id: i64) -> String {
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Dead, "{detail:?}");
    assert_eq!(detail.attempts.len(), 1);
    detail.attempts[0].detail.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_plugins_fail_their_attempt_and_nothing_else() {
    let routes = [
        route("trap", "fault.trap", "trap", ""),
        route("spin", "fault.spin", "spin", "time_limit = \"300ms\""),
        route("bomb", "fault.bomb", "memory-bomb", "memory_limit_mb = 16"),
        route("fine", "ok.*", "echo", "ordering = \"none\""),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;
    let trap = herald.append(event("fault.trap", "t")).await;
    let spin = herald.append(event("fault.spin", "s")).await;
    let bomb = herald.append(event("fault.bomb", "b")).await;
    let mut fine = Vec::new();
    for n in 0..20 {
        fine.push(herald.append(event("ok.tick", &format!("e{n}"))).await);
    }
    herald.settle(LIMIT).await;

    let reason = only_reason(&herald, trap).await;
    assert!(reason.starts_with("plugin trapped:"), "{reason}");
    let reason = only_reason(&herald, spin).await;
    assert!(
        reason.starts_with("plugin exceeded its time limit of 300ms"),
        "{reason}"
    );
    let reason = only_reason(&herald, bomb).await;
    assert!(
        reason.starts_with("plugin exceeded its memory limit of 16777216 bytes"),
        "{reason}"
    );
    for id in fine {
        assert_eq!(herald.status(id).await, EventStatus::Success, "event {id}");
    }

    // The host is healthy: the same plugins still run new events.
    let after = herald.append(event("ok.tick", "after")).await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(after).await, EventStatus::Success);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_has_no_filesystem_environment_or_network() {
    let herald = Herald::sqlite(&route("escape", "escape.*", "escape", "")).await;
    let id = herald.append(event("escape.try", "x")).await;
    herald.settle(LIMIT).await;
    let reason = only_reason(&herald, id).await;
    assert!(
        !reason.contains("DATA("),
        "the sandbox let something through: {reason}"
    );
    for probe in ["fs=err(", "env=err(", "net=err("] {
        assert!(reason.contains(probe), "{probe} missing: {reason}");
    }
    herald.finish().await;
}

fn webhook(name: &str, sink: &Sink, allowed: &str, allow_private: bool) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nevent_types = [\"{name}.*\"]\nplugin = \"webhook\"\nallowed_hosts = [\"{allowed}\"]\nallow_private = {allow_private}\n[routes.retry]\nmax_attempts = 1\n[routes.config]\nurl = \"{}\"\n",
        sink.url("/hook")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_hosts_and_private_addresses_are_refused() {
    let sink = Sink::start().await;
    let routes = [
        webhook("elsewhere", &sink, "hooks.example.com", false),
        webhook("private", &sink, &sink.address, false),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;
    let elsewhere = herald.append(event("elsewhere.x", "1")).await;
    let private = herald.append(event("private.x", "1")).await;
    herald.settle(LIMIT).await;

    let reason = only_reason(&herald, elsewhere).await;
    assert!(
        reason.contains("not in the allowed hosts of route 'elsewhere'"),
        "{reason}"
    );
    let reason = only_reason(&herald, private).await;
    assert!(
        reason.contains("127.0.0.1 is a loopback address"),
        "{reason}"
    );
    assert!(sink.requests().is_empty(), "nothing reached the sink");
    herald.finish().await;
}

/// Delegates to a real store, but fails on purpose: the first `failing_completions`
/// outcomes error out after the plugin ran (the process "crashed" between the effect and
/// the commit), and with `failing_claims` every claim from the store errors out (the
/// database went away between two statements).
struct FaultyStore {
    inner: Arc<dyn EventStore>,
    failing_completions: AtomicUsize,
    failing_claims: bool,
}

impl FaultyStore {
    fn wrap(
        failing_completions: usize,
        failing_claims: bool,
    ) -> impl FnOnce(Arc<dyn EventStore>) -> Arc<dyn EventStore> {
        move |inner| {
            Arc::new(FaultyStore {
                inner,
                failing_completions: AtomicUsize::new(failing_completions),
                failing_claims,
            })
        }
    }
}

#[async_trait]
impl EventStore for FaultyStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn migrate(&self) -> StoreResult<()> {
        self.inner.migrate().await
    }
    async fn check_schema(&self) -> StoreResult<()> {
        self.inner.check_schema().await
    }
    async fn append_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
        self.inner.append_batch(events).await
    }
    async fn fan_out_starting(
        &self,
        request: &FanOutRequest,
        start: Option<&ClaimRequest>,
        router: &Router<'_>,
    ) -> StoreResult<(FanOutReport, FanOutStarts)> {
        self.inner.fan_out_starting(request, start, router).await
    }
    async fn claim(&self, request: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        if self.failing_claims {
            return Err(StoreError::Invariant("injected failure of a claim".into()));
        }
        self.inner.claim(request).await
    }
    fn paces_fan_out(&self) -> bool {
        self.inner.paces_fan_out()
    }
    async fn complete(&self, completions: &[Completion]) -> StoreResult<Vec<CompletionResult>> {
        let crashed = self
            .failing_completions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if crashed {
            return Err(StoreError::Invariant("injected crash before commit".into()));
        }
        self.inner.complete(completions).await
    }
    async fn backlog(&self) -> StoreResult<Backlog> {
        self.inner.backlog().await
    }
    async fn release(&self, owner: &str, ids: &[i64]) -> StoreResult<u64> {
        self.inner.release(owner, ids).await
    }
    async fn renew_leases(&self, owner: &str, ids: &[i64], lease: Duration) -> StoreResult<u64> {
        self.inner.renew_leases(owner, ids, lease).await
    }
    async fn heartbeat(&self, instance_id: &str, version: &str) -> StoreResult<()> {
        self.inner.heartbeat(instance_id, version).await
    }
    async fn deregister(&self, instance_id: &str) -> StoreResult<()> {
        self.inner.deregister(instance_id).await
    }
    async fn instances(&self, within: Duration) -> StoreResult<Vec<Instance>> {
        self.inner.instances(within).await
    }
    async fn quarantine(&self, plugin: &str, reason: &str, faults: u32) -> StoreResult<bool> {
        self.inner.quarantine(plugin, reason, faults).await
    }
    async fn quarantined(&self) -> StoreResult<Vec<Quarantine>> {
        self.inner.quarantined().await
    }
    async fn resume(&self, plugin: &str) -> StoreResult<bool> {
        self.inner.resume(plugin).await
    }
    async fn list_events(&self, filter: &EventFilter) -> StoreResult<Vec<Event>> {
        self.inner.list_events(filter).await
    }
    async fn event_detail(&self, id: i64) -> StoreResult<Option<EventDetail>> {
        self.inner.event_detail(id).await
    }
    async fn list_deliveries(&self, filter: &DeliveryFilter) -> StoreResult<Vec<Delivery>> {
        self.inner.list_deliveries(filter).await
    }
    async fn redrive(&self, selection: &RedriveSelection) -> StoreResult<u64> {
        self.inner.redrive(selection).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_effect_before_the_commit_causes_no_second_effect() {
    let sink = Sink::start().await;
    let routes = format!(
        "\n[[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhook\"\nallowed_hosts = [\"{}\"]\nallow_private = true\ntime_limit = \"500ms\"\n[routes.config]\nurl = \"{}\"\n",
        sink.address,
        sink.url("/hook")
    );
    let herald = Herald::sqlite_wrapped(
        "lease = \"1s\"\npoll_interval = \"20ms\"",
        &routes,
        FaultyStore::wrap(1, false),
    )
    .await;
    let id = herald
        .append(NewEvent::new("order.created", "order", "o-1", json!({})))
        .await;
    herald.settle(LIMIT).await;

    let requests = sink.requests();
    assert_eq!(
        requests.len(),
        2,
        "the lease expired and the delivery ran again"
    );
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), 1, "one key, so one effect: {accepted:?}");
    assert_eq!(
        accepted.values().next(),
        Some(&2),
        "the repeat carried the same key"
    );
    let detail = herald.detail(id).await;
    assert_eq!(detail.event.event_status, EventStatus::Success);
    assert_eq!(
        detail.attempts.len(),
        1,
        "only the committed attempt is on record"
    );
    assert_eq!(detail.attempts[0].attempt, 2);
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emits_past_the_per_call_limit_are_refused_and_nothing_is_committed() {
    let herald = Herald::sqlite(&route(
        "chatty",
        "chatty.*",
        "echo",
        "[routes.config]\nemit_type = \"chatty.echo\"\nemit_count = 101",
    ))
    .await;
    let id = herald.append(event("chatty.talk", "c")).await;
    herald.settle(LIMIT).await;
    let reason = only_reason(&herald, id).await;
    assert!(
        reason.contains("emit") && reason.contains("100"),
        "{reason}"
    );
    assert!(herald.events_of_type("chatty.echo").await.is_empty());
    herald.finish().await;
}

/// A plugin computing until its time limit must not hold the thread it runs on. Two
/// spinning plugins on a two-thread runtime: another route's events are delivered while
/// they spin. (Before plugins yielded at every epoch tick, the two spins held both threads
/// for their whole time limit and everything else waited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_plugins_do_not_stall_other_routes() {
    let routes = [
        route(
            "spin",
            "fault.spin",
            "spin",
            "time_limit = \"10s\"\nordering = \"none\"",
        ),
        route("fine", "ok.*", "echo", "ordering = \"none\""),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;
    let spins = [
        herald.append(event("fault.spin", "s1")).await,
        herald.append(event("fault.spin", "s2")).await,
    ];
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = herald.service.dispatcher.run(stopped);
    let check = async {
        // Once both spins are claimed, the fine route's events go in.
        loop {
            let claimed = herald
                .deliveries_of("spin")
                .await
                .iter()
                .filter(|d| d.attempts > 0)
                .count();
            if claimed == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut fine = Vec::new();
        for n in 0..20 {
            fine.push(herald.append(event("ok.tick", &format!("e{n}"))).await);
        }
        while !herald.all_succeeded(&fine).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // All delivered while the spins were still running: no attempt of theirs recorded.
        for spin in spins {
            assert!(
                herald.attempts(spin).await.is_empty(),
                "the other route waited for the spinning plugins"
            );
        }
        let _ = stop.send(true);
    };
    tokio::join!(running, check);
    herald.finish().await;
}

/// An entity's later events, which fan-out queues in this instance behind the earlier one
/// it starts, each run when the one before closes, even while every claim from the store
/// fails: the queue holds their leases, and no claim would take them while this instance
/// renews them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_deliveries_run_while_claims_fail() {
    let Some(herald) = Herald::postgres_wrapped(
        "queued_while_claims_fail",
        &route("orders", "order.*", "echo", ""),
        FaultyStore::wrap(0, true),
    )
    .await
    else {
        return;
    };
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(herald.append(event("order.updated", "o-1")).await);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = herald.service.dispatcher.run(stopped);
    let check = async {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !herald.all_succeeded(&ids).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every event of the entity was delivered within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(true);
    };
    tokio::join!(running, check);
    let mut order = Vec::new();
    for id in &ids {
        let attempts = herald.attempts(*id).await;
        assert_eq!(attempts.len(), 1, "event {id}: {attempts:?}");
        order.push(attempts[0].started_at);
    }
    assert!(order.is_sorted(), "in order: {order:?}");
    herald.finish().await;
}
