//! The compile cache against real plugins (`tests/build-plugins`).
//!
//! Each test plays a restart by building a second `PluginRuntime` on the same cache
//! directory. `LoadedPlugin::from_cache` tells whether a load deserialized an entry or
//! compiled; a plugin that came from a bad entry, or from none, must still work.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use herald::runtime::{
    CallLimits, EngineSettings, Event, LoadedPlugin, Outcome, PluginRuntime, RouteGrant,
};
use sha2::{Digest, Sha256};

fn runtime(cache: &Path) -> PluginRuntime {
    // The cache's warnings say why an entry was refused; shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("herald=debug")
        .with_test_writer()
        .try_init();
    PluginRuntime::new(EngineSettings {
        max_instances: 4,
        cache_dir: Some(cache.to_path_buf()),
        ..EngineSettings::default()
    })
    .expect("runtime")
}

fn wasm(name: &str) -> Vec<u8> {
    let path = support::plugins_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

async fn load(runtime: &PluginRuntime, name: &str) -> LoadedPlugin {
    runtime
        .load_bytes(name, wasm(name))
        .await
        .unwrap_or_else(|err| panic!("load {name}: {err}"))
}

/// The cache's entries; also checks that no temporary file was left behind.
fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(cache).expect("read the cache dir") {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        assert!(!file.ends_with(".partial"), "leftover {file}");
        if file.ends_with(".cwasm") {
            entries.push(path);
        }
    }
    entries.sort();
    entries
}

