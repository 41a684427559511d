//! The faults: when each happens (by progress: effects applied at the sink), and each
//! one done and followed until the system has recovered, with a note of how long that
//! took. Every wait has a deadline and says what it waited for when it runs out.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::watch;

use crate::db::Db;
use crate::herald::Fleet;
use crate::postgres::PrivatePostgres;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a random instance, then start it again.
    Kill,
    /// `pg_ctl stop -m fast` + `pg_ctl start` of the private cluster.
    RestartPostgres,
    /// A new version of the webhook plugin through `herald plugins deploy`.
    Deploy,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::RestartPostgres => "Postgres restart",
            Fault::Deploy => "plugin deploy",
        }
    }
}

/// A fault and the number of effects applied at the sink that triggers it.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub at_applied: u64,
    pub fault: Fault,
}

/// The faults in a seeded random order, at evenly spaced points of the run (never at its
/// very start or end, so there is work in flight around each one).
pub fn plan(
    rng: &mut StdRng,
    events: u64,
    kills: u32,
    restarts: u32,
    deploys: u32,
) -> Vec<Planned> {
    let mut faults: Vec<Fault> = std::iter::repeat_n(Fault::Kill, kills as usize)
        .chain(std::iter::repeat_n(
            Fault::RestartPostgres,
            restarts as usize,
        ))
        .chain(std::iter::repeat_n(Fault::Deploy, deploys as usize))
        .collect();
    faults.shuffle(rng);
    let slots = faults.len() as u64 + 1;
    faults
        .into_iter()
        .enumerate()
        .map(|(index, fault)| Planned {
            at_applied: events * (index as u64 + 1) / slots,
            fault,
        })
        .collect()
}

/// What one fault did and how the system came back.
#[derive(Debug, Clone)]
pub struct Note {
    pub fault: Fault,
    pub at_applied: u64,
    pub detail: String,
}

/// Everything a fault acts on.
pub struct Faults<'a> {
    pub pg: &'a mut PrivatePostgres,
    pub db: &'a Db,
    pub fleet: &'a mut Fleet,
    pub rng: &'a mut StdRng,
    pub progress: watch::Receiver<u64>,
    pub lease: Duration,
    /// The built webhook component, which each deploy changes a little.
    pub webhook: Vec<u8>,
    pub work_dir: PathBuf,
    pub deploys_done: u32,
    pub seed: u64,
}

/// How long an instance may take to start and register (a debug build compiles nothing
/// at start: plugins come from the compile cache after the first start).
const START_LIMIT: Duration = Duration::from_secs(120);
/// How long the instances may take to reconnect after Postgres is back.
const RECONNECT_LIMIT: Duration = Duration::from_secs(60);
/// How long a deploy may take to be in service on every instance.
const DEPLOY_LIMIT: Duration = Duration::from_secs(120);

