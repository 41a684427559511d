//! Dispatch: fan new events out to routes, lease due deliveries, run each in its route's
//! plugin, and record the outcome, with the route's retry policy applied.
//!
//! Per-entity order needs nothing here: the store only hands out the earliest open
//! delivery of an entity on an ordered route, so every claimed delivery may run at once.

mod outcome;
mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;

pub use outcome::dead_notice;
pub use retry::{RetryDecision, RetryPolicy};

use crate::router::Router;
use crate::runtime::{PluginRegistry, PluginRuntime, RouteGrant};
use crate::store::{
    ClaimRequest, ClaimedDelivery, Completion, CompletionResult, EventStore, Outcome, StoreError,
};

/// A configured route as dispatch needs it.
pub struct Route {
    pub name: String,
    pub plugin: String,
    pub grant: Arc<RouteGrant>,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Recorded as lease owner and in every attempt row.
    pub instance_id: String,
    /// Events fanned out, and deliveries claimed, per round trip.
    pub batch_size: u32,
    /// Plugin calls in flight at once.
    pub concurrency: usize,
    /// How long a claim is held; longer than any route's time limit.
    pub lease: Duration,
    /// Sleep between polls when there is nothing to do.
    pub poll_interval: Duration,
    /// Wake on the store's new-event notifications (Postgres LISTEN/NOTIFY) instead of
    /// waiting for the next poll.
    pub listen: bool,
    /// On shutdown, how long attempts in flight may take to finish.
    pub shutdown_deadline: Duration,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            instance_id: default_instance_id(),
            batch_size: 100,
            concurrency: 32,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            listen: true,
            shutdown_deadline: Duration::from_secs(30),
        }
    }
}

/// `hostname-pid`: unique among live instances, readable in the attempts log.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".to_string());
    format!("{host}-{}", std::process::id())
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub fanned_out: usize,
    pub claimed: usize,
}

impl PassReport {
    pub fn is_idle(&self) -> bool {
        self.fanned_out == 0 && self.claimed == 0
    }
}

/// The routes in force: how events fan out, and what each route runs with.
pub struct RouteTable {
    pub router: Router,
    pub routes: Arc<HashMap<String, Route>>,
}

impl RouteTable {
    pub fn new(router: Router, routes: HashMap<String, Route>) -> Self {
        RouteTable {
            router,
            routes: Arc::new(routes),
        }
    }
}

/// Swaps the route table of a running dispatcher (config reload). A pass or a delivery
/// takes the table once, so it never sees half of an old and half of a new config.
#[derive(Clone)]
pub struct RouteSwitch(Arc<std::sync::RwLock<Arc<RouteTable>>>);

impl RouteSwitch {
    fn new(table: RouteTable) -> Self {
        RouteSwitch(Arc::new(std::sync::RwLock::new(Arc::new(table))))
    }

    pub fn current(&self) -> Arc<RouteTable> {
        match self.0.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, table: RouteTable) {
        let mut current = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Arc::new(table);
    }
}

