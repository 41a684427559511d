//! Dispatch: fan new events out to routes, lease due deliveries, run each in its route's
//! plugin, and record the outcome, with the route's retry policy applied.
//!
//! Per-entity order needs nothing here for claimed deliveries: the store only hands out
//! the earliest open delivery of an entity on an ordered route, so every claimed delivery
//! may run at once. Deliveries fan-out leased behind a lane this instance holds wait in
//! [`lane_queue`] until the one before them closes.

mod lane_queue;
mod outcome;
mod quarantine;
mod recorder;
mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;

pub use outcome::dead_notice;
pub use retry::{RetryDecision, RetryPolicy};

use lane_queue::{Effects, Ended, LaneQueue};
use quarantine::Quarantines;
use recorder::Recorder;

use crate::router::Router;
use crate::runtime::{Event as PluginEvent, PluginRegistry, PluginRuntime, RouteGrant};
use crate::store::{
    ClaimRequest, ClaimedDelivery, Completion, CompletionResult, DeliveryStatus, EventStore,
    FanOutReport, FanOutRequest, Outcome, QueuedDelivery, StoreError, WakeUpRequest,
};

/// Most deliveries one task runs in a row (in one plugin instance, when the route lets an
/// instance serve that many): enough to spread instantiation thin, few enough that a slow
/// plugin does not hold a long queue of leases.
const DELIVERIES_PER_TASK: usize = 16;

/// Most deliveries fan-out leases behind lanes this instance holds, per slot: as many as
/// the slots run in a row, so the queue feeds every slot for a round without a claim.
const QUEUED_PER_SLOT: usize = DELIVERIES_PER_TASK;

/// How long a claim waits for more running tasks to finish once one has (see
/// `gather_finished`). Short against a delivery's latency, long against a commit.
const GATHER_WINDOW: Duration = Duration::from_millis(2);

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
    /// Consecutive faults (traps, panics, limits broken) after which a plugin is
    /// quarantined and its routes pause; 0 never quarantines.
    pub quarantine_after: u32,
    /// Events whose payload or headers are larger are DEAD at fan-out, unread.
    pub max_event_bytes: u64,
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
            quarantine_after: 10,
            max_event_bytes: crate::store::DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// The first and the longest pause between two requests for wake-ups that found a
/// producer in flight which may have missed the request.
const FIRST_WAKE_UP_PAUSE: Duration = Duration::from_micros(100);
const LAST_WAKE_UP_PAUSE: Duration = Duration::from_millis(5);

/// What the fan-out loop does once it asked producers for wake-ups.
enum AfterAsking {
    /// Look for new events once more, then sleep.
    Look,
    /// A wake-up came while waiting: fan out at once.
    Woken,
    /// Sleep: nothing was asked (or asking failed, and the poll finds new events).
    Sleep,
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
    wake: Arc<Notify>,
    /// Fan-out created deliveries it did not lease.
    claimable: Notify,
    /// Deliveries leased at fan-out behind lanes this instance holds, with the leases
    /// this instance holds and what fan-out left unstarted.
    queue: QueueHandle,
    /// Fan-outs run one at a time (what [`LaneQueue`] relies on to forget endings).
    fan_out_turn: tokio::sync::Mutex<()>,
    /// When the claim loop last asked the store while deliveries were queued here.
    last_store_claim: Mutex<std::time::Instant>,
    /// Deliveries this instance fanned out less those it claimed since: an estimate of
    /// what is waiting to be claimed. Signed, because a claim may take deliveries before
    /// the fan-out that made them has counted them.
    ahead: AtomicI64,
    /// A claim started deliveries.
    claimed: Notify,
    /// A delivery task finished (its outcomes are recorded).
    task_done: Arc<Notify>,
    recorder: Recorder,
    quarantines: Arc<Quarantines>,
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
        let queue = QueueHandle {
            lanes: Arc::default(),
            in_flight: Arc::default(),
            due: Arc::new(Notify::new()),
            unstarted: Arc::default(),
            store: store.clone(),
            owner: settings.instance_id.clone(),
        };
        Dispatcher {
            quarantines: Arc::new(Quarantines::new(settings.quarantine_after)),
            recorder: Recorder::start(store.clone()),
            store,
            table: RouteSwitch::new(table),
            plugins,
            runtime,
            settings,
            slots,
            queue,
            wake: Arc::new(Notify::new()),
            claimable: Notify::new(),
            fan_out_turn: tokio::sync::Mutex::new(()),
            last_store_claim: Mutex::new(std::time::Instant::now()),
            ahead: AtomicI64::new(0),
            claimed: Notify::new(),
            task_done: Arc::new(Notify::new()),
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
        let (fanned, started, _) = self.fan_out_once(false).await?;
        let claimed = self.claim_and_start(true).await?;
        Ok(PassReport {
            fanned_out: fanned.events(),
            claimed: started + claimed.total,
        })
    }

