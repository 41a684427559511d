//! Prometheus metrics of a serving Herald, rendered by the admin server's `/metrics`.
//!
//! The recorder is process-global (the `metrics` facade's), installed once by the first
//! dispatcher or scrape; before that, and in commands that never dispatch, recording is a
//! no-op. Labels are route and plugin names and small fixed sets only, never event ids or
//! entities, so the number of series stays bounded by the config.
//!
//! What each metric is for:
//! - `herald_deliveries_claimed_total{route}`: work taken on per route; rate vs. attempts
//!   shows claims whose outcome never got recorded.
//! - `herald_claims_total{result}`: claim round trips to the store, by whether they took
//!   work (found) or not (empty); a steady rate of empty claims is load on the database
//!   for nothing (each is planned and run), and should come only from the poll interval.
//! - `herald_attempts_total{route,plugin,outcome}`: recorded attempt outcomes (delivered,
//!   retry, dead, skipped); the delivery success rate and dead-letter alarms.
//! - `herald_outcomes_lost_total{route,reason}`: attempts whose outcome was not recorded
//!   (lease lost, store error) and will run again; a lease too short or a failing store.
//! - `herald_attempt_duration_seconds{route,plugin}`: how long one attempt takes, plugin
//!   and its HTTP included; to size time limits and spot slow receivers.
//! - `herald_delivery_lag_seconds{route}`: event creation to recorded delivery, retries
//!   included; the end-to-end latency producers experience.
//! - `herald_events_fanned_out_total{result}`: events turned into deliveries (routed) or
//!   set aside (skipped: no route, duplicate, malformed); a jump in skipped means a route
//!   is missing.
//! - `herald_plugin_faults_total{route,plugin,kind}`: plugins that trapped, ran past their
//!   time or memory limit, or could not be instantiated: plugin bugs, not receiver errors.
//! - `herald_plugin_deploys_total{plugin,result}`: hot deploys done or refused.
//! - `herald_events_ready`: READY events, the work not yet finished; a growing value means
//!   Herald falls behind its producers.
//! - `herald_deliveries_waiting_retry`: deliveries waiting for a retry; receivers failing.
//! - `herald_plugin_quarantined{plugin}`: 1 while a plugin's routes are paused after
//!   consecutive faults (`herald plugins resume NAME` lifts it); alert on any 1.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::runtime::PluginFault;
use crate::store::{AttemptOutcome, Backlog, EventStore, FanOutReport, StoreResult};

/// The `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const CLAIMED: &str = "herald_deliveries_claimed_total";
const CLAIMS: &str = "herald_claims_total";
const ATTEMPTS: &str = "herald_attempts_total";
const OUTCOMES_LOST: &str = "herald_outcomes_lost_total";
const ATTEMPT_DURATION: &str = "herald_attempt_duration_seconds";
const DELIVERY_LAG: &str = "herald_delivery_lag_seconds";
const FANNED_OUT: &str = "herald_events_fanned_out_total";
const PLUGIN_FAULTS: &str = "herald_plugin_faults_total";
const PLUGIN_DEPLOYS: &str = "herald_plugin_deploys_total";
const EVENTS_READY: &str = "herald_events_ready";
const WAITING_RETRY: &str = "herald_deliveries_waiting_retry";
const PLUGIN_QUARANTINED: &str = "herald_plugin_quarantined";

/// From a fast in-memory plugin to a slow webhook at its time limit.
const ATTEMPT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// From an idle instance woken by a notification to a delivery retried for a day.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
    86400.0,
];

/// Histograms are only kept in memory between scrapes and upkeeps; this bounds that.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the Prometheus recorder as this process's global recorder, once. `None` when
/// another recorder was installed first (an embedding program's): Herald then records into
/// that one and has nothing to render itself.
pub fn install() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| match builder().and_then(PrometheusBuilder::install_recorder) {
            Ok(handle) => {
                describe();
                start_upkeep(handle.clone());
                Some(handle)
            }
            Err(err) => {
                tracing::warn!(%err, "metrics recorder not installed; /metrics will be unavailable");
                None
            }
        })
        .as_ref()
}

fn builder() -> Result<PrometheusBuilder, BuildError> {
    // Without buckets the exporter renders histograms as summaries, which cannot be
    // aggregated across instances.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(ATTEMPT_DURATION.into()), ATTEMPT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DELIVERY_LAG.into()), LAG_BUCKETS)
}

fn describe() {
    describe_counter!(CLAIMED, "Deliveries claimed (leased) by this instance.");
    describe_counter!(
        CLAIMS,
        "Claim round trips to the store, by result (found: took work, empty: found none)."
    );
    describe_counter!(
        ATTEMPTS,
        "Attempts whose outcome was recorded, by outcome (delivered, retry, dead, skipped)."
    );
    describe_counter!(
        OUTCOMES_LOST,
        "Attempts whose outcome could not be recorded (lease_lost, store_error); they run again."
    );
    describe_histogram!(
        ATTEMPT_DURATION,
        "Duration of one attempt, plugin call included, in seconds."
    );
    describe_histogram!(
        DELIVERY_LAG,
        "Time from an event's creation to its recorded delivery, in seconds."
    );
    describe_counter!(
        FANNED_OUT,
        "Events fanned out, by result (routed, skipped, duplicate, malformed)."
    );
    describe_counter!(
        PLUGIN_FAULTS,
        "Plugin calls that ended without an outcome, by kind (trap, panic, time_limit, memory_limit, capability_limit, emits_refused, instantiate)."
    );
    describe_counter!(
        PLUGIN_DEPLOYS,
        "Plugin hot deploys, by result (deployed, refused)."
    );
    describe_gauge!(EVENTS_READY, "Events still READY in the store.");
    describe_gauge!(WAITING_RETRY, "Deliveries waiting for a retry.");
    describe_gauge!(
        PLUGIN_QUARANTINED,
        "1 while a plugin is quarantined (its routes paused after consecutive faults)."
    );
}

