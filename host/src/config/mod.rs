//! `herald.toml`: finding it, reading it with located errors, and choosing the store.
//!
//! Store precedence: `--store` flag, then `HERALD_STORE`, then the file's `store` key, then
//! `sqlite://herald.db` beside the config file (or in the working directory without one).
//! A relative SQLite path in the file is relative to the file's directory, so a config
//! behaves the same whatever directory `herald` runs from.

mod env;
mod service;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::store::StoreUrl;

pub use service::{
    AdminConfig, DispatchConfig, Ordering, RetryConfig, RouteConfig, MAX_MEMORY_LIMIT_MB,
};

/// The file `herald` looks for in the working directory when no config is named.
pub const DEFAULT_CONFIG_FILE: &str = "herald.toml";

/// The store used when nothing names one.
pub const DEFAULT_STORE: &str = "sqlite://herald.db";

/// The environment variable that overrides the config file's `store`.
pub const STORE_ENV: &str = "HERALD_STORE";

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "HERALD_CONFIG";

const TEMPLATE: &str = r#"# herald.toml: configuration of Herald, the event handler for the transactional outbox.
#
# Every key may be left out; the value shown is the default. Unknown keys are errors, so a
# misspelt key is reported with its line instead of being silently ignored.

# Environment variables override this file: HERALD_STORE, HERALD_PLUGINS_DIR,
# HERALD_DISPATCH_<KEY> and HERALD_ADMIN_<KEY> (e.g. HERALD_DISPATCH_CONCURRENCY=64,
# HERALD_ADMIN_LISTEN=0.0.0.0:7474), HERALD_ADMIN_TOKEN and HERALD_INSTANCE_ID.

# The event store: the `events` table producers INSERT into, plus Herald's delivery books.
#
#   sqlite://PATH                      embedded store in one file; a relative PATH is
#                                      relative to the directory of this file
#   postgres://USER@HOST:PORT/DATABASE production, and the only store several instances
#                                      can share
#
# Overridden by the HERALD_STORE environment variable, which the --store flag overrides.
# Keep passwords out of this file: put them in HERALD_STORE or in ~/.pgpass.
store = "sqlite://herald.db"

# Log filter when RUST_LOG is not set (RUST_LOG wins), e.g. "info" or "herald=debug,warn".
# Default: "info" for `herald serve`, "warn" for the other commands.
# log_level = "info"

# Directory of plugins: each NAME.wasm in it is the plugin NAME. Relative to this file.
plugins_dir = "plugins"

# How this instance claims and runs deliveries. The values shown are the defaults.
[dispatch]
# instance_id = ""         # lease owner recorded in the attempts log; empty: hostname-pid
#                          # (HERALD_INSTANCE_ID overrides it)
# batch_size = 100         # events fanned out, and deliveries claimed, per round trip
# concurrency = 32         # plugin calls in flight at once
# lease = "60s"            # a claim is held this long; another instance may take it after
# poll_interval = "500ms"  # how often to look for new events when there is nothing to do
# shutdown_deadline = "30s"  # on SIGTERM, attempts in flight get this long to finish;
#                          # the leases of any still running are then released
# listen = true            # wake at once when events are inserted (Postgres: LISTEN/NOTIFY;
#                          # SQLite: a watch of the WAL file for any process's commits);
#                          # polling stays the safety net (a pooler in transaction mode
#                          # drops notifications)
# quarantine_after = 10    # consecutive plugin faults (trap, panic, a limit broken) that
#                          # pause the plugin's routes until `herald plugins resume NAME`;
#                          # 0: never
# max_event_bytes = 1048576  # 1 MiB: an event whose event_data or headers is larger is
#                          # DEAD with its size in status_reason, never handed to a plugin
#                          # (most brokers and webhook receivers refuse more anyway)

# The admin HTTP server of `herald serve`: /healthz, /readyz and the JSON API under /api.
[admin]
# enabled = true
# listen = "127.0.0.1:7474"  # loopback by default; another address requires a token
# token = "env:HERALD_ADMIN_TOKEN"  # bearer token for /api (HERALD_ADMIN_TOKEN overrides)

