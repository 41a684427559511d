//! Test plugin `trap`: traps on every event, so the host's tests can check that a trap
//! fails that attempt only (and that repeated traps quarantine the plugin).

use herald_sdk::prelude::*;

struct Trap;

impl Plugin for Trap {
    fn describe() -> PluginInfo {
        PluginInfo::new("trap", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        // On wasm32 this is the `unreachable` instruction: a trap, with no outcome.
        std::process::abort()
    }
}

herald_sdk::export_plugin!(Trap);
