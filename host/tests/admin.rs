//! The admin server over real HTTP: open health endpoints, token-guarded API, and the
//! refusal to expose it without a token.

use std::net::SocketAddr;
use std::sync::Arc;

use herald::admin::{AdminError, AdminServer, AdminSettings, BearerToken};
use herald::store::{self, EventStore};
use tokio::sync::watch;

async fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    Arc::from(store::open_migrated(&url).await.expect("store"))
}

struct Running {
    base: String,
    _stop: watch::Sender<bool>,
}

async fn start(store: Arc<dyn EventStore>, token: Option<&str>) -> Running {
    let settings = AdminSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: token.and_then(BearerToken::new),
    };
    let server = AdminServer::bind(settings, store)
        .await
        .expect("bind admin");
    let addr = server.local_addr().expect("bound address");
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(server.run(stopped));
    Running {
        base: format!("http://{addr}"),
        _stop: stop,
    }
}

#[tokio::test]
async fn health_is_open_and_the_api_needs_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = sqlite_store(&dir).await;
    store.heartbeat("alpha", "0.1.0").await.expect("heartbeat");
    let admin = start(store, Some("s3cret-token")).await;
    let client = reqwest::Client::new();

    let health = client
        .get(format!("{}/healthz", admin.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = client
        .get(format!("{}/readyz", admin.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    let url = format!("{}/api/instances", admin.base);
    let anonymous = client.get(&url).send().await.expect("no token");
    assert_eq!(anonymous.status(), 401);
    let wrong = client
        .get(&url)
        .bearer_auth("s3cret-tokeN")
        .send()
        .await
        .expect("wrong token");
    assert_eq!(wrong.status(), 401);
    let right = client
        .get(&url)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .expect("token");
    assert_eq!(right.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&right.bytes().await.expect("body")).expect("json");
    assert_eq!(body[0]["instance_id"], "alpha");
    assert_eq!(body[0]["leases_held"], 0);
}

#[tokio::test]
async fn without_a_token_the_api_is_open_on_loopback_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = sqlite_store(&dir).await;
    let admin = start(store.clone(), None).await;
    let open = reqwest::get(format!("{}/api/instances", admin.base))
        .await
        .expect("get");
    assert_eq!(open.status(), 200);

    let exposed = AdminSettings {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        token: None,
    };
    let refused = AdminServer::bind(exposed, store).await.err();
    assert!(matches!(refused, Some(AdminError::ExposedWithoutToken(_))));
    let message = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("set admin.token (or HERALD_ADMIN_TOKEN)"),
        "{message}"
    );
}

#[test]
fn tokens_never_show_in_debug_output_and_empty_ones_are_refused() {
    let token = BearerToken::new("hunter2").expect("token");
    assert_eq!(format!("{token:?}"), "BearerToken(***)");
    assert!(BearerToken::new("   ").is_none());
}
