//! The plugins in service, by name. Calls hold an `Arc` of the version they started on,
//! so replacing an entry never disturbs a call in flight.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use super::{LoadError, LoadedPlugin, PluginRuntime};

#[derive(Default)]
pub struct PluginRegistry {
    plugins: RwLock<HashMap<String, Arc<LoadedPlugin>>>,
}

impl PluginRegistry {
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins
            .read()
            .ok()
            .and_then(|plugins| plugins.get(name).cloned())
    }

    /// Put a checked plugin in service, returning the version it replaced.
    pub fn insert(&self, plugin: LoadedPlugin) -> Option<Arc<LoadedPlugin>> {
        let mut plugins = match self.plugins.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        plugins.insert(plugin.name.clone(), Arc::new(plugin))
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .plugins
            .read()
            .map(|plugins| plugins.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Load every `*.wasm` in `dir`. One bad file does not stop the others; each
    /// failure is returned for the caller to report.
    pub async fn load_dir(
        &self,
        runtime: &PluginRuntime,
        dir: &Path,
    ) -> Result<Vec<LoadError>, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
            .collect();
        paths.sort();
        let mut failures = Vec::new();
        for path in paths {
            match runtime.load_file(&path).await {
                Ok(plugin) => {
                    tracing::info!(plugin = %plugin.name, version = %plugin.short_version(), "plugin loaded");
                    self.insert(plugin);
                }
                Err(err) => failures.push(err),
            }
        }
        Ok(failures)
    }
}
