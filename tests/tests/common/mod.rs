//! A Herald assembled from a real `herald.toml` text, on a real store, with the real
//! plugins built by `tests/build-plugins`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herald::config::Config;
use herald::service::Service;
use herald::store::{
    self, Attempt, DeliveryFilter, EventDetail, EventFilter, EventStatus, EventStore, NewEvent,
};
use herald_tests::PgSchema;

/// Where `tests/build-plugins` puts `NAME.wasm`.
pub fn plugins_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("plugins");
    assert!(
        dir.join("webhook.wasm").is_file(),
        "no plugins in {}: run tests/build-plugins first (tests/run does)",
        dir.display()
    );
    dir
}

const DEFAULT_DISPATCH: &str = "lease = \"30s\"\npoll_interval = \"20ms\"";

fn config(dir: &tempfile::TempDir, dispatch: &str, routes: &str) -> Config {
    config_with_plugins(dir, &plugins_dir(), dispatch, routes)
}

fn config_with_plugins(
    dir: &tempfile::TempDir,
    plugins: &std::path::Path,
    dispatch: &str,
    routes: &str,
) -> Config {
    let text = format!(
        "plugins_dir = {:?}\n\n[dispatch]\n{dispatch}\n\n{routes}",
        plugins.display().to_string()
    );
    Config::parse(&text, &dir.path().join("herald.toml"))
        .unwrap_or_else(|err| panic!("test config: {err}\n{text}"))
}

pub enum Backend {
    Sqlite,
    Postgres(PgSchema),
}

pub struct Herald {
    pub store: Arc<dyn EventStore>,
    pub service: Service,
    pub config: Config,
    pub store_url: String,
    backend: Backend,
    _dir: tempfile::TempDir,
}

impl Herald {
    /// A Herald on a fresh SQLite store. `routes` is TOML appended to the config; the
    /// plugins directory is filled in.
    pub async fn sqlite(routes: &str) -> Herald {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        Herald::start(dir, &url, Backend::Sqlite, routes).await
    }

    /// The same on Postgres, or `None` when Postgres is unreachable outside CI.
    pub async fn postgres(test: &str, routes: &str) -> Option<Herald> {
        Herald::postgres_wrapped(test, routes, |store| store).await
    }

    /// The same on Postgres with the store wrapped, or `None` as for [`Herald::postgres`].
    pub async fn postgres_wrapped(
        test: &str,
        routes: &str,
        wrap: impl FnOnce(Arc<dyn EventStore>) -> Arc<dyn EventStore>,
    ) -> Option<Herald> {
        Herald::postgres_configured(test, DEFAULT_DISPATCH, routes, wrap).await
    }

    /// A Postgres Herald with its own `[dispatch]` keys, or `None` as for
    /// [`Herald::postgres`].
    pub async fn postgres_with_dispatch(
        test: &str,
        dispatch: &str,
        routes: &str,
    ) -> Option<Herald> {
        Herald::postgres_configured(test, dispatch, routes, |store| store).await
    }

    async fn postgres_configured(
        test: &str,
        dispatch: &str,
        routes: &str,
        wrap: impl FnOnce(Arc<dyn EventStore>) -> Arc<dyn EventStore>,
    ) -> Option<Herald> {
        let schema = PgSchema::create(test).await?;
        let url = schema.url.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(&dir, dispatch, routes);
        Some(Herald::with_store(dir, &url, Backend::Postgres(schema), config, wrap).await)
    }

    async fn start(dir: tempfile::TempDir, url: &str, backend: Backend, routes: &str) -> Herald {
        let config = config(&dir, DEFAULT_DISPATCH, routes);
        Herald::with_store(dir, url, backend, config, |store| store).await
    }

