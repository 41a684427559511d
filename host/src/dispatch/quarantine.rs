//! Quarantine: a plugin that faults (traps, panics, breaks a time, memory or call limit) on
//! event after event is broken, not unlucky. Retrying each event on its own schedule would
//! keep burning CPU and fill the attempts log, so after a run of consecutive faults the
//! plugin's routes pause, on every instance (the verdict is a store row), until an operator
//! runs `herald plugins resume NAME`. Deliveries wait, unclaimed; nothing is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Route;
use crate::store::EventStore;

/// How stale this instance's view of the quarantined plugins may get: a quarantine set or
/// lifted elsewhere (another instance, `herald plugins resume`) takes effect within this.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Quarantines {
    /// Consecutive faults that quarantine a plugin; 0 never does.
    after: u32,
    /// Each plugin's current run of faults on this instance.
    runs: Mutex<HashMap<String, u32>>,
    view: Mutex<View>,
}

#[derive(Default)]
struct View {
    plugins: HashSet<String>,
    read_at: Option<Instant>,
}

impl Quarantines {
    pub(super) fn new(after: u32) -> Self {
        Quarantines {
            after,
            runs: Mutex::default(),
            view: Mutex::default(),
        }
    }

    /// The routes whose plugin is quarantined, from a view at most [`REFRESH_EVERY`] old.
    /// A store that cannot say keeps the last view: a claim should not fail for it.
    pub(super) async fn paused_routes(
        &self,
        store: &dyn EventStore,
        routes: &HashMap<String, Route>,
    ) -> Vec<String> {
        let stale = lock(&self.view)
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= REFRESH_EVERY);
        if stale {
            match store.quarantined().await {
                Ok(rows) => {
                    let now: HashSet<String> = rows.into_iter().map(|q| q.plugin).collect();
                    let mut view = lock(&self.view);
                    for resumed in view.plugins.difference(&now) {
                        tracing::info!(plugin = %resumed, "plugin resumed: its routes claim again");
                    }
                    view.plugins = now;
                    view.read_at = Some(Instant::now());
                    // The gauges change only with the view, so they are set here, not on
                    // every claim.
                    let mut plugins: Vec<&str> =
                        routes.values().map(|r| r.plugin.as_str()).collect();
                    plugins.sort_unstable();
                    plugins.dedup();
                    for plugin in plugins {
                        crate::metrics::plugin_quarantined(plugin, view.plugins.contains(plugin));
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot read quarantined plugins; keeping the last view")
                }
            }
        }
        let view = lock(&self.view);
        routes
            .values()
            .filter(|route| view.plugins.contains(&route.plugin))
            .map(|route| route.name.clone())
            .collect()
    }

    /// Count `plugin`'s attempts in the order they finished: `Some(reason)` for a fault,
    /// `None` for anything the plugin decided itself, which ends a run. A run reaching the
    /// threshold quarantines the plugin.
    pub(super) async fn observe<'a>(
        &self,
        store: &dyn EventStore,
        plugin: &str,
        attempts: impl IntoIterator<Item = Option<&'a str>>,
    ) {
        if self.after == 0 {
            return;
        }
        let mut verdict = None;
        {
            let mut runs = lock(&self.runs);
            let run = runs.entry(plugin.to_string()).or_default();
            for fault in attempts {
                match fault {
                    Some(reason) => {
                        *run = run.saturating_add(1);
                        if *run >= self.after {
                            verdict = Some((*run, reason.to_string()));
                            // A resumed plugin gets a full run again before the next verdict.
                            *run = 0;
                        }
                    }
                    None => *run = 0,
                }
            }
        }
        let Some((faults, last)) = verdict else {
            return;
        };
        let reason = format!("{faults} consecutive faults; last: {last}");
        match store.quarantine(plugin, &reason, faults).await {
            Ok(newly) => {
                if newly {
                    tracing::error!(
                        plugin,
                        faults,
                        last_fault = %last,
                        "plugin quarantined: its routes are paused until `herald plugins resume {plugin}`"
                    );
                }
                lock(&self.view).plugins.insert(plugin.to_string());
                crate::metrics::plugin_quarantined(plugin, true);
            }
            Err(err) => tracing::error!(%err, plugin, "cannot quarantine the plugin"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
