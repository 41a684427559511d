//! Test plugin `memory-bomb`: allocates and writes memory until the allocator fails, so
//! the host's tests can check that the memory limit stops it (as a trap) and fails that
//! attempt only.

use herald_sdk::prelude::*;

struct MemoryBomb;

/// One allocation; small enough that the limit is hit close to where it is set.
const CHUNK_BYTES: usize = 1 << 20;

impl Plugin for MemoryBomb {
    fn describe() -> PluginInfo {
        PluginInfo::new("memory-bomb", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Non-zero fill: every page is written, so none can stay untouched.
            let chunk = vec![0xA5_u8; CHUNK_BYTES];
            hoard.push(std::hint::black_box(chunk));
            std::hint::black_box(&hoard);
        }
    }
}

herald_sdk::export_plugin!(MemoryBomb);
