//! `herald deliveries dead|redrive`: the dead letters, and sending them again.

use clap::{Args, Subcommand};
use serde_json::json;

use crate::store::{DeliveryFilter, DeliveryStatus, RedriveSelection};

use super::{context, output, GlobalArgs};

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List dead deliveries (dead letters), oldest first
    Dead(DeadArgs),
    /// Send dead deliveries again with a fresh attempt budget
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Only this route's
    #[arg(long, value_name = "ROUTE")]
    pub route: Option<String>,
    /// At most this many
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub limit: u32,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald deliveries redrive 42              # one delivery, by its id
  herald deliveries redrive --route orders  # every dead delivery of a route
  herald deliveries redrive --all")]
#[group(id = "which", required = true, multiple = false)]
pub struct RedriveArgs {
    /// The delivery id (from `herald deliveries dead`)
    #[arg(group = "which", value_name = "ID")]
    pub id: Option<i64>,
    /// Every dead delivery of this route
    #[arg(long, group = "which", value_name = "ROUTE")]
    pub route: Option<String>,
    /// Every dead delivery
    #[arg(long, group = "which")]
    pub all: bool,
}

pub async fn run(global: &GlobalArgs, command: DeliveriesCommand) -> anyhow::Result<String> {
    let store = context::open_existing_store(global).await?;
    match command {
        DeliveriesCommand::Dead(args) => {
            let dead = store
                .list_deliveries(&DeliveryFilter {
                    status: Some(DeliveryStatus::Dead),
                    route: args.route,
                    limit: args.limit,
                })
                .await?;
            if global.json {
                return output::json(&dead);
            }
            if dead.is_empty() {
                return Ok("no dead deliveries".into());
            }
            Ok(output::deliveries_table(&dead))
        }
        DeliveriesCommand::Redrive(args) => {
            let count = store
                .redrive(&RedriveSelection {
                    delivery_id: args.id,
                    route: args.route,
                })
                .await?;
            if global.json {
                return output::json(&json!({ "redriven": count }));
            }
            Ok(format!(
                "{count} dead deliver{} sent again",
                if count == 1 { "y" } else { "ies" }
            ))
        }
    }
}
