//! Running the real `herald` binary from tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn herald(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run herald")
}

pub fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "herald failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// Where `tests/build-plugins` puts `NAME.wasm`.
pub fn plugins_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    assert!(
        dir.join("webhook.wasm").is_file(),
        "no plugins in {}: run tests/build-plugins first (tests/run does)",
        dir.display()
    );
    dir
}

/// `herald serve` in the background, killed (SIGKILL) when dropped. Its log goes to
/// `log`, for reading when a test fails.
pub fn spawn_serve(config: &Path, instance_id: &str, log: &Path) -> tokio::process::Child {
    let log = std::fs::File::create(log).expect("serve log file");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("HERALD_INSTANCE_ID", instance_id)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start herald serve")
}

/// `herald serve` with its log on the test's stderr, killed (SIGKILL) when dropped.
pub fn serve_in_foreground(config: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .kill_on_drop(true)
        .spawn()
        .expect("start herald serve")
}

/// Send SIGTERM to a running `herald serve`, as systemd or an operator would.
pub fn sigterm(serve: &tokio::process::Child) {
    let pid = serve.id().expect("serve is running").to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
}

/// A config with the built plugins and `rest` (its `[dispatch]` and `[[routes]]`), as
/// `dir/herald.toml` would hold it.
pub fn config_with_plugins(dir: &tempfile::TempDir, rest: &str) -> herald::config::Config {
    let text = format!(
        "plugins_dir = {:?}\n\n{rest}",
        plugins_dir().display().to_string()
    );
    herald::config::Config::parse(&text, &dir.path().join("herald.toml"))
        .unwrap_or_else(|err| panic!("test config: {err}\n{text}"))
}