# Routes send events to plugins. An event may match several routes (fan-out); an event
# that no route matches is marked SKIPPED with the reason. For example:
#
# [[routes]]
# name = "orders-webhook"
# event_types = ["order.*"]               # globs over event_type
# target = "billing"                      # only events with this event_target (optional)
# plugin = "webhook"                      # plugins_dir/webhook.wasm
# ordering = "entity"                     # "entity": a later event of an entity waits
#                                         # for the earlier ones; "none": no ordering
# allowed_hosts = ["hooks.example.com"]   # hosts the plugin may call; none by default
# allow_private = false                   # allow loopback and private addresses
# time_limit = "10s"                      # per attempt, HTTP calls included
# memory_limit_mb = 64
# http_timeout = "10s"                    # default time-out of one HTTP request
# events_per_instance = 64                # events one plugin instance handles in a row;
#                                         # 1: a fresh instance (no state kept in the
#                                         # plugin's globals) for every event, slower
#
# [routes.retry]
# max_attempts = 12                       # then the delivery is DEAD
# max_age = "24h"                         # no retry past this age of the event
# backoff_base = "1s"                     # doubles per failure, with jitter
# backoff_max = "1h"
#
# [routes.config]                         # the plugin reads these with config.get;
# url = "https://hooks.example.com/orders"    # "env:NAME" reads an environment variable
# secret = "env:ORDERS_WEBHOOK_SECRET"
"#;

/// What `herald.toml` says, plus where it was read from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The store URL as written in the file, with its position for error messages.
    store: Option<Spanned<String>>,
    plugins_dir: Option<String>,
    log_level: Option<String>,
    #[serde(default)]
    dispatch: DispatchConfig,
    #[serde(default)]
    routes: Vec<Spanned<RouteConfig>>,
    #[serde(default)]
    admin: AdminConfig,
    /// The file this was read from; `None` when running on defaults.
    #[serde(skip)]
    path: Option<PathBuf>,
}

/// Where the chosen store URL came from, for logs and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSource {
    Flag,
    Env,
    ConfigFile,
    Default,
}

impl fmt::Display for StoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreSource::Flag => "--store",
            StoreSource::Env => STORE_ENV,
            StoreSource::ConfigFile => "the config file",
            StoreSource::Default => "the default",
        })
    }
}

/// The store URL to open and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreChoice {
    pub url: String,
    pub source: StoreSource,
}

/// A config file that cannot be used; every message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    InvalidUnlocated { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl Config {
    /// The commented `herald.toml` that `herald init` writes.
    pub fn template() -> &'static str {
        TEMPLATE
    }

    /// The template with another store URL in place of the default one.
    pub fn template_with_store(url: &str) -> String {
        let quoted = toml::Value::String(url.to_string()).to_string();
        TEMPLATE.replace(
            &format!("store = \"{DEFAULT_STORE}\""),
            &format!("store = {quoted}"),
        )
    }

    /// The config a command runs with: the named file (which must exist), otherwise
    /// `./herald.toml` when present, otherwise the defaults.
    pub fn discover(named: Option<&Path>) -> Result<Config, ConfigError> {
        let default = Path::new(DEFAULT_CONFIG_FILE);
        let mut config = match named {
            Some(path) => Config::load(path)?,
            None if default.is_file() => Config::load(default)?,
            None => Config::default(),
        };
        config.apply_overrides(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Config::parse(&text, path)
    }

    /// Parse config text; `path` is where it came from (for messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|err| {
            let message = readable_message(err.message());
            match err.span() {
                Some(span) => located(path, text, span.start, message),
                None => ConfigError::InvalidUnlocated {
                    path: path.to_path_buf(),
                    message,
                },
            }
        })?;
        if let Some(store) = &config.store {
            if let Err(err) = StoreUrl::parse(store.get_ref()) {
                return Err(located(path, text, store.span().start, err.to_string()));
            }
        }
        if let Some((key, problem)) = config.dispatch.problem() {
            return Err(match dispatch_key_offset(text, key) {
                Some(offset) => located(path, text, offset, problem),
                None => ConfigError::InvalidUnlocated {
                    path: path.to_path_buf(),
                    message: problem,
                },
            });
        }
        let mut names = std::collections::HashSet::new();
        for route in &config.routes {
            let problem = route.get_ref().problem(config.dispatch.lease).or_else(|| {
                (!names.insert(route.get_ref().name.clone()))
                    .then(|| format!("route name '{}' is used twice", route.get_ref().name))
            });
            if let Some(problem) = problem {
                return Err(located(path, text, route.span().start, problem));
            }
        }
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// The log filter when `RUST_LOG` is not set, e.g. `info` or `herald=debug,warn`.
    pub fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }

    /// Where plugins are loaded from: `plugins_dir`, relative to the config file.
    pub fn plugins_dir(&self) -> PathBuf {
        self.base_dir()
            .join(self.plugins_dir.as_deref().unwrap_or("plugins"))
    }

    pub fn dispatch(&self) -> &DispatchConfig {
        &self.dispatch
    }

    pub fn admin(&self) -> &AdminConfig {
        &self.admin
    }

    pub fn routes(&self) -> impl Iterator<Item = &RouteConfig> {
        self.routes.iter().map(Spanned::get_ref)
    }

    /// The file this config was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The directory relative paths in this config are resolved against.
    fn base_dir(&self) -> PathBuf {
        match self.path.as_deref().and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The store this config names (or the default), with a relative SQLite path made
    /// relative to the config file's directory.
    pub fn store_url(&self) -> String {
        let written = self
            .store
            .as_ref()
            .map_or(DEFAULT_STORE, |s| s.get_ref().as_str());
        if self.path.is_none() {
            return written.to_string();
        }
        match StoreUrl::parse(written) {
            Ok(StoreUrl::Sqlite(file)) if file.is_relative() => {
                format!("sqlite://{}", self.base_dir().join(file).display())
            }
            _ => written.to_string(),
        }
    }

    /// Apply the precedence: flag, then environment, then this config, then the default.
    /// Empty values count as not given.
    pub fn choose_store(&self, flag: Option<&str>, env: Option<&str>) -> StoreChoice {
        let given =
            |value: Option<&str>| value.filter(|v| !v.trim().is_empty()).map(str::to_string);
        if let Some(url) = given(flag) {
            return StoreChoice {
                url,
                source: StoreSource::Flag,
            };
        }
        if let Some(url) = given(env) {
            return StoreChoice {
                url,
                source: StoreSource::Env,
            };
        }
        let source = if self.store.is_some() {
            StoreSource::ConfigFile
        } else {
            StoreSource::Default
        };
        StoreChoice {
            url: self.store_url(),
            source,
        }
    }
}

