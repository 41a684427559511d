//! Property tests of the `herald.toml` parser: whatever the text, `Config::parse` returns
//! a config or a one-line error naming the file (and, where the text has one, the line
//! and column, or the key); it never panics. Inputs: arbitrary strings, strings over
//! TOML's own alphabet (which get much further into the parser), and structured
//! mutations of a complete, valid file: a value replaced by one of another type, a key
//! renamed, a line dropped or repeated.

use std::path::Path;

use herald::config::Config;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// Every section and most keys, with valid values.
const VALID: &str = r#"store = "sqlite://herald.db"
plugins_dir = "plugins"
log_level = "info"

[dispatch]
instance_id = "a"
batch_size = 100
concurrency = 8
lease = "60s"
poll_interval = "500ms"
shutdown_deadline = "30s"
listen = true
max_event_bytes = 1048576

[admin]
enabled = true
listen = "127.0.0.1:7474"
token = "env:HERALD_ADMIN_TOKEN"

[[routes]]
name = "orders-webhook"
event_types = ["order.*"]
target = "billing"
plugin = "webhook"
ordering = "entity"
allowed_hosts = ["hooks.example.com"]
allow_private = false
time_limit = "10s"
memory_limit_mb = 64
http_timeout = "10s"
events_per_instance = 64

[routes.retry]
max_attempts = 12
max_age = "24h"
backoff_base = "1s"
backoff_max = "1h"

[routes.config]
url = "https://hooks.example.com/orders"
"#;

/// The located error a parse must give, if any: `herald.toml:LINE:COLUMN: ...` within the
/// text, or `herald.toml: ...` naming a key; always one line.
fn check(text: &str) -> Result<Option<String>, TestCaseError> {
    let result = Config::parse(text, Path::new("herald.toml"));
    let Err(err) = result else {
        return Ok(None);
    };
    let message = err.to_string();
    prop_assert!(!message.contains('\n'), "not one line: {message:?}");
    let rest = message.strip_prefix("herald.toml");
    prop_assert!(rest.is_some(), "does not name the file: {message}");
    let rest = rest.unwrap_or_default();
    if let Some(located) = rest.strip_prefix(':') {
        let mut parts = located.splitn(3, ':');
        let line: Option<usize> = parts.next().and_then(|l| l.parse().ok());
        let column: Option<usize> = parts.next().and_then(|c| c.parse().ok());
        match (line, column) {
            (Some(line), Some(column)) => {
                let lines = text.split('\n').count();
                prop_assert!(
                    (1..=lines).contains(&line) && column >= 1,
                    "{message} points outside the text ({lines} lines)"
                );
            }
            // `herald.toml: message`, unlocated: it must name what it refuses.
            _ => prop_assert!(
                message.contains('\'') || message.contains("max_event_bytes"),
                "neither located nor naming a key: {message}"
            ),
        }
    } else {
        prop_assert!(false, "unexpected shape: {message}");
    }
    Ok(Some(message))
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A value of any TOML type, valid or not for the key it lands on.
fn any_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        ".{0,20}".prop_map(|s| toml_string(&s)),
        Just("\"\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"18446744073709551616s\"".to_string()),
        Just("\"0.0.0.0:99999\"".to_string()),
        Just("\"postgres://u:secret@h/db\"".to_string()),
        Just("\"mysql://u:secret@h/db\"".to_string()),
        Just("\"../../etc/passwd\"".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        Just("[]".to_string()),
        Just("[1, \"a\", true]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("{}".to_string()),
        "[a-z]{1,8}".prop_map(|s| s),
    ]
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// One edit of one line of the valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Value(String),
    RenameKey(String),
    Drop,
    Repeat,
    Insert(String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => any_value().prop_map(Mutation::Value),
        2 => "zz_[a-z]{1,8}".prop_map(Mutation::RenameKey),
        1 => Just(Mutation::Drop),
        1 => Just(Mutation::Repeat),
        1 => "[ -~]{0,30}".prop_map(Mutation::Insert),
    ]
}

/// `text` with `mutation` applied to line `at` (modulo the line count), and the key a
/// rename introduced, with its 1-based line, when that key must be reported as unknown.
fn mutate(text: &str, at: usize, mutation: &Mutation) -> (String, Option<(String, usize)>) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return (text.to_string(), None);
    }
    let at = at % lines.len();
    // `[routes.config]` takes any key: a rename there is not an error.
    let in_free_table = lines[..=at]
        .iter()
        .rev()
        .find(|l| l.starts_with('['))
        .is_some_and(|section| section == "[routes.config]");
    let mut unknown = None;
    match mutation {
        Mutation::Value(value) => {
            if let Some((key, _)) = lines[at].split_once(" = ") {
                lines[at] = format!("{key} = {value}");
            }
        }
        Mutation::RenameKey(new_key) => {
            if let Some((_, value)) = lines[at].split_once(" = ") {
                lines[at] = format!("{new_key} = {value}");
                if !in_free_table {
                    unknown = Some((new_key.clone(), at + 1));
                }
            }
        }
        Mutation::Drop => {
            lines.remove(at);
        }
        Mutation::Repeat => {
            let line = lines[at].clone();
            lines.insert(at, line);
        }
        Mutation::Insert(new) => lines.insert(at, new.clone()),
    }
    (lines.join("\n"), unknown)
}

#[test]
fn the_valid_file_parses() {
    let config = Config::parse(VALID, Path::new("herald.toml")).expect("valid");
    assert_eq!(config.routes().count(), 1);
    assert_eq!(config.dispatch().max_event_bytes, 1 << 20);
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn toml_like_text_never_panics(
        text in "[a-z_\\[\\]{}=\"'.,#0-9 \n\t:-]{0,120}",
    ) {
        check(&text)?;
    }
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn mutated_configs_are_accepted_or_refused_with_a_location(
        edits in proptest::collection::vec((any::<usize>(), mutation()), 1..4),
    ) {
        let mut text = VALID.to_string();
        let mut unknown = None;
        for (at, edit) in &edits {
            (text, unknown) = mutate(&text, *at, edit);
        }
        // With one edit, a renamed key is surely unknown (later edits could drop it).
        let unknown = unknown.filter(|_| edits.len() == 1);
        let error = check(&text)?;
        if let Ok(config) = Config::parse(&text, Path::new("herald.toml")) {
            // A config that parsed is usable: its accessors do not panic either.
            let _ = config.store_url();
            let _ = config.plugins_dir();
            for route in config.routes() {
                let _ = route.resolved_config();
            }
        }
        if let Some((key, line)) = unknown {
            let message = error.unwrap_or_default();
            prop_assert!(
                message.starts_with(&format!("herald.toml:{line}:"))
                    && message.contains(&format!("unknown key '{key}'")),
                "renamed key {} on line {}: {}", key, line, message
            );
        }
    }
}
