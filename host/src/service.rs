//! Assembling a running Herald from its config: the plugin runtime, the plugins, the
//! routes with their grants, and the dispatcher over the store.

use std::collections::HashMap;
use std::sync::Arc;

use crate::capabilities::http::{HttpCapability, HttpPolicy};
use crate::config::{Config, Ordering, RouteConfig};
use crate::dispatch::{
    default_instance_id, DispatchSettings, Dispatcher, Route, RouteSwitch, RouteTable,
};
use crate::router::{RouteMatch, Router};
use crate::runtime::{CallLimits, EngineSettings, PluginRegistry, PluginRuntime, RouteGrant};
use crate::store::EventStore;

/// Why the service cannot start; each names the route, plugin or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Route(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Plugin(#[from] crate::runtime::LoadError),
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
}

pub struct Service {
    pub runtime: Arc<PluginRuntime>,
    pub plugins: Arc<PluginRegistry>,
    pub dispatcher: Dispatcher,
}

impl Service {
    /// Load the plugins of `config.plugins_dir()` and check every route against them.
    pub async fn build(
        config: &Config,
        store: Arc<dyn EventStore>,
    ) -> Result<Service, ServiceError> {
        let dispatch = config.dispatch();
        let max_memory_mb = config
            .routes()
            .map(|r| r.memory_limit_mb)
            .max()
            .unwrap_or(64);
        let runtime = Arc::new(PluginRuntime::new(EngineSettings {
            // Dispatch never runs more calls than `concurrency`; a little headroom for
            // deploy checks running beside it.
            max_instances: u32::try_from(dispatch.concurrency)
                .unwrap_or(u32::MAX)
                .saturating_add(4),
            max_memory: (max_memory_mb as usize) << 20,
            cache_dir: Some(config.plugins_dir().join(".cache")),
            ..EngineSettings::default()
        })?);
        let plugins = Arc::new(PluginRegistry::default());
        let dir = config.plugins_dir();
        if dir.is_dir() {
            for failure in plugins.load_dir(&runtime, &dir).await? {
                tracing::error!(%failure, "plugin refused");
            }
        } else if config.routes().next().is_some() {
            return Err(ServiceError::Route(format!(
                "plugins_dir {} does not exist",
                dir.display()
            )));
        }

        let table = route_table(config, &plugins)?;
        let settings = DispatchSettings {
            instance_id: instance_id(&dispatch.instance_id),
            batch_size: dispatch.batch_size.max(1),
            concurrency: dispatch.concurrency.max(1),
            lease: dispatch.lease,
            poll_interval: dispatch.poll_interval,
            listen: dispatch.listen,
            shutdown_deadline: dispatch.shutdown_deadline,
            quarantine_after: dispatch.quarantine_after,
            max_event_bytes: dispatch.max_event_bytes,
        };
        let dispatcher = Dispatcher::new(store, table, plugins.clone(), runtime.clone(), settings);
        Ok(Service {
            runtime,
            plugins,
            dispatcher,
        })
    }
}

/// The routes a config describes, each checked against the plugins in service.
pub fn route_table(config: &Config, plugins: &PluginRegistry) -> Result<RouteTable, ServiceError> {
    let mut routes = HashMap::new();
    let mut matches = Vec::new();
    for spec in config.routes() {
        if plugins.get(&spec.plugin).is_none() {
            return Err(ServiceError::Route(format!(
                "route '{}': plugin '{}' is not loaded (expected {} to be a valid plugin)",
                spec.name,
                spec.plugin,
                config
                    .plugins_dir()
                    .join(format!("{}.wasm", spec.plugin))
                    .display()
            )));
        }
        routes.insert(spec.name.clone(), route(spec)?);
        matches.push(RouteMatch {
            route: spec.name.clone(),
            event_types: spec.event_types.clone(),
            target: spec.target.clone(),
            ordered: spec.ordering == Ordering::Entity,
        });
    }
    Ok(RouteTable::new(Router::new(&matches)?, routes))
}

/// Re-read the config file and, if it is valid and its plugins are in service, swap in
/// its routes. Only `[[routes]]` change this way; the other sections need a restart.
pub fn reload_routes(
    path: &std::path::Path,
    runtime: &PluginRuntime,
    plugins: &PluginRegistry,
    switch: &RouteSwitch,
) -> Result<usize, String> {
    let config = Config::load(path).map_err(|err| err.to_string())?;
    let engine_max_mb = runtime.settings().max_memory >> 20;
    if let Some(route) = config
        .routes()
        .find(|r| r.memory_limit_mb as usize > engine_max_mb)
    {
        return Err(format!(
            "route '{}': memory_limit_mb {} is above the {engine_max_mb} MiB this process \
             started with; restart to raise it",
            route.name, route.memory_limit_mb
        ));
    }
    let table = route_table(&config, plugins).map_err(|err| err.to_string())?;
    let count = table.routes.len();
    switch.replace(table);
    Ok(count)
}

fn route(spec: &RouteConfig) -> Result<Route, ServiceError> {
    let config = spec.resolved_config().map_err(ServiceError::Route)?;
    let http = if spec.allowed_hosts.is_empty() {
        None
    } else {
        let policy = HttpPolicy {
            route: spec.name.clone(),
            allowed_hosts: spec.allowed_hosts.clone(),
            allow_private: spec.allow_private,
            default_timeout: spec.http_timeout,
            max_timeout: spec.time_limit,
            ..HttpPolicy::default()
        };
        Some(HttpCapability::new(policy).map_err(|err| ServiceError::Route(err.to_string()))?)
    };
    let limits = CallLimits {
        time: spec.time_limit,
        memory: (spec.memory_limit_mb as usize) << 20,
        events_per_instance: spec.events_per_instance,
        ..CallLimits::default()
    };
    Ok(Route {
        name: spec.name.clone(),
        plugin: spec.plugin.clone(),
        grant: Arc::new(RouteGrant {
            route: spec.name.clone(),
            plugin: spec.plugin.clone(),
            config,
            http,
            limits,
        }),
        retry: spec.retry.policy(),
    })
}

/// `HERALD_INSTANCE_ID`, else the config's `instance_id`, else `hostname-pid`.
fn instance_id(configured: &str) -> String {
    std::env::var(INSTANCE_ID_ENV)
        .ok()
        .filter(|id| !id.trim().is_empty())
        .or_else(|| (!configured.is_empty()).then(|| configured.to_string()))
        .unwrap_or_else(default_instance_id)
}

/// Names this process's leases and attempts; overrides `[dispatch] instance_id`.
pub const INSTANCE_ID_ENV: &str = "HERALD_INSTANCE_ID";
