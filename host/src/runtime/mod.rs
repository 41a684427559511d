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
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

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
    /// A Rust guest's panic: its message and location, read from the plugin's stderr.
    #[error("plugin panicked: {0}")]
    Panic(String),
    /// A per-call limit of a host capability (e.g. `http.send` calls).
    #[error("plugin exceeded its limit of {0}")]
    CapabilityLimit(String),
    /// The plugin answered `delivered` although the host refused some of its emits:
    /// recording it would commit only part of the effect, so the attempt fails instead.
    #[error("plugin answered delivered after the host refused {refused} of its emits (first: {first}); nothing it emitted is committed")]
    EmitsRefused { refused: u32, first: String },
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
        // At every epoch tick a running plugin either stops (its time is up) or hands its
        // thread back to the executor for a moment. Without the yield, a plugin computing
        // until its limit holds a runtime worker thread all that time: on 2 cores, two
        // such plugins stalled every other route, their claims and their commits.
        store.epoch_deadline_callback(|store| match store.data().call_deadline {
            Some(deadline) if Instant::now() >= deadline => Ok(UpdateDeadline::Interrupt),
            _ => Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            )),
        });
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
                Ok(Ok(outcome)) => answered(outcome, current.store.data()),
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
        store.data_mut().call_deadline = Some(Instant::now() + limit);
        store.set_epoch_deadline(1);
    }
}

/// An instance and its store, serving events of one batch in turn.
struct LiveInstance {
    store: Store<HostState>,
    instance: bindings::Plugin,
    served: u32,
}

/// The plugin's own answer, unless it answered `delivered` after the host refused some of
/// its emits.
fn answered(outcome: Outcome, state: &HostState) -> Result<Outcome, PluginFault> {
    match (&outcome, &state.first_refused_emit) {
        (Outcome::Delivered(_), Some(first)) => Err(PluginFault::EmitsRefused {
            refused: state.emits_refused,
            first: first.clone(),
        }),
        _ => Ok(outcome),
    }
}

/// Bytes of a plugin's stderr, or of its panic message, quoted in a fault's reason.
const STDERR_IN_REASON: usize = 500;

fn classify(err: &wasmtime::Error, state: &HostState, limits: &CallLimits) -> PluginFault {
    if let Some(requested) = state.memory_refused {
        return PluginFault::MemoryLimit {
            limit: limits.memory,
            requested,
        };
    }
    if let Some(limit) = &state.limit_exceeded {
        return PluginFault::CapabilityLimit(limit.clone());
    }
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return PluginFault::TimeLimit(limits.time);
    }
    // A Rust guest prints its panic to stderr and then aborts, which is a trap: the
    // message is what explains it. The whole of the event's stderr (at most the pipe's
    // capacity) is searched, so a long message cannot push the `panicked at` line out.
    if let Some(panic) = state
        .stderr_tail(usize::MAX)
        .as_deref()
        .and_then(panic_message)
    {
        return PluginFault::Panic(panic);
    }
    let stderr = state.stderr_tail(STDERR_IN_REASON);
    match err.downcast_ref::<Trap>() {
        Some(trap) => {
            let mut reason = match trap {
                Trap::StackOverflow => format!("stack overflow ({trap})"),
                _ => trap.to_string(),
            };
            if let Some(stderr) = stderr {
                reason.push_str(&format!("; stderr: {stderr}"));
            }
            PluginFault::Trap(reason)
        }
        None => PluginFault::Trap(plugin::first_line(err)),
    }
}

/// `<message> (at <file:line:column>)` from the stderr of a Rust guest that
/// panicked: `thread '<unnamed>' panicked at src/lib.rs:15:9:`, the message on the
/// following lines, then maybe a `note: run with RUST_BACKTRACE` hint. The tail has its
/// lines joined with ` | ` (as `stderr_tail` gives it).
fn panic_message(stderr: &str) -> Option<String> {
    const MARKER: &str = " panicked at ";
    let after = &stderr[stderr.rfind(MARKER)? + MARKER.len()..];
    let (location, message) = after.split_once(" | ").unwrap_or((after, ""));
    let location = location.trim().trim_end_matches(':');
    let message = message
        .split(" | ")
        .take_while(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .collect::<Vec<_>>()
        .join(" | ");
    let mut message = message.trim();
    if message.is_empty() {
        message = "(no message)";
    }
    if message.len() > STDERR_IN_REASON {
        let cut = (0..=STDERR_IN_REASON)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        return Some(format!("{} …[truncated] (at {location})", &message[..cut]));
    }
    Some(format!("{message} (at {location})"))
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn a_panic_is_told_by_its_message_and_location() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:15:9: | no url for order 7 | note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("no url for order 7 (at src/lib.rs:15:9)")
        );
        let long = format!("thread 'x' panicked at a.rs:1:1: | {}", "é".repeat(1000));
        let told = panic_message(&long).unwrap_or_default();
        assert!(told.ends_with(" …[truncated] (at a.rs:1:1)"), "{told}");
        assert!(told.len() < 600);
        assert_eq!(panic_message("just some output"), None);
    }
}
