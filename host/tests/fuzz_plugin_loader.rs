//! Property tests of the plugin loader, through the path a deploy takes: the directory
//! watcher sees `NAME.wasm` change, compiles, links and asks it to `describe()` itself
//! (`PluginRuntime::load_bytes`, which `herald plugins deploy` and the upload API call
//! too). Fed arbitrary bytes, truncations and bit-flips of a real plugin, it must
//! refuse with a reason and never panic, and the running version must stay: nothing of
//! the refused file is put in service or recorded for rollback.
//!
//! Case counts are fixed and small: a mutant that survives validation is compiled by
//! Cranelift, which costs a good fraction of a second in a debug build.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald::runtime::hot_reload::{DeployOutcome, PluginWatcher};
use herald::runtime::versions::PluginDir;
use herald::runtime::{EngineSettings, PluginRegistry, PluginRuntime};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// The component-model preamble: magic, then the component layer's version, so random
/// bytes after it reach the section parser instead of failing on the first word.
const COMPONENT_HEADER: &[u8] = b"\0asm\x0d\0\x01\0";

struct Fixture {
    tokio: tokio::runtime::Runtime,
    runtime: Arc<PluginRuntime>,
    echo: Vec<u8>,
    _cache: tempfile::TempDir,
}

/// One engine and one compile cache for every case: the real echo plugin is compiled
/// once, and each case puts it in service again from the cache in milliseconds.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
        let echo = std::fs::read(built.join("echo.wasm")).unwrap_or_else(|err| {
            panic!(
                "echo.wasm in {} ({err}): run tests/build-plugins",
                built.display()
            )
        });
        let cache = tempfile::tempdir().expect("cache dir");
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let runtime = Arc::new(
            PluginRuntime::new(EngineSettings {
                cache_dir: Some(cache.path().to_path_buf()),
                ..EngineSettings::default()
            })
            .expect("plugin runtime"),
        );
        Fixture {
            tokio,
            runtime,
            echo,
            _cache: cache,
        }
    })
}

/// Scan until the watcher has judged the file (it waits for two equal looks).
async fn judged(watcher: &mut PluginWatcher) -> Vec<DeployOutcome> {
    for _ in 0..3 {
        let outcomes = watcher.scan().await;
        if !outcomes.is_empty() {
            return outcomes;
        }
    }
    Vec::new()
}

/// Replace the running `echo.wasm` by `bytes` and let the watcher deploy it. Returns
/// what the watcher said; asserts that a refusal changed nothing.
fn deploy_over_running_echo(bytes: &[u8]) -> Result<DeployOutcome, TestCaseError> {
    let f = fixture();
    f.tokio.block_on(async {
        let dir = tempfile::tempdir().expect("plugins dir");
        let file = dir.path().join("echo.wasm");
        std::fs::write(&file, &f.echo).expect("write echo");
        let registry = Arc::new(PluginRegistry::default());
        let running = f
            .runtime
            .load_bytes("echo", f.echo.clone())
            .await
            .expect("the real echo loads");
        let running_version = running.version.clone();
        registry.insert(running);
        let mut watcher = PluginWatcher::new(dir.path(), f.runtime.clone(), registry.clone());

        std::fs::write(&file, bytes).expect("write the mutant");
        // A mutant of the same length written within the clock's granularity would look
        // unchanged to the watcher: make the change visible.
        touch_later(&file);
        let outcomes = judged(&mut watcher).await;
        prop_assert_eq!(outcomes.len(), 1, "{:?}", outcomes);
        let outcome = outcomes[0].clone();
        if let DeployOutcome::Refused { reason, .. } = &outcome {
            prop_assert!(!reason.trim().is_empty());
            let in_service = registry.get("echo").map(|p| p.version.clone());
            prop_assert_eq!(in_service.as_deref(), Some(running_version.as_str()));
            let kept: Vec<String> = PluginDir::new(dir.path())
                .history("echo")
                .into_iter()
                .map(|d| d.version)
                .collect();
            prop_assert_eq!(kept, vec![running_version]);
        }
        Ok(outcome)
    })
}

fn touch_later(file: &Path) {
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    let handle = std::fs::File::options()
        .write(true)
        .open(file)
        .expect("open the mutant");
    handle.set_modified(later).expect("set mtime");
}

fn refused(outcome: &DeployOutcome) -> bool {
    matches!(outcome, DeployOutcome::Refused { .. })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are shrunk and printed; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn arbitrary_bytes_are_refused(
        component in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut bytes = if component { COMPONENT_HEADER.to_vec() } else { Vec::new() };
        bytes.extend(tail);
        let outcome = deploy_over_running_echo(&bytes)?;
        prop_assert!(refused(&outcome), "{:?}", outcome);
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn truncated_plugins_are_refused(fraction in 0.0f64..1.0) {
        let echo = &fixture().echo;
        let keep = ((echo.len() as f64) * fraction) as usize;
        let outcome = deploy_over_running_echo(&echo[..keep.min(echo.len() - 1)])?;
        prop_assert!(refused(&outcome), "{:?}", outcome);
    }

    /// A flipped bit may land in a string or an unused byte and leave a plugin that
    /// still works; then deploying it is right. What must never happen is a panic, or a
    /// refused file that changed what runs (checked in `deploy_over_running_echo`).
    #[test]
    fn bit_flipped_plugins_never_panic_and_refusals_change_nothing(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..8),
    ) {
        let mut bytes = fixture().echo.clone();
        for (at, bit) in flips {
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        let outcome = deploy_over_running_echo(&bytes)?;
        if let DeployOutcome::Deployed { version, .. } = &outcome {
            prop_assert!(version.starts_with("sha256:"));
        }
    }
}