fn only_entry(cache: &Path) -> PathBuf {
    let entries = entries(cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

/// Run `handle` once: proves the code (however it was obtained) really runs.
async fn assert_echo_delivers(runtime: &PluginRuntime, echo: &LoadedPlugin) {
    let grant = Arc::new(RouteGrant {
        route: "cache-test".into(),
        plugin: echo.name.clone(),
        config: BTreeMap::new(),
        http: None,
        limits: CallLimits::default(),
    });
    let event = Event {
        id: 7,
        event_type: "order.placed".into(),
        target: None,
        entity_type: "order".into(),
        entity_id: "o-1".into(),
        data: "{}".into(),
        headers: Vec::new(),
        created_at_ms: 0,
        now_ms: 0,
        attempt: 1,
        idempotency_key: "key-7".into(),
        route: "cache-test".into(),
    };
    let report = runtime.call(echo, grant, event).await;
    match report.outcome {
        Ok(Outcome::Delivered(Some(receipt))) => assert_eq!(receipt, "cache-test:1:key-7"),
        Ok(other) => panic!("echo did not deliver: {other:?}"),
        Err(fault) => panic!("echo faulted: {fault}"),
    }
}

/// Rewrite an entry's payload and give it the digest that matches, the way Herald
/// writes entries (header: magic line, key line, sha256-hex line), so only wasmtime's
/// own checks stand between the payload and the engine.
fn reseal(entry: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut lines = entry.splitn(4, |&b| b == b'\n');
    let magic = lines.next().expect("magic line");
    let key = lines.next().expect("key line");
    let mut file = Vec::new();
    for line in [magic, key, hex::encode(Sha256::digest(payload)).as_bytes()] {
        file.extend_from_slice(line);
        file.push(b'\n');
    }
    file.extend_from_slice(payload);
    file
}

#[tokio::test]
async fn a_restart_loads_from_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("plugins/.cache");

    let cold = runtime(&cache);
    let started = Instant::now();
    let webhook = load(&cold, "webhook").await;
    let cold_time = started.elapsed();
    assert!(!webhook.from_cache);
    let entry = only_entry(&cache);
    let echo = load(&cold, "echo").await;
    assert!(!echo.from_cache);
    assert_eq!(entries(&cache).len(), 2);
    drop(cold);

    let warm = runtime(&cache);
    let started = Instant::now();
    let webhook_again = load(&warm, "webhook").await;
    let warm_time = started.elapsed();
    assert!(webhook_again.from_cache);
    assert_eq!(webhook_again.info.name, "webhook");
    assert_eq!(webhook_again.version, webhook.version);
    let echo = load(&warm, "echo").await;
    assert!(echo.from_cache);
    assert_echo_delivers(&warm, &echo).await;
    // Reading an entry does not rewrite it.
    assert!(entries(&cache).contains(&entry));
    assert_eq!(entries(&cache).len(), 2);

    // Both loads include instantiating the plugin and its describe() check.
    eprintln!(
        "webhook.wasm load: compiled {:.1} ms, from the cache {:.1} ms",
        cold_time.as_secs_f64() * 1e3,
        warm_time.as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn a_corrupt_entry_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    load(&runtime(&cache), "echo").await;
    let entry = only_entry(&cache);
    let sound = std::fs::read(&entry).expect("read entry");

    let mut flipped = sound.clone();
    let middle = flipped.len() / 2;
    for byte in &mut flipped[middle..middle + 16] {
        *byte ^= 0xa5;
    }
    let truncated = sound[..sound.len() / 3].to_vec();
    for damaged in [flipped, truncated, Vec::new()] {
        std::fs::write(&entry, &damaged).expect("damage the entry");

        let restarted = runtime(&cache);
        let echo = load(&restarted, "echo").await;
        assert!(!echo.from_cache, "a damaged entry was used");
        assert_echo_delivers(&restarted, &echo).await;
        let rewritten = std::fs::read(only_entry(&cache)).expect("read the rewritten entry");
        assert_ne!(rewritten, damaged, "the damaged entry was not replaced");

        // The rewritten entry is sound: the next start uses it.
        let next = runtime(&cache);
        let echo = load(&next, "echo").await;
        assert!(echo.from_cache);
        assert_echo_delivers(&next, &echo).await;
    }
}

#[tokio::test]
async fn an_entry_for_another_engine_is_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    load(&runtime(&cache), "echo").await;
    let entry = only_entry(&cache);
    let sound = std::fs::read(&entry).expect("read entry");

    // Real wasmtime output for the same plugin, but from an engine configured otherwise
    // (no epoch interruption, default allocator): what a config change would leave behind.
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let other_engine = wasmtime::Engine::new(&config).expect("other engine");
    let foreign = wasmtime::component::Component::new(&other_engine, wasm("echo"))
        .and_then(|component| component.serialize())
        .expect("compile for the other engine");
    let garbage = b"\x7fELF but not really a wasmtime artefact".repeat(64);

    for payload in [foreign, garbage] {
        // A digest that matches: Herald's integrity check passes, wasmtime must refuse.
        let forged = reseal(&sound, &payload);
        std::fs::write(&entry, &forged).expect("forge the entry");

        let restarted = runtime(&cache);
        let echo = load(&restarted, "echo").await;
        assert!(!echo.from_cache, "a foreign entry was used");
        assert_echo_delivers(&restarted, &echo).await;
        let rewritten = std::fs::read(only_entry(&cache)).expect("read the rewritten entry");
        assert_ne!(rewritten, forged, "the foreign entry was not replaced");

        let next = runtime(&cache);
        assert!(load(&next, "echo").await.from_cache);
    }
}

#[tokio::test]
async fn an_entry_filed_under_another_key_is_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let first = runtime(&cache);
    load(&first, "echo").await;
    let echo_entry = only_entry(&cache);
    load(&first, "webhook").await;
    let webhook_entry = entries(&cache)
        .into_iter()
        .find(|path| *path != echo_entry)
        .expect("webhook entry");

    // A sound entry, but for other wasm: it must not stand in for echo's code.
    std::fs::copy(&webhook_entry, &echo_entry).expect("copy entry");
    let restarted = runtime(&cache);
    let echo = load(&restarted, "echo").await;
    assert!(!echo.from_cache);
    assert_eq!(echo.info.name, "echo");
    assert_echo_delivers(&restarted, &echo).await;
}

#[tokio::test]
async fn an_unwritable_cache_only_costs_compiling() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The cache directory cannot be created: a file is in its way.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").expect("blocker");
    let runtime = runtime(&blocker.join("cache"));
    let echo = load(&runtime, "echo").await;
    assert!(!echo.from_cache);
    assert_echo_delivers(&runtime, &echo).await;
    let again = load(&runtime, "echo").await;
    assert!(!again.from_cache);
}
