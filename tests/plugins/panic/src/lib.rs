//! Test plugin `panic`: panics on every event, so the host's tests can check that the
//! panic message (which a Rust guest writes to stderr before it aborts) reaches the
//! attempts log.

use herald_sdk::prelude::*;

struct Panic;

impl Plugin for Panic {
    fn describe() -> PluginInfo {
        PluginInfo::new("panic", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(event: Event) -> Outcome {
        panic!("deliberate panic on event {}", event.id)
    }
}

herald_sdk::export_plugin!(Panic);
