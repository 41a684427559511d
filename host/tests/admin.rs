//! The admin server over real HTTP: open health endpoints, token-guarded API, and the
//! refusal to expose it without a token.

use std::net::SocketAddr;
use std::sync::Arc;

use herald::admin::{AdminContext, AdminError, AdminServer, AdminSettings, BearerToken};
use herald::store::{self, EventStore, FanOutRequest};
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
    let context = AdminContext {
        store,
        plugins: None,
        routes: Vec::new(),
        deploys: None,
    };
    let server = AdminServer::bind(settings, context)
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
    // With a token it starts on every address, and the API answers 401 without it.
    let guarded = AdminSettings {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        token: BearerToken::new("t0ken"),
    };
    let context = AdminContext {
        store: store.clone(),
        plugins: None,
        routes: Vec::new(),
        deploys: None,
    };
    let server = AdminServer::bind(guarded, context)
        .await
        .expect("bind 0.0.0.0");
    let port = server.local_addr().expect("addr").port();
    let (_stop_guarded, stopped) = watch::channel(false);
    tokio::spawn(server.run(stopped));
    let refused = reqwest::get(format!("http://127.0.0.1:{port}/api/instances"))
        .await
        .expect("get");
    assert_eq!(refused.status(), 401);
    let context = AdminContext {
        store,
        plugins: None,
        routes: Vec::new(),
        deploys: None,
    };
    let refused = AdminServer::bind(exposed, context).await.err();
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

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn the_api_shows_events_and_redrives_dead_letters() {
    use herald::store::{ClaimRequest, Completion, NewEvent, Outcome, RoutePlan};
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = sqlite_store(&dir).await;
    let id = store
        .append(&NewEvent::new(
            "order.created",
            "order",
            "7",
            serde_json::json!({ "total": 5 }),
        ))
        .await
        .expect("append");
    store
        .fan_out(&FanOutRequest::new(10), &|_| {
            vec![RoutePlan::ordered("hooks")]
        })
        .await
        .expect("fan out");
    let claimed = store
        .claim(&ClaimRequest {
            owner: "t".into(),
            limit: 10,
            lease: Duration::from_secs(60),
            paused_routes: Vec::new(),
        })
        .await
        .expect("claim");
    store
        .complete(&[Completion::for_claim(
            &claimed[0],
            "t",
            Outcome::Dead {
                reason: "HTTP 410".into(),
            },
        )])
        .await
        .expect("complete");

    let admin = start(store, None).await;
    let client = reqwest::Client::new();
    let (status, events) =
        get_json(&client, &format!("{}/api/events?status=DEAD", admin.base)).await;
    assert_eq!(status, 200);
    assert_eq!(events[0]["event_id"], id);
    assert_eq!(
        events[0]["event_data"]["total"], 5,
        "payload embedded as JSON"
    );
    let (status, error) =
        get_json(&client, &format!("{}/api/events?status=DONE", admin.base)).await;
    assert_eq!(status, 400);
    assert!(
        error["error"]
            .as_str()
            .unwrap_or_default()
            .contains("expected one of"),
        "{error}"
    );
    let (status, detail) = get_json(&client, &format!("{}/api/events/{id}", admin.base)).await;
    assert_eq!(status, 200);
    assert_eq!(detail["attempts"][0]["detail"], "HTTP 410");
    let (status, _) = get_json(&client, &format!("{}/api/events/999", admin.base)).await;
    assert_eq!(status, 404);
    let (_, history) = get_json(&client, &format!("{}/api/history/order/7", admin.base)).await;
    assert_eq!(history.as_array().map(Vec::len), Some(1));

    let (_, dead) = get_json(&client, &format!("{}/api/deliveries/dead", admin.base)).await;
    assert_eq!(dead[0]["route"], "hooks");
    let redrive = format!("{}/api/deliveries/redrive", admin.base);
    let ambiguous = client
        .post(&redrive)
        .header("content-type", "application/json")
        .body(r#"{"all": true, "route": "hooks"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(ambiguous.status(), 400);
    let done = client
        .post(&redrive)
        .header("content-type", "application/json")
        .body(r#"{"all": true}"#)
        .send()
        .await
        .expect("post");
    let body: serde_json::Value =
        serde_json::from_slice(&done.bytes().await.expect("body")).expect("json");
    assert_eq!(body["redriven"], 1);
    let (_, dead) = get_json(&client, &format!("{}/api/deliveries/dead", admin.base)).await;
    assert_eq!(dead.as_array().map(Vec::len), Some(0));
}

/// An admin server that takes plugin uploads into its own plugins directory.
struct UploadServer {
    base: String,
    client: reqwest::Client,
    registry: Arc<herald::runtime::PluginRegistry>,
    plugins_dir: std::path::PathBuf,
    /// The built echo plugin.
    echo: Vec<u8>,
    dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

impl UploadServer {
    async fn start() -> UploadServer {
        use herald::admin::Deploys;
        use herald::runtime::{EngineSettings, PluginRegistry, PluginRuntime};

        let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
        let echo =
            std::fs::read(built.join("echo.wasm")).expect("echo.wasm (run tests/build-plugins)");
        let dir = tempfile::tempdir().expect("temp dir");
        let plugins_dir = dir.path().join("plugins");
        let store = sqlite_store(&dir).await;
        let registry = Arc::new(PluginRegistry::default());
        let runtime = Arc::new(PluginRuntime::new(EngineSettings::default()).expect("runtime"));
        let settings = AdminSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: BearerToken::new("t0ken"),
        };
        let context = AdminContext {
            store,
            plugins: Some(registry.clone()),
            routes: Vec::new(),
            deploys: Some(Deploys {
                runtime,
                plugins_dir: plugins_dir.clone(),
            }),
        };
        let server = AdminServer::bind(settings, context).await.expect("bind");
        let base = format!("http://{}", server.local_addr().expect("addr"));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(server.run(stopped));
        UploadServer {
            base,
            client: reqwest::Client::new(),
            registry,
            plugins_dir,
            echo,
            dir,
            _stop: stop,
        }
    }

    /// `PUT /api/plugins/NAME`; `name` goes into the URL as given (already escaped).
    async fn put(
        &self,
        name: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = self
            .client
            .put(format!("{}/api/plugins/{name}", self.base))
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await
    }

    /// Every file under the temporary directory but the store, with its content: what a
    /// refused request must leave as it was.
    fn snapshot(&self) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if !entry.file_name().to_string_lossy().starts_with("herald.db") {
                    out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
                }
            }
        }
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files);
        files.sort();
        files
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_uploads_are_checked_before_anything_changes() {
    let server = UploadServer::start().await;
    let echo = server.echo.clone();
    let registry = server.registry.clone();
    let plugins_dir = server.plugins_dir.clone();

    let anonymous = server.put("echo", echo.clone(), None).await.expect("put");
    assert_eq!(anonymous.status(), 401);
    // Refused before its body was read: the connection closes, and the answer says so.
    assert_eq!(
        anonymous
            .headers()
            .get(reqwest::header::CONNECTION)
            .map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let garbage = server
        .put("echo", b"\0asm but not really".to_vec(), Some("t0ken"))
        .await
        .expect("put");
    assert_eq!(garbage.status(), 422);
    let not_wasm = server
        .put("echo", b"#!/bin/sh".to_vec(), Some("t0ken"))
        .await
        .expect("put");
    assert_eq!(not_wasm.status(), 422);
    let traversal = server
        .put("..%2Fevil", echo.clone(), Some("t0ken"))
        .await
        .expect("put");
    assert_eq!(traversal.status(), 400);
    let too_big = server
        .put("echo", vec![0u8; (64 << 20) + 1], Some("t0ken"))
        .await
        .expect("put");
    assert_eq!(too_big.status(), 413);
    assert!(registry.get("echo").is_none(), "nothing was deployed");
    assert!(
        !plugins_dir.join("echo.wasm").exists(),
        "nothing was installed"
    );

    let deployed = server
        .put("echo", echo.clone(), Some("t0ken"))
        .await
        .expect("put");
    assert_eq!(deployed.status(), 200);
    let running = registry.get("echo").expect("echo in service");
    assert_eq!(
        std::fs::read(plugins_dir.join("echo.wasm")).expect("installed"),
        echo
    );
    assert!(running.version.starts_with("sha256:"));
}

#[tokio::test]
async fn readiness_needs_every_routes_plugin() {
    use herald::admin::RouteSummary;
    use herald::runtime::PluginRegistry;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = sqlite_store(&dir).await;
    let route = RouteSummary {
        name: "hooks".into(),
        event_types: vec!["order.*".into()],
        target: None,
        plugin: "webhook".into(),
        ordered: true,
        allowed_hosts: Vec::new(),
        time_limit_ms: 1000,
        memory_limit_mb: 64,
        max_attempts: 3,
    };
    let settings = AdminSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: None,
    };
    let context = AdminContext {
        store,
        plugins: Some(Arc::new(PluginRegistry::default())),
        routes: vec![route],
        deploys: None,
    };
    let server = AdminServer::bind(settings, context).await.expect("bind");
    let base = format!("http://{}", server.local_addr().expect("addr"));
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(server.run(stopped));
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let text = ready.text().await.expect("body");
    assert!(
        text.contains("plugin 'webhook' of route 'hooks' is not loaded"),
        "{text}"
    );
    let alive = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(alive.status(), 200);
}

