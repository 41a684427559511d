//! `herald init` and `herald migrate`: the two commands that may create a store.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use crate::config::{Config, StoreChoice, StoreSource, DEFAULT_CONFIG_FILE, STORE_ENV};
use crate::store::{self, redact_url};

use super::{context, output, GlobalArgs};

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald init                      # ./herald.toml and ./herald.db
  herald init /srv/herald          # /srv/herald/herald.toml and /srv/herald/herald.db
  herald init --store postgres://herald@db/herald   # a config naming Postgres, migrated

An existing herald.toml is never overwritten. With --store, that URL is written into the \
new file; HERALD_STORE is honoured but not written (it may hold a password).")]
pub struct InitArgs {
    /// Directory for herald.toml and the SQLite store; created when missing
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

pub async fn init(global: &GlobalArgs, args: &InitArgs) -> anyhow::Result<String> {
    let config_path = config_path_in(&args.dir);
    if config_path.exists() {
        anyhow::bail!(
            "{} already exists; init never overwrites it (edit it, or remove it to start over)",
            config_path.display()
        );
    }
    let text = match &global.store {
        Some(url) => Config::template_with_store(url),
        None => Config::template().to_string(),
    };
    let config = Config::parse(&text, &config_path)?;
    // The flag is already in the new file (resolved against its directory); otherwise the
    // environment overrides the file as it will for every later command.
    let choice = match global.store {
        Some(_) => StoreChoice {
            url: config.store_url(),
            source: StoreSource::Flag,
        },
        None => config.choose_store(None, std::env::var(STORE_ENV).ok().as_deref()),
    };

    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create directory {}", args.dir.display()))?;
    store::open_migrated(&choice.url).await?;
    write_new_file(&config_path, &text)?;

    let store_shown = redact_url(&choice.url);
    if global.json {
        return output::json(&json!({
            "config": config_path.display().to_string(),
            "store": store_shown,
        }));
    }
    let mut said = format!(
        "wrote {}\nstore {store_shown} is migrated and ready\n",
        config_path.display()
    );
    if choice.source == StoreSource::Env {
        said.push_str(&format!(
            "(store taken from {STORE_ENV}; the file names its own)\n"
        ));
    }
    Ok(said)
}

pub async fn migrate(global: &GlobalArgs) -> anyhow::Result<String> {
    let config = context::config(global)?;
    let choice = context::choose_store(global, &config);
    store::open_migrated(&choice.url).await?;
    let store_shown = redact_url(&choice.url);
    if global.json {
        return output::json(&json!({ "store": store_shown, "migrated": true }));
    }
    Ok(format!("store {store_shown} is migrated\n"))
}

/// `DIR/herald.toml`, shown as plain `herald.toml` for the working directory.
fn config_path_in(dir: &Path) -> PathBuf {
    if dir == Path::new(".") {
        PathBuf::from(DEFAULT_CONFIG_FILE)
    } else {
        dir.join(DEFAULT_CONFIG_FILE)
    }
}

/// Write a file that must not exist yet (a racing `init` loses instead of overwriting).
fn write_new_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
