//! Test plugin `giant-output`: answers with a string of config `bytes` bytes (default
//! 32 MiB) as a receipt (config `as = "receipt"`) or as a retry reason (the default), so
//! the host's tests can check that what the host stores of a plugin's answer is bounded.

use herald_sdk::prelude::*;

struct GiantOutput;

const DEFAULT_BYTES: usize = 32 << 20;

impl Plugin for GiantOutput {
    fn describe() -> PluginInfo {
        PluginInfo::new("giant-output", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::optional(
                "bytes",
                "Length of the answer (default 32 MiB).",
            ))
            .config(ConfigKey::optional(
                "as",
                "`receipt` or `reason` (default).",
            ))
    }

    fn handle(_event: Event) -> Outcome {
        let bytes = match config::parse::<usize>("bytes") {
            Ok(bytes) => bytes.unwrap_or(DEFAULT_BYTES),
            Err(err) => return Outcome::dead(err.to_string()),
        };
        let giant = "G".repeat(bytes);
        match config::get("as").as_deref() {
            Some("receipt") => Outcome::delivered_with(giant),
            _ => Outcome::retry(giant),
        }
    }
}

herald_sdk::export_plugin!(GiantOutput);
