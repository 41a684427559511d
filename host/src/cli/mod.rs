//! The `herald` command line: the clap tree and dispatch to one module per command.

mod context;
mod deliveries;
mod events;
mod init;
mod input;
mod instances;
mod logging;
mod output;
mod plugins;
mod report;
mod serve;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

pub use logging::LogFormat;
pub use report::{one_line, usage_error};

const ABOUT: &str =
    "Event handler for the transactional outbox: routes stored events to WebAssembly plugins";

const LONG_ABOUT: &str = "\
Event handler for the transactional outbox: routes stored events to WebAssembly plugins.

Producers INSERT rows into the event store (SQLite or Postgres) in the same transaction as \
their business change; Herald finds them, routes each by type to a plugin and keeps the \
books: status, attempts, idempotency keys, dead letters.

The store is chosen by --store, else HERALD_STORE, else `store` in herald.toml, else \
sqlite://herald.db beside the config file (or in the working directory).";

const EXAMPLES: &str = "\
Examples:
  herald init                         # herald.toml + herald.db in this directory
  herald events append --type order.created --entity-type order --entity-id 42 \\
      --data '{\"total\": 99.5}'
  herald events list --status READY
  herald events show 1 --json
  herald history order 42
  herald serve
  herald deliveries dead
  herald deliveries redrive --all
  herald --store postgres://herald@db/herald migrate";

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = EXAMPLES,
    propagate_version = true,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

const GLOBAL: &str = "Global options";

/// Options every command accepts.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Config file [default: ./herald.toml when present]
    #[arg(long, global = true, help_heading = GLOBAL, env = crate::config::CONFIG_ENV, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Event store URL, sqlite://PATH or postgres://USER@HOST/DB [env: HERALD_STORE]
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "URL")]
    pub store: Option<String>,

    /// Print JSON instead of tables (for scripts)
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// Format of the logs on stderr; RUST_LOG sets the level (default: warn)
    #[arg(long, global = true, help_heading = GLOBAL, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented herald.toml and create the SQLite store beside it
    Init(init::InitArgs),
    /// Create or upgrade the store's tables (safe to run again)
    #[command(after_long_help = "\
Examples:
  herald migrate                                    # the store of ./herald.toml
  HERALD_STORE=postgres://herald@db/herald herald migrate")]
    Migrate,
    /// Append, list and inspect events
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Show the events of one entity (aggregate), oldest first
    History(events::HistoryArgs),
    /// Run Herald: route events to plugins until SIGTERM/SIGINT
    Serve(serve::ServeArgs),
    /// Dead letters: list them, send them again
    #[command(subcommand)]
    Deliveries(deliveries::DeliveriesCommand),
    /// The herald serve processes sharing this store, and the leases each holds
    Instances(instances::InstancesArgs),
    /// Deploy, list and roll back plugins (a running herald serve picks changes up)
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
}

/// Run a parsed command line to completion. Logging starts here so `--log-format` applies.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let default_filter = match cli.command {
        Command::Serve(_) => logging::SERVICE_FILTER,
        _ => logging::COMMAND_FILTER,
    };
    // The config's log_level, if the file reads; a bad file is reported by the command.
    let configured = crate::config::Config::discover(cli.global.config.as_deref())
        .ok()
        .and_then(|config| config.log_level().map(String::from));
    logging::init(
        cli.global.log_format,
        configured.as_deref().unwrap_or(default_filter),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let printed = runtime.block_on(dispatch(cli));
    // A plugin call abandoned at the shutdown deadline may still be computing until its
    // own time limit; do not wait for it to exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    output::print(&printed?).context("cannot write to stdout")
}

async fn dispatch(cli: Cli) -> anyhow::Result<String> {
    let global = &cli.global;
    match cli.command {
        Command::Init(args) => init::init(global, &args).await,
        Command::Migrate => init::migrate(global).await,
        Command::Events(command) => events::run(global, command).await,
        Command::History(args) => events::history(global, &args).await,
        Command::Serve(args) => serve::serve(global, &args).await,
        Command::Deliveries(command) => deliveries::run(global, command).await,
        Command::Instances(args) => instances::run(global, &args).await,
        Command::Plugins(command) => plugins::run(global, command).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
