//! `herald serve` as ops run it: a real process, the real plugins, a real receiver, the
//! CLI beside it, and SIGTERM to stop.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use herald_tests::sink::{Reply, Sink};
use support::{herald, plugins_dir, serve_in_foreground, sigterm, stdout_json};

async fn wait_for_status(config: &Path, id: i64, status: &str) {
    let wait = async {
        loop {
            let shown = stdout_json(&herald(
                config,
                &["events", "show", &id.to_string(), "--json"],
            ));
            if shown["event_status"] == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .is_err()
    {
        panic!("event {id} did not reach {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_delivers_redrives_and_stops_on_sigterm() {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    let admin_port = free_port();
    std::fs::write(
        &config,
        format!(
            "store = \"sqlite://herald.db\"\nplugins_dir = {:?}\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[dispatch]\npoll_interval = \"20ms\"\n\n\
             [[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhook\"\n\
             allowed_hosts = [\"{}\"]\nallow_private = true\n[routes.config]\nurl = \"{}\"\n",
            plugins_dir().display().to_string(),
            sink.address,
            sink.url("/orders")
        ),
    )
    .expect("write config");
    assert!(herald(&config, &["migrate"]).status.success());

    let mut serve = serve_in_foreground(&config);

    let appended = stdout_json(&herald(
        &config,
        &[
            "--json",
            "events",
            "append",
            "--type",
            "order.created",
            "--entity-type",
            "order",
            "--entity-id",
            "1",
            "--data",
            "{\"total\": 3}",
        ],
    ));
    let first = appended["event_id"].as_i64().expect("event id");
    sink.wait_for(1, Duration::from_secs(30)).await;
    wait_for_status(&config, first, "SUCCESS").await;

    sink.script([Reply::Status(410)]);
    let appended = stdout_json(&herald(
        &config,
        &[
            "--json",
            "events",
            "append",
            "--type",
            "order.paid",
            "--entity-type",
            "order",
            "--entity-id",
            "2",
            "--data",
            "{}",
        ],
    ));
    let second = appended["event_id"].as_i64().expect("event id");
    wait_for_status(&config, second, "DEAD").await;
    let dead = stdout_json(&herald(&config, &["--json", "deliveries", "dead"]));
    assert_eq!(dead.as_array().map(Vec::len), Some(1), "{dead}");
    assert_eq!(dead[0]["event_id"], second);
    let redriven = stdout_json(&herald(
        &config,
        &["--json", "deliveries", "redrive", "--all"],
    ));
    assert_eq!(redriven["redriven"], 1);
    wait_for_status(&config, second, "SUCCESS").await;
    assert_eq!(sink.requests().len(), 3);

    // The admin API and the CLI both show this instance.
    let response = reqwest::get(format!("http://127.0.0.1:{admin_port}/api/instances"))
        .await
        .expect("admin API");
    let instances: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(instances.as_array().map(Vec::len), Some(1), "{instances}");
    let api = |path: &'static str| async move {
        let response = reqwest::get(format!("http://127.0.0.1:{admin_port}{path}"))
            .await
            .expect("admin API");
        serde_json::from_slice::<serde_json::Value>(&response.bytes().await.expect("body"))
            .expect("json")
    };
    let routes = api("/api/routes").await;
    assert_eq!(routes[0]["name"], "hooks");
    assert!(
        !routes.to_string().contains(&sink.url("/orders")),
        "route config values stay private"
    );
    let plugins = api("/api/plugins").await;
    let webhook = plugins
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "webhook"))
        .expect("webhook plugin listed");
    assert_eq!(webhook["routes"], serde_json::json!(["hooks"]));
    let listed = stdout_json(&herald(&config, &["--json", "instances"]));
    assert_eq!(listed[0]["instance_id"], instances[0]["instance_id"]);

    sigterm(&serve);
    let status = tokio::time::timeout(Duration::from_secs(20), serve.wait())
        .await
        .expect("serve stops after SIGTERM")
        .expect("wait for serve");
    assert!(status.success(), "serve exited with {status}");
}

/// A port nothing listens on right now (the OS picks it; the race is harmless in tests).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn serve_refuses_a_route_whose_plugin_is_missing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    std::fs::write(
        &config,
        "[[routes]]\nname = \"hooks\"\nevent_types = [\"order.*\"]\nplugin = \"webhok\"\n",
    )
    .expect("write config");
    let output = herald(&config, &["serve", "--until-idle"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("route 'hooks': plugin 'webhok' is not loaded"),
        "{stderr}"
    );
}

