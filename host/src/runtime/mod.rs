//! Runs plugins: one wasmtime engine, plugins compiled once and pre-linked
//! (`InstancePre`), a fresh instance and store per call, with the route's limits.

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
use std::time::Duration;

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
        let tick = self.settings.epoch_tick.as_nanos().max(1);
        let ticks = time_limit.as_nanos().div_ceil(tick);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX).max(1));
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
        let limits = grant.limits.clone();
        let mut store = self.new_store(grant.clone(), event.id);
        let run = async {
            let instance = plugin
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|err| Err(PluginFault::Instantiate(plugin::first_line(&err))))?;
            instance.call_handle(&mut store, &event).await.map_err(Ok)
        };
        // Epochs stop a plugin that computes; this stops one parked in a host call.
        let grace = self.settings.epoch_tick * 10;
        let result = tokio::time::timeout(limits.time + grace, run).await;
        let outcome = match result {
            Err(_) => Err(PluginFault::TimeLimit(limits.time)),
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(Err(fault))) => Err(fault),
            Ok(Err(Ok(err))) => Err(classify(&err, store.data(), &limits)),
        };
        if let Err(fault) = &outcome {
            crate::metrics::plugin_fault(&grant.route, &plugin.name, fault);
        }
        let emitted = std::mem::take(&mut store.data_mut().emitted);
        CallReport { outcome, emitted }
    }
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
