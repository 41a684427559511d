//! The `herald serve` processes under test: one config, one plugins directory, each
//! process a child of ours with its log in a file of its own. An instance is a slot
//! (`a`, `b`); each (re)start of a slot is a new incarnation with its own instance id
//! (`a.1`, `a.2`, ...), as a restarted process gets a new `hostname-pid` in production,
//! so attempts and leases say which life of the slot held them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::db::Db;

/// What the config sets, beyond where things are.
pub struct Tuning {
    pub lease: Duration,
    pub poll_interval: Duration,
    pub concurrency: usize,
    pub time_limit: Duration,
    pub http_timeout: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

pub const ROUTE: &str = "chaos-webhook";
pub const EVENT_TYPE: &str = "chaos.updated";

/// Write `herald.toml` for every instance: the private cluster, the run's plugins
/// directory, one ordered route to the sink through the webhook plugin.
pub fn write_config(
    dir: &Path,
    store_url: &str,
    plugins_dir: &Path,
    sink: &std::net::SocketAddr,
    sink_url: &str,
    tuning: &Tuning,
) -> anyhow::Result<PathBuf> {
    let duration = |d: Duration| format!("\"{}ms\"", d.as_millis());
    let text = format!(
        "# Written by herald-chaos for one fault run.\n\
         store = \"{store_url}\"\n\
         plugins_dir = {plugins_dir:?}\n\n\
         [admin]\n\
         # Each instance on a port of its own.\n\
         listen = \"127.0.0.1:0\"\n\n\
         [dispatch]\n\
         lease = {lease}\n\
         poll_interval = {poll}\n\
         concurrency = {concurrency}\n\
         shutdown_deadline = \"5s\"\n\n\
         [[routes]]\n\
         name = \"{ROUTE}\"\n\
         event_types = [\"chaos.*\"]\n\
         plugin = \"webhook\"\n\
         ordering = \"entity\"\n\
         allowed_hosts = [\"{sink}\"]\n\
         allow_private = true\n\
         time_limit = {time_limit}\n\
         http_timeout = {http_timeout}\n\
         [routes.retry]\n\
         max_attempts = {max_attempts}\n\
         max_age = {max_age}\n\
         backoff_base = {backoff_base}\n\
         backoff_max = {backoff_max}\n\
         [routes.config]\n\
         url = \"{sink_url}\"\n",
        plugins_dir = plugins_dir.display().to_string(),
        lease = duration(tuning.lease),
        poll = duration(tuning.poll_interval),
        concurrency = tuning.concurrency,
        time_limit = duration(tuning.time_limit),
        http_timeout = duration(tuning.http_timeout),
        max_attempts = tuning.max_attempts,
        max_age = duration(tuning.max_age),
        backoff_base = duration(tuning.backoff_base),
        backoff_max = duration(tuning.backoff_max),
    );
    let path = dir.join("herald.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub struct Instance {
    pub slot: &'static str,
    pub incarnation: u32,
    child: Child,
}

impl Instance {
    pub fn id(&self) -> String {
        instance_id(self.slot, self.incarnation)
    }
}

fn instance_id(slot: &str, incarnation: u32) -> String {
    format!("{slot}.{incarnation}")
}

/// The running instances and everything needed to start more.
pub struct Fleet {
    binary: PathBuf,
    config: PathBuf,
    logs: PathBuf,
    pub instances: Vec<Instance>,
    /// Instances that exited without being told to (each a crash of the host).
    pub crashes: Vec<String>,
    /// Slots whose every incarnation runs with the batch ledger off.
    ledger_off: Vec<&'static str>,
}

impl Fleet {
    pub fn new(binary: &Path, config: &Path, logs: &Path) -> Fleet {
        Fleet {
            binary: binary.to_path_buf(),
            config: config.to_path_buf(),
            logs: logs.to_path_buf(),
            instances: Vec::new(),
            crashes: Vec::new(),
            ledger_off: Vec::new(),
        }
    }

    /// Run every incarnation of `slot` with the Postgres batch ledger off.
    pub fn batch_ledger_off(&mut self, slot: &'static str) {
        self.ledger_off.push(slot);
    }

    /// `herald CMD...` with the run's config, for one-off commands (migrate, deploy).
    pub async fn herald(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        let run = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(limit, run)
            .await
            .with_context(|| format!("herald {} took more than {limit:?}", args.join(" ")))?
            .with_context(|| format!("running {}", self.binary.display()))?;
        if !output.status.success() {
            bail!(
                "herald {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Start the next incarnation of `slot`.
    pub fn start(&mut self, slot: &'static str, incarnation: u32) -> anyhow::Result<()> {
        let id = instance_id(slot, incarnation);
        let log_path = self.logs.join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new(&self.binary);
        if self.ledger_off.contains(&slot) {
            command.env("HERALD_BATCH_LEDGER", "0");
        }
        let child = command
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("HERALD_INSTANCE_ID", &id)
            // Warnings and errors only: what went wrong, and panics, which go to stderr
            // whatever the level.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve", self.binary.display()))?;
        self.instances.push(Instance {
            slot,
            incarnation,
            child,
        });
        Ok(())
    }

    /// Wait until instance `id` has registered in the store (its first heartbeat), or
    /// fail with its log when it exits or `limit` passes first.
    pub async fn wait_registered(
        &mut self,
        db: &Db,
        id: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(true) = db.instance_registered(id).await {
                return Ok(());
            }
            if let Some(instance) = self.instances.iter_mut().find(|i| i.id() == id) {
                if let Ok(Some(status)) = instance.child.try_wait() {
                    bail!(
                        "herald serve {id} exited ({status}) before registering; its log:\n{}",
                        self.log_tail(id, 30)
                    );
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "herald serve {id} did not register within {limit:?}; its log:\n{}",
                    self.log_tail(id, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL the instance at `index` and wait for it to be gone; returns it.
    pub async fn kill(&mut self, index: usize) -> anyhow::Result<Instance> {
        let mut instance = self.instances.remove(index);
        instance
            .child
            .start_kill()
            .with_context(|| format!("SIGKILL {}", instance.id()))?;
        tokio::time::timeout(Duration::from_secs(10), instance.child.wait())
            .await
            .with_context(|| format!("{} did not die within 10 s of SIGKILL", instance.id()))?
            .with_context(|| format!("waiting for {}", instance.id()))?;
        Ok(instance)
    }

    /// Instances that exited on their own since the last look: recorded as crashes and
    /// restarted (the next incarnation), so the run goes on and the crash is reported.
    pub fn restart_crashed(&mut self) -> anyhow::Result<Vec<String>> {
        let mut crashed = Vec::new();
        let mut index = 0;
        while index < self.instances.len() {
            let instance = &mut self.instances[index];
            match instance.child.try_wait() {
                Ok(Some(status)) => {
                    let note = format!("{} exited on its own ({status})", instance.id());
                    let (slot, incarnation) = (instance.slot, instance.incarnation);
                    self.instances.remove(index);
                    self.crashes.push(note.clone());
                    crashed.push(note);
                    self.start(slot, incarnation + 1)?;
                }
                _ => index += 1,
            }
        }
        Ok(crashed)
    }

    /// SIGTERM every instance and wait for them to exit; the exits that were not clean.
    pub async fn stop_all(&mut self, limit: Duration) -> Vec<String> {
        let mut unclean = Vec::new();
        for instance in &self.instances {
            if let Some(pid) = instance.child.id().and_then(|pid| i32::try_from(pid).ok()) {
                // SAFETY: kill(2) with a pid of our own child and a valid signal number.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        for mut instance in self.instances.drain(..) {
            let id = instance.id();
            match tokio::time::timeout(limit, instance.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => unclean.push(format!("{id} exited with {status} on SIGTERM")),
                Ok(Err(err)) => unclean.push(format!("{id}: {err}")),
                Err(_) => unclean.push(format!("{id} still running {limit:?} after SIGTERM")),
            }
        }
        unclean
    }

    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
            .collect();
        files.sort();
        files
    }

    pub fn log_tail(&self, id: &str, lines: usize) -> String {
        tail(&self.logs.join(format!("{id}.log")), lines)
    }

    /// Lines of every serve log that report a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for file in self.log_files() {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.extend(
                text.lines()
                    .filter(|line| line.contains("panicked"))
                    .map(|line| format!("{name}: {line}")),
            );
        }
        found
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
