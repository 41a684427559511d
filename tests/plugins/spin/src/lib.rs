//! Test plugin `spin`: never returns, so the host's tests can check that the time limit
//! (epoch deadline) interrupts it and fails that attempt only.

use herald_sdk::prelude::*;

struct Spin;

impl Plugin for Spin {
    fn describe() -> PluginInfo {
        PluginInfo::new("spin", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        let mut turns: u64 = 0;
        loop {
            // black_box keeps the compiler from proving the loop pointless.
            turns = std::hint::black_box(turns.wrapping_add(1));
        }
    }
}

herald_sdk::export_plugin!(Spin);