    /// Fan out one batch, starting at once the new deliveries the free slots take (no
    /// claim round trip for them), and queueing those the store leased behind lanes this
    /// instance holds; returns the report, how many it started or queued, and how many
    /// events it could take ([`Dispatcher::fan_out_limit`]; with none, it asks the store
    /// nothing unless it must stop wake-ups).
    async fn fan_out_once(
        &self,
        stop_wake_ups: bool,
    ) -> Result<(FanOutReport, usize, u32), StoreError> {
        let _turn = self.fan_out_turn.lock().await;
        let table = self.table.current();
        let grant = self.claim_request().await;
        let room = self.queue_room();
        let limit = self.fan_out_limit(grant.is_some(), room);
        if limit == 0 && !stop_wake_ups {
            return Ok((FanOutReport::default(), 0, 0));
        }
        let request = FanOutRequest {
            limit,
            max_event_bytes: self.settings.max_event_bytes,
            queue_behind: u32::try_from(room).unwrap_or(u32::MAX),
            stop_wake_ups,
        };
        let ticket = self.queue.lanes.begin_fan_out();
        let fanned = self
            .store
            .fan_out_starting(
                &request,
                grant.as_ref().map(|(request, _)| request),
                &|head| table.router.plans_for(head),
            )
            .await;
        let fanned = match fanned {
            Ok((report, starts)) => {
                let queued = starts.queued.len();
                self.hold_queued(starts.queued).await;
                Ok((report, starts.now, queued))
            }
            Err(err) => Err(err),
        };
        self.queue.lanes.end_fan_out(ticket, self.settings.lease);
        let (report, started, queued) = fanned?;
        crate::metrics::fanned_out(&report);
        let waiting = report
            .deliveries
            .saturating_sub(started.len())
            .saturating_sub(queued);
        if waiting > 0 {
            self.ahead
                .fetch_add(count(waiting), AtomicOrdering::Relaxed);
            self.queue
                .unstarted
                .fetch_add(count(waiting), AtomicOrdering::Relaxed);
            self.claimable.notify_one();
        }
        let started_count = started.len() + queued;
        if let Some((_, free)) = grant {
            if !started.is_empty() {
                self.start(started, free).await;
            }
        }
        Ok((report, started_count, limit))
    }

    /// How many events a fan-out pass takes. A store that leases started deliveries per
    /// batch ([`EventStore::paces_fan_out`]) is given no more than this instance can lease:
    /// every new delivery fan-out cannot start takes queue room (a held lane's next ones
    /// need it), and one left unleased costs a delivery row of its own. The rest wait in
    /// the fan-out queue, where they cost nothing, for the next pass.
    fn fan_out_limit(&self, can_start: bool, room: usize) -> u32 {
        if !self.store.paces_fan_out() {
            return self.settings.batch_size;
        }
        let can_lease = if can_start { room } else { 0 };
        self.settings
            .batch_size
            .min(u32::try_from(can_lease).unwrap_or(u32::MAX))
    }

    /// How many more deliveries fan-out may queue behind lanes held here.
    fn queue_room(&self) -> usize {
        let most = self.settings.concurrency.max(1) * QUEUED_PER_SLOT;
        most.saturating_sub(self.queue.lanes.len())
    }

    /// Keep the deliveries fan-out queued, renewing their leases until they run.
    async fn hold_queued(&self, queued: Vec<QueuedDelivery>) {
        if queued.is_empty() {
            return;
        }
        let mut effects = Effects::default();
        {
            let mut held = lock(&self.queue.in_flight);
            for queued in &queued {
                held.insert(queued.delivery.delivery_id);
            }
        }
        for QueuedDelivery { behind, delivery } in queued {
            let more = self.queue.lanes.queue(behind, delivery);
            effects.add(more);
        }
        self.queue.apply(effects).await;
    }

    /// Whether [`Dispatcher::claim_request`] would give a claim.
    fn claim_request_possible(&self) -> bool {
        self.slots.available_permits() > 0 || self.queue_room() > 0
    }

    /// What the free slots can take now, as a claim (with the slots counted); `None` when
    /// every slot is busy and fan-out may queue nothing either.
    async fn claim_request(&self) -> Option<(ClaimRequest, usize)> {
        let free = self.slots.available_permits();
        if !self.claim_request_possible() {
            return None;
        }
        let limit = (self.settings.batch_size as usize).min(free * DELIVERIES_PER_TASK);
        let paused_routes = self
            .quarantines
            .paused_routes(self.store.as_ref(), &self.table.current().routes)
            .await;
        let request = ClaimRequest {
            owner: self.settings.instance_id.clone(),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            lease: self.settings.lease,
            paused_routes,
        };
        Some((request, free))
    }

