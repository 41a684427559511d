//! `herald plugins list|deploy|rollback|resume`: the plugin directory as ops see it, and
//! quarantines. A running `herald serve` picks every change up by itself.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use comfy_table::Cell;
use serde_json::json;

use crate::runtime::versions::PluginDir;
use crate::runtime::{EngineSettings, PluginRuntime};

use super::{context, output, GlobalArgs};

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// The plugins in plugins_dir: active version, when it was deployed, routes using it
    List,
    /// Check a plugin file (it must load and describe itself) and make it active
    Deploy(DeployArgs),
    /// Put the previous version (or --to HASH) back
    Rollback(RollbackArgs),
    /// Lift a quarantine (routes paused after consecutive faults): its routes claim again
    Resume(ResumeArgs),
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    pub name: String,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The .wasm component
    pub file: PathBuf,
    /// Deploy under this name instead of the name the plugin gives in describe()
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub name: String,
    /// A version hash (or its first characters) from `herald plugins list --json`
    #[arg(long, value_name = "HASH")]
    pub to: Option<String>,
}

pub async fn run(global: &GlobalArgs, command: PluginsCommand) -> anyhow::Result<String> {
    let config = context::config(global)?;
    let dir = PluginDir::new(config.plugins_dir());
    match command {
        PluginsCommand::List => {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .with_context(|| format!("cannot read plugins_dir {}", dir.path().display()))?
                .filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".wasm")
                        .map(String::from)
                })
                .filter(|name| !name.starts_with('.'))
                .collect();
            names.sort();
            // The directory alone answers the rest, so a store that cannot be reached only
            // leaves the quarantine column unknown.
            let quarantined = match context::open_existing_store(global).await {
                Ok(store) => store.quarantined().await.map_err(anyhow::Error::from),
                Err(err) => Err(err),
            };
            let rows: Vec<serde_json::Value> = names
                .iter()
                .map(|name| {
                    let history = dir.history(name);
                    let version = dir.active_version(name);
                    // When a running serve put this version in service; none yet if the
                    // file was installed while no serve ran.
                    let deployed_at = history
                        .iter()
                        .rev()
                        .find(|d| Some(&d.version) == version.as_ref())
                        .map(|d| d.deployed_at);
                    let routes: Vec<&str> = config
                        .routes()
                        .filter(|r| &r.plugin == name)
                        .map(|r| r.name.as_str())
                        .collect();
                    json!({
                        "name": name,
                        "version": version,
                        "deployed_at": deployed_at,
                        "versions_kept": history.iter().map(|d| d.version.clone()).collect::<std::collections::BTreeSet<_>>().len(),
                        "routes": routes,
                        "quarantine": match &quarantined {
                            Ok(all) => json!(all.iter().find(|q| &q.plugin == name)),
                            Err(err) => json!({ "unknown": format!("{err:#}") }),
                        },
                    })
                })
                .collect();
            if global.json {
                return output::json(&rows);
            }
            let mut table =
                output::new_table(["PLUGIN", "VERSION", "DEPLOYED", "ROUTES", "STATUS"]);
            for row in &rows {
                let version = row["version"].as_str().unwrap_or("-");
                let quarantine = &row["quarantine"];
                let status = if quarantine.is_null() {
                    "active".to_string()
                } else if let Some(unknown) = quarantine["unknown"].as_str() {
                    format!("unknown ({unknown})")
                } else {
                    format!(
                        "QUARANTINED since {}: {}",
                        quarantine["since"].as_str().unwrap_or("?"),
                        quarantine["reason"].as_str().unwrap_or("?")
                    )
                };
                table.add_row([
                    Cell::new(row["name"].as_str().unwrap_or_default()),
                    Cell::new(version.get(..19).unwrap_or(version)),
                    Cell::new(row["deployed_at"].as_str().unwrap_or("-")),
                    Cell::new(
                        row["routes"]
                            .as_array()
                            .map(|r| {
                                r.iter()
                                    .filter_map(|v| v.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .unwrap_or_default(),
                    ),
                    Cell::new(status),
                ]);
            }
            Ok(output::finish(&table))
        }
        PluginsCommand::Deploy(args) => {
            let bytes = std::fs::read(&args.file)
                .with_context(|| format!("cannot read {}", args.file.display()))?;
            let runtime = PluginRuntime::new(EngineSettings {
                max_instances: 2,
                ..EngineSettings::default()
            })?;
            let checked = runtime.load_bytes("deploy-check", bytes.clone()).await?;
            let name = args.name.unwrap_or_else(|| checked.info.name.clone());
            let path = dir.install(&name, &bytes)?;
            if global.json {
                return output::json(
                    &json!({ "plugin": name, "version": checked.version, "file": path }),
                );
            }
            Ok(format!(
                "{name} {} installed as {}; a running herald serve deploys it within a second\n",
                checked.version,
                path.display()
            ))
        }
        PluginsCommand::Rollback(args) => {
            let version = dir.rollback(&args.name, args.to.as_deref())?;
            if global.json {
                return output::json(&json!({ "plugin": args.name, "version": version }));
            }
            Ok(format!("{} rolled back to {version}\n", args.name))
        }
        PluginsCommand::Resume(args) => {
            let store = context::open_existing_store(global).await?;
            if !store.resume(&args.name).await? {
                let quarantined: Vec<String> = store
                    .quarantined()
                    .await?
                    .into_iter()
                    .map(|q| q.plugin)
                    .collect();
                anyhow::bail!(
                    "plugin '{}' is not quarantined (quarantined: {})",
                    args.name,
                    if quarantined.is_empty() {
                        "none".to_string()
                    } else {
                        quarantined.join(", ")
                    }
                );
            }
            if global.json {
                return output::json(&json!({ "plugin": args.name, "resumed": true }));
            }
            Ok(format!(
                "{} resumed: its routes claim again within a second\n",
                args.name
            ))
        }
    }
}
