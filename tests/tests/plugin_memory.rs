//! The host's memory returns to normal after memory-heavy plugin faults: an allocation
//! bomb, a giant answer, an emit flood and a log flood. A test binary of its own, with a
//! single test: resident memory is the process's, and tests running beside it in the
//! same process would move it.
//!
//! Each plugin faults at most seven times here, below the ten that quarantine a plugin.

mod common;

use std::time::Duration;

use common::Herald;
use herald::store::{EventStatus, NewEvent};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// Rounds after the warm-up. Each round runs every fault once.
const ROUNDS: usize = 6;

/// How far above the warm-up's resident memory the process may end. Each round has the
/// plugins allocate 64 MiB (bomb), answer 32 MiB (giant), emit 8 MiB (flood) and log
/// 200 MiB (log flood), all of which the host must let go; keeping any one of them per
/// round would add at least 6 × 8 MiB = 48 MiB over the rounds, the others hundreds. What
/// may legitimately stay (allocator caches, SQLite pages, pooled instance slots that were
/// already touched in the warm-up) is a few MiB.
const ALLOWED_GROWTH: u64 = 24 << 20;

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib << 10
}

fn route(name: &str, plugin: &str, keys: &str, config: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nevent_types = [\"{name}.*\"]\nplugin = \"{plugin}\"\n\
         ordering = \"none\"\n{keys}\n[routes.retry]\nmax_attempts = 1\n[routes.config]\n{config}\n"
    )
}

/// One event per faulty route; returns them with the status each must end in.
async fn round(herald: &Herald, n: usize) -> Vec<(i64, EventStatus)> {
    let mut ids = Vec::new();
    for (route, status) in [
        ("bomb", EventStatus::Dead),
        ("giant", EventStatus::Dead),
        ("flood", EventStatus::Dead),
        ("chatty", EventStatus::Success),
    ] {
        let event = NewEvent::new(format!("{route}.x"), "thing", format!("r{n}"), json!({}));
        ids.push((herald.append(event).await, status));
    }
    herald.settle(LIMIT).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_normal_after_memory_heavy_faults() {
    let routes = [
        route("bomb", "memory-bomb", "memory_limit_mb = 64", ""),
        route("giant", "giant-output", "memory_limit_mb = 96", ""),
        // 1,000,000 bytes of filler stays under the 1 MiB per event; the ninth such event
        // passes the 8 MiB per call.
        route(
            "flood",
            "emit-flood",
            "",
            "count = 200\ndata_bytes = 1000000",
        ),
        route("chatty", "log-flood", "", ""),
    ]
    .concat();
    let herald = Herald::sqlite(&routes).await;

    round(&herald, 0).await;
    let baseline = resident_bytes();
    let mut outcomes = Vec::new();
    for n in 1..=ROUNDS {
        outcomes.extend(round(&herald, n).await);
    }
    let after = resident_bytes();

    for (id, status) in outcomes {
        assert_eq!(herald.status(id).await, status, "event {id}");
    }
    let flood = herald.events_of_type("flood.x").await;
    let reason = herald.detail(flood[0].event_id).await.attempts[0]
        .detail
        .clone()
        .unwrap_or_default();
    assert!(
        reason.contains("refused 192 of its emits (first: invalid event: the events emitted in this attempt would exceed 8388608 bytes in all)"),
        "{reason}"
    );
    eprintln!(
        "resident memory: {} MiB after the warm-up, {} MiB after {ROUNDS} more rounds",
        baseline >> 20,
        after >> 20
    );
    assert!(
        after <= baseline + ALLOWED_GROWTH,
        "resident memory grew from {} MiB to {} MiB over {ROUNDS} rounds of faults",
        baseline >> 20,
        after >> 20
    );
    herald.finish().await;
}
