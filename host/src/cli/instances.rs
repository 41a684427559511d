//! `herald instances`: the Herald processes sharing this store, and what each holds.

use std::time::Duration;

use clap::Args;
use comfy_table::Cell;

use super::{context, output, GlobalArgs};

#[derive(Debug, Args)]
pub struct InstancesArgs {
    /// Show instances last seen within this long (default: 2 minutes)
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub within: Duration,
}

pub async fn run(global: &GlobalArgs, args: &InstancesArgs) -> anyhow::Result<String> {
    let store = context::open_existing_store(global).await?;
    let instances = store.instances(args.within).await?;
    if global.json {
        return output::json(&instances);
    }
    if instances.is_empty() {
        return Ok(format!(
            "no instance seen in the last {}",
            humantime::format_duration(args.within)
        ));
    }
    let mut table = output::new_table(["INSTANCE", "VERSION", "STARTED", "LAST SEEN", "LEASES"]);
    for instance in &instances {
        table.add_row([
            Cell::new(&instance.instance_id),
            Cell::new(&instance.version),
            Cell::new(output::timestamp(instance.started_at)),
            Cell::new(output::timestamp(instance.last_seen)),
            Cell::new(instance.leases_held),
        ]);
    }
    Ok(output::finish(&table))
}
