//! Hot deploy: plugins replaced in the plugin directory while events flow.

mod common;

use std::time::Duration;

use common::{plugins_dir, Herald};
use herald::runtime::hot_reload::{DeployOutcome, PluginWatcher};
use herald::runtime::versions::PluginDir;
use herald::store::{EventStatus, NewEvent};
use serde_json::json;
use tokio::sync::watch;

const LIMIT: Duration = Duration::from_secs(120);

const ECHO_ROUTE: &str = "\n[[routes]]\nname = \"audit\"\nevent_types = [\"audit.*\"]\nplugin = \"echo\"\nordering = \"none\"\n[routes.retry]\nmax_attempts = 1\n";

fn echo_bytes() -> Vec<u8> {
    std::fs::read(plugins_dir().join("echo.wasm")).expect("echo.wasm")
}

/// The same plugin with a custom section appended: another version (another hash)
/// that behaves the same.
fn relabelled(mut wasm: Vec<u8>, label: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"herald-test-version";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(label.as_bytes());
    wasm.push(0);
    leb(payload.len(), &mut wasm);
    wasm.extend(payload);
    wasm
}

fn watcher(herald: &Herald) -> PluginWatcher {
    PluginWatcher::new(
        &herald.config.plugins_dir(),
        herald.service.runtime.clone(),
        herald.service.plugins.clone(),
    )
}

/// Scan until the file settles and is deployed or refused.
async fn deploy_outcome(watcher: &mut PluginWatcher) -> DeployOutcome {
    for _ in 0..3 {
        if let Some(outcome) = watcher.scan().await.into_iter().next() {
            return outcome;
        }
    }
    panic!("nothing was deployed or refused after three scans");
}

fn event(n: usize) -> NewEvent {
    NewEvent::new(
        "audit.tick",
        "tick",
        format!("t{}", n % 50),
        json!({ "n": n }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_deploys_while_5000_events_flow_fail_no_attempt() {
    let herald = Herald::sqlite_with_own_plugins(&["echo"], ECHO_ROUTE).await;
    let plugins = PluginDir::new(herald.config.plugins_dir());
    let mut watcher = watcher(&herald);
    let (stop, stopped) = watch::channel(false);

    let deploys = async {
        let mut versions = Vec::new();
        for round in 0..10 {
            let events: Vec<NewEvent> = (round * 500..(round + 1) * 500).map(event).collect();
            herald.store.append_batch(&events).await.expect("append");
            plugins
                .install(
                    "echo",
                    &relabelled(echo_bytes(), &format!("v{}", round % 2)),
                )
                .expect("install");
            match deploy_outcome(&mut watcher).await {
                DeployOutcome::Deployed { version, .. } => versions.push(version),
                refused => panic!("round {round}: {refused:?}"),
            }
        }
        let deadline = tokio::time::Instant::now() + LIMIT;
        while herald.open_events().await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "events still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        versions
    };
    let (versions, ()) = tokio::join!(deploys, herald.service.dispatcher.run(stopped));
    assert_eq!(versions.len(), 10);

    let raw = sqlx::SqlitePool::connect(&herald.store_url)
        .await
        .expect("raw pool");
    let (attempts, failed, versions_used): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE outcome <> 'DELIVERED'), \
         count(DISTINCT plugin_version) FROM herald_attempts",
    )
    .fetch_one(&raw)
    .await
    .expect("attempts");
    let unsettled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'audit.tick' AND event_status <> 'SUCCESS'",
    )
    .fetch_one(&raw)
    .await
    .expect("events");
    assert_eq!(
        (attempts, failed, unsettled),
        (5000, 0, 0),
        "every event delivered once, no attempt failed"
    );
    assert!(
        versions_used >= 2,
        "attempts ran on both versions: {versions_used}"
    );
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_refused_and_the_running_version_keeps_delivering() {
    let herald = Herald::sqlite_with_own_plugins(&["echo"], ECHO_ROUTE).await;
    let plugins = PluginDir::new(herald.config.plugins_dir());
    let mut watcher = watcher(&herald);
    let running = herald
        .service
        .plugins
        .get("echo")
        .expect("echo runs")
        .version
        .clone();

    let echo = echo_bytes();
    for (what, bytes) in [
        ("garbage", b"not wasm at all".to_vec()),
        ("a truncated component", echo[..echo.len() / 2].to_vec()),
        (
            "a core module, not a component",
            b"\0asm\x01\0\0\0".to_vec(),
        ),
    ] {
        plugins.install("echo", &bytes).expect("install");
        match deploy_outcome(&mut watcher).await {
            DeployOutcome::Refused { reason, .. } => {
                assert!(!reason.is_empty(), "{what}");
                if what.contains("another interface") {
                    assert!(
                        reason.contains("does not fit herald:plugin@0.1.0"),
                        "{reason}"
                    );
                }
            }
            deployed => panic!("{what} was deployed: {deployed:?}"),
        }
        let id = herald.append(event(1)).await;
        herald.settle(LIMIT).await;
        assert_eq!(
            herald.status(id).await,
            EventStatus::Success,
            "after {what}"
        );
        let attempt = &herald.attempts(id).await[0];
        assert_eq!(
            attempt.plugin_version.as_deref(),
            Some(running.as_str()),
            "after {what}"
        );
    }

    // A file caught half-written is not even tried: it loads once it is complete.
    let path = plugins.active_file("echo");
    let next = relabelled(echo.clone(), "complete");
    std::fs::write(&path, &next[..next.len() / 3]).expect("half a file");
    assert!(watcher.scan().await.is_empty(), "a changing file waits");
    std::fs::write(&path, &next).expect("the whole file");
    let outcome = deploy_outcome(&mut watcher).await;
    assert!(
        matches!(outcome, DeployOutcome::Deployed { .. }),
        "{outcome:?}"
    );
    herald.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_behaviour() {
    let herald = Herald::sqlite_with_own_plugins(&["echo"], ECHO_ROUTE).await;
    let plugins = PluginDir::new(herald.config.plugins_dir());
    let mut watcher = watcher(&herald);

    // A bad release: the trap plugin shipped under the echo name.
    let trap = std::fs::read(plugins_dir().join("trap.wasm")).expect("trap.wasm");
    plugins.install("echo", &trap).expect("install");
    assert!(matches!(
        deploy_outcome(&mut watcher).await,
        DeployOutcome::Deployed { .. }
    ));
    let broken = herald.append(event(1)).await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(broken).await, EventStatus::Dead);

    plugins.rollback("echo", None).expect("rollback");
    assert!(matches!(
        deploy_outcome(&mut watcher).await,
        DeployOutcome::Deployed { .. }
    ));
    let fixed = herald.append(event(2)).await;
    herald.settle(LIMIT).await;
    assert_eq!(herald.status(fixed).await, EventStatus::Success);
    herald.finish().await;
}
