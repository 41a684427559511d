//! A compiled, checked plugin version, ready to instantiate.

use std::path::Path;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{PluginInfo, PluginPre};
use super::host::HostState;

pub struct LoadedPlugin {
    /// The name routes refer to (the file stem).
    pub name: String,
    /// `sha256:<hex>` of the wasm bytes: what every attempt records.
    pub version: String,
    /// What the plugin said about itself when it was checked.
    pub info: PluginInfo,
    /// Whether the machine code was read from the compile cache rather than compiled by
    /// this load.
    pub from_cache: bool,
    pub(super) pre: PluginPre<HostState>,
}

impl LoadedPlugin {
    pub fn short_version(&self) -> &str {
        let hex = self.version.trim_start_matches("sha256:");
        &hex[..hex.len().min(12)]
    }
}

/// Why a plugin could not be loaded; the old version, if any, stays in service.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin {name} is not a valid WebAssembly component: {reason}")]
    Compile { name: String, reason: String },
    #[error("plugin {name} does not fit herald:plugin@0.1.0: {reason}")]
    Interface { name: String, reason: String },
    #[error("plugin {name} failed its describe() check: {reason}")]
    Describe { name: String, reason: String },
}

pub(super) fn content_version(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub(super) fn compile(
    engine: &wasmtime::Engine,
    name: &str,
    bytes: &[u8],
) -> Result<Component, LoadError> {
    Component::new(engine, bytes).map_err(|err| LoadError::Compile {
        name: name.to_string(),
        reason: first_line(&err),
    })
}

pub(super) fn first_line(err: &wasmtime::Error) -> String {
    let text = format!("{err:#}");
    text.lines().next().unwrap_or_default().to_string()
}
