//! Hot deploy: watch the plugin directory and put changed plugins in service while the
//! host keeps running.
//!
//! A file is loaded only once it has looked the same on two scans in a row, so a copy in
//! progress is not even tried; a file that still fails to compile or describe itself is
//! refused with the reason and the running version stays. Calls in flight keep the
//! version they started with (they hold it), the next claim gets the new one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::versions::{valid_plugin_name, PluginDir};
use super::{LoadedPlugin, PluginRegistry, PluginRuntime};
use crate::metrics::{self, DeployResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// What one scan did to one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployOutcome {
    Deployed { plugin: String, version: String },
    Refused { plugin: String, reason: String },
}

/// Put a checked plugin in service, whichever way it arrived (directory or upload): it
/// replaces the running version (calls in flight keep theirs), is kept for rollback, and
/// the deploy is counted and logged. Returns the version it replaced.
pub fn put_in_service(
    registry: &PluginRegistry,
    dir: &PluginDir,
    plugin: LoadedPlugin,
    bytes: &[u8],
) -> Option<String> {
    let name = plugin.name.clone();
    let version = plugin.version.clone();
    let previous = registry.insert(plugin).map(|p| p.version.clone());
    if let Err(err) = dir.record(&name, bytes) {
        tracing::warn!(%err, plugin = %name, "deployed, but cannot keep the version for rollback");
    }
    metrics::plugin_deployed(&name, DeployResult::Deployed);
    tracing::info!(plugin = %name, %version, ?previous, "plugin deployed");
    previous
}

/// Count and log a plugin that failed its checks; the running version stays.
pub fn refuse(name: &str, reason: &str) {
    metrics::plugin_deployed(name, DeployResult::Refused);
    tracing::error!(plugin = name, %reason, "plugin refused; the running version stays");
}

pub struct PluginWatcher {
    dir: PluginDir,
    runtime: Arc<PluginRuntime>,
    registry: Arc<PluginRegistry>,
    /// The stamp of the file last loaded (or refused) per plugin.
    settled: HashMap<String, Stamp>,
    /// A changed stamp seen once, waiting to be seen again unchanged.
    settling: HashMap<String, Stamp>,
}

impl PluginWatcher {
    /// Start from what the registry already runs (loaded from the same directory).
    pub fn new(dir: &Path, runtime: Arc<PluginRuntime>, registry: Arc<PluginRegistry>) -> Self {
        let dir = PluginDir::new(dir);
        let mut settled = HashMap::new();
        for name in registry.names() {
            if let Some(stamp) = stamp(&dir.active_file(&name)) {
                settled.insert(name.clone(), stamp);
            }
            // The running version is the baseline a rollback can return to.
            if let Some(plugin) = registry.get(&name) {
                let known = dir.history(&name).last().map(|d| d.version.clone());
                if known.as_deref() != Some(plugin.version.as_str()) {
                    if let Ok(bytes) = std::fs::read(dir.active_file(&name)) {
                        if let Err(err) = dir.record(&name, &bytes) {
                            tracing::warn!(%err, plugin = %name, "cannot keep the running version");
                        }
                    }
                }
            }
        }
        PluginWatcher {
            dir,
            runtime,
            registry,
            settled,
            settling: HashMap::new(),
        }
    }

    /// Look at the directory once and deploy what changed and has settled.
    pub async fn scan(&mut self) -> Vec<DeployOutcome> {
        let mut outcomes = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return outcomes;
        };
        let mut files: Vec<(String, Stamp)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let path = entry.path();
                let name = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".wasm")?
                    .to_string();
                valid_plugin_name(&name).then_some(())?;
                Some((name, stamp(&path)?))
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, current) in files {
            if self.settled.get(&name) == Some(&current) {
                continue;
            }
            if self.settling.insert(name.clone(), current) != Some(current) {
                continue;
            }
            self.settling.remove(&name);
            self.settled.insert(name.clone(), current);
            if let Some(outcome) = self.deploy(&name).await {
                outcomes.push(outcome);
            }
        }
        outcomes
    }

    async fn deploy(&self, name: &str) -> Option<DeployOutcome> {
        let bytes = match std::fs::read(self.dir.active_file(name)) {
            Ok(bytes) => bytes,
            Err(err) => {
                return Some(self.refused(name, format!("cannot read the file: {err}")));
            }
        };
        let running = self.registry.get(name).map(|p| p.version.clone());
        match self.runtime.load_bytes(name, bytes.clone()).await {
            Ok(plugin) if Some(&plugin.version) == running.as_ref() => None,
            Ok(plugin) => {
                let version = plugin.version.clone();
                put_in_service(&self.registry, &self.dir, plugin, &bytes);
                Some(DeployOutcome::Deployed {
                    plugin: name.to_string(),
                    version,
                })
            }
            Err(err) => Some(self.refused(name, err.to_string())),
        }
    }

    fn refused(&self, name: &str, reason: String) -> DeployOutcome {
        refuse(name, &reason);
        DeployOutcome::Refused {
            plugin: name.to_string(),
            reason,
        }
    }

    /// Scan every `every` until `shutdown` turns true.
    pub async fn run(mut self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            self.scan().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
