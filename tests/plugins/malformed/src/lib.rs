//! Test plugin `malformed`: answers with what a plugin can hand the host that the host
//! must not trust, chosen by config `case`:
//!
//! - emits (each refused by the host; the plugin ignores the refusal and answers
//!   `delivered`): `emit-non-json-data`, `emit-empty-type`, `emit-nul-type`,
//!   `emit-nul-data` (a `\u0000` escape, which Postgres `jsonb` cannot store),
//!   `emit-nul-header`, `emit-empty-header-name`, `emit-empty-key`, `emit-long-type`;
//! - answers: `nul-receipt`, `nul-reason` (dead), `nul-skip`, `retry-forever` (a retry
//!   after `u64::MAX` milliseconds).

use std::time::Duration;

use herald_sdk::prelude::*;

struct Malformed;

/// Longer than any identity field the host accepts.
const LONG_FIELD_BYTES: usize = 100_000;

impl Plugin for Malformed {
    fn describe() -> PluginInfo {
        PluginInfo::new("malformed", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::required(
                "case",
                "Which malformed answer to give.",
            ))
    }

    fn handle(event: Event) -> Outcome {
        let case = config::get("case").unwrap_or_default();
        let valid = || NewEvent::same_entity_as(&event, "malformed.emitted");
        let emitted = match case.as_str() {
            "emit-non-json-data" => {
                let mut bad = valid();
                bad.data = "{not json".into();
                bad
            }
            "emit-empty-type" => NewEvent::same_entity_as(&event, " "),
            "emit-nul-type" => NewEvent::same_entity_as(&event, "malformed\0emitted"),
            "emit-nul-data" => {
                let mut bad = valid();
                bad.data = r#"{"text": "a\u0000b"}"#.into();
                bad
            }
            "emit-nul-header" => valid().header("x-trace", "a\0b"),
            "emit-empty-header-name" => valid().header("", "value"),
            "emit-empty-key" => valid().idempotency_key(""),
            "emit-long-type" => NewEvent::same_entity_as(&event, "t".repeat(LONG_FIELD_BYTES)),
            "nul-receipt" => return Outcome::delivered_with("receipt\0with a NUL"),
            "nul-reason" => return Outcome::dead("reason\0with a NUL"),
            "nul-skip" => return Outcome::skip("skip\0with a NUL"),
            "retry-forever" => {
                return Outcome::retry_after(Duration::from_millis(u64::MAX), "see you never")
            }
            other => return Outcome::dead(format!("unknown case '{other}'")),
        };
        // Ignored on purpose: the host must not rely on the plugin to notice.
        let _ = emit::emit(emitted);
        Outcome::delivered()
    }
}

herald_sdk::export_plugin!(Malformed);