    /// Start what the free slots take: queued deliveries that became due, then claimed
    /// ones; returns how many. Woken only because queued deliveries became due
    /// (`for_store` false), the store is asked too only if fan-out left some unleased, or
    /// once a poll interval (retries come due, other instances leave work): a claim
    /// beside a queue that feeds the slots walks the due index past every queued lease
    /// to find nothing.
    async fn claim_and_start(&self, for_store: bool) -> Result<Started, StoreError> {
        let Some((mut request, free)) = self.claim_request().await else {
            return Ok(Started::default());
        };
        if free == 0 {
            return Ok(Started::default());
        }
        let ready = self.take_ready(&request).await;
        let room = (request.limit as usize).saturating_sub(ready.len());
        let ask_store = for_store
            || self.queue.unstarted.load(AtomicOrdering::Relaxed) > 0
            || self.store_claim_due();
        let mut leased = ready;
        let mut claimed_count = 0;
        if room > 0 && ask_store {
            request.limit = u32::try_from(room).unwrap_or(u32::MAX);
            let claimed = match self.store.claim(&request).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    // The queued deliveries taken above are leased here and due: dropped,
                    // they would stay among the leases the heartbeat renews, and never run.
                    if !leased.is_empty() {
                        self.start(leased, free).await;
                    }
                    return Err(err);
                }
            };
            claimed_count = claimed.len();
            self.count_claimed(claimed_count);
            leased.extend(claimed);
        }
        let started = Started {
            total: leased.len(),
            claimed: claimed_count,
        };
        self.claimed.notify_one();
        if started.total > 0 {
            self.start(leased, free).await;
        }
        Ok(started)
    }

    /// Whether a poll interval has passed since the last claim from the store (and if so,
    /// start the next interval).
    fn store_claim_due(&self) -> bool {
        let mut last = self
            .last_store_claim
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.elapsed() < self.settings.poll_interval {
            return false;
        }
        *last = std::time::Instant::now();
        true
    }

    /// Queued deliveries now due, as many as `request` takes; those of a paused route
    /// are given back instead, for a claim to take once the route resumes.
    async fn take_ready(&self, request: &ClaimRequest) -> Vec<ClaimedDelivery> {
        let ready = self.queue.lanes.take_ready(request.limit as usize);
        let (paused, ready): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|d| request.paused_routes.contains(&d.route));
        if !paused.is_empty() {
            let mut effects = Effects::default();
            for delivery in &paused {
                effects.add(self.queue.lanes.give_back(delivery.delivery_id));
            }
            self.queue.apply(effects).await;
        }
        ready
    }

    /// What a claim from the store found, against what fan-out counted as waiting.
    fn count_claimed(&self, claimed: usize) {
        crate::metrics::claim_made(claimed);
        if claimed > 0 {
            self.ahead
                .fetch_sub(count(claimed), AtomicOrdering::Relaxed);
            // Saturating: a claim also takes retries and other instances' deliveries.
            let _ = self.queue.unstarted.fetch_update(
                AtomicOrdering::Relaxed,
                AtomicOrdering::Relaxed,
                |unstarted| Some((unstarted - count(claimed)).max(0)),
            );
        } else {
            // Nothing is due: whatever fan-out counted is claimed or blocked behind
            // running deliveries, and fan-out may go on.
            self.ahead.store(0, AtomicOrdering::Relaxed);
            // With nothing running here either, what is left is blocked by other
            // instances or paused, or was claimed elsewhere: no finish of ours frees it.
            if self.is_idle() {
                self.queue.unstarted.store(0, AtomicOrdering::Relaxed);
            }
        }
    }

    /// Run leased deliveries: spread them over the `free` slots; each task runs its share
    /// in one plugin instance after another, which is what makes a call cheap.
    async fn start(&self, leased: Vec<ClaimedDelivery>, free: usize) {
        let per_task = leased.len().div_ceil(free.max(1)).max(1);
        for (route, deliveries) in by_route(leased) {
            crate::metrics::claimed(&route, deliveries.len());
            let mut deliveries = deliveries.into_iter().peekable();
            while deliveries.peek().is_some() {
                let share: Vec<ClaimedDelivery> = deliveries.by_ref().take(per_task).collect();
                let Ok(permit) = self.slots.clone().acquire_owned().await else {
                    break;
                };
                let worker = self.worker();
                let task_done = self.task_done.clone();
                let in_flight: Vec<InFlight> = share
                    .iter()
                    .map(|d| InFlight::enter(&self.queue.in_flight, d.delivery_id))
                    .collect();
                let unsettled = SettleOnPanic {
                    queue: self.queue.clone(),
                    ids: share.iter().map(|d| d.delivery_id).collect(),
                };
                let span = tracing::info_span!(
                    "deliveries",
                    route = %route,
                    count = share.len(),
                    plugin = tracing::field::Empty,
                    version = tracing::field::Empty,
                );
                tokio::spawn(
                    async move {
                        worker.deliver(share).await;
                        unsettled.disarm();
                        drop(in_flight);
                        drop(permit);
                        task_done.notify_one();
                    }
                    .instrument(span),
                );
            }
        }
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
            let (fan_out_done, fan_out_finished) = watch::channel(false);
            let fanning = async {
                let result = self.fan_out_backlog().await;
                let _ = fan_out_done.send(true);
                result
            };
            // The first error ends both: a fan-out waiting for claims must not outlive them.
            tokio::try_join!(fanning, self.claim_backlog(fan_out_finished))?;
            // What the last completions unblocked or emitted: look once more.
            self.wait_idle().await;
            if self.pass().await?.is_idle() {
                self.wait_idle().await;
                // Nothing runs: whatever is still queued waits for a delivery no task here
                // will end. Give it back for a claim.
                self.give_back_queued().await;
                return Ok(());
            }
        }
    }

    /// Fan out until no new event is left.
    ///
    /// A pass that could lease nothing (a paced store, and every slot and the lane queue
    /// full) is no sign the backlog is done: it waits for room, as
    /// [`Dispatcher::fan_out_loop`] does. Ending there would end the drain's round, and the
    /// next round begins only once everything started has finished.
    async fn fan_out_backlog(&self) -> Result<(), StoreError> {
        loop {
            while self.run_ahead() {
                self.claimed.notified().await;
            }
            let (report, _, limit) = self.fan_out_once(false).await?;
            if limit == 0 {
                self.wait_for_lease_room().await;
                continue;
            }
            if report.events() == 0 {
                return Ok(());
            }
        }
    }

    /// A paced fan-out could lease nothing: look again once a claim has run (it may have
    /// started what was queued), or after the poll interval.
    async fn wait_for_lease_room(&self) {
        tokio::select! {
            _ = self.claimed.notified() => {}
            _ = tokio::time::sleep(self.settings.poll_interval) => {}
        }
    }

    /// Whether fan-out is far enough ahead of the claims. Deliveries fanned out long
    /// before they can be claimed only lengthen every claim's scan (and an entity's later
    /// events cannot be claimed before its earlier ones anyway).
    fn run_ahead(&self) -> bool {
        self.ahead.load(AtomicOrdering::Relaxed) >= 2 * i64::from(self.settings.batch_size)
    }

    /// Forget what fan-out counted as unclaimed: other instances, or retries that are not
    /// due yet, may hold it, and fan-out must not wait for claims that will not come.
    fn forget_run_ahead(&self) {
        self.ahead.store(0, AtomicOrdering::Relaxed);
        self.claimed.notify_one();
    }

    /// Claim and start deliveries until none is due, nothing runs and fan-out is done.
    async fn claim_backlog(
        &self,
        mut fan_out_done: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let mut for_store = true;
        loop {
            let started = self.claim_and_start(for_store).await?;
            if started.total > 0 {
                // Ask the store again only while it had work.
                for_store = started.claimed > 0;
                self.wait_for_room().await;
                continue;
            }
            // (The empty claim has reset the run-ahead count, so a waiting fan-out goes on.)
            let fanning = !*fan_out_done.borrow();
            if !fanning && self.is_idle() {
                return Ok(());
            }
            for_store = tokio::select! {
                _ = self.claimable.notified() => true,
                _ = self.queue.due.notified() => {
                    self.gather_finished().await;
                    false
                }
                // While deliveries are queued here, what a finish made due is queued
                // too, or counted as unstarted.
                _ = self.task_done.notified() => {
                    self.gather_finished().await;
                    self.queue.lanes.is_empty()
                }
                _ = fan_out_done.changed(), if fanning => true,
            };
        }
    }

    /// A task just finished: give the others a moment to finish too, so the next claim
    /// takes the successors of many deliveries at once rather than one claim (one write
    /// transaction) per finished task.
    async fn gather_finished(&self) {
        let _ = tokio::time::timeout(GATHER_WINDOW, self.wait_for_room()).await;
    }

    /// Whether no delivery is running or queued here.
    fn is_idle(&self) -> bool {
        self.slots.available_permits() >= self.settings.concurrency.max(1)
            && self.queue.lanes.is_empty()
    }

    /// Wait until a quarter of the slots are free: claiming for one free slot at a time
    /// would turn a backlog into many small claims, each a round trip.
    async fn wait_for_room(&self) {
        let room = u32::try_from(self.settings.concurrency / 4)
            .unwrap_or(u32::MAX)
            .max(1);
        if let Ok(permits) = self.slots.acquire_many(room).await {
            drop(permits);
        }
    }

    /// Dispatch until `shutdown` turns true, then let in-flight deliveries finish. Wakes on
    /// the store's notifications when it has them, and polls regardless: a lost
    /// notification costs latency, never an event.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) {
        let listening = self.settings.listen
            && match self
                .store
                .watch_new_events(Arc::downgrade(&self.wake))
                .await
            {
                Ok(true) => {
                    tracing::info!("woken by new-event notifications; polling as a fallback");
                    true
                }
                Ok(false) => {
                    tracing::debug!("the store sends no notifications; polling");
                    false
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for new events; polling");
                    false
                }
            };
        let heartbeat = tokio::spawn(heartbeat(
            self.settings.clone(),
            self.queue.clone(),
            shutdown.clone(),
        ));
        tokio::join!(
            self.fan_out_loop(shutdown.clone(), listening),
            self.claim_loop(shutdown.clone())
        );
        self.finish_in_flight().await;
        let _ = heartbeat.await;
        if let Err(err) = self.store.deregister(&self.settings.instance_id).await {
            tracing::warn!(%err, "could not deregister this instance");
        }
    }

    /// Fan out while new events keep coming: at once again after a full batch (more is
    /// waiting), else when woken (events inserted or emitted) or after the poll interval.
    /// Runs beside the claim loop, so deliveries are ready before the claims ask for them.
    /// With `listening`, it asks producers for wake-ups before each sleep, and its first
    /// fan-out after the sleep stops them: producers pay for a wake-up only while this
    /// instance waits for one.
    async fn fan_out_loop(&self, mut shutdown: watch::Receiver<bool>, listening: bool) {
        let mut asked = false;
        while running(&shutdown) {
            if self.run_ahead() {
                tokio::select! {
                    _ = self.claimed.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => self.forget_run_ahead(),
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let limit = self.fan_out_limit(self.claim_request_possible(), self.queue_room());
            if limit == 0 {
                tokio::select! {
                    _ = self.wait_for_lease_room() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if self.fan_out_logged(std::mem::take(&mut asked)).await >= limit as usize {
                continue;
            }
            if listening {
                match self.ask_for_wake_ups(&mut shutdown).await {
                    AfterAsking::Sleep => {}
                    AfterAsking::Look => {
                        asked = true;
                        if self.fan_out_logged(false).await > 0 {
                            continue;
                        }
                    }
                    AfterAsking::Woken => {
                        asked = true;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// [`Dispatcher::fan_out_once`] for the fan-out loop: how many events it fanned out; a
    /// failure is logged and counts none (the loop then waits for the poll interval).
    async fn fan_out_logged(&self, stop_wake_ups: bool) -> usize {
        match self.fan_out_once(stop_wake_ups).await {
            Ok((report, _, _)) => report.events(),
            Err(err) => {
                tracing::error!(%err, "fan-out failed; retrying after the poll interval");
                0
            }
        }
    }

    /// Ask producers for wake-ups before sleeping, and wait until the last look is due:
    /// once no producer that may have missed the request is in flight (trying again at
    /// short intervals; such a producer commits within milliseconds, or the poll covers
    /// it), or at once when a wake-up arrives meanwhile.
    async fn ask_for_wake_ups(&self, shutdown: &mut watch::Receiver<bool>) -> AfterAsking {
        let deadline = tokio::time::Instant::now() + self.settings.poll_interval;
        let mut pause = FIRST_WAKE_UP_PAUSE;
        loop {
            match self.store.request_wake_ups().await {
                Ok(WakeUpRequest::Settled) => return AfterAsking::Look,
                Ok(WakeUpRequest::Pending) => {}
                Ok(WakeUpRequest::Unneeded) => return AfterAsking::Sleep,
                Err(err) => {
                    tracing::warn!(%err, "cannot ask producers for wake-ups; polling");
                    return AfterAsking::Sleep;
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return AfterAsking::Look;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => return AfterAsking::Woken,
                _ = shutdown.changed() => return AfterAsking::Sleep,
            }
            pause = (pause * 2).min(LAST_WAKE_UP_PAUSE);
        }
    }

    /// Claim and start deliveries as slots free up. With nothing due it waits for new
    /// deliveries, for a running one to finish while fan-out left deliveries unstarted
    /// (the next event of its entity may be due then), or for the poll interval (retries
    /// come due on the store's clock; other instances' deliveries are found then too).
    async fn claim_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut for_store = true;
        while running(&shutdown) {
            match self.claim_and_start(for_store).await {
                Ok(started) if started.total > 0 => {
                    // Ask the store again only while it had work.
                    for_store = started.claimed > 0;
                    tokio::select! {
                        _ = self.wait_for_room() => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::error!(%err, "claiming failed; retrying after the poll interval")
                }
            }
            for_store = self.wait_for_claimable(&mut shutdown).await;
        }
    }

    /// Wait for a reason to claim: new deliveries, queued ones that became due, a
    /// finished one that may have made one of this instance's unstarted deliveries due,
    /// the poll interval, or shutdown. Returns whether the store should be asked (all
    /// but queued deliveries becoming due).
    async fn wait_for_claimable(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let poll_at = tokio::time::Instant::now() + self.settings.poll_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(poll_at) => return true,
                _ = self.claimable.notified() => return true,
                _ = self.queue.due.notified() => {
                    self.gather_finished().await;
                    return false;
                }
                _ = self.task_done.notified() => {
                    if self.queue.unstarted.load(AtomicOrdering::Relaxed) > 0 {
                        self.gather_finished().await;
                        return true;
                    }
                }
                _ = shutdown.changed() => return true,
            }
        }
    }

    /// Give back the leases of every delivery queued here and not started.
    async fn give_back_queued(&self) {
        let release = self.queue.lanes.take_all();
        if release.is_empty() {
            return;
        }
        let effects = Effects { release, ready: 0 };
        self.queue.apply(effects).await;
    }

    /// Let running attempts finish and record their outcomes, up to the shutdown
    /// deadline; then give back the leases of those still running, so another instance
    /// takes them at once instead of after the lease expires. Queued deliveries that
    /// have not started are given back first: none starts after shutdown.
    async fn finish_in_flight(&self) {
        self.give_back_queued().await;
        let deadline = self.settings.shutdown_deadline;
        if tokio::time::timeout(deadline, self.wait_idle())
            .await
            .is_ok()
        {
            return;
        }
        let unfinished: Vec<i64> = lock(&self.queue.in_flight).iter().copied().collect();
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
            quarantines: self.quarantines.clone(),
            recorder: self.recorder.clone(),
            wake: self.wake.clone(),
            routes: self.table.current().routes.clone(),
            plugins: self.plugins.clone(),
            runtime: self.runtime.clone(),
            owner: self.settings.instance_id.clone(),
            queue: self.queue.clone(),
        }
    }
}

/// What one round of the claim loop started.
#[derive(Debug, Default, Clone, Copy)]
struct Started {
    total: usize,
    /// Of those, claimed from the store (the rest were queued here).
    claimed: usize,
}

/// Whether the dispatcher should go on: not told to stop, and whoever could tell it still
/// there (a dropped sender would otherwise make every wait on it return at once).
fn running(shutdown: &watch::Receiver<bool>) -> bool {
    !*shutdown.borrow() && shutdown.has_changed().is_ok()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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

/// Every third of a lease: extend the leases of the deliveries still running or queued
/// here, so slow work is not taken over by another instance, give back queued deliveries
/// stranded behind one nothing here will end, and tell the store this instance is alive
/// (for `herald instances`).
async fn heartbeat(
    settings: DispatchSettings,
    queue: QueueHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let store = queue.store.clone();
    let every = (settings.lease / 3).max(Duration::from_millis(100));
    let version = env!("CARGO_PKG_VERSION");
    loop {
        if let Err(err) = store.heartbeat(&settings.instance_id, version).await {
            tracing::warn!(%err, "heartbeat failed");
        }
        let running: HashSet<i64> = lock(&queue.in_flight).clone();
        let ids: Vec<i64> = running.iter().copied().collect();
        if let Err(err) = store
            .renew_leases(&settings.instance_id, &ids, settings.lease)
            .await
        {
            tracing::warn!(%err, "could not renew leases; another instance may take over slow deliveries");
        }
        let mut effects = Effects::default();
        for behind in queue.lanes.stranded(&running, every) {
            tracing::warn!(
                behind,
                "deliveries queued behind one this instance does not run; giving them back"
            );
            effects.add(queue.lanes.settle(behind, Ended::Open));
        }
        queue.apply(effects).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// What a change of the lane queue acts on: shared by the dispatcher, its tasks and the
/// heartbeat.
#[derive(Clone)]
struct QueueHandle {
    lanes: Arc<LaneQueue>,
    /// Leases this instance holds (running or queued), which the heartbeat renews.
    in_flight: Arc<Mutex<HashSet<i64>>>,
    /// Queued deliveries became due.
    due: Arc<Notify>,
    /// Deliveries this instance fanned out without starting them (their lane was busy, or
    /// no slot was free), or gave back from its queue, and has not claimed since. While there are none, a finished
    /// delivery cannot have made anything of this instance's due, and the claim loop
    /// does not claim for it: at a low rate, where fan-out starts every delivery itself,
    /// that claim found nothing every time (300 empty claims a second at 1,000 events/s,
    /// each planned and run by Postgres for nothing).
    unstarted: Arc<AtomicI64>,
    store: Arc<dyn EventStore>,
    owner: String,
}

impl QueueHandle {
    /// Carry out what a change of the lane queue asks: give leases back (they stop being
    /// renewed, and if the store cannot take them back now they run out; either way a
    /// claim takes them later, so they count as unstarted), and wake the claim loop for
    /// what became due.
    async fn apply(&self, effects: Effects) {
        if !effects.release.is_empty() {
            {
                let mut held = lock(&self.in_flight);
                for id in &effects.release {
                    held.remove(id);
                }
            }
            self.unstarted
                .fetch_add(count(effects.release.len()), AtomicOrdering::Relaxed);
            if let Err(err) = self.store.release(&self.owner, &effects.release).await {
                tracing::warn!(%err, count = effects.release.len(), "could not give back queued deliveries; their leases run out");
            }
        }
        if effects.ready > 0 {
            self.due.notify_one();
        }
    }
}

/// Settles a task's deliveries as left open if the task ends without settling them (a
/// panic): what queued behind them is given back instead of waiting forever.
struct SettleOnPanic {
    queue: QueueHandle,
    ids: Vec<i64>,
}

impl SettleOnPanic {
    fn disarm(mut self) {
        self.ids.clear();
    }
}

impl Drop for SettleOnPanic {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            // No await here to give the leases back: they stop being renewed and run out.
            let released = self.queue.lanes.settle(id, Ended::Open).release;
            self.queue
                .unstarted
                .fetch_add(count(released.len()), AtomicOrdering::Relaxed);
            let mut held = lock(&self.queue.in_flight);
            for id in released {
                held.remove(&id);
            }
        }
    }
}

/// Everything one delivery needs, owned so it can run on its own task.
struct Worker {
    store: Arc<dyn EventStore>,
    quarantines: Arc<Quarantines>,
    recorder: Recorder,
    /// Woken when an outcome committed new events (emits, dead notices), so they are
    /// fanned out now rather than at the next poll.
    wake: Arc<Notify>,
    routes: Arc<HashMap<String, Route>>,
    plugins: Arc<PluginRegistry>,
    runtime: Arc<PluginRuntime>,
    owner: String,
    queue: QueueHandle,
}

impl Worker {
    /// Run the deliveries (all of one route) and record their outcomes in one transaction.
    async fn deliver(&self, deliveries: Vec<ClaimedDelivery>) {
        let Some(first) = deliveries.first() else {
            return;
        };
        let route = self.routes.get(&first.route);
        let plugin_name = route.map_or("", |route| route.plugin.as_str());
        let decided = self.decide(route, &deliveries).await;
        if route.is_some() {
            self.quarantines
                .observe(
                    self.store.as_ref(),
                    plugin_name,
                    decided.iter().map(|d| d.fault.as_deref()),
                )
                .await;
        }
        let mut completions = Vec::with_capacity(deliveries.len());
        for (delivery, decided) in deliveries.iter().zip(decided) {
            let Decided {
                outcome,
                plugin_version,
                started_at,
                duration,
                fault: _,
            } = decided;
            crate::metrics::attempt_duration(&delivery.route, plugin_name, duration);
            let host_events = match &outcome {
                Outcome::Dead { reason } => dead_notice(delivery, reason).into_iter().collect(),
                _ => Vec::new(),
            };
            tracing::debug!(
                event_id = delivery.event.event_id,
                attempt = delivery.attempt,
                outcome = ?outcome.attempt_outcome(),
                detail = ?outcome.detail(),
                "attempt finished"
            );
            completions.push(Completion {
                delivery_id: delivery.delivery_id,
                owner: self.owner.clone(),
                attempt: delivery.attempt,
                outcome,
                plugin_version,
                started_at,
                duration,
                host_events,
            });
        }
        let outcomes: Vec<_> = completions
            .iter()
            .map(|c| c.outcome.attempt_outcome())
            .collect();
        let closes: Vec<bool> = completions
            .iter()
            .map(|c| c.outcome.delivery_status() != DeliveryStatus::Retry)
            .collect();
        let adds_events = completions
            .iter()
            .any(|c| !c.outcome.emitted().is_empty() || !c.host_events.is_empty());
        let done = self.recorder.record(completions).await;
        if adds_events && done.is_ok() {
            self.wake.notify_one();
        }
        self.settle_lanes(&deliveries, &closes, done.as_deref().ok())
            .await;
        match done {
            Ok(results) => {
                for ((delivery, result), outcome) in deliveries.iter().zip(results).zip(outcomes) {
                    if result == CompletionResult::LeaseLost {
                        tracing::warn!(
                            event_id = delivery.event.event_id,
                            route = %delivery.route,
                            "lease lost before the outcome was recorded; another instance owns the delivery now"
                        );
                        crate::metrics::outcome_lost(
                            &delivery.route,
                            crate::metrics::LostOutcome::LeaseLost,
                        );
                    } else {
                        crate::metrics::attempt_recorded(
                            &delivery.route,
                            plugin_name,
                            outcome,
                            delivery.event.created_at,
                        );
                    }
                }
            }
            // The leases run out and the deliveries are claimed again: at least once, and
            // the sink dedups on the idempotency key.
            Err(err) => {
                tracing::error!(%err, count = deliveries.len(), "could not record the outcomes; the deliveries will run again");
                for delivery in &deliveries {
                    crate::metrics::outcome_lost(
                        &delivery.route,
                        crate::metrics::LostOutcome::StoreError,
                    );
                }
            }
        }
    }

    /// Tell the lane queue how each delivery ended, so what queued behind it runs or is
    /// given back. `results` is `None` when the outcomes could not be recorded.
    async fn settle_lanes(
        &self,
        deliveries: &[ClaimedDelivery],
        closes: &[bool],
        results: Option<&[CompletionResult]>,
    ) {
        let mut effects = Effects::default();
        for (index, delivery) in deliveries.iter().enumerate() {
            let recorded = results
                .and_then(|results| results.get(index))
                .is_some_and(|result| *result != CompletionResult::LeaseLost);
            let ended = if recorded && closes.get(index).copied().unwrap_or(false) {
                Ended::Closed
            } else {
                Ended::Open
            };
            let more = self.queue.lanes.settle(delivery.delivery_id, ended);
            effects.add(more);
        }
        self.queue.apply(effects).await;
    }

    /// One outcome per delivery, in order.
    async fn decide(&self, route: Option<&Route>, deliveries: &[ClaimedDelivery]) -> Vec<Decided> {
        let not_run = |outcome: Outcome| Decided {
            outcome,
            plugin_version: None,
            started_at: Utc::now(),
            duration: Duration::ZERO,
            fault: None,
        };
        let Some(route) = route else {
            return deliveries
                .iter()
                .map(|delivery| {
                    not_run(Outcome::Retry {
                        after: Duration::from_secs(60),
                        reason: format!(
                            "route '{}' is not configured on this instance",
                            delivery.route
                        ),
                    })
                })
                .collect();
        };
        let Some(plugin) = self.plugins.get(&route.plugin) else {
            let reason = format!("plugin '{}' is not loaded", route.plugin);
            return deliveries
                .iter()
                .map(|delivery| not_run(route_failure(route, delivery, reason.clone(), None)))
                .collect();
        };
        let span = tracing::Span::current();
        span.record("plugin", plugin.name.as_str());
        span.record("version", plugin.short_version());
        // Keys the ledger already holds are not run again.
        let to_run: Vec<PluginEvent> = deliveries
            .iter()
            .filter(|delivery| delivery.already_completed.is_none())
            .map(outcome::plugin_event)
            .collect();
        let mut reports = self
            .runtime
            .call_batch(&plugin, route.grant.clone(), to_run)
            .await
            .into_iter();
        deliveries
            .iter()
            .map(|delivery| {
                if let Some(done) = &delivery.already_completed {
                    return not_run(Outcome::Delivered {
                        receipt: Some(format!(
                            "not run again: key '{}' completed at {} (idempotency ledger)",
                            done.idempotency_key, done.completed_at
                        )),
                        emitted: Vec::new(),
                    });
                }
                match reports.next() {
                    Some(report) => Decided {
                        started_at: report.started_at,
                        duration: report.duration,
                        fault: report.outcome.as_ref().err().map(ToString::to_string),
                        outcome: outcome::store_outcome(route, delivery, report),
                        plugin_version: Some(plugin.version.clone()),
                    },
                    None => not_run(route_failure(
                        route,
                        delivery,
                        "the plugin runtime returned no report".into(),
                        None,
                    )),
                }
            })
            .collect()
    }
}

/// What became of one delivery, with the plugin version that decided it (none when no
/// plugin ran) and when and for how long it ran.
struct Decided {
    outcome: Outcome,
    plugin_version: Option<String>,
    started_at: DateTime<Utc>,
    duration: Duration,
    /// The plugin faulted (rather than deciding an outcome itself): why.
    fault: Option<String>,
}

/// Claimed deliveries grouped by route, each group in claim order.
fn by_route(claimed: Vec<ClaimedDelivery>) -> Vec<(String, Vec<ClaimedDelivery>)> {
    let mut groups: Vec<(String, Vec<ClaimedDelivery>)> = Vec::new();
    for delivery in claimed {
        match groups
            .iter_mut()
            .find(|(route, _)| *route == delivery.route)
        {
            Some((_, group)) => group.push(delivery),
            None => groups.push((delivery.route.clone(), vec![delivery])),
        }
    }
    groups
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
