//! The service half of `herald.toml`: where plugins live, how dispatch runs, the routes,
//! and the admin server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::dispatch::{DispatchSettings, RetryPolicy};

/// `[dispatch]`: how this instance claims and runs work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Lease owner name; empty means `hostname-pid`.
    pub instance_id: String,
    pub batch_size: u32,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wake when events are inserted instead of waiting for the next poll: on Postgres by
    /// LISTEN/NOTIFY, on SQLite by watching for other connections' commits.
    pub listen: bool,
    /// On SIGTERM, how long attempts in flight may take to finish before their leases
    /// are released.
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Consecutive plugin faults that quarantine the plugin; 0 never does.
    pub quarantine_after: u32,
    /// An event whose `event_data` or `headers` is longer (in bytes) is DEAD at fan-out
    /// with its size in the reason; it never reaches a plugin.
    pub max_event_bytes: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        // One set of defaults: the dispatcher's own.
        let defaults = DispatchSettings::default();
        DispatchConfig {
            instance_id: String::new(),
            batch_size: defaults.batch_size,
            concurrency: defaults.concurrency,
            lease: defaults.lease,
            poll_interval: defaults.poll_interval,
            listen: defaults.listen,
            shutdown_deadline: defaults.shutdown_deadline,
            quarantine_after: defaults.quarantine_after,
            max_event_bytes: defaults.max_event_bytes,
        }
    }
}

impl DispatchConfig {
    /// What is wrong with `[dispatch]`: the key, and a message naming it.
    pub(super) fn problem(&self) -> Option<(&'static str, String)> {
        if self.batch_size == 0 {
            return Some((
                "batch_size",
                "[dispatch] batch_size must be at least 1 (0 would fan out and claim nothing)"
                    .to_string(),
            ));
        }
        (self.max_event_bytes == 0).then(|| {
            (
                "max_event_bytes",
                "[dispatch] max_event_bytes must be at least 1 (0 would refuse every event)"
                    .to_string(),
            )
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Per (entity_type, entity_id): a later event waits for the earlier ones.
    #[default]
    Entity,
    /// No ordering: every event runs as soon as it is due.
    None,
}

/// `[routes.retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let policy = RetryPolicy::default();
        RetryConfig {
            max_attempts: policy.max_attempts,
            max_age: policy.max_age,
            backoff_base: policy.backoff_base,
            backoff_max: policy.backoff_max,
        }
    }
}

impl RetryConfig {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            max_age: self.max_age,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
        }
    }
}

/// `[[routes]]`: which events go to which plugin, and what the plugin may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Globs over `event_type`, e.g. `["order.*"]`.
    pub event_types: Vec<String>,
    /// Only events with this `event_target`.
    #[serde(default)]
    pub target: Option<String>,
    /// The plugin's name: `PLUGINS_DIR/NAME.wasm`.
    pub plugin: String,
    #[serde(default)]
    pub ordering: Ordering,
    /// Hosts the plugin may call: `api.example.com`, `host:8443`, `*.example.com`.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Permit loopback/private/link-local destinations (off: SSRF protection).
    #[serde(default)]
    pub allow_private: bool,
    #[serde(default = "default_time_limit", with = "humantime_serde")]
    pub time_limit: Duration,
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: u32,
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub http_timeout: Duration,
    /// Events one plugin instance handles in a row; 1 gives each event a fresh instance
    /// (nothing a plugin keeps in globals survives an event), at several times the cost.
    #[serde(default = "default_events_per_instance")]
    pub events_per_instance: u32,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Handed to the plugin through `config.get`. Strings are passed as written, other
    /// values as JSON; `"env:NAME"` is replaced by that environment variable.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

fn default_time_limit() -> Duration {
    Duration::from_secs(10)
}

fn default_memory_limit_mb() -> u32 {
    64
}

fn default_events_per_instance() -> u32 {
    crate::runtime::CallLimits::default().events_per_instance
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The largest memory a route may grant; also the engine's per-memory reservation.
pub const MAX_MEMORY_LIMIT_MB: u32 = 1024;

impl RouteConfig {
    /// What is wrong with this route on its own, if anything.
    pub(super) fn problem(&self, lease: Duration) -> Option<String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Some(format!(
                "route name '{}' must be non-empty letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        let prefix = format!("route '{}'", self.name);
        if self.event_types.is_empty() {
            return Some(format!(
                "{prefix}: event_types is empty; it would match nothing"
            ));
        }
        if self.plugin.is_empty()
            || self.plugin.contains(['/', '\\'])
            || self.plugin.starts_with('.')
        {
            return Some(format!(
                "{prefix}: plugin '{}' is not a plugin name",
                self.plugin
            ));
        }
        if self.time_limit.is_zero() || self.time_limit >= lease {
            return Some(format!(
                "{prefix}: time_limit must be above zero and below the dispatch lease ({})",
                humantime::format_duration(lease)
            ));
        }
        if self.memory_limit_mb == 0 || self.memory_limit_mb > MAX_MEMORY_LIMIT_MB {
            return Some(format!(
                "{prefix}: memory_limit_mb must be between 1 and {MAX_MEMORY_LIMIT_MB}"
            ));
        }
        if self.events_per_instance == 0 {
            return Some(format!("{prefix}: events_per_instance must be at least 1"));
        }
        if self.retry.max_attempts == 0 {
            return Some(format!("{prefix}: retry.max_attempts must be at least 1"));
        }
        if self.retry.backoff_base > self.retry.backoff_max {
            return Some(format!(
                "{prefix}: retry.backoff_base is above retry.backoff_max"
            ));
        }
        None
    }

    /// The `config` table as the plugin sees it, `env:` references resolved.
    pub fn resolved_config(&self) -> Result<BTreeMap<String, String>, String> {
        self.config
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::String(text) => match text.strip_prefix("env:") {
                        Some(var) => std::env::var(var).map_err(|_| {
                            format!(
                                "route '{}': config key '{key}' refers to environment variable {var}, which is not set",
                                self.name
                            )
                        })?,
                        None => text.clone(),
                    },
                    other => serde_json::to_string(other).map_err(|err| {
                        format!("route '{}': config key '{key}': {err}", self.name)
                    })?,
                };
                Ok((key.clone(), text))
            })
            .collect()
    }
}

/// `[admin]`: the HTTP server for probes, metrics and the JSON API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Bearer token for `/api`; `"env:NAME"` reads a variable. `HERALD_ADMIN_TOKEN`
    /// overrides it. Required when `listen` is not a loopback address.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7474)),
            token: None,
        }
    }
}

/// Overrides `[admin] token`.
pub const ADMIN_TOKEN_ENV: &str = "HERALD_ADMIN_TOKEN";

impl AdminConfig {
    /// The token in force: the environment's, else the file's (resolving `env:`).
    pub fn resolved_token(&self) -> Result<Option<String>, String> {
        if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
            if !token.trim().is_empty() {
                return Ok(Some(token));
            }
        }
        match self.token.as_deref() {
            None => Ok(None),
            Some(text) => match text.strip_prefix("env:") {
                Some(var) => std::env::var(var).map(Some).map_err(|_| {
                    format!("admin.token refers to environment variable {var}, which is not set")
                }),
                None => Ok(Some(text.to_string())),
            },
        }
    }
}