fn located(path: &Path, text: &str, offset: usize, message: String) -> ConfigError {
    let (line, column) = line_and_column(text, offset);
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Where `key` is set in the `[dispatch]` table, as a byte offset, for a located error
/// (the table is read without spans; its keys are plain, so their line is easy to find).
fn dispatch_key_offset(text: &str, key: &str) -> Option<usize> {
    let mut in_dispatch = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_dispatch = trimmed.trim_end().trim_end_matches(|c| c != ']') == "[dispatch]";
        } else if in_dispatch
            && trimmed
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(offset + (line.len() - trimmed.len()));
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// serde speaks of fields and quotes with backticks; a config file has keys and quotes.
fn readable_message(message: &str) -> String {
    let message = message.lines().next().unwrap_or_default().trim();
    message
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
        .replace("duplicate field", "duplicate key")
        .replace('`', "'")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("herald.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn template_parses_to_the_default_store() {
        let config = parse(Config::template()).expect("template parses");
        assert_eq!(
            config.store.as_ref().map(|s| s.get_ref().as_str()),
            Some(DEFAULT_STORE)
        );
        assert!(
            Config::template()
                .lines()
                .filter(|l| l.starts_with('#'))
                .count()
                > 5
        );
    }

    #[test]
    fn template_can_carry_another_store() {
        let text = Config::template_with_store("postgres://herald@db/\"x\"");
        let config = parse(&text).expect("parses");
        assert_eq!(config.store_url(), "postgres://herald@db/\"x\"");
    }

    #[test]
    fn unknown_keys_name_key_and_line() {
        let err = parse("# comment\n\nstor = \"sqlite://x.db\"\n").err();
        assert_eq!(
            err.as_deref(),
            Some("herald.toml:3:1: unknown key 'stor', expected one of 'store', 'plugins_dir', 'log_level', 'dispatch', 'routes', 'admin'")
        );
    }

    #[test]
    fn syntax_errors_are_located_and_one_line() {
        let err = parse("store = \"sqlite://x.db\"\nthis is not toml\n")
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("herald.toml:2:"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn unsupported_store_urls_point_at_the_value() {
        let err = parse("store = \"mysql://u:pw@h/db\"\n")
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("herald.toml:1:9: unsupported store URL"),
            "{err}"
        );
        assert!(!err.contains("pw@"), "{err}");
    }

    #[test]
    fn relative_sqlite_paths_are_relative_to_the_config_file() {
        let config = Config::parse(
            "store = \"sqlite://data/h.db\"",
            Path::new("/etc/herald/herald.toml"),
        );
        let config = config.expect("parses");
        assert_eq!(config.store_url(), "sqlite:///etc/herald/data/h.db");

        let config = Config::parse("", Path::new("/srv/herald.toml")).expect("parses");
        assert_eq!(config.store_url(), "sqlite:///srv/herald.db");

        let config = Config::parse(
            "store = \"sqlite:///abs/h.db\"",
            Path::new("/srv/herald.toml"),
        );
        assert_eq!(config.expect("parses").store_url(), "sqlite:///abs/h.db");

        let config = Config::parse("", Path::new("herald.toml")).expect("parses");
        assert_eq!(config.store_url(), "sqlite://./herald.db");

        assert_eq!(Config::default().store_url(), DEFAULT_STORE);
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file = Config::parse("store = \"sqlite:///file.db\"", Path::new("/c/herald.toml"));
        let file = file.expect("parses");
        let choose = |config: &Config, flag, env| config.choose_store(flag, env);

        let chosen = choose(&file, Some("sqlite:///flag.db"), Some("sqlite:///env.db"));
        assert_eq!(
            (chosen.url.as_str(), chosen.source),
            ("sqlite:///flag.db", StoreSource::Flag)
        );
        let chosen = choose(&file, None, Some("sqlite:///env.db"));
        assert_eq!(
            (chosen.url.as_str(), chosen.source),
            ("sqlite:///env.db", StoreSource::Env)
        );
        let chosen = choose(&file, None, Some(""));
        assert_eq!(
            (chosen.url.as_str(), chosen.source),
            ("sqlite:///file.db", StoreSource::ConfigFile)
        );
        let chosen = choose(&Config::default(), None, None);
        assert_eq!(
            (chosen.url.as_str(), chosen.source),
            (DEFAULT_STORE, StoreSource::Default)
        );
    }

    #[test]
    fn routes_parse_with_defaults() {
        let config = parse(
            "plugins_dir = \"wasm\"\n\n[[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhook\"\n\n[routes.config]\nurl = \"http://x\"\nmap = { a = \"b\" }\n",
        )
        .expect("parses");
        let route = config.routes().next().expect("one route");
        assert_eq!(route.ordering, Ordering::Entity);
        assert_eq!(route.retry.max_attempts, 12);
        assert!(config.plugins_dir().ends_with("wasm"));
        let resolved = route.resolved_config().expect("resolves");
        assert_eq!(resolved.get("url").map(String::as_str), Some("http://x"));
        assert_eq!(
            resolved.get("map").map(String::as_str),
            Some("{\"a\":\"b\"}")
        );
    }

    #[test]
    fn route_problems_name_the_route_and_its_line() {
        let base = "[[routes]]\nname = \"a\"\nevent_types = [\"x.*\"]\nplugin = \"p\"\n";
        let twice = format!("{base}\n{base}");
        assert_eq!(
            parse(&twice).err().as_deref(),
            Some("herald.toml:6:1: route name 'a' is used twice")
        );
        let slow = format!("{base}time_limit = \"2m\"\n");
        let err = parse(&slow).err().unwrap_or_default();
        assert!(
            err.starts_with("herald.toml:1:1: route 'a': time_limit"),
            "{err}"
        );
        let typo = format!("{base}alowed_hosts = []\n");
        let err = parse(&typo).err().unwrap_or_default();
        assert!(
            err.starts_with("herald.toml:5:1: unknown key 'alowed_hosts'"),
            "{err}"
        );
        let bad_duration = format!("{base}time_limit = \"soon\"\n");
        let err = parse(&bad_duration).err().unwrap_or_default();
        assert!(err.starts_with("herald.toml:5:"), "{err}");
    }

    #[test]
    fn missing_env_secrets_are_named() {
        let config = parse(
            "[[routes]]\nname = \"a\"\nevent_types = [\"x\"]\nplugin = \"p\"\n[routes.config]\nsecret = \"env:HERALD_TEST_SURELY_UNSET_VAR\"\n",
        )
        .expect("parses");
        let err = config.routes().next().map(|r| r.resolved_config());
        assert_eq!(
            err.and_then(Result::err).as_deref(),
            Some("route 'a': config key 'secret' refers to environment variable HERALD_TEST_SURELY_UNSET_VAR, which is not set")
        );
    }

    #[test]
    fn the_event_size_limit_defaults_to_one_mebibyte_and_zero_sizes_are_refused() {
        let config = parse("").expect("parses");
        assert_eq!(config.dispatch().max_event_bytes, 1 << 20);
        let config = parse("[dispatch]\nmax_event_bytes = 4096\n").expect("parses");
        assert_eq!(config.dispatch().max_event_bytes, 4096);
        let err =
            parse("store = \"sqlite://x.db\"\n\n[dispatch] # limits\n  max_event_bytes = 0\n")
                .err();
        assert_eq!(
            err.as_deref(),
            Some("herald.toml:4:3: [dispatch] max_event_bytes must be at least 1 (0 would refuse every event)")
        );
        let err = parse("[dispatch]\nbatch_size = 0\n").err();
        assert_eq!(
            err.as_deref(),
            Some("herald.toml:2:1: [dispatch] batch_size must be at least 1 (0 would fan out and claim nothing)")
        );
        let err = parse("[dispatch]\nmax_event_bytes = -1\n")
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("herald.toml:2:"), "{err}");
        let err = parse("[dispatch]\nmax_event_bytes = \"1MiB\"\n")
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("herald.toml:2:"), "{err}");
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_and_column("a\nbé c", 5), (2, 3));
        assert_eq!(line_and_column("", 10), (1, 1));
    }
}
