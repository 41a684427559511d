//! Every knob of the benchmark in one place: the `[dispatch]` keys each scenario runs
//! with, the sizes of the full and the `--quick` run, and the time bounds.

use std::time::Duration;

/// `[dispatch]` of the drains (scenarios 2 and 3): big fan-out batches, enough calls in
/// flight to overlap the webhook's HTTP round trips.
pub const DRAIN_DISPATCH: &str =
    "batch_size = 500\nconcurrency = 64\nlease = \"60s\"\npoll_interval = \"20ms\"";

/// `[dispatch]` of the faulting-neighbour run (scenario 8), but for `quarantine_after`,
/// which each row sets: the drain's.
pub const NEIGHBOUR_DISPATCH: &str =
    "batch_size = 500\nconcurrency = 64\nlease = \"60s\"\npoll_interval = \"20ms\"";

/// `[dispatch]` of the latency run (scenario 4). Postgres wakes on NOTIFY; SQLite on the
/// store's watch of the WAL file for any process's commits (`sqlite::watch`).
pub const LATENCY_DISPATCH: &str =
    "batch_size = 100\nconcurrency = 64\nlease = \"60s\"\npoll_interval = \"20ms\"\nlisten = true";

/// `[dispatch]` of the hot-swap run (scenario 6).
pub const HOTSWAP_DISPATCH: &str =
    "batch_size = 200\nconcurrency = 32\nlease = \"60s\"\npoll_interval = \"20ms\"\nlisten = true";

/// `[dispatch]` of the producers run (scenario 9): the drain's, woken by the store.
pub const PRODUCERS_DISPATCH: &str =
    "batch_size = 500\nconcurrency = 64\nlease = \"60s\"\npoll_interval = \"20ms\"\nlisten = true";

/// Producers inserting at once in scenario 9, each on a connection of its own (the
/// benchmark's Postgres pool holds 8).
pub const PRODUCERS: usize = 8;

/// How the benchmark's events are spread: many entities, so per-entity ordering leaves
/// plenty of lanes to run in parallel.
pub const ENTITIES: u64 = 1_000;

/// Per-entity ordering (Herald's default) on every route of the benchmark.
pub const ROUTE_ORDERING: &str = "entity";

/// Rows per bulk INSERT while preloading (not timed).
pub const PRELOAD_CHUNK: u64 = 10_000;

/// Rows a ceiling relay claims per transaction.
pub const CEILING_BATCH: i64 = 100;
/// Concurrent ceiling relays (connections).
pub const CEILING_RELAYS: usize = 2;

/// Drain progress is sampled this often (one read of a counter; see `DrainWatch`).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The shortest pause of a loop that times a drain by watching the database.
pub const FINISH_POLL: Duration = Duration::from_millis(10);

/// The plugin watcher's scan interval in the hot-swap run (`herald serve` uses 500ms).
pub const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Events per chunk of `call_batch` in the overhead scenario.
pub const OVERHEAD_CHUNK: usize = 100;

/// Sizes of one run; `--quick` shrinks everything so CI can smoke it in seconds.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Events of the ceiling and of each drain.
    pub events: u64,
    /// Events per second of the latency producer, and for how long it produces.
    pub latency_rate: u64,
    pub latency_for: Duration,
    /// Events delivered before the latency clock starts (connections, first instance).
    pub latency_warmup: u64,
    /// Calls per measurement of the overhead scenario.
    pub overhead_calls: usize,
    /// Plugin swaps, the load beside them and the pause between two swaps.
    pub swaps: usize,
    pub swap_load_per_sec: u64,
    pub swap_gap: Duration,
    /// How long the producers of scenario 9 insert.
    pub producers_for: Duration,
    /// The longest any one drain or wait may take before the scenario fails.
    pub time_bound: Duration,
    /// Bytes of padding in each preloaded event's data (the ceilings' and the drains'
    /// events); 0 leaves it `{"seq": n}`.
    pub payload_bytes: usize,
}

impl Sizes {
    pub fn full(events: u64) -> Self {
        Sizes {
            events,
            latency_rate: 1_000,
            latency_for: Duration::from_secs(10),
            latency_warmup: 20,
            overhead_calls: 20_000,
            swaps: 10,
            swap_load_per_sec: 1_000,
            swap_gap: Duration::from_millis(500),
            producers_for: Duration::from_secs(5),
            time_bound: Duration::from_secs(240),
            payload_bytes: 0,
        }
    }

    pub fn quick(events: Option<u64>) -> Self {
        Sizes {
            events: events.unwrap_or(2_000),
            latency_rate: 1_000,
            latency_for: Duration::from_secs(2),
            latency_warmup: 10,
            overhead_calls: 2_000,
            swaps: 2,
            swap_load_per_sec: 500,
            swap_gap: Duration::from_millis(300),
            producers_for: Duration::from_secs(1),
            time_bound: Duration::from_secs(60),
            payload_bytes: 0,
        }
    }
}
