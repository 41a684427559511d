//! Test plugin `log-flood`: writes config `lines` lines (default 200) of config
//! `line_bytes` bytes each (default 1 MiB) to the host's log, or, with config
//! `stream = "stderr"`, to its stderr, then answers `delivered`. The host's tests check
//! that the log budget bounds what reaches the host's log, and that a plugin filling its
//! stderr fails its attempt with a clear reason.

use std::io::Write;

use herald_sdk::prelude::*;

struct LogFlood;

impl Plugin for LogFlood {
    fn describe() -> PluginInfo {
        PluginInfo::new("log-flood", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::optional(
                "lines",
                "Lines to write (default 200).",
            ))
            .config(ConfigKey::optional(
                "line_bytes",
                "Bytes per line (default 1 MiB).",
            ))
            .config(ConfigKey::optional(
                "stream",
                "`log` (default) or `stderr`.",
            ))
    }

    fn handle(_event: Event) -> Outcome {
        let (lines, line_bytes) = match (
            config::parse::<u32>("lines"),
            config::parse::<usize>("line_bytes"),
        ) {
            (Ok(lines), Ok(line_bytes)) => (lines.unwrap_or(200), line_bytes.unwrap_or(1 << 20)),
            (Err(err), _) | (_, Err(err)) => return Outcome::dead(err.to_string()),
        };
        let line = "L".repeat(line_bytes);
        let to_stderr = config::get("stream").as_deref() == Some("stderr");
        for _ in 0..lines {
            if to_stderr {
                // `eprintln!` would panic on a failed write; a plugin that keeps writing
                // regardless is the case under test.
                let _ = writeln!(std::io::stderr(), "{line}");
            } else {
                log::info(&line);
            }
        }
        Outcome::delivered_with(format!("wrote {lines} lines of {line_bytes} bytes"))
    }
}

herald_sdk::export_plugin!(LogFlood);
