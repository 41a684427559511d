//! Runs plugins: one wasmtime engine, plugins compiled once and pre-linked
//! (`InstancePre`), instances made fresh per batch of events (at most the route's
//! `events_per_instance` each), with the route's limits.

mod bindings;
mod cache;
mod engine;
mod host;
pub mod hot_reload;
mod limits;
mod plugin;
mod registry;
pub mod versions;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use wasmtime::component::Linker;
use wasmtime::{Engine, Store, Trap};

pub use bindings::{ConfigKey, Event, Outcome, PluginInfo, RetryRequest};
pub use engine::EngineSettings;
pub use host::RouteGrant;
pub use limits::CallLimits;
pub use plugin::{LoadError, LoadedPlugin};
pub use registry::PluginRegistry;

use bindings::PluginPre;
use cache::{CompileCache, Compiled};
use engine::EpochTicker;
use host::HostState;

use crate::store::NewEvent;

/// Why a call produced no outcome. Each fails only its attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginFault {
    #[error("plugin exceeded its time limit of {0:?}")]
    TimeLimit(Duration),
    #[error("plugin exceeded its memory limit of {limit} bytes (asked for {requested})")]
    MemoryLimit { limit: usize, requested: usize },
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
}

/// The result of one call: the plugin's outcome (or the fault that stopped it) and the
/// events it emitted, which only a `delivered` outcome may commit.
pub struct CallReport {
    pub outcome: Result<Outcome, PluginFault>,
    pub emitted: Vec<NewEvent>,
    /// When this event's call started, and how long it took (an instantiation it
    /// needed included).
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the plugin runtime: {0}")]
pub struct RuntimeError(String);

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    settings: EngineSettings,
    cache: Option<Arc<CompileCache>>,
    _ticker: EpochTicker,
}

