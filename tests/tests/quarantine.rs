//! Quarantine: a plugin that faults event after event has its routes paused (on every
//! instance, by a store row) until an operator resumes it; other plugins keep flowing.
//! Its own test binary, because the metrics it checks are process-global.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Herald;
use herald::store::{EventStatus, NewEvent};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// Log lines, kept for the assertions.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

async fn fragile_attempts(herald: &Herald) -> i32 {
    herald
        .deliveries_of("fragile")
        .await
        .iter()
        .map(|d| d.attempts)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_plugin_is_quarantined_until_resumed_and_others_flow() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();

    // `echo` panics on `{"panic": ...}`; `noop` serves the steady route.
    let routes = "
[[routes]]
name = \"fragile\"
event_types = [\"fragile.*\"]
plugin = \"echo\"
ordering = \"none\"
[routes.retry]
max_attempts = 50
backoff_base = \"1ms\"
backoff_max = \"1ms\"

[[routes]]
name = \"steady\"
event_types = [\"steady.*\"]
plugin = \"noop\"
ordering = \"none\"
";
    let herald = Herald::sqlite_wrapped(
        "poll_interval = \"20ms\"\nquarantine_after = 3",
        routes,
        |store| store,
    )
    .await;
    let mut broken = Vec::new();
    for n in 0..3 {
        broken.push(
            herald
                .append(NewEvent::new(
                    "fragile.x",
                    "thing",
                    format!("b{n}"),
                    json!({ "panic": "boom" }),
                ))
                .await,
        );
    }
    let mut steady = Vec::new();
    for n in 0..50 {
        steady.push(
            herald
                .append(NewEvent::new(
                    "steady.tick",
                    "thing",
                    format!("s{n}"),
                    json!({}),
                ))
                .await,
        );
    }

    herald
        .run_until(LIMIT, async |h: &Herald| {
            !h.store.quarantined().await.expect("quarantined").is_empty()
        })
        .await;
    let verdict = herald.store.quarantined().await.expect("quarantined");
    assert_eq!(verdict.len(), 1, "{verdict:?}");
    assert_eq!(verdict[0].plugin, "echo");
    assert!(verdict[0].faults >= 3, "{verdict:?}");
    assert!(
        verdict[0]
            .reason
            .contains("consecutive faults; last: plugin"),
        "{verdict:?}"
    );
    let log = logs.text();
    assert!(
        log.contains("plugin quarantined") && log.contains("herald plugins resume echo"),
        "no quarantine log line:\n{log}"
    );
    let metrics = herald::metrics::render(herald.store.as_ref())
        .await
        .expect("metrics");
    assert!(
        metrics.contains("herald_plugin_quarantined{plugin=\"echo\"} 1"),
        "{metrics}"
    );

    // Paused: with every retry due (1 ms backoff), more passes run nothing of the route,
    // and nothing of it goes DEAD; the other plugin's route finishes.
    let paused_at = fragile_attempts(&herald).await;
    herald
        .run_until(LIMIT, async |h: &Herald| h.all_succeeded(&steady).await)
        .await;
    for _ in 0..5 {
        herald.service.dispatcher.drain().await.expect("drain");
    }
    assert_eq!(fragile_attempts(&herald).await, paused_at);
    for id in &broken {
        assert_ne!(herald.status(*id).await, EventStatus::Dead);
    }

    // Resumed: the route claims again. A good event goes through; the broken ones fault
    // again and the plugin is quarantined again.
    let good = herald
        .append(NewEvent::new("fragile.x", "thing", "g", json!({})))
        .await;
    assert!(herald.store.resume("echo").await.expect("resume"));
    herald
        .run_until(LIMIT, async |h: &Herald| {
            h.status(good).await == EventStatus::Success
                && !h.store.quarantined().await.expect("quarantined").is_empty()
        })
        .await;
    assert!(fragile_attempts(&herald).await > paused_at);
    herald.finish().await;
}
