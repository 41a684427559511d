//! Test plugin `emit-flood`: emits config `count` events (default 5,000) of config
//! `data_bytes` bytes of data each (default a few), ignores every refusal and answers
//! `delivered`, so the host's tests can check that the emit limits hold and that a
//! delivery whose emits were cut short is not recorded as delivered.

use herald_sdk::prelude::*;

struct EmitFlood;

impl Plugin for EmitFlood {
    fn describe() -> PluginInfo {
        PluginInfo::new("emit-flood", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::optional(
                "count",
                "Events to emit (default 5000).",
            ))
            .config(ConfigKey::optional(
                "data_bytes",
                "Length of a string in each event's data (default 8).",
            ))
    }

    fn handle(event: Event) -> Outcome {
        let (count, data_bytes) = match (
            config::parse::<u32>("count"),
            config::parse::<usize>("data_bytes"),
        ) {
            (Ok(count), Ok(data_bytes)) => (count.unwrap_or(5_000), data_bytes.unwrap_or(8)),
            (Err(err), _) | (_, Err(err)) => return Outcome::dead(err.to_string()),
        };
        let filler = "F".repeat(data_bytes);
        for n in 0..count {
            let flood = NewEvent::same_entity_as(&event, "flood.emitted")
                .data(serde_json::json!({ "n": n, "filler": filler }));
            // Ignored on purpose: the host must not count on plugins to stop.
            let _ = emit::emit(flood);
        }
        Outcome::delivered()
    }
}

herald_sdk::export_plugin!(EmitFlood);
