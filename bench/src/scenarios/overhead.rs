//! Scenario 5, plugin overhead: the per-event cost of running a delivery through the wasm
//! runtime (a fresh instance per event) against a native no-op handler called through a
//! trait object, in the same process, one event at a time; and through `call_batch`,
//! where one instance serves several events.

use std::collections::BTreeMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald::runtime::{
    CallLimits, CallReport, EngineSettings, Event, LoadedPlugin, Outcome, PluginRuntime, RouteGrant,
};

use super::Ctx;
use crate::report::{count, micros, ratio, Table};
use crate::tuning::OVERHEAD_CHUNK;

/// A native delivery handler behind dynamic dispatch, as a host without wasm would call it.
type NativeHandler =
    Box<dyn Fn(Event) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

fn native_noop() -> NativeHandler {
    Box::new(|event| {
        Box::pin(async move {
            black_box(&event);
            Outcome::Delivered(None)
        })
    })
}

pub async fn table(ctx: &mut Ctx) -> Table {
    let n = ctx.sizes.overhead_calls;
    let mut table = Table::new(
        format!(
            "5. Plugin overhead: wasm runtime vs a native no-op handler ({} events, sequential, no database)",
            count(n as u64)
        ),
        &["path", "µs/event", "vs native"],
    );
    table.note(format!(
        "`PluginRuntime::call` runs each event in a fresh instance and store; `call_batch` runs \
         chunks of {OVERHEAD_CHUNK}, an instance serving several events in turn; the native \
         handler is an async fn behind a `Box<dyn Fn>` returning a boxed future. Event values \
         are built before the clock starts."
    ));
    match measure(&ctx.plugins, n).await {
        Ok(rows) => {
            let native = rows
                .iter()
                .find(|(path, _)| path.starts_with("native"))
                .and_then(|(_, us)| *us);
            for (path, us) in rows {
                let (cell, versus) = match (us, native) {
                    (Some(us), Some(native)) => (micros(us), ratio(us / native)),
                    (Some(us), None) => (micros(us), "-".to_string()),
                    (None, _) => ("n/a".to_string(), "-".to_string()),
                };
                table.row(vec![path, cell, versus]);
            }
        }
        Err(err) => ctx.fail(&mut table, "overhead", &err),
    }
    table
}

fn events(n: usize) -> Vec<Event> {
    let now = chrono::Utc::now().timestamp_millis();
    (0..n as i64)
        .map(|id| Event {
            id,
            event_type: "bench.overhead".into(),
            target: None,
            entity_type: "bench".into(),
            entity_id: (id % 1000).to_string(),
            data: format!("{{\"seq\":{id}}}"),
            headers: Vec::new(),
            created_at_ms: now,
            now_ms: now,
            attempt: 1,
            idempotency_key: format!("herald-{id}-bench-overhead"),
            route: "bench-overhead".into(),
        })
        .collect()
}

fn delivered(report: &CallReport) -> bool {
    matches!(report.outcome, Ok(Outcome::Delivered(_)))
}

/// µs/event per path; `None` where the path is not available.
async fn measure(
    plugins: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<(String, Option<f64>)>> {
    let runtime = PluginRuntime::new(EngineSettings::default()).context("starting the runtime")?;
    let file = plugins.join("noop.wasm");
    let plugin = runtime
        .load_file(&file)
        .await
        .with_context(|| format!("loading {}", file.display()))?;
    let grant = Arc::new(RouteGrant {
        route: "bench-overhead".into(),
        plugin: "noop".into(),
        config: BTreeMap::new(),
        http: None,
        limits: CallLimits::default(),
    });
    let per_event = |elapsed: Duration| elapsed.as_secs_f64() * 1e6 / n as f64;

    // Warm-up: first instantiations, lazily initialised host parts.
    for event in events(200.min(n)) {
        let report = runtime.call(&plugin, grant.clone(), event).await;
        if !delivered(&report) {
            bail!("noop did not deliver: {:?}", report.outcome.err());
        }
    }

    let handler = native_noop();
    let batch = events(n);
    let started = Instant::now();
    let mut ok = 0usize;
    for event in batch {
        if matches!(handler(event).await, Outcome::Delivered(_)) {
            ok += 1;
        }
    }
    let native = per_event(started.elapsed());
    check(ok, n, "native")?;

    let spinner = crate::progress::spinner("overhead wasm call");
    let batch = events(n);
    let started = Instant::now();
    let mut ok = 0usize;
    for event in batch {
        if delivered(&runtime.call(&plugin, grant.clone(), event).await) {
            ok += 1;
        }
    }
    let single = per_event(started.elapsed());
    spinner.finish_and_clear();
    check(ok, n, "call")?;

    let batched = call_batch(&runtime, &plugin, &grant, events(n)).await;
    check(batched.delivered, n, "call_batch")?;
    let batched = (batched.label, Some(per_event(batched.elapsed)));

    Ok(vec![
        ("native no-op (dyn Fn, async)".to_string(), Some(native)),
        (
            "wasm `call` (fresh instance per event)".to_string(),
            Some(single),
        ),
        batched,
    ])
}

fn check(delivered: usize, n: usize, path: &str) -> anyhow::Result<()> {
    if delivered != n {
        bail!("{path}: {delivered} of {n} events delivered");
    }
    Ok(())
}

/// What the `call_batch` run measured.
struct Batched {
    /// The row's name, with how many events one instance serves.
    label: String,
    elapsed: Duration,
    delivered: usize,
}

/// Time `call_batch` over chunks of [`OVERHEAD_CHUNK`] events.
async fn call_batch(
    runtime: &PluginRuntime,
    plugin: &LoadedPlugin,
    grant: &Arc<RouteGrant>,
    events: Vec<Event>,
) -> Batched {
    let mut chunks: Vec<Vec<Event>> = Vec::new();
    let mut rest = events.into_iter().peekable();
    while rest.peek().is_some() {
        chunks.push(rest.by_ref().take(OVERHEAD_CHUNK).collect());
    }
    let spinner = crate::progress::spinner("overhead wasm call_batch");
    let started = Instant::now();
    let mut ok = 0usize;
    for chunk in chunks {
        let reports = runtime.call_batch(plugin, grant.clone(), chunk).await;
        ok += reports.iter().filter(|report| delivered(report)).count();
    }
    let elapsed = started.elapsed();
    spinner.finish_and_clear();
    Batched {
        label: format!(
            "wasm `call_batch` (chunks of {OVERHEAD_CHUNK}, an instance serves up to {})",
            grant.limits.events_per_instance
        ),
        elapsed,
        delivered: ok,
    }
}
