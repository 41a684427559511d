//! The one wasmtime engine of the process: pooling allocator, epoch interruption, and a
//! linker that knows WASI (granting nothing) and Herald's capabilities.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::Plugin;
use super::host::HostState;

/// Sizing of the engine; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Plugin instances alive at once; dispatch concurrency must not exceed it.
    pub max_instances: u32,
    /// The largest memory any route may grant.
    pub max_memory: usize,
    /// Granularity of time limits.
    pub epoch_tick: Duration,
    /// Where compiled plugins are kept between runs, so a restart need not compile them
    /// again; `None` compiles every time. Only a directory Herald owns: what is in it
    /// runs as native code.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_instances: 64,
            max_memory: 256 << 20,
            epoch_tick: Duration::from_millis(10),
            cache_dir: None,
        }
    }
}

/// Bytes of each freed linear memory reset in place rather than released: a plugin's
/// stack and data, as a Rust component lays them out, fit.
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;
/// The same for each freed table.
const KEEP_RESIDENT_TABLE: usize = 128 << 10;

pub(super) fn build_engine(settings: &EngineSettings) -> wasmtime::Result<Engine> {
    let instances = settings.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A rustc component holds a few core instances (its module plus shims), one memory
    // and a couple of tables; leave room for other toolchains' layouts.
    pool.total_component_instances(instances)
        .total_core_instances(instances * 8)
        .total_memories(instances * 2)
        .total_tables(instances * 4)
        .total_stacks(instances)
        .max_memory_size(settings.max_memory);
    // A freed slot is reset by writing its low pages back to their initial contents
    // (only the pages the instance touched, where the kernel can say which) instead of
    // handing them back to the kernel: each `madvise` of a freed instance flushed the
    // other core's TLB, and a fresh instance cost twice as much
    // (docs/benchmarks-history.md, the seventh refresh). The reset is the same either
    // way: the next instance sees nothing of the last.
    pool.linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    // Plugins make blocking calls (each instance runs one event at a time), never the
    // component model's concurrent ones. Without concurrency support a store neither sets
    // up that machinery nor takes it down on drop, and the take-down built an error value
    // each time: with `RUST_BACKTRACE=1` in the environment it captured a backtrace, 7–8
    // µs of a fresh instance's 21 (docs/benchmarks-history.md, the eleventh refresh).
    config
        .wasm_component_model(true)
        .concurrency_support(false)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

pub(super) fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;
    Ok(linker)
}

/// Advances the engine's epoch on a plain thread, so time limits hold even when every
/// tokio worker is busy running plugins.
pub(super) struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("herald-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochTicker { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
