//! The admin HTTP server of `herald serve`: health for probes, and a JSON API for
//! operators. Loopback by default; anywhere else it refuses to start without a token.

mod api;
mod auth;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::store::EventStore;

pub use api::RouteSummary;
pub use auth::BearerToken;

use crate::runtime::{PluginRegistry, PluginRuntime};

/// Where and how the admin server listens.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Required on every `/api` request when set; required to be set when `listen` is
    /// not a loopback address.
    pub token: Option<BearerToken>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "admin.listen {0} is not a loopback address: set admin.token (or HERALD_ADMIN_TOKEN) \
         so the API is not open to the network"
    )]
    ExposedWithoutToken(SocketAddr),
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the API reports on.
pub struct AdminContext {
    pub store: Arc<dyn EventStore>,
    /// `None` where no plugins run (e.g. a CLI-only process).
    pub plugins: Option<Arc<PluginRegistry>>,
    pub routes: Vec<RouteSummary>,
    /// Where uploaded plugins are checked and installed; `None` disables uploads.
    pub deploys: Option<Deploys>,
}

/// What a plugin upload needs: the runtime to check it with, the directory to keep it in.
pub struct Deploys {
    pub runtime: Arc<PluginRuntime>,
    pub plugins_dir: PathBuf,
}

pub(crate) struct AdminState {
    pub store: Arc<dyn EventStore>,
    pub plugins: Option<Arc<PluginRegistry>>,
    pub routes: Vec<RouteSummary>,
    pub deploys: Option<Deploys>,
    pub token: Option<BearerToken>,
}

/// A bound admin server, ready to run.
pub struct AdminServer {
    listener: TcpListener,
    router: axum::Router,
}

impl AdminServer {
    /// Check the settings and bind the port, so a misconfiguration stops `serve` at start.
    pub async fn bind(settings: AdminSettings, context: AdminContext) -> Result<Self, AdminError> {
        if !settings.listen.ip().is_loopback() && settings.token.is_none() {
            return Err(AdminError::ExposedWithoutToken(settings.listen));
        }
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| AdminError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let state = Arc::new(AdminState {
            store: context.store,
            plugins: context.plugins,
            routes: context.routes,
            deploys: context.deploys,
            token: settings.token,
        });
        Ok(AdminServer {
            listener,
            router: routes::router(state),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serve until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await
    }
}
