//! The plugin directory as a deployment target: `NAME.wasm` is what should run, every
//! version that ever ran is kept under `.versions/NAME/<hash>.wasm`, and
//! `.versions/NAME/history` lists when each became active, oldest first.
//!
//! Deploys and rollbacks only ever replace `NAME.wasm` (write to a temporary file, then
//! rename, so a reader never sees half a file); the running service notices and loads it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::plugin::content_version;

/// A plugin name usable as a file name and a URL segment: no path tricks.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub version: String,
    pub deployed_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("'{0}' is not a plugin name (lowercase letters, digits, '-' and '_')")]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin {name} has no earlier version to roll back to")]
    NothingToRollBackTo { name: String },
    #[error("plugin {name} has no kept version matching '{wanted}'")]
    UnknownVersion { name: String, wanted: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VersionError + '_ {
    move |source| VersionError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub struct PluginDir {
    dir: PathBuf,
}

impl PluginDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PluginDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn active_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    fn versions_dir(&self, name: &str) -> PathBuf {
        self.dir.join(".versions").join(name)
    }

    /// The version of the plugin's active file, whether or not it was loaded yet.
    pub fn active_version(&self, name: &str) -> Option<String> {
        fs::read(self.active_file(name))
            .ok()
            .map(|bytes| content_version(&bytes))
    }

    /// Make `bytes` the plugin's active file, atomically.
    pub fn install(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, VersionError> {
        if !valid_plugin_name(name) {
            return Err(VersionError::BadName(name.to_string()));
        }
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let target = self.active_file(name);
        let temporary = self.dir.join(format!(".{name}.wasm.partial"));
        let mut file = fs::File::create(&temporary).map_err(io(&temporary))?;
        file.write_all(bytes).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        fs::rename(&temporary, &target).map_err(io(&target))?;
        Ok(target)
    }

    /// Keep a version that has just become active, and note when.
    pub fn record(&self, name: &str, bytes: &[u8]) -> Result<String, VersionError> {
        let version = content_version(bytes);
        let dir = self.versions_dir(name);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let kept = dir.join(format!("{}.wasm", hex_of(&version)));
        if !kept.exists() {
            fs::write(&kept, bytes).map_err(io(&kept))?;
        }
        let history = dir.join("history");
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history)
            .map_err(io(&history))?;
        writeln!(log, "{} {version}", Utc::now().to_rfc3339()).map_err(io(&history))?;
        Ok(version)
    }

    /// Activations of a plugin, oldest first.
    pub fn history(&self, name: &str) -> Vec<Deployment> {
        let text = fs::read_to_string(self.versions_dir(name).join("history")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (at, version) = line.split_once(' ')?;
                let deployed_at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
                Some(Deployment {
                    version: version.to_string(),
                    deployed_at,
                })
            })
            .collect()
    }

    /// Put an earlier version back: `to` (a hash or its prefix) or, without it, the
    /// version active before the current one. Returns the version now installed.
    pub fn rollback(&self, name: &str, to: Option<&str>) -> Result<String, VersionError> {
        if !valid_plugin_name(name) {
            return Err(VersionError::BadName(name.to_string()));
        }
        let history = self.history(name);
        let version = match to {
            Some(wanted) => {
                let wanted = wanted.trim_start_matches("sha256:");
                history
                    .iter()
                    .rev()
                    .map(|d| d.version.clone())
                    .find(|v| hex_of(v).starts_with(wanted) && !wanted.is_empty())
                    .ok_or_else(|| VersionError::UnknownVersion {
                        name: name.to_string(),
                        wanted: wanted.to_string(),
                    })?
            }
            None => {
                let current = history.last().map(|d| d.version.clone());
                history
                    .iter()
                    .rev()
                    .map(|d| d.version.clone())
                    .find(|v| Some(v) != current.as_ref())
                    .ok_or_else(|| VersionError::NothingToRollBackTo {
                        name: name.to_string(),
                    })?
            }
        };
        let kept = self
            .versions_dir(name)
            .join(format!("{}.wasm", hex_of(&version)));
        let bytes = fs::read(&kept).map_err(io(&kept))?;
        self.install(name, &bytes)?;
        Ok(version)
    }
}

fn hex_of(version: &str) -> &str {
    version.trim_start_matches("sha256:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_directory() {
        for bad in [
            "", "../x", "a/b", ".hidden", "UPPER", "a b", "-flag", "x.wasm",
        ] {
            assert!(!valid_plugin_name(bad), "{bad:?}");
        }
        for good in ["webhook", "saga-compensator", "v2_echo"] {
            assert!(valid_plugin_name(good), "{good:?}");
        }
    }

    #[test]
    fn install_record_and_roll_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plugins = PluginDir::new(dir.path());
        assert!(matches!(
            plugins.rollback("p", None),
            Err(VersionError::NothingToRollBackTo { .. })
        ));
        let first = plugins.record("p", b"one").expect("record");
        plugins.install("p", b"one").expect("install");
        let second = plugins.record("p", b"two").expect("record");
        plugins.install("p", b"two").expect("install");
        assert_eq!(plugins.history("p").len(), 2);

        assert_eq!(plugins.rollback("p", None).expect("rollback"), first);
        assert_eq!(fs::read(plugins.active_file("p")).expect("read"), b"one");
        let prefix = &hex_of(&second)[..10];
        assert_eq!(
            plugins.rollback("p", Some(prefix)).expect("rollback to"),
            second
        );
        assert!(matches!(
            plugins.rollback("p", Some("ffff")),
            Err(VersionError::UnknownVersion { .. })
        ));
        assert!(plugins.install("../p", b"x").is_err());
    }
}
