//! On-disk cache of compiled plugins, so a restart deserializes machine code instead of
//! running Cranelift again.
//!
//! An entry is `<dir>/<wasm-sha256>-<engine-hash>.cwasm`: the key names both the plugin's
//! bytes and everything about the engine that shapes compiled code (wasmtime's
//! `precompile_compatibility_hash`: target, compiler flags, tunables, features, wasmtime
//! version). The file is a short header and wasmtime's serialization:
//!
//! ```text
//! herald-cwasm 1\n
//! <the key>\n
//! <sha256 hex of the payload>\n
//! <payload: Component::serialize()>
//! ```
//!
//! The cache is an optimisation only. An entry that is missing, unreadable, truncated,
//! filed under another key, fails its digest or is refused by wasmtime is logged, deleted
//! and rebuilt from the wasm; failing to write an entry is a warning. Nothing here can
//! stop a plugin from loading that would load without the cache.
//!
//! Trust: wasmtime runs deserialized code natively, outside the wasm sandbox, so whoever
//! can write to the cache directory can run code as Herald. It lives in the plugin
//! directory, which Herald owns and which is already where the code Herald runs comes
//! from; it is created owner-only. The digest guards against damage (a torn write, a
//! bad disk, a stray file), not against someone who can write there.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::plugin::{self, LoadError};

const MAGIC: &[u8] = b"herald-cwasm 1\n";

/// The compiled form of one plugin and where it came from.
pub(super) struct Compiled {
    pub component: Component,
    pub from_cache: bool,
}

pub(super) struct CompileCache {
    dir: PathBuf,
    /// Hex digest of the engine's compatibility hash, computed once: it is fixed for the
    /// life of the engine.
    engine_hash: String,
}

impl CompileCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = Sha256Hasher::default();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache {
            dir,
            engine_hash: hex::encode(hasher.0.finalize()),
        }
    }

    /// The plugin's compiled form: from the cache when a sound entry exists, else compiled
    /// now and written to the cache for next time. Blocks; run it off the async workers.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        name: &str,
        wasm: &[u8],
    ) -> Result<Compiled, LoadError> {
        let key = format!("{}-{}", hex::encode(Sha256::digest(wasm)), self.engine_hash);
        let path = self.dir.join(format!("{key}.cwasm"));
        match self.lookup(engine, &key, &path) {
            Ok(Some(component)) => {
                tracing::debug!(plugin = name, path = %path.display(), "compiled plugin taken from the cache");
                return Ok(Compiled {
                    component,
                    from_cache: true,
                });
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(
                    plugin = name,
                    path = %path.display(),
                    %reason,
                    "ignoring a bad compiled-plugin cache entry; compiling again"
                );
                if let Err(err) = fs::remove_file(&path) {
                    if err.kind() != ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), %err, "cannot delete the bad cache entry; it will be overwritten");
                    }
                }
            }
        }
        let component = plugin::compile(engine, name, wasm)?;
        if let Err(reason) = self.store(&key, &path, &component) {
            tracing::warn!(
                plugin = name,
                path = %path.display(),
                %reason,
                "cannot write the compiled-plugin cache; the next start compiles again"
            );
        }
        Ok(Compiled {
            component,
            from_cache: false,
        })
    }

    /// `Ok(None)` when there is no entry; `Err` when there is one that must not be used.
    fn lookup(&self, engine: &Engine, key: &str, path: &Path) -> Result<Option<Component>, String> {
        // Read the whole file once and check and deserialize that same buffer: with
        // `deserialize_file` (an mmap) the file could change between check and use.
        let file = match fs::read(path) {
            Ok(file) => file,
            // No entry, or no cache directory yet (or a file where it should be, which
            // the write that follows reports).
            Err(err) if matches!(err.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                return Ok(None)
            }
            Err(err) => return Err(format!("cannot read it: {err}")),
        };
        let payload = unseal(key, &file)?;
        // SAFETY: `Component::deserialize` trusts its input to be wasmtime's own output for
        // a compatible engine; arbitrary bytes could make it run arbitrary native code.
        // These bytes are: (1) read from a cache directory inside Herald's plugin
        // directory, which only Herald (and whoever deploys plugins) writes; (2) filed
        // under this exact key, so compiled from these wasm bytes for an engine with this
        // compatibility hash; (3) unchanged since Herald wrote them, their sha256 matching
        // the digest written beside them. Wasmtime additionally checks that the artefact
        // is its own format and that the engine's version, target, flags, tunables and
        // features match, refusing it otherwise (which lands in the `Err` arm).
        let component = unsafe { Component::deserialize(engine, payload) }
            .map_err(|err| format!("wasmtime refused it: {}", plugin::first_line(&err)))?;
        Ok(Some(component))
    }

    fn store(&self, key: &str, path: &Path, component: &Component) -> Result<(), String> {
        let payload = component
            .serialize()
            .map_err(|err| format!("cannot serialize: {}", plugin::first_line(&err)))?;
        create_private_dir(&self.dir)
            .map_err(|err| format!("cannot create {}: {err}", self.dir.display()))?;
        // A unique temporary name, then a rename: a reader (another Herald on the same
        // directory included) sees the old entry, no entry or the whole new one. No fsync:
        // an entry torn by a crash fails its digest and is rebuilt.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let temporary = self.dir.join(format!(
            ".{key}.{}-{}.partial",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let written =
            fs::write(&temporary, seal(key, &payload)).and_then(|()| fs::rename(&temporary, path));
        if let Err(err) = written {
            // Best effort: a leftover temporary file is harmless, only untidy.
            let _ = fs::remove_file(&temporary);
            return Err(err.to_string());
        }
        Ok(())
    }
}

fn seal(key: &str, payload: &[u8]) -> Vec<u8> {
    let digest = hex::encode(Sha256::digest(payload));
    let mut file = Vec::with_capacity(MAGIC.len() + key.len() + digest.len() + 2 + payload.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(key.as_bytes());
    file.push(b'\n');
    file.extend_from_slice(digest.as_bytes());
    file.push(b'\n');
    file.extend_from_slice(payload);
    file
}

/// The payload of an entry, if it is one Herald wrote for `key` and is intact.
fn unseal<'a>(key: &str, file: &'a [u8]) -> Result<&'a [u8], String> {
    let rest = file
        .strip_prefix(MAGIC)
        .ok_or("not a Herald cache entry (bad header)")?;
    let (stored_key, rest) = split_line(rest).ok_or("truncated header")?;
    if stored_key != key.as_bytes() {
        return Err("it was written for another plugin or engine".into());
    }
    let (digest, payload) = split_line(rest).ok_or("truncated header")?;
    let actual = hex::encode(Sha256::digest(payload));
    if digest != actual.as_bytes() {
        return Err("its digest does not match its contents".into());
    }
    Ok(payload)
}

fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Feeds `Hash` output into SHA-256, giving a digest that is stable across processes
/// (unlike `DefaultHasher`, whose algorithm is unspecified) and wide enough for a key.
#[derive(Default)]
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_unseal() {
        let file = seal("k", b"payload\nwith newline");
        assert_eq!(unseal("k", &file), Ok(&b"payload\nwith newline"[..]));
        assert!(unseal("other", &file).is_err());
        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert!(unseal("k", &flipped).is_err());
        assert!(unseal("k", &file[..file.len() - 1]).is_err());
        assert!(unseal("k", b"herald-cwasm 1\nk").is_err());
        assert!(unseal("k", b"").is_err());
    }
}
