//! Several `herald serve` processes on one Postgres, with nothing but Postgres between
//! them: they share the work, keep per-entity order, take over a killed peer's leases,
//! and wake on NOTIFY.
//!
//! The tests here run one at a time: each starts several processes with their own
//! connection pools, and together they would exceed Postgres' connection limit.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::store::{self, EventFilter, EventStatus, EventStore, NewEvent};
use herald_tests::sink::{arrivals, Sink};
use herald_tests::PgSchema;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use support::{herald, plugins_dir, spawn_serve, stdout_json};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EVENTS: usize = 20_000;
const ENTITIES: usize = 500;

struct Cluster {
    schema: PgSchema,
    store: Arc<dyn EventStore>,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn new(test: &str, sink: &Sink, dispatch: &str) -> Option<Cluster> {
        let schema = PgSchema::create(test).await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("herald.toml");
        std::fs::write(
            &config,
            format!(
                "store = {:?}\nplugins_dir = {:?}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\n{dispatch}\n\n\
                 [[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhook\"\n\
                 allowed_hosts = [\"{}\"]\nallow_private = true\ntime_limit = \"2s\"\n\
                 [routes.retry]\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n\
                 [routes.config]\nurl = \"{}\"\n",
                schema.url,
                plugins_dir().display().to_string(),
                sink.address,
                sink.url("/orders"),
            ),
        )
        .expect("write config");
        let store: Arc<dyn EventStore> =
            Arc::from(store::open_migrated(&schema.url).await.expect("open store"));
        Some(Cluster {
            schema,
            store,
            config,
            dir,
        })
    }

