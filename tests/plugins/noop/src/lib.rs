//! Test plugin `noop`: every event is delivered, nothing is done. What a benchmark runs to
//! measure the host's own cost per event.

use herald_sdk::prelude::*;

struct Noop;

impl Plugin for Noop {
    fn describe() -> PluginInfo {
        PluginInfo::new("noop", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        Outcome::delivered()
    }
}

herald_sdk::export_plugin!(Noop);
