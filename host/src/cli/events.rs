//! `herald events append|list|show` and `herald history`: writing and reading the log.

use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::store::{EventFilter, EventStatus};

use super::input::{self, EventFlags};
use super::{context, output, GlobalArgs};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append an event (or many, as JSON lines on stdin) and print the new id(s)
    Append(AppendArgs),
    /// List events, newest first
    List(ListArgs),
    /// Show one event with its deliveries and attempts
    Show(ShowArgs),
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald events append --type order.created --entity-type order --entity-id 42 \\
      --data '{\"total\": 99.5}' --target billing --key order-42-created \\
      --header tenant=acme
  printf '%s\\n' \\
    '{\"type\":\"order.created\",\"entity_type\":\"order\",\"entity_id\":\"7\",\"data\":{}}' \\
    '{\"type\":\"order.paid\",\"entity_type\":\"order\",\"entity_id\":\"7\",\"data\":{}}' \\
    | herald events append --stdin

Each stdin line is one JSON object with event_type (or type), entity_type, entity_id, \
event_data (or data), and optionally event_target (target), idempotency_key (key) and \
headers. Blank lines are skipped. The lines are appended in one transaction: if any line \
is bad, nothing is written.")]
pub struct AppendArgs {
    /// Event type, the routing key, e.g. order.created
    #[arg(long = "type", value_name = "TYPE", required_unless_present = "stdin")]
    pub event_type: Option<String>,

    /// Type of the entity (aggregate) the event belongs to, e.g. order
    #[arg(long, value_name = "TYPE", required_unless_present = "stdin")]
    pub entity_type: Option<String>,

    /// Id of the entity; events of one entity are delivered in order
    #[arg(long, value_name = "ID", required_unless_present = "stdin")]
    pub entity_id: Option<String>,

    /// Payload, as JSON
    #[arg(long, value_name = "JSON", required_unless_present = "stdin")]
    pub data: Option<String>,

    /// Logical destination service
    #[arg(long, value_name = "SERVICE")]
    pub target: Option<String>,

    /// Producer idempotency key: a later event with the same key is a duplicate
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,

    /// Header (metadata) such as a tenant or traceparent; repeatable
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = input::parse_header)]
    pub headers: Vec<(String, String)>,

    /// Read events as JSON lines from stdin and append them all or none
    #[arg(
        long,
        conflicts_with_all = ["event_type", "entity_type", "entity_id", "data", "target", "key", "headers"]
    )]
    pub stdin: bool,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald events list
  herald events list --status DEAD --type order.created --limit 10
  herald events list --before 1200          # the page after one ending at id 1200
  herald events list --json | jq '.[].event_id'")]
pub struct ListArgs {
    /// Only events with this status: READY, SUCCESS, FAILED, DEAD, SKIPPED or DUPLICATE
    #[arg(long, value_name = "STATUS")]
    pub status: Option<EventStatus>,

    /// Only events of this type
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,

    /// Only events with an id below this one (to page back)
    #[arg(long, value_name = "ID")]
    pub before: Option<i64>,

    /// At most this many events
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald events show 42
  herald events show 42 --json | jq '.deliveries'")]
pub struct ShowArgs {
    /// The event id
    #[arg(value_name = "ID")]
    pub id: i64,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  herald history order 42
  herald history order 42 --json | jq '.[].event_type'")]
pub struct HistoryArgs {
    /// Entity type, e.g. order
    #[arg(value_name = "ENTITY_TYPE")]
    pub entity_type: String,

    /// Entity id, e.g. 42
    #[arg(value_name = "ENTITY_ID")]
    pub entity_id: String,
}

pub async fn run(global: &GlobalArgs, command: EventsCommand) -> anyhow::Result<String> {
    match command {
        EventsCommand::Append(args) => append(global, &args).await,
        EventsCommand::List(args) => list(global, &args).await,
        EventsCommand::Show(args) => show(global, &args).await,
    }
}

async fn append(global: &GlobalArgs, args: &AppendArgs) -> anyhow::Result<String> {
    // Input is checked before the store is touched: a bad line costs no connection.
    if args.stdin {
        let events = input::read_event_lines(std::io::stdin().lock())?;
        let store = context::open_existing_store(global).await?;
        let ids = if events.is_empty() {
            tracing::warn!("stdin held no events; nothing appended");
            Vec::new()
        } else {
            store.append_batch(&events).await?
        };
        if global.json {
            return output::json(&json!({ "event_ids": ids }));
        }
        return Ok(ids.iter().map(|id| format!("{id}\n")).collect());
    }

    let event = EventFlags {
        event_type: flag(&args.event_type, "--type")?,
        entity_type: flag(&args.entity_type, "--entity-type")?,
        entity_id: flag(&args.entity_id, "--entity-id")?,
        data: flag(&args.data, "--data")?,
        target: args.target.as_deref(),
        key: args.key.as_deref(),
        headers: &args.headers,
    }
    .to_new_event()?;
    let store = context::open_existing_store(global).await?;
    let id = store.append(&event).await?;
    if global.json {
        return output::json(&json!({ "event_id": id }));
    }
    Ok(format!("{id}\n"))
}

async fn list(global: &GlobalArgs, args: &ListArgs) -> anyhow::Result<String> {
    let store = context::open_existing_store(global).await?;
    let events = store
        .list_events(&EventFilter {
            status: args.status,
            event_type: args.event_type.clone(),
            before_id: args.before,
            limit: args.limit,
            ..EventFilter::default()
        })
        .await?;
    if global.json {
        return output::json(&output::events_json(&events)?);
    }
    Ok(output::events_table(&events))
}

async fn show(global: &GlobalArgs, args: &ShowArgs) -> anyhow::Result<String> {
    let store = context::open_existing_store(global).await?;
    let detail = store
        .event_detail(args.id)
        .await?
        .ok_or_else(|| anyhow!("event {} not found", args.id))?;
    if global.json {
        return output::json(&output::detail_json(&detail)?);
    }
    Ok(output::detail_text(&detail))
}

/// clap enforces these flags without --stdin; this keeps that promise out of `unwrap`.
fn flag<'a>(value: &'a Option<String>, name: &str) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .ok_or_else(|| anyhow!("{name} is required unless --stdin is given"))
}

pub async fn history(global: &GlobalArgs, args: &HistoryArgs) -> anyhow::Result<String> {
    let store = context::open_existing_store(global).await?;
    let events = store
        .entity_history(&args.entity_type, &args.entity_id)
        .await?;
    if global.json {
        return output::json(&output::events_json(&events)?);
    }
    Ok(output::events_table(&events))
}