impl Faults<'_> {
    pub async fn run(&mut self, planned: Planned) -> anyhow::Result<Note> {
        let at_applied = *self.progress.borrow();
        let detail = match planned.fault {
            Fault::Kill => self.kill().await?,
            Fault::RestartPostgres => self.restart_postgres().await?,
            Fault::Deploy => self.deploy().await?,
        };
        Ok(Note {
            fault: planned.fault,
            at_applied,
            detail,
        })
    }

    async fn kill(&mut self) -> anyhow::Result<String> {
        let index = self.rng.random_range(0..self.fleet.instances.len());
        let victim = self.fleet.instances[index].id();
        let slot = self.fleet.instances[index].slot;
        let next = self.fleet.instances[index].incarnation + 1;
        let held = self.db.leases_of(&victim).await.unwrap_or(-1);
        let killed_at = Instant::now();
        self.fleet.kill(index).await?;
        self.fleet.start(slot, next)?;
        let successor = format!("{slot}.{next}");
        self.fleet
            .wait_registered(self.db, &successor, START_LIMIT)
            .await?;
        let up = killed_at.elapsed();
        // The victim's leases run out and the surviving instances claim its deliveries.
        let limit = self.lease * 10 + Duration::from_secs(30);
        let taken_over = poll_until(limit, "the killed instance's leases to be taken over", {
            let db = self.db.clone();
            let victim = victim.clone();
            move || {
                let db = db.clone();
                let victim = victim.clone();
                async move { Ok(db.leases_of(&victim).await? == 0) }
            }
        })
        .await?;
        let held = if held < 0 {
            "?".to_string()
        } else {
            held.to_string()
        };
        Ok(format!(
            "{victim} killed holding {held} lease(s); {successor} registered after {}; \
             all its leases claimed by others after {}",
            secs(up),
            secs(taken_over.max(up))
        ))
    }

    async fn restart_postgres(&mut self) -> anyhow::Result<String> {
        let began = Instant::now();
        let restart = self.pg.restart().await?;
        let back = Instant::now();
        let applied_then = *self.progress.borrow();
        let since = self.db_now().await?;
        let ids: Vec<String> = self.fleet.instances.iter().map(|i| i.id()).collect();
        for id in &ids {
            let db = self.db.clone();
            let id = id.clone();
            poll_until(
                RECONNECT_LIMIT,
                &format!("{id} to heartbeat again after the restart"),
                move || {
                    let db = db.clone();
                    let id = id.clone();
                    async move { db.heartbeat_after(&id, since).await }
                },
            )
            .await?;
        }
        let reconnected = back.elapsed();
        let mut progress = self.progress.clone();
        tokio::time::timeout(RECONNECT_LIMIT, progress.wait_for(|n| *n > applied_then))
            .await
            .with_context(|| {
                format!("no effect applied at the sink within {RECONNECT_LIMIT:?} of the restart")
            })?
            .context("the sink stopped")?;
        Ok(format!(
            "stop (fast) {}, start {}; every instance heartbeating {} after Postgres was \
             back, deliveries flowing after {} (fault to recovery {})",
            secs(restart.stop),
            secs(restart.start),
            secs(reconnected),
            secs(back.elapsed()),
            secs(began.elapsed())
        ))
    }

    async fn deploy(&mut self) -> anyhow::Result<String> {
        self.deploys_done += 1;
        let number = self.deploys_done;
        let build = new_version(
            &self.webhook,
            &format!("herald-chaos deploy {number} (seed {})", self.seed),
        );
        let file = self.work_dir.join(format!("webhook-deploy-{number}.wasm"));
        std::fs::write(&file, &build).with_context(|| format!("writing {}", file.display()))?;
        let began = Instant::now();
        let path = file.to_string_lossy().into_owned();
        let out = self
            .fleet
            .herald(
                &["--json", "plugins", "deploy", &path, "--name", "webhook"],
                DEPLOY_LIMIT,
            )
            .await?;
        let installed = began.elapsed();
        let answer: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("herald plugins deploy printed no JSON: {out}"))?;
        let Some(version) = answer["version"].as_str().map(str::to_string) else {
            bail!("herald plugins deploy answered without a version: {out}");
        };
        let ids: Vec<String> = self.fleet.instances.iter().map(|i| i.id()).collect();
        for id in &ids {
            let db = self.db.clone();
            let (id, version) = (id.clone(), version.clone());
            poll_until(
                DEPLOY_LIMIT,
                &format!("{id} to run an attempt on {version}"),
                move || {
                    let db = db.clone();
                    let (id, version) = (id.clone(), version.clone());
                    async move { db.ran_version(&id, &version).await }
                },
            )
            .await?;
        }
        let short = version.get(..19).unwrap_or(&version);
        Ok(format!(
            "webhook {short}… installed (checked and written) in {}; attempts on it from \
             every instance after {}",
            secs(installed),
            secs(began.elapsed())
        ))
    }

    /// The store's clock, retried while Postgres comes back.
    async fn db_now(&self) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
        let deadline = Instant::now() + RECONNECT_LIMIT;
        loop {
            match self.db.now().await {
                Ok(now) => return Ok(now),
                Err(err) if Instant::now() > deadline => {
                    return Err(err).context("reaching the restarted Postgres")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// The built component with a custom section appended: different bytes (so a new
/// version, by content hash) with the same code.
pub fn new_version(component: &[u8], label: &str) -> Vec<u8> {
    use wasm_encoder::ComponentSection;
    let mut bytes = component.to_vec();
    wasm_encoder::CustomSection {
        name: "herald-chaos".into(),
        data: label.as_bytes().into(),
    }
    .append_to_component(&mut bytes);
    bytes
}

/// Poll `check` every 100 ms until it answers true; how long that took. Errors (the store
/// restarting) count as "not yet".
pub async fn poll_until<F, Fut>(limit: Duration, what: &str, check: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let began = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(began.elapsed()),
            Ok(false) => {}
            Err(err) => last_error = Some(err),
        }
        if began.elapsed() > limit {
            match last_error {
                Some(err) => bail!("waited {limit:?} for {what} (last error: {err:#})"),
                None => bail!("waited {limit:?} for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn secs(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}
