//! Logs go to stderr through `tracing`, so stdout stays clean for tables and JSON.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line, for log collectors
    Json,
}

/// The level when `RUST_LOG` is not set: commands answer on stdout, logs are for trouble.
pub const COMMAND_FILTER: &str = "warn";

/// The level of `herald serve` when `RUST_LOG` is not set: a service's logs are its output.
pub const SERVICE_FILTER: &str = "info";

pub fn init(format: LogFormat, default_filter: &str) {
    let (filter, rejected) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(err) => (EnvFilter::new(default_filter), Some(err)),
        },
        _ => (EnvFilter::new(default_filter), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A subscriber installed earlier (by a program embedding this crate) keeps its place.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(err) = rejected {
        tracing::warn!("RUST_LOG is not a valid filter ({err}); logging at '{default_filter}'");
    }
}
