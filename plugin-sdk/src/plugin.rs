//! The trait a plugin implements and the description it gives of itself.

use crate::{Event, Outcome};

/// A delivery plugin: one type, two functions, no state.
///
/// The host makes a fresh instance for every event, so there is nothing to keep between
/// calls; both functions are associated functions rather than methods.
pub trait Plugin {
    /// Who the plugin is and what it needs. The host calls it when a new version is
    /// deployed, before any event reaches it, to check the route's config against
    /// [`PluginInfo::config_keys`].
    fn describe() -> PluginInfo;

    /// Deliver, transform or reject one event on one route.
    fn handle(event: Event) -> Outcome;
}

/// What [`Plugin::describe`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The plugin's name, as ops refer to it in routes.
    pub name: String,
    /// Usually `env!("CARGO_PKG_VERSION")`.
    pub version: String,
    /// Event-type globs the plugin is written for, e.g. `order.*`.
    pub event_types: Vec<String>,
    /// The route config the plugin reads.
    pub config_keys: Vec<ConfigKey>,
}

impl PluginInfo {
    /// A plugin with no event types and no config yet.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            event_types: Vec::new(),
            config_keys: Vec::new(),
        }
    }

    /// Adds an event-type glob the plugin is written for.
    pub fn event_type(mut self, glob: impl Into<String>) -> Self {
        self.event_types.push(glob.into());
        self
    }

    /// Adds a config key the plugin reads.
    pub fn config(mut self, key: ConfigKey) -> Self {
        self.config_keys.push(key);
        self
    }
}

/// One key of the route's config table, declared so the host can reject a route that
/// lacks a required key before any event is attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigKey {
    pub name: String,
    pub required: bool,
    /// Secrets are resolved by the host from `env:NAME` references and never logged.
    pub secret: bool,
    pub description: String,
}

impl ConfigKey {
    /// A key the route must set.
    pub fn required(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            required: true,
            secret: false,
            description: description.into(),
        }
    }

    /// A key the route may set.
    pub fn optional(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            required: false,
            ..Self::required(name, description)
        }
    }

    /// Marks the key as a secret.
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}
