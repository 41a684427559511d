//! When the serving dispatcher asks the store for work. A claim is a planned and executed
//! statement on the database; one that finds nothing is load for nothing. The metrics
//! recorder is process-global, so this file holds one test.

mod support;

use std::sync::Arc;
use std::time::Duration;

use herald::config::Config;
use herald::service::Service;
use herald::store::{self, EventStatus, EventStore, NewEvent};
use herald_tests::PgSchema;
use serde_json::json;
use tokio::sync::watch;

/// No poll within the test's lifetime: every claim is woken by the dispatcher itself.
fn config(dir: &tempfile::TempDir) -> Config {
    support::config_with_plugins(
        dir,
        r#"[dispatch]
lease = "30s"
poll_interval = "1h"
listen = true

[[routes]]
name = "echo-route"
event_types = ["order.*"]
plugin = "echo"
"#,
    )
}

fn claims(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("herald_claims_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// What `probe` finds, once it finds something; fails the test after 30 s.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn delivered(store: &dyn EventStore, id: i64) {
    eventually(&format!("event {id} delivered"), || async {
        let detail = store
            .event_detail(id)
            .await
            .expect("detail")
            .expect("event");
        (detail.event.event_status == EventStatus::Success).then_some(())
    })
    .await
}

/// Events arriving one at a time are started by fan-out itself (their lanes are free),
/// so a finished delivery leaves nothing of this instance's to claim: it must not wake a
/// claim. Nor must events queued behind their lane's running delivery. (Before, every finished task claimed, and at 1,000 events/s that was 300
/// empty claims a second.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_started_by_fan_out_wake_no_claim_when_they_finish() {
    let Some(schema) = PgSchema::create("claims_fan_out_started").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn EventStore> =
        Arc::from(store::open_migrated(&schema.url).await.expect("open store"));
    let service = Service::build(&config(&dir), store.clone())
        .await
        .unwrap_or_else(|err| panic!("service: {err}"));
    let dispatcher = Arc::new(service.dispatcher);
    let (stop, stopped) = watch::channel(false);

    // Appended before the dispatcher runs: its first pass takes it, and its delivery
    // shows that the loops (and the listener before them) are up.
    let first = NewEvent::new("order.created", "order", "0", json!({}));
    let first = store.append(&first).await.expect("append");
    let running = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run(stopped).await }
    });
    delivered(&*store, first).await;
    let render = || async {
        herald::metrics::render(&*store)
            .await
            .expect("Herald's recorder")
    };
    // The claim loop claims once as it starts; that claim may still be on its way back.
    let before = eventually("the claim at start", || async {
        Some(claims(&render().await)).filter(|made| *made >= 1.0)
    })
    .await;

    for entity in 1..=5 {
        let event = NewEvent::new("order.created", "order", entity.to_string(), json!({}));
        let id = store.append(&event).await.expect("append");
        delivered(&*store, id).await;
    }
    let after = claims(&render().await);
    assert_eq!(
        after - before,
        0.0,
        "claims made for deliveries fan-out had started (before {before}, after {after})"
    );

    // An entity's events committed together: fan-out starts the first and queues the
    // rest behind it; each runs when the one before closes, in order, with no claim.
    let burst: Vec<NewEvent> = (0..20)
        .map(|n| NewEvent::new("order.updated", "order", "burst", json!({ "n": n })))
        .collect();
    let ids = store.append_batch(&burst).await.expect("append burst");
    for id in &ids {
        delivered(&*store, *id).await;
    }
    let mut first_attempts = Vec::new();
    for id in &ids {
        let detail = store
            .event_detail(*id)
            .await
            .expect("detail")
            .expect("event");
        assert_eq!(detail.attempts.len(), 1, "event {id} ran once");
        first_attempts.push(detail.attempts[0].attempt_id);
    }
    let mut in_order = first_attempts.clone();
    in_order.sort_unstable();
    assert_eq!(first_attempts, in_order, "the entity's events ran in order");
    let after_burst = claims(&render().await);
    assert_eq!(
        after_burst - after,
        0.0,
        "claims made for deliveries queued behind their lane (before {after}, after \
         {after_burst})"
    );

    let _ = stop.send(true);
    running.await.expect("dispatcher stops");
    schema.drop().await;
}