    /// A SQLite Herald whose plugin directory is its own copy of `plugins` (of the built
    /// ones), so a test may deploy into it.
    pub async fn sqlite_with_own_plugins(plugins: &[&str], routes: &str) -> Herald {
        let dir = tempfile::tempdir().expect("temp dir");
        let own = dir.path().join("plugins");
        std::fs::create_dir(&own).expect("plugins dir");
        for name in plugins {
            let file = format!("{name}.wasm");
            std::fs::copy(plugins_dir().join(&file), own.join(&file)).expect("copy plugin");
        }
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let config = config_with_plugins(&dir, &own, DEFAULT_DISPATCH, routes);
        Herald::with_store(dir, &url, Backend::Sqlite, config, |store| store).await
    }

    /// A SQLite Herald with its own `[dispatch]` keys and its store wrapped.
    pub async fn sqlite_wrapped(
        dispatch: &str,
        routes: &str,
        wrap: impl FnOnce(Arc<dyn EventStore>) -> Arc<dyn EventStore>,
    ) -> Herald {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let config = config(&dir, dispatch, routes);
        Herald::with_store(dir, &url, Backend::Sqlite, config, wrap).await
    }

    /// Like `start`, with the store wrapped (e.g. to inject a fault).
    pub async fn with_store(
        dir: tempfile::TempDir,
        url: &str,
        backend: Backend,
        config: Config,
        wrap: impl FnOnce(Arc<dyn EventStore>) -> Arc<dyn EventStore>,
    ) -> Herald {
        let opened = store::open_migrated(url)
            .await
            .expect("open and migrate store");
        let store = wrap(Arc::from(opened));
        let service = Service::build(&config, store.clone())
            .await
            .unwrap_or_else(|err| panic!("service: {err}"));
        Herald {
            store,
            service,
            config,
            store_url: url.to_string(),
            backend,
            _dir: dir,
        }
    }

    pub async fn append(&self, event: NewEvent) -> i64 {
        self.store.append(&event).await.expect("append")
    }

    /// Run dispatch until `done` holds, failing after `limit`. Retries wait on the store's
    /// clock, so this polls rather than draining once.
    pub async fn run_until<F>(&self, limit: Duration, mut done: F)
    where
        F: AsyncFnMut(&Herald) -> bool,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.service.dispatcher.drain().await.expect("dispatch");
            if done(self).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Run until every event is settled (nothing READY or FAILED).
    pub async fn settle(&self, limit: Duration) {
        self.run_until(limit, async |h: &Herald| h.open_events().await == 0)
            .await;
    }

    pub async fn open_events(&self) -> usize {
        let mut open = 0;
        for status in [EventStatus::Ready, EventStatus::Failed] {
            open += self
                .store
                .list_events(&EventFilter {
                    status: Some(status),
                    limit: 100_000,
                    ..Default::default()
                })
                .await
                .expect("list")
                .len();
        }
        open
    }

    /// Whether every one of these events is SUCCESS.
    pub async fn all_succeeded(&self, ids: &[i64]) -> bool {
        for id in ids {
            if self.status(*id).await != EventStatus::Success {
                return false;
            }
        }
        true
    }

    pub async fn detail(&self, id: i64) -> EventDetail {
        self.store
            .event_detail(id)
            .await
            .expect("detail")
            .expect("event exists")
    }

    pub async fn status(&self, id: i64) -> EventStatus {
        self.detail(id).await.event.event_status
    }

    pub async fn attempts(&self, id: i64) -> Vec<Attempt> {
        self.detail(id).await.attempts
    }

    pub async fn events_of_type(&self, event_type: &str) -> Vec<store::Event> {
        self.store
            .list_events(&EventFilter {
                event_type: Some(event_type.into()),
                limit: 1000,
                oldest_first: true,
                ..Default::default()
            })
            .await
            .expect("list")
    }

    /// The deliveries of one route (at most 1,000).
    pub async fn deliveries_of(&self, route: &str) -> Vec<store::Delivery> {
        self.store
            .list_deliveries(&DeliveryFilter {
                route: Some(route.into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("deliveries")
    }

    pub async fn finish(self) {
        drop(self.service);
        drop(self.store);
        if let Backend::Postgres(schema) = self.backend {
            schema.drop().await;
        }
    }
}
