//! `herald-bench`: what Herald costs, on SQLite and on Postgres, measured in one process
//! against real stores, the real wasm plugins and a real loopback HTTP receiver.
//!
//! Figures go to stdout as Markdown (paste them into BENCHMARKS.md); progress bars and
//! errors go to stderr. `tests/bench` builds the plugins and runs this in release.

/// The allocator `herald` itself runs with (host/src/main.rs), so the figures are its.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod cpu;
mod progress;
mod report;
mod rss;
mod scenarios;
mod setup;
mod sink;
mod tuning;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use scenarios::{Ctx, Scenario};
use setup::Backend;
use tuning::Sizes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    about = "Benchmark Herald: relay ceiling, drains, latency, plugin overhead, hot swap",
    after_long_help = "\
Scenarios:
  ceiling   raw SQL relay without Herald on the same database (claim 100, mark done, commit)
  ledger-ceiling
            the same keeping a ledger under a lease: each transaction settles the 100
            rows leased before, with a delivery and an attempt each, and leases 100 more
  batch-ledger
            the same with a claim row and a ledger row per batch instead of per event
            (Postgres only; not Herald's ledger, what one would cost)
  noop      drain N preloaded events through the no-op plugin, with peak RSS
  webhook   the same through the webhook plugin to a loopback HTTP sink
  latency   created -> delivered at a steady 1,000 events/s while Herald runs
  overhead  per-event cost of the wasm runtime vs a native no-op handler
  hotswap   deploy alternating plugin builds under load: time to serve, failed attempts
  neighbour the no-op drain beside a route whose plugin faults: does its rate hold?

Postgres: HERALD_BENCH_PG, else HERALD_TEST_PG, else postgres://postgres@127.0.0.1:5432/test;
each scenario gets a schema of its own, dropped afterwards. Plugins: target/plugins (run
tests/build-plugins), or HERALD_BENCH_PLUGINS.

Examples:
  tests/bench                                   # everything, both backends
  tests/bench --quick                           # smoke run in seconds
  tests/bench --backend postgres --scenario noop,webhook --events 20000"
)]
struct Args {
    /// Which store(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendArg,
    /// Scenarios to run, comma-separated; all when not given.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Events of the ceiling and of each drain [default: 100000, 2000 with --quick].
    #[arg(long)]
    events: Option<u64>,
    /// Shrink everything (2,000 events, 2 s of latency, 2 swaps) for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Pad each preloaded event's data (the ceilings' and the drains' events) with a
    /// string of this many bytes, for payloads the size of real ones [default: none,
    /// `{"seq": n}`].
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Herald's warnings and errors (a refused plugin, a failed pass) on stderr; sqlx's
    // "slow statement" notices are the benchmark's own load, not news.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    match run(args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("herald-bench: {failures} measurement(s) failed; see the tables above");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("herald-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<usize> {
    let mut sizes = if args.quick {
        Sizes::quick(args.events)
    } else {
        Sizes::full(args.events.unwrap_or(100_000))
    };
    sizes.payload_bytes = args.payload_bytes;
    if sizes.events == 0 {
        anyhow::bail!("--events must be at least 1");
    }
    let backends: Vec<Backend> = match args.backend {
        BackendArg::Sqlite => vec![Backend::Sqlite],
        BackendArg::Postgres => vec![Backend::Postgres],
        BackendArg::Both => vec![Backend::Sqlite, Backend::Postgres],
    };
    let mut selected = if args.scenario.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenario.clone()
    };
    selected.sort_unstable();
    selected.dedup();

    let plugins = setup::built_plugins_dir()?;
    let postgres = if backends.contains(&Backend::Postgres) {
        // Fail before any work when Postgres is not there.
        Some(setup::pg_version(&setup::pg_base_url()).await?)
    } else {
        None
    };
    let sqlite = setup::sqlite_version().await.ok();
    print_header(
        &args,
        &sizes,
        &backends,
        postgres.as_deref(),
        sqlite.as_deref(),
    );

    let mut ctx = Ctx {
        sizes,
        plugins,
        ceiling: Default::default(),
        ledger_ceiling: Default::default(),
        failures: 0,
    };
    for scenario in selected {
        let table = scenarios::run(&mut ctx, scenario, &backends).await;
        table.print();
    }
    Ok(ctx.failures)
}

fn print_header(
    args: &Args,
    sizes: &Sizes,
    backends: &[Backend],
    postgres: Option<&str>,
    sqlite: Option<&str>,
) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
    let memory = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|kib| kib.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("?".to_string(), |kib| {
            format!("{:.0} GiB", kib / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    println!("# Herald benchmark\n");
    println!("- machine: {cores} cores ({cpu}), {memory} RAM, Linux {kernel}",);
    println!(
        "- herald {}, {} build, {}",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "DEBUG (figures not representative; use --release)"
        } else {
            "release"
        },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
    println!(
        "- backends: {}; SQLite {} (WAL; synchronous=FULL, NORMAL for fan-out and claims, as Herald runs it); Postgres {}",
        names.join(", "),
        sqlite.unwrap_or("?"),
        postgres.unwrap_or("not measured")
    );
    let payload = match sizes.payload_bytes {
        0 => String::new(),
        bytes => format!(
            "; each preloaded event's data padded with {} bytes (--payload-bytes)",
            report::count(bytes as u64)
        ),
    };
    println!(
        "- run: {}, {} events per drain{payload}",
        if args.quick { "--quick" } else { "full" },
        report::count(sizes.events)
    );
    println!();
}

/// The value of the first `name: value` line of a /proc file.
fn proc_field(file: &str, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.split_once(':'))
        .map(|(_, value)| value.trim().to_string())
}
