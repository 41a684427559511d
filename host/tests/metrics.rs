//! `/metrics` over real HTTP after a real dispatch of a known workload, with the real
//! plugins. The recorder is process-global, so everything is asserted in ONE test: a
//! second test in this file would add to the same counters and make the values inexact.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use herald::admin::{AdminContext, AdminServer, AdminSettings, BearerToken};
use herald::config::Config;
use herald::metrics::DeployResult;
use herald::service::Service;
use herald::store::{self, EventStatus, EventStore, NewEvent};
use serde_json::json;
use tokio::sync::watch;

const TOKEN: &str = "metrics-token";

fn config(dir: &tempfile::TempDir) -> Config {
    support::config_with_plugins(
        dir,
        r#"[dispatch]
lease = "30s"
poll_interval = "20ms"

[[routes]]
name = "echo-route"
event_types = ["order.*"]
plugin = "echo"

[[routes]]
name = "trap-route"
event_types = ["boom.*"]
plugin = "trap"
[routes.retry]
max_attempts = 1
"#,
    )
}

/// The samples of a Prometheus text exposition: series name, its labels, its value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value.parse().expect("numeric value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key.to_string(), value.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value)
        })
        .collect()
}

/// The value of the one series named `name` with exactly `labels`, if it exists.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| n == name && *l == wanted)
        .map(|(_, _, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} appears twice:\n{text}");
    found.first().copied()
}

/// The sum over every series named `name`.
fn total(text: &str, name: &str) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let store: Arc<dyn EventStore> =
        Arc::from(store::open_migrated(&url).await.expect("open store"));
    let config = config(&dir);
    let service = Service::build(&config, store.clone())
        .await
        .unwrap_or_else(|err| panic!("service: {err}"));

    let mut ids = Vec::new();
    for entity in 1..=5 {
        let event = NewEvent::new("order.created", "order", entity.to_string(), json!({}));
        ids.push(store.append(&event).await.expect("append"));
    }
    let boom = NewEvent::new("boom.now", "thing", "1", json!({}));
    let trapped = store.append(&boom).await.expect("append");
    for entity in 1..=2 {
        let unrouted = NewEvent::new("nobody.cares", "thing", entity.to_string(), json!({}));
        store.append(&unrouted).await.expect("append");
    }
    service.dispatcher.drain().await.expect("drain");
    for id in &ids {
        let detail = store
            .event_detail(*id)
            .await
            .expect("detail")
            .expect("event");
        assert_eq!(detail.event.event_status, EventStatus::Success);
    }
    let detail = store
        .event_detail(trapped)
        .await
        .expect("detail")
        .expect("event");
    assert_eq!(detail.event.event_status, EventStatus::Dead);

    // Nothing deploys yet; the counter is fed through its public function.
    herald::metrics::plugin_deployed("echo", DeployResult::Deployed);

    let settings = AdminSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: BearerToken::new(TOKEN),
    };
    let context = AdminContext {
        store: store.clone(),
        plugins: Some(service.plugins.clone()),
        routes: Vec::new(),
        deploys: None,
    };
    let server = AdminServer::bind(settings, context)
        .await
        .expect("bind admin");
    let addr = server.local_addr().expect("bound address");
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(server.run(stopped));
    let endpoint = format!("http://{addr}/metrics");
    let client = reqwest::Client::new();

    let anonymous = client.get(&endpoint).send().await.expect("get");
    assert_eq!(anonymous.status(), 401, "the token guards /metrics");

    let response = client
        .get(&endpoint)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("body");

    let echo = [("route", "echo-route")];
    let trap = [("route", "trap-route")];
    assert_eq!(
        value(&text, "herald_deliveries_claimed_total", &echo),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "herald_deliveries_claimed_total", &trap),
        Some(1.0)
    );
    assert_eq!(total(&text, "herald_deliveries_claimed_total"), 6.0);

    let attempts = "herald_attempts_total";
    let delivered = [
        ("route", "echo-route"),
        ("plugin", "echo"),
        ("outcome", "delivered"),
    ];
    let dead = [
        ("route", "trap-route"),
        ("plugin", "trap"),
        ("outcome", "dead"),
    ];
    assert_eq!(value(&text, attempts, &delivered), Some(5.0));
    assert_eq!(value(&text, attempts, &dead), Some(1.0));
    assert_eq!(total(&text, attempts), 6.0, "no retries, no other outcomes");
    assert_eq!(total(&text, "herald_outcomes_lost_total"), 0.0);

    let fault = [
        ("route", "trap-route"),
        ("plugin", "trap"),
        ("kind", "trap"),
    ];
    assert_eq!(
        value(&text, "herald_plugin_faults_total", &fault),
        Some(1.0)
    );
    assert_eq!(total(&text, "herald_plugin_faults_total"), 1.0);

    let duration = "herald_attempt_duration_seconds_count";
    let echo_plugin = [("route", "echo-route"), ("plugin", "echo")];
    let trap_plugin = [("route", "trap-route"), ("plugin", "trap")];
    assert_eq!(value(&text, duration, &echo_plugin), Some(5.0));
    assert_eq!(value(&text, duration, &trap_plugin), Some(1.0));
    assert_eq!(total(&text, duration), 6.0);
    let inf = [("route", "echo-route"), ("plugin", "echo"), ("le", "+Inf")];
    assert_eq!(
        value(&text, "herald_attempt_duration_seconds_bucket", &inf),
        Some(5.0)
    );

    // Only delivered attempts have a lag; the trapped event never got delivered.
    assert_eq!(
        value(&text, "herald_delivery_lag_seconds_count", &echo),
        Some(5.0)
    );
    assert_eq!(
        value(&text, "herald_delivery_lag_seconds_count", &trap),
        None
    );
    assert!(total(&text, "herald_delivery_lag_seconds_sum") >= 0.0);

    // 6 events routed; skipped: the 2 unrouted events, and the `herald.delivery.dead`
    // notice the host appended for the trapped event, which no route takes either.
    let fanned = "herald_events_fanned_out_total";
    assert_eq!(value(&text, fanned, &[("result", "routed")]), Some(6.0));
    assert_eq!(value(&text, fanned, &[("result", "skipped")]), Some(3.0));
    assert_eq!(value(&text, fanned, &[("result", "duplicate")]), None);

    let deployed = [("plugin", "echo"), ("result", "deployed")];
    assert_eq!(
        value(&text, "herald_plugin_deploys_total", &deployed),
        Some(1.0)
    );

    // The backlog is counted at scrape time; after the drain there is none.
    for gauge in ["herald_events_ready", "herald_deliveries_waiting_retry"] {
        assert_eq!(value(&text, gauge, &[]), Some(0.0), "{gauge}");
    }

    // Cardinality: labels name routes and plugins, never events or entities.
    let label_names: std::collections::BTreeSet<String> = samples(&text)
        .into_iter()
        .flat_map(|(_, labels, _)| labels.into_keys())
        .collect();
    let allowed = [
        "route", "plugin", "outcome", "kind", "result", "reason", "le",
    ];
    for name in &label_names {
        assert!(
            allowed.contains(&name.as_str()),
            "unexpected label {name}:\n{text}"
        );
    }
}
