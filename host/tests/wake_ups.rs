//! Postgres producers send wake-ups only while an idle instance asks for them (migration
//! 0011). What must not happen: an instance that goes to sleep while a producer that
//! missed its request is still in flight, so that the producer's event waits for a poll.

mod support;

use std::sync::Arc;
use std::time::Duration;

use herald::service::Service;
use herald::store::{self, EventStatus, EventStore, FanOutRequest, RoutePlan};
use herald_tests::PgSchema;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

/// The poll is an hour away: only a wake-up, or the look an instance takes after asking
/// for them, delivers an event within the test.
const DISPATCH: &str = r#"[dispatch]
lease = "30s"
poll_interval = "1h"
listen = true

[[routes]]
name = "echo-route"
event_types = ["order.*"]
plugin = "echo"
"#;

async fn wake_ups_requested(conn: &mut PgConnection) -> bool {
    let value: i64 = sqlx::query_scalar("SELECT last_value FROM herald_wake_ups_requested")
        .fetch_one(conn)
        .await
        .expect("read the request");
    value == 1
}

/// A producer reads "not asked", and is still in flight when the instance, idle, asks:
/// the instance must wait for it to end before its last look, and then deliver its event.
/// (Were the instance to look at once, the event would commit after the look, with no
/// wake-up, and wait an hour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_producer_commits_while_the_instance_falls_asleep_is_delivered() {
    let Some(schema) = PgSchema::create("wake_ups_falling_asleep").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn EventStore> =
        Arc::from(store::open_migrated(&schema.url).await.expect("open store"));
    // What a woken instance's first fan-out does: producers stop sending wake-ups.
    let stop = FanOutRequest {
        stop_wake_ups: true,
        ..FanOutRequest::new(10)
    };
    store
        .fan_out(&stop, &|_| vec![RoutePlan::ordered("echo-route")])
        .await
        .expect("stop wake-ups");

    let mut producer = PgConnection::connect(&schema.url).await.expect("producer");
    let mut in_flight = producer.begin().await.expect("begin");
    let event_id: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', '1', '{}') RETURNING event_id",
    )
    .fetch_one(&mut *in_flight)
    .await
    .expect("insert");

    let config = support::config_with_plugins(&dir, DISPATCH);
    let service = Service::build(&config, store.clone())
        .await
        .unwrap_or_else(|err| panic!("service: {err}"));
    let dispatcher = Arc::new(service.dispatcher);
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run(stopped).await }
    });

    // The instance found nothing and asks for wake-ups; the producer has not committed.
    let mut observer = PgConnection::connect(&schema.url).await.expect("observer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !wake_ups_requested(&mut observer).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle instance did not ask for wake-ups within 30s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    in_flight.commit().await.expect("commit");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let detail = store
            .event_detail(event_id)
            .await
            .expect("detail")
            .expect("event");
        if detail.event.event_status == EventStatus::Success {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event committed as the instance fell asleep was not delivered within 30s \
             (the poll is an hour away)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let _ = stop.send(true);
    running.await.expect("dispatcher stops");
    schema.drop().await;
}