/// The `install_recorder` recorder has no upkeep task of its own; without one, histogram
/// samples pile up in memory while nobody scrapes. A thread, because the recorder outlives
/// any runtime that may have installed it.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("herald-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(err) = spawned {
        tracing::warn!(%err, "no metrics upkeep thread; histograms are drained on scrape only");
    }
}

/// This process's metrics in the Prometheus text format, with the backlog gauges sampled
/// now. `None` when the recorder is not Herald's (see [`install`]).
pub async fn render(store: &dyn EventStore) -> Option<String> {
    let handle = install()?;
    match count_backlog(store).await {
        Ok(Some(backlog)) => set_backlog(&backlog),
        Ok(None) => {}
        // A scrape still shows everything else; the gauges keep their last value.
        Err(err) => tracing::warn!(%err, "cannot count the backlog for /metrics"),
    }
    Some(handle.render())
}

/// Counted at scrape time, by index look-ups that grow with the backlog (each store's
/// `backlog`).
async fn count_backlog(store: &dyn EventStore) -> StoreResult<Option<Backlog>> {
    store.backlog().await.map(Some)
}

pub fn set_backlog(backlog: &Backlog) {
    gauge!(EVENTS_READY).set(backlog.ready_events as f64);
    gauge!(WAITING_RETRY).set(backlog.waiting_retry as f64);
}

pub fn fanned_out(report: &FanOutReport) {
    for (result, events) in [
        ("routed", report.routed),
        ("skipped", report.skipped),
        ("duplicate", report.duplicates),
        ("malformed", report.malformed),
    ] {
        if events > 0 {
            counter!(FANNED_OUT, "result" => result).increment(events as u64);
        }
    }
}

/// One claim round trip, which took `taken` deliveries.
pub fn claim_made(taken: usize) {
    let result = if taken > 0 { "found" } else { "empty" };
    counter!(CLAIMS, "result" => result).increment(1);
}

pub fn claimed(route: &str, count: usize) {
    counter!(CLAIMED, "route" => route.to_owned()).increment(count as u64);
}

pub fn attempt_duration(route: &str, plugin: &str, duration: Duration) {
    histogram!(ATTEMPT_DURATION, "route" => route.to_owned(), "plugin" => plugin.to_owned())
        .record(duration.as_secs_f64());
}

/// An attempt whose outcome the store committed; a delivered one also records its lag
/// from the event's creation.
pub fn attempt_recorded(
    route: &str,
    plugin: &str,
    outcome: AttemptOutcome,
    created_at: DateTime<Utc>,
) {
    counter!(
        ATTEMPTS,
        "route" => route.to_owned(),
        "plugin" => plugin.to_owned(),
        "outcome" => outcome_label(outcome),
    )
    .increment(1);
    if outcome == AttemptOutcome::Delivered {
        // `created_at` is the database's clock: a host clock behind it is not negative lag.
        let lag = (Utc::now() - created_at).to_std().unwrap_or_default();
        histogram!(DELIVERY_LAG, "route" => route.to_owned()).record(lag.as_secs_f64());
    }
}

fn outcome_label(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry => "retry",
        AttemptOutcome::Dead => "dead",
        AttemptOutcome::Skipped => "skipped",
    }
}

/// Why an attempt's outcome was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostOutcome {
    LeaseLost,
    StoreError,
}

pub fn outcome_lost(route: &str, reason: LostOutcome) {
    let reason = match reason {
        LostOutcome::LeaseLost => "lease_lost",
        LostOutcome::StoreError => "store_error",
    };
    counter!(OUTCOMES_LOST, "route" => route.to_owned(), "reason" => reason).increment(1);
}

pub fn plugin_fault(route: &str, plugin: &str, fault: &PluginFault) {
    let kind = match fault {
        PluginFault::Trap(_) => "trap",
        PluginFault::Panic(_) => "panic",
        PluginFault::CapabilityLimit(_) => "capability_limit",
        PluginFault::EmitsRefused { .. } => "emits_refused",
        PluginFault::TimeLimit(_) => "time_limit",
        PluginFault::MemoryLimit { .. } => "memory_limit",
        PluginFault::Instantiate(_) => "instantiate",
    };
    counter!(
        PLUGIN_FAULTS,
        "route" => route.to_owned(),
        "plugin" => plugin.to_owned(),
        "kind" => kind,
    )
    .increment(1);
}

pub fn plugin_quarantined(plugin: &str, quarantined: bool) {
    gauge!(PLUGIN_QUARANTINED, "plugin" => plugin.to_owned()).set(if quarantined {
        1.0
    } else {
        0.0
    });
}

/// How a hot deploy of a plugin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployResult {
    /// Checked and put in service.
    Deployed,
    /// Refused by the checks; the previous version stays in service.
    Refused,
}

pub fn plugin_deployed(plugin: &str, result: DeployResult) {
    let result = match result {
        DeployResult::Deployed => "deployed",
        DeployResult::Refused => "refused",
    };
    counter!(PLUGIN_DEPLOYS, "plugin" => plugin.to_owned(), "result" => result).increment(1);
}
