//! The route's configuration table, e.g. `url` and `secret` for a webhook.
//!
//! Values are strings; secrets arrive already resolved from their `env:` references.
//! A missing or malformed key is a configuration problem that no retry fixes, so it
//! usually becomes [`crate::Outcome::dead`] with the error as reason.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;

/// The value of `key`, if the route sets it.
pub fn get(key: &str) -> Option<String> {
    crate::backend::config_get(key)
}

/// The value of `key`, or [`ConfigError::Missing`].
pub fn require(key: &str) -> Result<String, ConfigError> {
    get(key).ok_or_else(|| ConfigError::Missing(key.to_owned()))
}

/// The value of `key` parsed with [`FromStr`] (numbers, booleans), if set.
pub fn parse<T>(key: &str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    get(key)
        .map(|value| {
            value
                .trim()
                .parse()
                .map_err(|err: T::Err| ConfigError::Invalid {
                    key: key.to_owned(),
                    reason: err.to_string(),
                })
        })
        .transpose()
}

/// The value of `key` parsed as JSON into `T` (maps, lists), if set.
pub fn json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, ConfigError> {
    get(key)
        .map(|value| {
            serde_json::from_str(&value).map_err(|err| ConfigError::Invalid {
                key: key.to_owned(),
                reason: err.to_string(),
            })
        })
        .transpose()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The route does not set this required key.
    Missing(String),
    /// The key is set but its value is unusable.
    Invalid { key: String, reason: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing(key) => write!(f, "config key `{key}` is required but not set"),
            ConfigError::Invalid { key, reason } => write!(f, "config key `{key}`: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}