impl PluginRuntime {
    pub fn new(settings: EngineSettings) -> Result<Self, RuntimeError> {
        let engine = engine::build_engine(&settings).map_err(|e| RuntimeError(format!("{e:#}")))?;
        let linker = engine::build_linker(&engine).map_err(|e| RuntimeError(format!("{e:#}")))?;
        let ticker = EpochTicker::start(engine.clone(), settings.epoch_tick)
            .map_err(|e| RuntimeError(format!("epoch thread: {e}")))?;
        let cache = settings
            .cache_dir
            .clone()
            .map(|dir| Arc::new(CompileCache::new(dir, &engine)));
        Ok(PluginRuntime {
            engine,
            linker,
            settings,
            cache,
            _ticker: ticker,
        })
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Load `NAME.wasm`; the plugin's name is the file stem.
    pub async fn load_file(&self, path: &Path) -> Result<LoadedPlugin, LoadError> {
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = plugin::read(path)?;
        self.load_bytes(&name, bytes).await
    }

    /// Compile, link and check a plugin: it must instantiate against this host's
    /// interface and answer `describe()` within the default limits.
    pub async fn load_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<LoadedPlugin, LoadError> {
        let version = plugin::content_version(&bytes);
        let engine = self.engine.clone();
        let owned_name = name.to_string();
        let cache = self.cache.clone();
        // Compilation takes milliseconds to seconds of CPU, and the cache reads and writes
        // files: keep both off the async workers.
        let Compiled {
            component,
            from_cache,
        } = tokio::task::spawn_blocking(move || match cache {
            Some(cache) => cache.load_or_compile(&engine, &owned_name, &bytes),
            None => plugin::compile(&engine, &owned_name, &bytes).map(|component| Compiled {
                component,
                from_cache: false,
            }),
        })
        .await
        .map_err(|err| LoadError::Compile {
            name: name.to_string(),
            reason: format!("compiler task failed: {err}"),
        })??;
        let interface_error = |err: wasmtime::Error| LoadError::Interface {
            name: name.to_string(),
            reason: plugin::first_line(&err),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(interface_error)?;
        let pre = PluginPre::new(pre).map_err(interface_error)?;

        let grant = Arc::new(RouteGrant {
            route: "(deploy check)".into(),
            plugin: name.to_string(),
            config: BTreeMap::new(),
            http: None,
            limits: CallLimits::default(),
        });
        let mut store = self.new_store(grant, 0);
        let describe = async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance.call_describe(&mut store).await
        };
        let info = match tokio::time::timeout(CallLimits::default().time, describe).await {
            Ok(Ok(info)) => info,
            Ok(Err(err)) => {
                return Err(LoadError::Describe {
                    name: name.to_string(),
                    reason: plugin::first_line(&err),
                })
            }
            Err(_) => {
                return Err(LoadError::Describe {
                    name: name.to_string(),
                    reason: "describe() did not answer in time".into(),
                })
            }
        };
        Ok(LoadedPlugin {
            name: name.to_string(),
            version,
            info,
            from_cache,
            pre,
        })
    }

    fn new_store(&self, grant: Arc<RouteGrant>, event_id: i64) -> Store<HostState> {
        let time_limit = grant.limits.time;
        let mut store = Store::new(&self.engine, HostState::new(grant, event_id));
        store.limiter(|state| state);
        self.arm_time_limit(&mut store, time_limit);
        store.epoch_deadline_trap();
        store
    }

    /// Run `handle(event)` in a fresh instance under the grant's limits.
    pub async fn call(
        &self,
        plugin: &LoadedPlugin,
        grant: Arc<RouteGrant>,
        event: Event,
    ) -> CallReport {
        let mut reports = self.call_batch(plugin, grant, vec![event]).await;
        reports.pop().unwrap_or_else(|| CallReport {
            outcome: Err(PluginFault::Instantiate("no report for the call".into())),
            emitted: Vec::new(),
            started_at: Utc::now(),
            duration: Duration::ZERO,
        })
    }

    /// Run `handle` for each event in turn, one report per event in input order. An
    /// instance serves up to the grant's `events_per_instance` events; it is replaced
    /// after any fault (a trapped instance cannot be entered again) and when its stderr
    /// fills up. Each call has the full time limit; memory is the instance's.
    pub async fn call_batch(
        &self,
        plugin: &LoadedPlugin,
        grant: Arc<RouteGrant>,
        events: Vec<Event>,
    ) -> Vec<CallReport> {
        let limits = grant.limits.clone();
        let per_instance = limits.events_per_instance.max(1);
        // Epochs stop a plugin that computes; the timeout stops one parked in a host call.
        let grace = self.settings.epoch_tick * 10;
        let mut reports = Vec::with_capacity(events.len());
        let mut live: Option<LiveInstance> = None;
        for event in events {
            let started_at = Utc::now();
            let clock = Instant::now();
            if live
                .as_ref()
                .is_some_and(|l| l.served >= per_instance || l.store.data().stderr_filling())
            {
                live = None;
            }
            let current = match live.as_mut() {
                Some(current) => current,
                None => match self.instantiate(plugin, grant.clone(), event.id).await {
                    Ok(fresh) => live.insert(fresh),
                    Err(fault) => {
                        crate::metrics::plugin_fault(&grant.route, &plugin.name, &fault);
                        reports.push(CallReport {
                            outcome: Err(fault),
                            emitted: Vec::new(),
                            started_at,
                            duration: clock.elapsed(),
                        });
                        continue;
                    }
                },
            };
            current.store.data_mut().begin_event(event.id);
            self.arm_time_limit(&mut current.store, limits.time);
            let call = current.instance.call_handle(&mut current.store, &event);
            let outcome = match tokio::time::timeout(limits.time + grace, call).await {
                Err(_) => Err(PluginFault::TimeLimit(limits.time)),
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(err)) => Err(classify(&err, current.store.data(), &limits)),
            };
            current.served += 1;
            let emitted = std::mem::take(&mut current.store.data_mut().emitted);
            if let Err(fault) = &outcome {
                crate::metrics::plugin_fault(&grant.route, &plugin.name, fault);
                live = None;
            }
            reports.push(CallReport {
                outcome,
                emitted,
                started_at,
                duration: clock.elapsed(),
            });
        }
        reports
    }

    async fn instantiate(
        &self,
        plugin: &LoadedPlugin,
        grant: Arc<RouteGrant>,
        event_id: i64,
    ) -> Result<LiveInstance, PluginFault> {
        let time = grant.limits.time;
        let mut store = self.new_store(grant, event_id);
        let instantiating = plugin.pre.instantiate_async(&mut store);
        match tokio::time::timeout(time, instantiating).await {
            Ok(Ok(instance)) => Ok(LiveInstance {
                store,
                instance,
                served: 0,
            }),
            Ok(Err(err)) => Err(PluginFault::Instantiate(plugin::first_line(&err))),
            Err(_) => Err(PluginFault::Instantiate(format!(
                "instantiation took longer than {time:?}"
            ))),
        }
    }

    fn arm_time_limit(&self, store: &mut Store<HostState>, limit: Duration) {
        let tick = self.settings.epoch_tick.as_nanos().max(1);
        let ticks = limit.as_nanos().div_ceil(tick);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX).max(1));
    }
}

/// An instance and its store, serving events of one batch in turn.
struct LiveInstance {
    store: Store<HostState>,
    instance: bindings::Plugin,
    served: u32,
}

fn classify(err: &wasmtime::Error, state: &HostState, limits: &CallLimits) -> PluginFault {
    if let Some(requested) = state.memory_refused {
        return PluginFault::MemoryLimit {
            limit: limits.memory,
            requested,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginFault::TimeLimit(limits.time),
        Some(trap) => {
            let mut reason = trap.to_string();
            if let Some(stderr) = state.stderr_tail(500) {
                reason.push_str(&format!("; stderr: {stderr}"));
            }
            PluginFault::Trap(reason)
        }
        None => PluginFault::Trap(plugin::first_line(err)),
    }
}