    fn serve(&self, name: &str) -> tokio::process::Child {
        spawn_serve(&self.config, name, &self.log(name))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                all.push_str(&format!("--- {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    }

    /// Append the events in order, in chunks, while the instances run.
    async fn produce(&self, events: usize, entities: usize) {
        let all: Vec<NewEvent> = (0..events)
            .map(|n| {
                NewEvent::new(
                    "order.updated",
                    "order",
                    format!("o-{}", n % entities),
                    json!({ "n": n }),
                )
            })
            .collect();
        for chunk in all.chunks(500) {
            self.store.append_batch(chunk).await.expect("append");
        }
    }

    /// Until no event is open: every outcome so far is committed. Fails the test, with
    /// the instances' logs, if one is still open after a minute.
    async fn wait_closed(&self) {
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        while self.open_events().await > 0 {
            assert!(
                Instant::now() < deadline,
                "events still open after {limit:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn open_events(&self) -> usize {
        let mut open = 0;
        for status in [EventStatus::Ready, EventStatus::Failed] {
            open += self
                .store
                .list_events(&EventFilter {
                    status: Some(status),
                    limit: 1,
                    ..Default::default()
                })
                .await
                .expect("list")
                .len();
        }
        open
    }

    async fn finish(self) {
        drop(self.store);
        self.schema.drop().await;
    }
}

/// Wait until the receiver has every event and the store has nothing open.
async fn wait_until_done(cluster: &Cluster, sink: &Sink, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let distinct = arrivals(&sink.requests()).distinct();
        if distinct >= EVENTS && cluster.open_events().await == 0 {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "after {limit:?}: {distinct} of {EVENTS} delivered, {} open; logs:\n{}",
                cluster.open_events().await,
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_arrivals(sink: &Sink, distinct: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while arrivals(&sink.requests()).distinct() < distinct {
        assert!(
            Instant::now() < deadline,
            "fewer than {distinct} deliveries in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SHARED: &str = "lease = \"3s\"\npoll_interval = \"100ms\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_everything_once_in_entity_order() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start().await;
    let Some(cluster) = Cluster::new("scale_three", &sink, SHARED).await else {
        return;
    };
    let started = Instant::now();
    let instances: Vec<_> = ["a", "b", "c"].iter().map(|n| cluster.serve(n)).collect();
    cluster.produce(EVENTS, ENTITIES).await;
    wait_until_done(&cluster, &sink, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();

    let requests = sink.requests();
    let seen = arrivals(&requests);
    eprintln!(
        "3 instances: {EVENTS} events over {ENTITIES} entities in {elapsed:.1?} ({:.0} events/s), {} raw repeats",
        EVENTS as f64 / elapsed.as_secs_f64(),
        seen.repeats
    );
    assert_eq!(seen.distinct(), EVENTS, "every event arrived");
    assert!(
        seen.order_violations.is_empty(),
        "{:?}",
        &seen.order_violations[..5.min(seen.order_violations.len())]
    );
    assert_eq!(sink.accepted().len(), EVENTS, "one effect per key");
    assert_eq!(
        seen.repeats,
        0,
        "no instance ran a delivery another one held; instance logs:\n{}",
        cluster.logs()
    );

    let attempts_by: HashMap<String, usize> = attempts_per_instance(&cluster).await;
    assert_eq!(
        attempts_by.len(),
        3,
        "all three instances took part: {attempts_by:?}"
    );
    drop(instances);
    cluster.finish().await;
}

/// Attempts recorded by each instance in either ledger shape (migration 0013's view): a
/// batch entry of an item delivered at its first attempt has no `herald_attempts` row, and an
/// instance whose every attempt was one would otherwise not be counted.
async fn attempts_per_instance(cluster: &Cluster) -> HashMap<String, usize> {
    let mut conn = PgConnection::connect(&cluster.schema.url)
        .await
        .expect("connect");
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT instance, count(*) FROM herald_attempt_records GROUP BY instance")
            .fetch_all(&mut conn)
            .await
            .expect("attempts per instance");
    rows.into_iter().map(|(i, n)| (i, n as usize)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_taken_over_and_nothing_is_lost_or_reordered() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start().await;
    let Some(cluster) = Cluster::new("scale_kill", &sink, SHARED).await else {
        return;
    };
    let mut instances: Vec<_> = ["a", "b", "c"].iter().map(|n| cluster.serve(n)).collect();
    // The last quarter is produced only once the late instance is running, so that it
    // has work left whatever the speed of the first three.
    let late = EVENTS / 4;
    cluster.produce(EVENTS - late, ENTITIES).await;

    wait_for_arrivals(&sink, EVENTS / 2, Duration::from_secs(600)).await;
    instances[0].start_kill().expect("SIGKILL instance a");
    instances[0].wait().await.expect("a is gone");
    instances.push(cluster.serve("d"));
    wait_until_registered(&cluster, "d").await;
    cluster.produce(late, ENTITIES).await;
    wait_until_done(&cluster, &sink, Duration::from_secs(600)).await;

    let seen = arrivals(&sink.requests());
    eprintln!(
        "kill and take-over: {} distinct, {} raw repeats (redelivered after the kill, absorbed by the key)",
        seen.distinct(), seen.repeats
    );
    assert_eq!(seen.distinct(), EVENTS, "no event lost");
    assert!(
        seen.order_violations.is_empty(),
        "{:?}",
        &seen.order_violations[..5.min(seen.order_violations.len())]
    );
    assert_eq!(sink.accepted().len(), EVENTS, "one effect per key");
    let by = attempts_per_instance(&cluster).await;
    assert!(by.contains_key("d"), "the late instance took part: {by:?}");

    // `herald instances` shows the live ones (heartbeat every second with a 3 s lease),
    // and the killed one drops out once its last heartbeat is older than the window.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = stdout_json(&herald(
            &cluster.config,
            &["--json", "instances", "--within", "3s"],
        ));
        let names: HashSet<String> = live
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|i| i["instance_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        assert!(names.contains("b") && names.contains("d"), "{live}");
        if !names.contains("a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed instance is still listed: {live}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(instances);
    cluster.finish().await;
}

/// With no poll within the test's lifetime, an event in an idle system is delivered only
/// if NOTIFY wakes the instance; with NOTIFY off, the poll still delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_instance_and_the_poll_is_the_safety_net() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start().await;
    let Some(cluster) = Cluster::new("scale_notify", &sink, "poll_interval = \"1h\"").await else {
        return;
    };
    // Waiting before the instance starts: its first pass (at start) delivers it. Once
    // that outcome is committed the instance is idle, and with the poll an hour away only
    // a notification can make it look again.
    cluster.produce(1, 1).await;
    let _listening = cluster.serve("listening");
    sink.wait_for(1, Duration::from_secs(20)).await;
    cluster.wait_closed().await;
    cluster.produce(1, 1).await;
    sink.wait_for(2, Duration::from_secs(20)).await;
    // Stop it only once the outcome is committed: a lease left behind would (rightly)
    // hold the entity's next event until it expired.
    cluster.wait_closed().await;
    drop(_listening);

    // Without NOTIFY, the poll alone delivers the next one.
    std::fs::write(
        &cluster.config,
        std::fs::read_to_string(&cluster.config)
            .expect("read config")
            .replace(
                "poll_interval = \"1h\"",
                "poll_interval = \"200ms\"\nlisten = false",
            ),
    )
    .expect("rewrite config");
    let _polling = cluster.serve("polling");
    wait_until_registered(&cluster, "polling").await;
    cluster.produce(1, 1).await;
    sink.wait_for(3, Duration::from_secs(20)).await;
    cluster.finish().await;
}

async fn wait_until_registered(cluster: &Cluster, instance: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = cluster
            .store
            .instances(Duration::from_secs(60))
            .await
            .expect("instances");
        if live.iter().any(|i| i.instance_id == instance) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{instance} never registered:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The outbox bug across instances: an event whose transaction took a low id but
/// committed after higher ids were delivered is still delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_delivered_once_by_a_cluster() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start().await;
    let Some(cluster) = Cluster::new("scale_late_commit", &sink, SHARED).await else {
        return;
    };
    let _a = cluster.serve("a");
    let _b = cluster.serve("b");

    let mut slow = PgConnection::connect(&cluster.schema.url)
        .await
        .expect("producer");
    let mut slow_tx = slow.begin().await.expect("begin");
    let late: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.updated', 'order', 'late', '{}') RETURNING event_id",
    )
    .fetch_one(&mut *slow_tx)
    .await
    .expect("insert in the slow transaction");
    cluster.produce(50, 10).await;
    wait_for_arrivals(&sink, 50, Duration::from_secs(60)).await;
    assert!(
        !sink.requests().iter().any(|r| r.json()["id"] == late),
        "not visible before its commit"
    );

    slow_tx.commit().await.expect("late commit");
    wait_for_arrivals(&sink, 51, Duration::from_secs(60)).await;
    let seen = arrivals(&sink.requests());
    assert_eq!((seen.distinct(), seen.repeats), (51, 0));
    assert!(sink.requests().iter().any(|r| r.json()["id"] == late));
    cluster.finish().await;
}
