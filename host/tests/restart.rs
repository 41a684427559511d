//! SIGTERM in the middle of a run, then a restart: real `herald serve` processes on one
//! SQLite store, the real webhook plugin, a real receiver. Every event is delivered once
//! in effect, per-entity order holds across the restart, and a graceful stop leaves no
//! attempt to repeat.

mod support;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_tests::sink::{arrivals, Recorded, Sink};
use serde_json::{json, Value};
use support::{plugins_dir, sigterm, spawn_serve, stdout_json};

const EVENTS: usize = 2_000;
const ENTITIES: usize = 100;
/// SIGTERM once the receiver has this many requests: well inside the run.
const STOP_AFTER: usize = 300;

/// `herald ARGS --json` off the runtime's worker threads (the sink runs on them).
async fn cli_json(config: &Path, args: &[&str]) -> Value {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stdout_json(&support::herald(&config, &args))
    })
    .await
    .expect("herald CLI task")
}

/// How many events are still READY or FAILED (0 once everything is settled).
async fn open_events(config: &Path) -> usize {
    let mut open = 0;
    for status in ["READY", "FAILED"] {
        let listed = cli_json(config, &["events", "list", "--status", status, "--json"]).await;
        open += listed.as_array().expect("a JSON array of events").len();
    }
    open
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Append all events, `n % ENTITIES` as the entity, in one `events append --stdin`.
fn append_all(config: &Path) -> Vec<i64> {
    let mut lines = String::new();
    for n in 0..EVENTS {
        let line = json!({
            "type": "order.updated",
            "entity_type": "order",
            "entity_id": format!("o-{}", n % ENTITIES),
            "data": { "n": n },
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let mut append = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(config)
        .args(["--json", "events", "append", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run herald events append");
    append
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write events");
    let output = append.wait_with_output().expect("wait for append");
    let appended = stdout_json(&output);
    appended["event_ids"]
        .as_array()
        .expect("event_ids")
        .iter()
        .map(|id| id.as_i64().expect("an integer id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_then_restart_delivers_everything_once_in_order() {
    let started = Instant::now();
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"sqlite://herald.db\"\nplugins_dir = {:?}\n\n[admin]\nenabled = false\n\n\
             [dispatch]\npoll_interval = \"20ms\"\nbatch_size = 50\nconcurrency = 8\n\
             shutdown_deadline = \"5s\"\n\n\
             [[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhook\"\n\
             allowed_hosts = [\"{}\"]\nallow_private = true\n[routes.config]\nurl = \"{}\"\n",
            plugins_dir().display().to_string(),
            sink.address,
            sink.url("/orders")
        ),
    )
    .expect("write config");
    let migrate = support::herald(&config, &["migrate"]);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let ids = append_all(&config);
    assert_eq!(ids.len(), EVENTS, "one id per appended event");
    let expected: HashSet<i64> = ids.iter().copied().collect();

    // First run: stopped by SIGTERM once a good part, but not all, has arrived.
    let before_log: PathBuf = dir.path().join("before.log");
    let mut before = spawn_serve(&config, "before", &before_log);
    sink.wait_for(STOP_AFTER, Duration::from_secs(30)).await;
    let at_signal = sink.requests().len();
    sigterm(&before);
    let signalled = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), before.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "serve did not stop within 20 s of SIGTERM; log:\n{}",
                log_tail(&before_log)
            )
        })
        .expect("wait for serve");
    let stop_took = signalled.elapsed();
    assert!(
        status.success(),
        "serve exited with {status}; log:\n{}",
        log_tail(&before_log)
    );
    let at_exit = sink.requests();
    eprintln!(
        "first run: SIGTERM at {at_signal} requests, exited 0 after {stop_took:?} with {} requests ({} finished after the signal)",
        at_exit.len(),
        at_exit.len() - at_signal
    );
    let before_stop = arrivals(&at_exit);
    assert!(
        before_stop.ids.len() < EVENTS,
        "the stop came after everything was delivered: the test proves nothing"
    );
    let open_at_stop = open_events(&config).await;
    assert!(
        open_at_stop > 0,
        "events are still open after the stop (the store agrees)"
    );
    // Every request the receiver answered before the exit has its outcome committed:
    // nothing the first run sent is left for the second to send again.
    let succeeded = cli_json(
        &config,
        &[
            "events",
            "list",
            "--status",
            "SUCCESS",
            "--limit",
            &EVENTS.to_string(),
            "--json",
        ],
    )
    .await;
    let succeeded: HashSet<i64> = succeeded
        .as_array()
        .expect("a JSON array of events")
        .iter()
        .map(|e| e["event_id"].as_i64().expect("event_id"))
        .collect();
    assert_eq!(
        succeeded, before_stop.ids,
        "the store's SUCCESS events are exactly those the receiver got before the stop"
    );
    let before_text = std::fs::read_to_string(&before_log).unwrap_or_default();
    assert!(
        !before_text.contains("after the shutdown deadline"),
        "in-flight attempts finished within the deadline:\n{before_text}"
    );

    // Second run: picks up where the first left off, with no lease to wait out.
    let after_log: PathBuf = dir.path().join("after.log");
    let after = spawn_serve(&config, "after", &after_log);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let delivered = arrivals(&sink.requests()).ids.len();
        if delivered >= EVENTS && open_events(&config).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after restart: {delivered} of {EVENTS} delivered, {} open; log:\n{}",
            open_events(&config).await,
            log_tail(&after_log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(after);

    let requests = sink.requests();
    let seen = arrivals(&requests);
    let repeats = requests.len().saturating_sub(EVENTS);
    eprintln!(
        "after restart: {} requests, {} distinct events, {repeats} raw repeats ({} by id), {} order violations; {:.1?} in all",
        requests.len(),
        seen.ids.len(),
        seen.repeats,
        seen.order_violations.len(),
        started.elapsed()
    );
    let missing: Vec<i64> = expected.difference(&seen.ids).copied().collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(seen.ids, expected, "nothing arrived that was not appended");
    assert_eq!(sink.accepted().len(), EVENTS, "one effect per key");
    assert!(
        seen.order_violations.is_empty(),
        "{:?}",
        &seen.order_violations[..seen.order_violations.len().min(5)]
    );
    assert_eq!(
        repeats, 0,
        "a graceful stop lets in-flight attempts finish and commit: nothing is repeated"
    );

    // A few events, in the store: one attempt each, by the instance that delivered it.
    // The last ones to arrive before the exit were in flight when SIGTERM came.
    let body_id = |r: &Recorded| r.json()["id"].as_i64().expect("id");
    let mut sampled: Vec<i64> = vec![ids[0], ids[EVENTS / 2], ids[EVENTS - 1]];
    sampled.extend(at_exit.iter().rev().take(3).map(body_id));
    sampled.extend(requests[at_exit.len()..].iter().take(2).map(body_id));
    for id in sampled {
        let instance = if before_stop.ids.contains(&id) {
            "before"
        } else {
            "after"
        };
        let shown = cli_json(&config, &["events", "show", &id.to_string(), "--json"]).await;
        let attempts = shown["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "event {id}: {shown}");
        assert_eq!(attempts[0]["outcome"], "DELIVERED", "event {id}: {shown}");
        assert_eq!(attempts[0]["instance"], instance, "event {id}: {shown}");
        assert_eq!(shown["event_status"], "SUCCESS", "event {id}: {shown}");
    }
}
