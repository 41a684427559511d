//! `herald serve`: run dispatch until SIGTERM or SIGINT.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::{AdminContext, AdminServer, AdminSettings, BearerToken, Deploys, RouteSummary};
use crate::runtime::hot_reload::PluginWatcher;
use crate::service::{reload_routes, Service};

/// How often the plugin directory is looked at; a deploy takes effect within two scans.
const PLUGIN_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
use crate::store::{self, redact_url, EventStore};

use super::{context, GlobalArgs};

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald serve                         # with ./herald.toml
  RUST_LOG=herald=debug herald serve --log-format json
  herald serve --until-idle            # deliver what is due, then exit

The store is migrated on start. SIGHUP re-reads the config file and swaps in its routes \
when it is valid (other sections need a restart); an invalid file is refused and logged, \
and the running config stays. Plugins are loaded from plugins_dir; a route whose plugin \
is missing or broken stops the start with the reason. SIGTERM or SIGINT stops claiming, \
lets the attempts in flight finish and record their outcomes, and exits 0.")]
pub struct ServeArgs {
    /// Exit once nothing is due instead of waiting for new events (deliveries waiting
    /// for a later retry stay waiting)
    #[arg(long)]
    pub until_idle: bool,
}

pub async fn serve(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<String> {
    let config = context::config(global)?;
    let choice = context::choose_store(global, &config);
    let store: Arc<dyn EventStore> = Arc::from(store::open_migrated(&choice.url).await?);
    let service = Service::build(&config, store.clone()).await?;
    tracing::info!(
        store = %redact_url(&choice.url),
        plugins = ?service.plugins.names(),
        routes = config.routes().count(),
        "herald serving"
    );
    if args.until_idle {
        service.dispatcher.drain().await?;
        return Ok(String::new());
    }
    let admin = match config.admin() {
        admin if admin.enabled => {
            let token = admin
                .resolved_token()
                .map_err(anyhow::Error::msg)?
                .and_then(|token| BearerToken::new(&token));
            let settings = AdminSettings {
                listen: admin.listen,
                token,
            };
            let context = AdminContext {
                store: store.clone(),
                plugins: Some(service.plugins.clone()),
                routes: config.routes().map(RouteSummary::of).collect(),
                deploys: Some(Deploys {
                    runtime: service.runtime.clone(),
                    plugins_dir: config.plugins_dir(),
                }),
            };
            Some(AdminServer::bind(settings, context).await?)
        }
        _ => None,
    };
    let (stop, stopped) = watch::channel(false);
    let admin_task = admin.map(|server| {
        if let Some(addr) = server.local_addr() {
            tracing::info!(%addr, "admin API listening");
        }
        tokio::spawn(server.run(stopped.clone()))
    });
    let plugins_dir = config.plugins_dir();
    let watcher = plugins_dir.is_dir().then(|| {
        let watcher = PluginWatcher::new(
            &plugins_dir,
            service.runtime.clone(),
            service.plugins.clone(),
        );
        tracing::info!(dir = %plugins_dir.display(), "watching for plugin deploys");
        tokio::spawn(watcher.run(PLUGIN_SCAN_INTERVAL, stopped.clone()))
    });
    if let Some(path) = config.path().map(std::path::Path::to_path_buf) {
        let switch = service.dispatcher.route_switch();
        let runtime = service.runtime.clone();
        let plugins = service.plugins.clone();
        tokio::spawn(async move {
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; config reload is off");
                return;
            };
            while hangups.recv().await.is_some() {
                match reload_routes(&path, &runtime, &plugins, &switch) {
                    Ok(routes) => {
                        tracing::info!(routes, config = %path.display(), "config reloaded")
                    }
                    Err(err) => {
                        tracing::error!(%err, "config reload refused; the running config stays")
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        match shutdown_signal().await {
            Ok(signal) => tracing::info!(
                signal,
                "stopping: no new claims, finishing attempts in flight"
            ),
            Err(err) => tracing::error!(%err, "cannot listen for shutdown signals; stopping"),
        }
        let _ = stop.send(true);
    });
    service.dispatcher.run(stopped).await;
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    if let Some(task) = admin_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "admin API stopped with an error"),
            Err(err) => tracing::warn!(%err, "admin API task failed"),
        }
    }
    tracing::info!("stopped");
    Ok(String::new())
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
