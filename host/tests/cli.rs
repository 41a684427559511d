//! The `herald` binary as a user runs it: real processes, real stores, temporary dirs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// A `herald` command in `dir`, shielded from the caller's environment.
fn herald(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .current_dir(dir)
        .env_remove("HERALD_STORE")
        .env_remove("HERALD_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

fn run(dir: &Path, args: &[&str]) -> Output {
    herald(dir).args(args).output().expect("herald runs")
}

fn run_with_stdin(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = herald(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herald starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    child.wait_with_output().expect("herald finishes")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Succeeded; returns stdout.
#[track_caller]
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "herald failed ({}): {}",
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// Failed with exactly one `error:` line on stderr and nothing on stdout; returns the line.
#[track_caller]
fn fails(output: Output) -> String {
    assert!(
        !output.status.success(),
        "herald succeeded: {}",
        stdout(&output)
    );
    let err = stderr(&output);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert_eq!(stdout(&output), "", "nothing on stdout when failing");
    lines[0].to_string()
}

#[track_caller]
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// A directory with `herald init` done in it.
fn initialised() -> TempDir {
    let dir = TempDir::new().expect("temp dir");
    ok(run(dir.path(), &["init"]));
    dir
}

fn append(dir: &Path, event_type: &str, entity_id: &str, data: &str) -> i64 {
    let out = ok(run(
        dir,
        &[
            "events",
            "append",
            "--type",
            event_type,
            "--entity-type",
            "order",
            "--entity-id",
            entity_id,
            "--data",
            data,
        ],
    ));
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("an id, not {out:?}"))
}

fn listed_ids(dir: &Path) -> Vec<i64> {
    let listed = json(&ok(run(dir, &["--json", "events", "list"])));
    listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["event_id"].as_i64().expect("an id"))
        .collect()
}

#[test]
fn init_writes_a_commented_config_and_a_migrated_store() {
    let dir = TempDir::new().expect("temp dir");
    let out = ok(run(dir.path(), &["init", "site"]));
    let site = dir.path().join("site");
    assert!(out.contains("site/herald.toml"), "{out}");

    let config = std::fs::read_to_string(site.join("herald.toml")).expect("config written");
    assert!(
        config.contains("store = \"sqlite://herald.db\""),
        "{config}"
    );
    assert!(
        config.lines().filter(|l| l.starts_with('#')).count() >= 5,
        "{config}"
    );
    assert!(
        site.join("herald.db").is_file(),
        "store created beside the config"
    );

    // The store is usable at once, from the config's directory or through --config.
    assert_eq!(ok(run(&site, &["events", "list"])), "no events\n");
    let config_flag = site.join("herald.toml");
    let config_flag = config_flag.to_str().expect("utf-8 path");
    assert_eq!(
        ok(run(
            dir.path(),
            &["--config", config_flag, "events", "list"]
        )),
        "no events\n"
    );
}

#[test]
fn init_refuses_to_overwrite_a_config() {
    let dir = initialised();
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "# mine\n").expect("edit config");

    let err = fails(run(dir.path(), &["init"]));
    assert!(err.contains("herald.toml already exists"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        "# mine\n"
    );
}

#[test]
fn migrate_is_idempotent_and_creates_the_store() {
    let dir = TempDir::new().expect("temp dir");
    ok(run(dir.path(), &["migrate"]));
    assert!(dir.path().join("herald.db").is_file());
    ok(run(dir.path(), &["migrate"]));
    assert_eq!(ok(run(dir.path(), &["events", "list"])), "no events\n");
}

#[test]
fn appended_events_show_up_in_list_show_and_history() {
    let dir = initialised();
    let dir = dir.path();
    let out = ok(run(
        dir,
        &[
            "events",
            "append",
            "--type",
            "order.created",
            "--entity-type",
            "order",
            "--entity-id",
            "42",
            "--data",
            r#"{"total": 99.5, "note": "a rather long note that will not fit in a table row"}"#,
            "--target",
            "billing",
            "--key",
            "order-42-created",
            "--header",
            "tenant=acme",
        ],
    ));
    let first: i64 = out.trim().parse().expect("prints the new id");
    let second = append(dir, "order.paid", "42", r#"{"paid": true}"#);
    let other = append(dir, "order.created", "7", "{}");
    assert!(first < second && second < other);

    let list = ok(run(dir, &["events", "list"]));
    let rows: Vec<&str> = list.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{list}");
    assert!(
        rows[0].trim_start().starts_with(&other.to_string()),
        "newest first: {list}"
    );
    assert!(
        list.contains("order.created") && list.contains("order/42"),
        "{list}"
    );
    assert!(list.contains("billing") && list.contains("READY"), "{list}");
    assert!(
        list.contains('…') && !list.contains("table row"),
        "long data is cut: {list}"
    );

    let show = ok(run(dir, &["events", "show", &first.to_string()]));
    for expected in [
        "order.created",
        "order/42",
        "billing",
        "order-42-created",
        "tenant",
        "99.5",
    ] {
        assert!(show.contains(expected), "{expected} missing from: {show}");
    }
    assert!(
        show.contains("not fit in a table row"),
        "show prints all data: {show}"
    );

    let history = ok(run(dir, &["history", "order", "42"]));
    let rows: Vec<&str> = history.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{history}");
    assert!(
        rows[0].trim_start().starts_with(&first.to_string()),
        "oldest first: {history}"
    );
    assert!(rows[1].contains("order.paid"), "{history}");
}

#[test]
fn json_output_uses_the_model_fields() {
    let dir = initialised();
    let dir = dir.path();
    let first = append(dir, "order.created", "42", r#"{"total": 99.5}"#);
    let second = append(dir, "order.paid", "42", "[1, 2]");
    append(dir, "invoice.sent", "7", "{}");

    let appended = json(&ok(run(
        dir,
        &[
            "--json",
            "events",
            "append",
            "--type",
            "t",
            "--entity-type",
            "e",
            "--entity-id",
            "1",
            "--data",
            "1",
        ],
    )));
    assert!(appended["event_id"].as_i64().is_some(), "{appended}");

    let listed = json(&ok(run(
        dir,
        &["events", "list", "--json", "--type", "order.paid"],
    )));
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["event_id"], second);
    assert_eq!(
        listed[0]["event_data"],
        serde_json::json!([1, 2]),
        "data as JSON, not text"
    );
    assert_eq!(listed[0]["event_status"], "READY");

    let limited = json(&ok(run(dir, &["--json", "events", "list", "--limit", "2"])));
    assert_eq!(limited.as_array().map(Vec::len), Some(2));
    let ready = json(&ok(run(
        dir,
        &["--json", "events", "list", "--status", "ready"],
    )));
    assert_eq!(ready.as_array().map(Vec::len), Some(4));

    let shown = json(&ok(run(
        dir,
        &["--json", "events", "show", &first.to_string()],
    )));
    assert_eq!(shown["event_id"], first);
    assert_eq!(shown["event_type"], "order.created");
    assert_eq!(shown["entity_type"], "order");
    assert_eq!(shown["entity_id"], "42");
    assert_eq!(shown["event_data"]["total"], 99.5);
    assert_eq!(shown["deliveries"], serde_json::json!([]));
    assert_eq!(shown["attempts"], serde_json::json!([]));
    assert!(shown["created_at"].is_string(), "{shown}");

    let history = json(&ok(run(dir, &["--json", "history", "order", "42"])));
    let types: Vec<&str> = history
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .collect();
    assert_eq!(types, ["order.created", "order.paid"]);
}

#[test]
fn stdin_appends_json_lines_in_bulk() {
    let dir = initialised();
    let dir = dir.path();
    let lines = concat!(
        r#"{"event_type":"order.created","entity_type":"order","entity_id":"1","event_data":{"n":1}}"#,
        "\n\n",
        r#"{"type":"order.paid","entity_type":"order","entity_id":1,"data":{"n":2},"target":"billing","key":"k-1","headers":{"tenant":"acme"}}"#,
        "\n   \n",
        r#"{"type":"order.shipped","entity_type":"order","entity_id":"1","data":null}"#,
        "\n",
    );
    let out = ok(run_with_stdin(dir, &["events", "append", "--stdin"], lines));
    let ids: Vec<i64> = out
        .lines()
        .map(|l| l.parse().expect("an id per line"))
        .collect();
    assert_eq!(ids.len(), 3, "{out}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in input order: {out}"
    );

    let paid = json(&ok(run(
        dir,
        &["--json", "events", "show", &ids[1].to_string()],
    )));
    assert_eq!(paid["event_target"], "billing");
    assert_eq!(paid["idempotency_key"], "k-1");
    assert_eq!(paid["entity_id"], "1");
    assert_eq!(paid["headers"]["tenant"], "acme");

    let out = json(&ok(run_with_stdin(
        dir,
        &["--json", "events", "append", "--stdin"],
        r#"{"type":"t","entity_type":"e","entity_id":"9","data":{}}"#,
    )));
    assert_eq!(out["event_ids"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_bad_stdin_line_writes_nothing() {
    let dir = initialised();
    let dir = dir.path();
    let good = r#"{"type":"order.created","entity_type":"order","entity_id":"1","data":{}}"#;
    let lines = format!("{good}\n{good}\n{{\"type\": \"x\", oops}}\n{good}\n");
    let err = fails(run_with_stdin(
        dir,
        &["events", "append", "--stdin"],
        &lines,
    ));
    assert!(err.starts_with("error: stdin line 3: "), "{err}");
    assert!(listed_ids(dir).is_empty(), "nothing written");

    let missing_data =
        format!("{good}\n\n{{\"type\":\"x\",\"entity_type\":\"e\",\"entity_id\":\"1\"}}\n");
    let err = fails(run_with_stdin(
        dir,
        &["events", "append", "--stdin"],
        &missing_data,
    ));
    assert!(
        err.starts_with("error: stdin line 3: missing field `event_data`"),
        "{err}"
    );
    assert!(listed_ids(dir).is_empty(), "nothing written");
}

#[test]
fn malformed_data_is_refused_with_its_position() {
    let dir = initialised();
    let err = fails(run(
        dir.path(),
        &[
            "events",
            "append",
            "--type",
            "t",
            "--entity-type",
            "e",
            "--entity-id",
            "1",
            "--data",
            "{bad",
        ],
    ));
    assert_eq!(
        err,
        "error: --data is not valid JSON: key must be a string at line 1 column 2"
    );
    assert!(listed_ids(dir.path()).is_empty());
}

#[test]
fn bad_flags_are_one_line_errors() {
    let dir = initialised();
    let dir = dir.path();

    let err = fails(run(dir, &["events", "list", "--status", "DONE"]));
    assert!(err.contains("unknown event status 'DONE'"), "{err}");
    assert!(
        err.contains("READY, SUCCESS, FAILED, DEAD, SKIPPED, DUPLICATE"),
        "{err}"
    );

    let err = fails(run(
        dir,
        &["events", "append", "--type", "t", "--data", "{}"],
    ));
    assert!(
        err.contains("--entity-type") && err.contains("--entity-id"),
        "{err}"
    );

    let err = fails(run(
        dir,
        &[
            "events",
            "append",
            "--type",
            "t",
            "--entity-type",
            "e",
            "--entity-id",
            "1",
            "--data",
            "{}",
            "--header",
            "tenant",
        ],
    ));
    assert!(
        err.contains("--header") && err.contains("NAME=VALUE"),
        "{err}"
    );

    let err = fails(run(dir, &["events", "append", "--stdin", "--type", "t"]));
    assert!(err.contains("--stdin") && err.contains("--type"), "{err}");

    assert!(listed_ids(dir).is_empty(), "nothing written");
}

#[test]
fn showing_a_missing_event_fails() {
    let dir = initialised();
    assert_eq!(
        fails(run(dir.path(), &["events", "show", "42"])),
        "error: event 42 not found"
    );
}

#[test]
fn commands_other_than_init_and_migrate_never_create_a_store() {
    let dir = TempDir::new().expect("temp dir");
    let err = fails(run(dir.path(), &["events", "list"]));
    assert!(
        err.contains("herald.db does not exist") && err.contains("herald init"),
        "{err}"
    );
    let err = fails(run(
        dir.path(),
        &[
            "events",
            "append",
            "--type",
            "t",
            "--entity-type",
            "e",
            "--entity-id",
            "1",
            "--data",
            "{}",
        ],
    ));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("herald.db").exists());
}

#[test]
fn an_unmigrated_store_is_refused_until_migrated() {
    let dir = TempDir::new().expect("temp dir");
    std::fs::write(dir.path().join("herald.db"), b"").expect("empty SQLite file");
    let err = fails(run(dir.path(), &["events", "list"]));
    assert!(
        err.contains("not migrated") && err.contains("herald migrate"),
        "{err}"
    );
    ok(run(dir.path(), &["migrate"]));
    assert_eq!(ok(run(dir.path(), &["events", "list"])), "no events\n");
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let dir = TempDir::new().expect("temp dir");
    let url = "postgres://herald:s3cret@127.0.0.1:1/herald";
    let err = fails(run(dir.path(), &["--store", url, "events", "list"]));
    assert!(
        err.contains("postgres://herald:***@127.0.0.1:1/herald"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");

    let err = fails(run(
        dir.path(),
        &["--store", "mysql://u:s3cret@h/db", "events", "list"],
    ));
    assert!(
        err.contains("unsupported store URL") && !err.contains("s3cret"),
        "{err}"
    );
}

#[test]
fn a_named_config_must_exist() {
    let dir = TempDir::new().expect("temp dir");
    let err = fails(run(
        dir.path(),
        &["--config", "nowhere/herald.toml", "events", "list"],
    ));
    assert_eq!(err, "error: config file nowhere/herald.toml does not exist");

    let err = fails(
        herald(dir.path())
            .env("HERALD_CONFIG", "elsewhere.toml")
            .args(["migrate"])
            .output()
            .expect("herald runs"),
    );
    assert_eq!(err, "error: config file elsewhere.toml does not exist");
    assert!(!dir.path().join("herald.db").exists(), "nothing created");
}

#[test]
fn unknown_config_keys_name_the_key_and_line() {
    let dir = TempDir::new().expect("temp dir");
    std::fs::write(
        dir.path().join("herald.toml"),
        "# my config\n\nstor = \"sqlite://x.db\"\n",
    )
    .expect("config");
    let err = fails(run(dir.path(), &["migrate"]));
    assert_eq!(
        err,
        "error: herald.toml:3:1: unknown key 'stor', expected one of 'store', 'plugins_dir', 'log_level', 'dispatch', 'routes', 'admin'"
    );
    assert!(!dir.path().join("x.db").exists() && !dir.path().join("herald.db").exists());
}

#[test]
fn store_precedence_is_flag_then_env_then_config_then_default() {
    let dir = TempDir::new().expect("temp dir");
    let root = dir.path();
    let conf = root.join("conf");
    let work = root.join("work");
    std::fs::create_dir_all(&conf).expect("conf dir");
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::write(
        conf.join("herald.toml"),
        "store = \"sqlite://from-config.db\"\n",
    )
    .expect("config");
    let config = conf.join("herald.toml");
    let config = config.to_str().expect("utf-8 path");
    let url = |name: &str| format!("sqlite://{}", root.join(name).display());
    let exists = |path: PathBuf| path.exists();

    // Flag beats environment and config.
    ok(herald(&work)
        .env("HERALD_STORE", url("from-env.db"))
        .args([
            "--config",
            config,
            "--store",
            &url("from-flag.db"),
            "migrate",
        ])
        .output()
        .expect("herald runs"));
    assert!(exists(root.join("from-flag.db")));
    assert!(!exists(root.join("from-env.db")) && !exists(conf.join("from-config.db")));

    // Environment beats config.
    ok(herald(&work)
        .env("HERALD_STORE", url("from-env.db"))
        .args(["--config", config, "migrate"])
        .output()
        .expect("herald runs"));
    assert!(exists(root.join("from-env.db")));
    assert!(!exists(conf.join("from-config.db")));

    // The config's relative path is relative to the config file, not the working dir.
    ok(run(&work, &["--config", config, "migrate"]));
    assert!(exists(conf.join("from-config.db")));
    assert!(!exists(work.join("from-config.db")));

    // Without any config: herald.db in the working directory.
    ok(run(&work, &["migrate"]));
    assert!(exists(work.join("herald.db")));

    // ./herald.toml is found without --config.
    ok(run(&conf, &["events", "list"]));
}

#[test]
fn help_reads_well() {
    let dir = TempDir::new().expect("temp dir");
    let help = ok(run(dir.path(), &["--help"]));
    for command in ["init", "migrate", "events", "history"] {
        assert!(
            help.contains(&format!("  {command} ")),
            "{command} missing: {help}"
        );
    }
    assert!(help.contains("Examples:"), "{help}");
    let help = ok(run(dir.path(), &["events", "append", "--help"]));
    assert!(
        help.contains("--stdin") && help.contains("Examples:"),
        "{help}"
    );
}

/// The append/list/show path on a real Postgres, through `--store`.
#[tokio::test]
async fn append_list_show_on_postgres() {
    let Some(schema) = herald_tests::PgSchema::create("cli_append_list_show").await else {
        return;
    };
    let dir = TempDir::new().expect("temp dir");
    let dir = dir.path();
    let store = schema.url.as_str();

    let err = fails(run(dir, &["--store", store, "events", "list"]));
    assert!(
        err.contains("herald migrate"),
        "an empty schema is not migrated: {err}"
    );
    ok(run(dir, &["--store", store, "migrate"]));
    ok(run(dir, &["--store", store, "migrate"]));

    let id: i64 = ok(run(
        dir,
        &[
            "--store",
            store,
            "events",
            "append",
            "--type",
            "order.created",
            "--entity-type",
            "order",
            "--entity-id",
            "42",
            "--data",
            r#"{"total": 99.5}"#,
            "--header",
            "tenant=acme",
        ],
    ))
    .trim()
    .parse()
    .expect("an id");
    let bulk = concat!(
        r#"{"type":"order.paid","entity_type":"order","entity_id":"42","data":{}}"#,
        "\n",
        r#"{"type":"order.shipped","entity_type":"order","entity_id":"42","data":{}}"#,
        "\n",
    );
    let out = ok(run_with_stdin(
        dir,
        &["--store", store, "events", "append", "--stdin"],
        bulk,
    ));
    assert_eq!(out.lines().count(), 2, "{out}");
    let bad_bulk = format!("{bulk}not json\n");
    fails(run_with_stdin(
        dir,
        &["--store", store, "events", "append", "--stdin"],
        &bad_bulk,
    ));

    let listed = json(&ok(run(
        dir,
        &["--store", store, "--json", "events", "list"],
    )));
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(3),
        "bad bulk wrote nothing"
    );
    assert_eq!(listed[2]["event_id"], id, "newest first");

    let list = ok(run(dir, &["--store", store, "events", "list"]));
    assert!(
        list.contains("order.created") && list.contains("order/42"),
        "{list}"
    );

    let shown = json(&ok(run(
        dir,
        &[
            "--store",
            store,
            "--json",
            "events",
            "show",
            &id.to_string(),
        ],
    )));
    assert_eq!(shown["event_data"]["total"], 99.5);
    assert_eq!(shown["headers"]["tenant"], "acme");
    assert_eq!(shown["event_status"], "READY");

    let history = json(&ok(run(
        dir,
        &["--store", store, "--json", "history", "order", "42"],
    )));
    assert_eq!(history.as_array().map(Vec::len), Some(3));
    assert_eq!(history[0]["event_id"], id, "oldest first");

    assert_eq!(
        fails(run(dir, &["--store", store, "events", "show", "999999"])),
        "error: event 999999 not found"
    );
    schema.drop().await;
}

#[test]
fn plugins_deploy_checks_the_file_and_list_shows_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "plugins_dir = \"plugins\"\n").expect("config");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run herald")
    };
    let echo = plugins.join("echo.wasm");
    let deployed = run(&["--json", "plugins", "deploy", echo.to_str().expect("path")]);
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert!(
        dir.path().join("plugins/echo.wasm").is_file(),
        "installed under its describe() name"
    );

    let listed = run(&["--json", "plugins", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed[0]["name"], "echo");
    assert!(listed[0]["version"]
        .as_str()
        .is_some_and(|v| v.starts_with("sha256:")));

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a plugin").expect("junk");
    let refused = run(&[
        "plugins",
        "deploy",
        junk.to_str().expect("path"),
        "--name",
        "echo",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("not a valid WebAssembly component"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("plugins/echo.wasm")).expect("still there"),
        std::fs::read(&echo).expect("echo"),
        "a refused deploy changes nothing"
    );
    let traversal = run(&[
        "plugins",
        "deploy",
        echo.to_str().expect("path"),
        "--name",
        "../evil",
    ]);
    assert!(!traversal.status.success());
    assert!(!dir.path().join("evil.wasm").exists());
}

#[tokio::test]
async fn plugins_resume_lifts_a_quarantine_and_list_shows_it() {
    let dir = initialised();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let store = herald::store::open_migrated(&url).await.expect("store");
    std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    std::fs::copy(
        plugins.join("echo.wasm"),
        dir.path().join("plugins/echo.wasm"),
    )
    .expect("echo.wasm (run tests/build-plugins)");
    assert!(store
        .quarantine(
            "echo",
            "10 consecutive faults; last: plugin trapped: boom",
            10
        )
        .await
        .expect("quarantine"));

    let listed = json(&ok(run(dir.path(), &["--json", "plugins", "list"])));
    assert_eq!(listed[0]["name"], "echo");
    assert_eq!(listed[0]["quarantine"]["faults"], 10);
    let table = ok(run(dir.path(), &["plugins", "list"]));
    assert!(table.contains("QUARANTINED since"), "{table}");

    let resumed = ok(run(dir.path(), &["plugins", "resume", "echo"]));
    assert!(resumed.starts_with("echo resumed"), "{resumed}");
    assert!(store.quarantined().await.expect("list").is_empty());
    let listed = json(&ok(run(dir.path(), &["--json", "plugins", "list"])));
    assert!(listed[0]["quarantine"].is_null(), "{listed}");

    let again = fails(run(dir.path(), &["plugins", "resume", "echo"]));
    assert!(
        again.contains("plugin 'echo' is not quarantined (quarantined: none)"),
        "{again}"
    );
}
