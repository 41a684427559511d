//! Environment overrides: `HERALD_<SECTION>_<KEY>` beats the file, so a container or a
//! systemd unit can change a setting without editing `herald.toml`. (`HERALD_STORE` is
//! handled with the store's own precedence, `HERALD_INSTANCE_ID` and `HERALD_ADMIN_TOKEN`
//! where they are used; routes are only configured in the file.)

use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, ConfigError, DispatchConfig};

/// The variables understood, for documentation and tests.
pub const OVERRIDES: &[&str] = &[
    "HERALD_PLUGINS_DIR",
    "HERALD_DISPATCH_BATCH_SIZE",
    "HERALD_DISPATCH_CONCURRENCY",
    "HERALD_DISPATCH_LEASE",
    "HERALD_DISPATCH_POLL_INTERVAL",
    "HERALD_DISPATCH_LISTEN",
    "HERALD_DISPATCH_SHUTDOWN_DEADLINE",
    "HERALD_DISPATCH_QUARANTINE_AFTER",
    "HERALD_DISPATCH_MAX_EVENT_BYTES",
    "HERALD_ADMIN_ENABLED",
    "HERALD_ADMIN_LISTEN",
];

fn invalid(var: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Env {
        var: var.to_string(),
        message: format!("'{value}' is not {expected}"),
    }
}

fn duration(var: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value)
        .map_err(|_| invalid(var, value, "a duration like 500ms or 30s"))
}

fn number<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(var, value, "a whole number"))
}

/// What `var` made wrong in `[dispatch]`, as its error.
fn refuse_problem(var: &str, dispatch: &DispatchConfig) -> Result<(), ConfigError> {
    match dispatch.problem() {
        Some((_, message)) => Err(ConfigError::Env {
            var: var.to_string(),
            message,
        }),
        None => Ok(()),
    }
}

fn flag(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(var, value, "true or false")),
    }
}

impl Config {
    /// Apply every override `lookup` knows of (in production: the process environment).
    pub fn apply_overrides(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for var in OVERRIDES {
            let Some(value) = lookup(var).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            let value = value.trim();
            let dispatch = &mut self.dispatch;
            let admin = &mut self.admin;
            match *var {
                "HERALD_PLUGINS_DIR" => self.plugins_dir = Some(value.to_string()),
                "HERALD_DISPATCH_BATCH_SIZE" => {
                    dispatch.batch_size = number(var, value)?;
                    refuse_problem(var, dispatch)?;
                }
                "HERALD_DISPATCH_CONCURRENCY" => dispatch.concurrency = number(var, value)?,
                "HERALD_DISPATCH_LEASE" => dispatch.lease = duration(var, value)?,
                "HERALD_DISPATCH_POLL_INTERVAL" => dispatch.poll_interval = duration(var, value)?,
                "HERALD_DISPATCH_LISTEN" => dispatch.listen = flag(var, value)?,
                "HERALD_DISPATCH_SHUTDOWN_DEADLINE" => {
                    dispatch.shutdown_deadline = duration(var, value)?
                }
                "HERALD_DISPATCH_QUARANTINE_AFTER" => {
                    dispatch.quarantine_after = number(var, value)?
                }
                "HERALD_DISPATCH_MAX_EVENT_BYTES" => {
                    dispatch.max_event_bytes = number(var, value)?;
                    refuse_problem(var, dispatch)?;
                }
                "HERALD_ADMIN_ENABLED" => admin.enabled = flag(var, value)?,
                "HERALD_ADMIN_LISTEN" => {
                    admin.listen = value
                        .parse::<SocketAddr>()
                        .map_err(|_| invalid(var, value, "an address like 127.0.0.1:7474"))?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn overrides_beat_the_file() {
        let mut config = Config::parse("[dispatch]\nconcurrency = 4\n", Path::new("herald.toml"))
            .expect("parses");
        config
            .apply_overrides(env(&[
                ("HERALD_DISPATCH_CONCURRENCY", "64"),
                ("HERALD_DISPATCH_LEASE", "2m"),
                ("HERALD_ADMIN_LISTEN", "0.0.0.0:9000"),
                ("HERALD_ADMIN_ENABLED", "false"),
            ]))
            .expect("valid overrides");
        assert_eq!(config.dispatch().concurrency, 64);
        assert_eq!(config.dispatch().lease, Duration::from_secs(120));
        assert_eq!(config.admin().listen.port(), 9000);
        assert!(!config.admin().enabled);
    }

    /// The error of one override of a default config.
    fn refusal(var: &str, value: &str) -> String {
        Config::default()
            .apply_overrides(env(&[(var, value)]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn the_event_size_limit_can_be_overridden_but_not_to_zero() {
        let mut config = Config::default();
        config
            .apply_overrides(env(&[("HERALD_DISPATCH_MAX_EVENT_BYTES", "2048")]))
            .expect("valid override");
        assert_eq!(config.dispatch().max_event_bytes, 2048);
        let err = refusal("HERALD_DISPATCH_MAX_EVENT_BYTES", "0");
        assert!(
            err.starts_with("environment variable HERALD_DISPATCH_MAX_EVENT_BYTES: [dispatch] max_event_bytes must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn the_batch_size_cannot_be_overridden_to_zero() {
        let err = refusal("HERALD_DISPATCH_BATCH_SIZE", "0");
        assert!(
            err.starts_with("environment variable HERALD_DISPATCH_BATCH_SIZE: [dispatch] batch_size must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_override_names_the_variable() {
        let mut config = Config::default();
        let err = config
            .apply_overrides(env(&[("HERALD_DISPATCH_LEASE", "soon")]))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("environment variable HERALD_DISPATCH_LEASE: 'soon' is not a duration like 500ms or 30s")
        );
    }
}