/// SIGTERM while an attempt is still running: after the shutdown deadline the lease is
/// given back (not left to expire) and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_leases_of_attempts_past_the_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"sqlite://herald.db\"\nplugins_dir = {:?}\n\n[admin]\nenabled = false\n\n\
             [dispatch]\npoll_interval = \"20ms\"\nshutdown_deadline = \"300ms\"\n\n\
             [[routes]]\nname = \"slow\"\nevent_types = [\"slow.*\"]\nplugin = \"spin\"\ntime_limit = \"20s\"\n",
            plugins_dir().display().to_string(),
        ),
    )
    .expect("write config");
    assert!(herald(&config, &["migrate"]).status.success());
    let mut serve = serve_in_foreground(&config);
    let appended = stdout_json(&herald(
        &config,
        &[
            "--json",
            "events",
            "append",
            "--type",
            "slow.job",
            "--entity-type",
            "job",
            "--entity-id",
            "1",
            "--data",
            "{}",
        ],
    ));
    let id = appended["event_id"].as_i64().expect("event id").to_string();
    let leased = async {
        loop {
            let shown = stdout_json(&herald(&config, &["events", "show", &id, "--json"]));
            if !shown["deliveries"][0]["locked_by"].is_null() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), leased)
        .await
        .expect("the attempt started");

    sigterm(&serve);
    let status = tokio::time::timeout(Duration::from_secs(10), serve.wait())
        .await
        .expect("serve stops soon after the deadline, not after the plugin's 20 s")
        .expect("wait for serve");
    assert!(status.success(), "serve exited with {status}");

    let shown = stdout_json(&herald(&config, &["events", "show", &id, "--json"]));
    let delivery = &shown["deliveries"][0];
    assert!(
        delivery["locked_by"].is_null(),
        "lease released: {delivery}"
    );
    assert_eq!(
        delivery["attempts"], 0,
        "the unfinished attempt is not counted"
    );
    assert_eq!(shown["event_status"], "READY");
}

/// SIGHUP re-reads the routes; a broken file is refused and the running routes stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_and_refuses_a_broken_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    let base = format!(
        "store = \"sqlite://herald.db\"\nplugins_dir = {:?}\n\n[admin]\nenabled = false\n\n\
         [dispatch]\npoll_interval = \"20ms\"\n\n\
         [[routes]]\nname = \"a\"\nevent_types = [\"a.*\"]\nplugin = \"echo\"\n",
        plugins_dir().display().to_string(),
    );
    std::fs::write(&config, &base).expect("write config");
    assert!(herald(&config, &["migrate"]).status.success());
    let mut serve = serve_in_foreground(&config);
    let pid = serve.id().expect("running").to_string();
    // The CLI reads its own file: the served one is about to be broken on purpose.
    let cli = dir.path().join("cli.toml");
    std::fs::write(&cli, "store = \"sqlite://herald.db\"\n").expect("cli config");
    let append = |event_type: &str| {
        let out = stdout_json(&herald(
            &cli,
            &[
                "--json",
                "events",
                "append",
                "--type",
                event_type,
                "--entity-type",
                "x",
                "--entity-id",
                "1",
                "--data",
                "{}",
            ],
        ));
        out["event_id"].as_i64().expect("event id").to_string()
    };
    let settled = |id: String| {
        let cli = cli.clone();
        async move {
            loop {
                let shown = stdout_json(&herald(&cli, &["events", "show", &id, "--json"]));
                let status = shown["event_status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if status != "READY" {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let limit = Duration::from_secs(30);
    let first_b = append("b.created");
    assert_eq!(
        tokio::time::timeout(limit, settled(first_b))
            .await
            .expect("settled"),
        "SKIPPED"
    );

    // A broken file: refused, route a keeps delivering, b still has no route.
    std::fs::write(&config, format!("{base}\n[[routes]]\nname = \"b\"\nevent_types = [\"b.*\"]\nplugin = \"echo\"\nbogus = 1\n")).expect("broken");
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let a = append("a.created");
    assert_eq!(
        tokio::time::timeout(limit, settled(a))
            .await
            .expect("settled"),
        "SUCCESS"
    );

    // A valid file: route b appears without a restart. A reload is asynchronous to the
    // signal, so wait for the condition: a b event delivered.
    std::fs::write(
        &config,
        format!("{base}\n[[routes]]\nname = \"b\"\nevent_types = [\"b.*\"]\nplugin = \"echo\"\n"),
    )
    .expect("valid");
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let reloaded = async {
        loop {
            let id = append("b.created");
            if settled(id).await == "SUCCESS" {
                return;
            }
        }
    };
    tokio::time::timeout(limit, reloaded)
        .await
        .expect("route b took effect");
    sigterm(&serve);
    let status = tokio::time::timeout(limit, serve.wait())
        .await
        .expect("stops")
        .expect("wait");
    assert!(status.success());
}