pub struct Dispatcher {
    store: Arc<dyn EventStore>,
    table: RouteSwitch,
    plugins: Arc<PluginRegistry>,
    runtime: Arc<PluginRuntime>,
    settings: DispatchSettings,
    slots: Arc<Semaphore>,
    /// Deliveries this instance is running, whose leases the heartbeat renews.
    in_flight: Arc<Mutex<HashSet<i64>>>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn EventStore>,
        table: RouteTable,
        plugins: Arc<PluginRegistry>,
        runtime: Arc<PluginRuntime>,
        settings: DispatchSettings,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        // Before the first delivery, so no count is lost to the no-op recorder.
        crate::metrics::install();
        Dispatcher {
            store,
            table: RouteSwitch::new(table),
            plugins,
            runtime,
            settings,
            slots,
            in_flight: Arc::default(),
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn settings(&self) -> &DispatchSettings {
        &self.settings
    }

    /// A handle that replaces the routes of this dispatcher while it runs.
    pub fn route_switch(&self) -> RouteSwitch {
        self.table.clone()
    }

    /// Fan out, claim as many deliveries as there are free slots, and start them. Returns
    /// once they are started, not finished.
    pub async fn pass(&self) -> Result<PassReport, StoreError> {
        let table = self.table.current();
        let fanned = self
            .store
            .fan_out(self.settings.batch_size, &|head| {
                table.router.plans_for(head)
            })
            .await?;
        crate::metrics::fanned_out(&fanned);
        let free = self
            .slots
            .available_permits()
            .min(self.settings.batch_size as usize);
        if free == 0 {
            return Ok(PassReport {
                fanned_out: fanned.events(),
                claimed: 0,
            });
        }
        let claimed = self
            .store
            .claim(&ClaimRequest {
                owner: self.settings.instance_id.clone(),
                limit: free as u32,
                lease: self.settings.lease,
            })
            .await?;
        let report = PassReport {
            fanned_out: fanned.events(),
            claimed: claimed.len(),
        };
        for delivery in claimed {
            crate::metrics::claimed(&delivery.route);
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                break;
            };
            let worker = self.worker();
            let in_flight = InFlight::enter(&self.in_flight, delivery.delivery_id);
            let span = tracing::info_span!(
                "delivery",
                event_id = delivery.event.event_id,
                route = %delivery.route,
                attempt = delivery.attempt,
                plugin = tracing::field::Empty,
                version = tracing::field::Empty,
            );
            tokio::spawn(
                async move {
                    worker.deliver(delivery).await;
                    drop(in_flight);
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Ok(report)
    }

    /// Wait until every started delivery has finished.
    pub async fn wait_idle(&self) {
        let all = self.settings.concurrency.max(1) as u32;
        if let Ok(permits) = self.slots.acquire_many(all).await {
            drop(permits);
        }
    }

    /// Run passes until nothing is left to fan out or claim and nothing is in flight;
    /// deliveries waiting for a later retry are left waiting. For the CLI and tests.
    pub async fn drain(&self) -> Result<(), StoreError> {
        loop {
            let report = self.pass().await?;
            if report.is_idle() {
                self.wait_idle().await;
                if self.pass().await?.is_idle() {
                    self.wait_idle().await;
                    return Ok(());
                }
            } else if report.claimed == 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Dispatch until `shutdown` turns true, then let in-flight deliveries finish. Wakes on
    /// the store's notifications when it has them, and polls regardless: a lost
    /// notification costs latency, never an event.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        if self.settings.listen {
            match self
                .store
                .watch_new_events(Arc::downgrade(&self.wake))
                .await
            {
                Ok(true) => {
                    tracing::info!("woken by new-event notifications; polling as a fallback")
                }
                Ok(false) => tracing::debug!("the store sends no notifications; polling"),
                Err(err) => tracing::warn!(%err, "cannot listen for new events; polling"),
            }
        }
        let heartbeat = tokio::spawn(heartbeat(
            self.store.clone(),
            self.settings.clone(),
            self.in_flight.clone(),
            shutdown.clone(),
        ));
        while !*shutdown.borrow() {
            let idle = match self.pass().await {
                Ok(report) => report.is_idle(),
                Err(err) => {
                    tracing::error!(%err, "dispatch pass failed; retrying after the poll interval");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
            } else if self.slots.available_permits() == 0 {
                // Every slot is busy: wait for one to free up, not for the poll interval.
                tokio::select! {
                    permit = self.slots.acquire() => drop(permit),
                    _ = shutdown.changed() => {}
                }
            }
        }
        self.finish_in_flight().await;
        let _ = heartbeat.await;
        if let Err(err) = self.store.deregister(&self.settings.instance_id).await {
            tracing::warn!(%err, "could not deregister this instance");
        }
    }

    /// Let running attempts finish and record their outcomes, up to the shutdown
    /// deadline; then give back the leases of those still running, so another instance
    /// takes them at once instead of after the lease expires.
    async fn finish_in_flight(&self) {
        let deadline = self.settings.shutdown_deadline;
        if tokio::time::timeout(deadline, self.wait_idle())
            .await
            .is_ok()
        {
            return;
        }
        let unfinished: Vec<i64> = lock(&self.in_flight).iter().copied().collect();
        match self
            .store
            .release(&self.settings.instance_id, &unfinished)
            .await
        {
            Ok(released) => tracing::warn!(
                released,
                "attempts still running after the shutdown deadline; their leases are released"
            ),
            Err(err) => tracing::error!(%err, "could not release leases; they expire on their own"),
        }
    }

    fn worker(&self) -> Worker {
        Worker {
            store: self.store.clone(),
            routes: self.table.current().routes.clone(),
            plugins: self.plugins.clone(),
            runtime: self.runtime.clone(),
            owner: self.settings.instance_id.clone(),
        }
    }
}

/// Marks a delivery as running on this instance for as long as it lives.
struct InFlight {
    set: Arc<Mutex<HashSet<i64>>>,
    delivery_id: i64,
}

impl InFlight {
    fn enter(set: &Arc<Mutex<HashSet<i64>>>, delivery_id: i64) -> Self {
        lock(set).insert(delivery_id);
        InFlight {
            set: set.clone(),
            delivery_id,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.delivery_id);
    }
}

fn lock(set: &Mutex<HashSet<i64>>) -> std::sync::MutexGuard<'_, HashSet<i64>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every third of a lease: extend the leases of the deliveries still running here, so
/// slow work is not taken over by another instance, and tell the store this instance is
/// alive (for `herald instances`).
async fn heartbeat(
    store: Arc<dyn EventStore>,
    settings: DispatchSettings,
    in_flight: Arc<Mutex<HashSet<i64>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = (settings.lease / 3).max(Duration::from_millis(100));
    let version = env!("CARGO_PKG_VERSION");
    loop {
        if let Err(err) = store.heartbeat(&settings.instance_id, version).await {
            tracing::warn!(%err, "heartbeat failed");
        }
        let running: Vec<i64> = lock(&in_flight).iter().copied().collect();
        if let Err(err) = store
            .renew_leases(&settings.instance_id, &running, settings.lease)
            .await
        {
            tracing::warn!(%err, "could not renew leases; another instance may take over slow deliveries");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Everything one delivery needs, owned so it can run on its own task.
struct Worker {
    store: Arc<dyn EventStore>,
    routes: Arc<HashMap<String, Route>>,
    plugins: Arc<PluginRegistry>,
    runtime: Arc<PluginRuntime>,
    owner: String,
}

impl Worker {
    async fn deliver(&self, delivery: ClaimedDelivery) {
        let started_at = Utc::now();
        let clock = Instant::now();
        let (outcome, plugin_version) = self.decide(&delivery).await;
        let duration = clock.elapsed();
        // A route this instance does not configure has no plugin: an empty label.
        let plugin = self
            .routes
            .get(&delivery.route)
            .map_or("", |route| route.plugin.as_str());
        let attempt_outcome = outcome.attempt_outcome();
        crate::metrics::attempt_duration(&delivery.route, plugin, duration);
        let host_events = match &outcome {
            Outcome::Dead { reason } => dead_notice(&delivery, reason).into_iter().collect(),
            _ => Vec::new(),
        };
        tracing::debug!(outcome = ?outcome.attempt_outcome(), detail = ?outcome.detail(), "attempt finished");
        let completion = Completion {
            delivery_id: delivery.delivery_id,
            owner: self.owner.clone(),
            attempt: delivery.attempt,
            outcome,
            plugin_version,
            started_at,
            duration,
            host_events,
        };
        match self.store.complete(&[completion]).await {
            Ok(results) if results.first() == Some(&CompletionResult::LeaseLost) => {
                tracing::warn!("lease lost before the outcome was recorded; another instance owns the delivery now");
                crate::metrics::outcome_lost(
                    &delivery.route,
                    crate::metrics::LostOutcome::LeaseLost,
                );
            }
            Ok(_) => crate::metrics::attempt_recorded(
                &delivery.route,
                plugin,
                attempt_outcome,
                delivery.event.created_at,
            ),
            // The lease runs out and the delivery is claimed again: at least once, and the
            // sink dedups on the idempotency key.
            Err(err) => {
                tracing::error!(%err, "could not record the outcome; the delivery will run again");
                crate::metrics::outcome_lost(
                    &delivery.route,
                    crate::metrics::LostOutcome::StoreError,
                );
            }
        }
    }

    async fn decide(&self, delivery: &ClaimedDelivery) -> (Outcome, Option<String>) {
        let Some(route) = self.routes.get(&delivery.route) else {
            return (
                Outcome::Retry {
                    after: Duration::from_secs(60),
                    reason: format!(
                        "route '{}' is not configured on this instance",
                        delivery.route
                    ),
                },
                None,
            );
        };
        if let Some(done) = &delivery.already_completed {
            return (
                Outcome::Delivered {
                    receipt: Some(format!(
                        "not run again: key '{}' completed at {} (idempotency ledger)",
                        done.idempotency_key, done.completed_at
                    )),
                    emitted: Vec::new(),
                },
                None,
            );
        }
        let Some(plugin) = self.plugins.get(&route.plugin) else {
            return (
                route_failure(
                    route,
                    delivery,
                    format!("plugin '{}' is not loaded", route.plugin),
                    None,
                ),
                None,
            );
        };
        let span = tracing::Span::current();
        span.record("plugin", plugin.name.as_str());
        span.record("version", plugin.short_version());
        let event = outcome::plugin_event(delivery);
        let report = self.runtime.call(&plugin, route.grant.clone(), event).await;
        let outcome = outcome::store_outcome(route, delivery, report);
        (outcome, Some(plugin.version.clone()))
    }
}

/// A failed attempt under the route's retry policy: retry later or give up.
fn route_failure(
    route: &Route,
    delivery: &ClaimedDelivery,
    reason: String,
    requested: Option<Duration>,
) -> Outcome {
    let age = (Utc::now() - delivery.event.created_at)
        .to_std()
        .unwrap_or_default();
    let attempt = u32::try_from(delivery.attempt).unwrap_or(u32::MAX);
    match route.retry.after_failure(attempt, age, requested) {
        RetryDecision::RetryAfter(after) => Outcome::Retry { after, reason },
        RetryDecision::GiveUp(why) => Outcome::Dead {
            reason: format!("{reason}; {why}"),
        },
    }
}
