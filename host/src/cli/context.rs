//! From the global options to an open store: config discovery, store precedence, and the
//! schema check every working command makes before touching data.

use crate::config::{Config, StoreChoice, STORE_ENV};
use crate::store::{self, redact_url, EventStore, OpenOptions};

use super::GlobalArgs;

/// The config the global options point at (or the defaults).
pub fn config(global: &GlobalArgs) -> anyhow::Result<Config> {
    Ok(Config::discover(global.config.as_deref())?)
}

/// The store URL by precedence: `--store`, `HERALD_STORE`, the config file, the default.
pub fn choose_store(global: &GlobalArgs, config: &Config) -> StoreChoice {
    let env = std::env::var(STORE_ENV).ok();
    let choice = config.choose_store(global.store.as_deref(), env.as_deref());
    tracing::debug!(
        store = %redact_url(&choice.url),
        from = %choice.source,
        config = %config.path().map_or("none".into(), |p| p.display().to_string()),
        "store chosen"
    );
    choice
}

/// Open an existing, migrated store: what every command but `init` and `migrate` needs.
pub async fn open_existing_store(global: &GlobalArgs) -> anyhow::Result<Box<dyn EventStore>> {
    let config = config(global)?;
    let choice = choose_store(global, &config);
    let store = store::open(
        &choice.url,
        OpenOptions {
            create_if_missing: false,
            batch_ledger: false,
        },
    )
    .await?;
    store.check_schema().await?;
    Ok(store)
}