#[tokio::test]
async fn resume_lifts_a_quarantine_and_needs_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = sqlite_store(&dir).await;
    let admin = start(store.clone(), Some("t0ken")).await;
    let client = reqwest::Client::new();
    let resume = |token: Option<&str>| {
        let mut request = client.post(format!("{}/api/plugins/echo/resume", admin.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    store
        .quarantine("echo", "3 consecutive faults; last: plugin trapped: x", 3)
        .await
        .expect("quarantine");
    assert_eq!(resume(None).await.expect("post").status(), 401);
    assert_eq!(store.quarantined().await.expect("list").len(), 1);
    assert_eq!(resume(Some("t0ken")).await.expect("post").status(), 200);
    assert!(store.quarantined().await.expect("list").is_empty());
    let again = resume(Some("t0ken")).await.expect("post");
    assert_eq!(again.status(), 404);
    let body: serde_json::Value =
        serde_json::from_slice(&again.bytes().await.expect("body")).expect("json");
    assert_eq!(body["error"], "plugin 'echo' is not quarantined");
}

/// Over a running plugin, every bad upload is refused and leaves the running version,
/// the installed file and the kept versions as they were; names that try to leave the
/// plugins directory are refused, for uploads and rollbacks alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_and_hostile_names_change_nothing() {
    let server = UploadServer::start().await;
    let token = Some("t0ken");
    let deployed = server
        .put("echo", server.echo.clone(), token)
        .await
        .expect("put");
    assert_eq!(deployed.status(), 200);
    let running = server
        .registry
        .get("echo")
        .expect("echo runs")
        .version
        .clone();
    let before = server.snapshot();
    assert!(!before.is_empty());

    let mut truncated = server.echo.clone();
    truncated.truncate(server.echo.len() / 2);
    let mut corrupted = server.echo.clone();
    corrupted[8..64].fill(0xff);
    let refused: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not wasm", b"<?php system($_GET['c']); ?>".to_vec(), 422),
        ("empty", Vec::new(), 422),
        ("truncated", truncated, 422),
        ("corrupted", corrupted, 422),
        // A valid core module, not a component of this interface.
        ("core module", b"\0asm\x01\0\0\0".to_vec(), 422),
        ("too big", vec![0u8; (64 << 20) + 1], 413),
    ];
    for (what, body, status) in refused {
        let answer = server.put("echo", body, token).await.expect("put");
        assert_eq!(answer.status().as_u16(), status, "{what}");
        assert_eq!(
            server.registry.get("echo").map(|p| p.version.clone()),
            Some(running.clone()),
            "{what} replaced the running version"
        );
        assert_eq!(server.snapshot(), before, "{what} changed a file");
    }

    for name in [
        "..%2Fevil",
        "..%2F..%2Fherald.db",
        "..%5Cevil",
        ".hidden",
        "echo%00",
        "echo.wasm",
        "ECHO",
        "-rf",
        "%2Fetc%2Fpasswd",
    ] {
        let answer = server
            .put(name, server.echo.clone(), token)
            .await
            .expect("put");
        assert_eq!(answer.status().as_u16(), 400, "{name}");
        let rollback = server
            .client
            .post(format!("{}/api/plugins/{name}/rollback", server.base))
            .bearer_auth("t0ken")
            .send()
            .await
            .expect("post");
        assert_eq!(rollback.status().as_u16(), 400, "rollback of {name}");
        assert_eq!(server.snapshot(), before, "{name} changed a file");
    }
    assert_eq!(
        server.registry.names(),
        vec!["echo".to_string()],
        "nothing else was put in service"
    );
}
