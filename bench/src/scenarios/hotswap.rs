//! Scenario 6, hot swap under load: while events are inserted and drained continuously on
//! a noop route, two builds of noop are deployed in turn by an atomic rename into the
//! plugin directory; the time from the rename until the registry serves the new version,
//! and every attempt that was not DELIVERED meanwhile (there must be none).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald::runtime::hot_reload::PluginWatcher;
use herald::service::Service;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::{one_line, with_env, Ctx};
use crate::report::{count, millis, quantile, Table};
use crate::setup::{noop_route, Backend, Db, Env};
use crate::tuning::{Sizes, HOTSWAP_DISPATCH, WATCH_EVERY};

const EVENT_TYPE: &str = "bench.swap";
/// The load is inserted this often, `rate / TICKS_PER_SEC` events per transaction.
const TICKS_PER_SEC: u64 = 100;

struct Swapped {
    /// Rename → served, per swap, in order.
    times: Vec<Duration>,
    events: u64,
    attempts: i64,
    not_delivered: i64,
    versions: i64,
}

pub async fn table(ctx: &mut Ctx, backends: &[Backend]) -> Table {
    let sizes = ctx.sizes.clone();
    let mut table = Table::new(
        format!(
            "6. Hot swap under load: {} deploys of alternating noop builds, {} events/s flowing",
            sizes.swaps,
            count(sizes.swap_load_per_sec)
        ),
        &[
            "backend",
            "swaps",
            "first ms",
            "median ms",
            "max ms",
            "events",
            "attempts",
            "not DELIVERED",
            "versions seen",
        ],
    );
    table.note(format!(
        "Rename → `plugins.get(\"noop\").version` is the new one, with a `PluginWatcher` \
         scanning every {} ms (a file is deployed once it looked the same on two scans). \
         `first` includes compiling the second build; later deploys come from the compile \
         cache. `[dispatch]` {}. `not DELIVERED` must be 0.",
        WATCH_EVERY.as_millis(),
        one_line(HOTSWAP_DISPATCH)
    ));
    for &backend in backends {
        let plugins = ctx.plugins.clone();
        let measured = with_env(ctx, backend, "hotswap", async |env: &Env| {
            measure(env, &plugins, &sizes).await
        })
        .await;
        match measured {
            Ok(m) => {
                let mut sorted = m.times.clone();
                sorted.sort_unstable();
                let cell = |d: Option<Duration>| d.map_or("-".to_string(), millis);
                table.row(vec![
                    backend.name().to_string(),
                    count(m.times.len() as u64),
                    cell(m.times.first().copied()),
                    cell(quantile(&sorted, 0.5)),
                    cell(sorted.last().copied()),
                    count(m.events),
                    count(u64::try_from(m.attempts).unwrap_or(0)),
                    m.not_delivered.to_string(),
                    m.versions.to_string(),
                ]);
                if m.not_delivered != 0 {
                    ctx.failures += 1;
                    eprintln!(
                        "{}: {} attempts were not DELIVERED during the swaps",
                        backend.name(),
                        m.not_delivered
                    );
                }
            }
            Err(err) => ctx.fail(&mut table, backend.name(), &err),
        }
    }
    table
}

async fn measure(env: &Env, plugins: &Path, sizes: &Sizes) -> anyhow::Result<Swapped> {
    let own = env.install_plugins(plugins, &["noop"])?;
    let first = std::fs::read(own.join("noop.wasm")).context("reading noop.wasm")?;
    let second = with_custom_section(&first, "herald-bench", b"second build of noop");
    let builds = [first, second];
    let versions = [version_of(&builds[0]), version_of(&builds[1])];

    let service = env.herald(HOTSWAP_DISPATCH, &noop_route("bench.*")).await?;
    if serving(&service).as_deref() != Some(versions[0].as_str()) {
        bail!("noop is not serving the installed build");
    }
    let (stop_herald, herald_stopped) = watch::channel(false);
    let (stop_load, load_stopped) = watch::channel(false);
    let watcher = PluginWatcher::new(&own, service.runtime.clone(), service.plugins.clone());
    let watching = tokio::spawn(watcher.run(WATCH_EVERY, herald_stopped.clone()));
    let runner = {
        let service = service.clone();
        tokio::spawn(async move { service.dispatcher.run(herald_stopped).await })
    };
    let producer = tokio::spawn(load(env.db.clone(), sizes.swap_load_per_sec, load_stopped));

    let swapped = swap(&own, &service, &builds, &versions, sizes).await;

    let _ = stop_load.send(true);
    let inserted = producer.await.context("the load task")?;
    let drained = match (&swapped, &inserted) {
        (Ok(_), Ok(_)) => super::settle(&env.db, sizes.time_bound).await,
        _ => Ok(()),
    };
    let _ = stop_herald.send(true);
    runner.await.context("the dispatcher task")?;
    watching.await.context("the watcher task")?;
    let times = swapped?;
    let events = inserted?;
    drained?;

    let success = env.db.events_with_status("SUCCESS").await?;
    if success != events as i64 {
        bail!(
            "{success} of {events} events are SUCCESS: {}",
            env.db.status_summary().await
        );
    }
    Ok(Swapped {
        times,
        events,
        attempts: env
            .db
            .scalar(&format!("SELECT count(*) FROM {}", env.db.attempts()))
            .await?,
        not_delivered: env
            .db
            .scalar(&format!(
                "SELECT count(*) FROM {} WHERE outcome <> 'DELIVERED'",
                env.db.attempts()
            ))
            .await?,
        versions: env
            .db
            .scalar(&format!(
                "SELECT count(DISTINCT plugin_version) FROM {}",
                env.db.attempts()
            ))
            .await?,
    })
}

/// Deploy the builds in turn (second, first, second, …), each by writing a temporary file
/// (not named `*.wasm`, so the watcher ignores it) and renaming it over `noop.wasm`.
async fn swap(
    dir: &Path,
    service: &Service,
    builds: &[Vec<u8>; 2],
    versions: &[String; 2],
    sizes: &Sizes,
) -> anyhow::Result<Vec<Duration>> {
    let bar = crate::progress::bar(sizes.swaps as u64, "hot swaps");
    tokio::time::sleep(sizes.swap_gap).await;
    let temp = dir.join(".noop.wasm.part");
    let active = dir.join("noop.wasm");
    let mut times = Vec::with_capacity(sizes.swaps);
    for i in 0..sizes.swaps {
        let next = (i + 1) % 2;
        std::fs::write(&temp, &builds[next])
            .with_context(|| format!("writing {}", temp.display()))?;
        let renamed = Instant::now();
        std::fs::rename(&temp, &active)
            .with_context(|| format!("renaming {} to {}", temp.display(), active.display()))?;
        loop {
            if serving(service).as_deref() == Some(versions[next].as_str()) {
                break;
            }
            if renamed.elapsed() > sizes.time_bound {
                bail!(
                    "swap {}: the new version was not served within {:?}",
                    i + 1,
                    sizes.time_bound
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(renamed.elapsed());
        bar.inc(1);
        tokio::time::sleep(sizes.swap_gap).await;
    }
    bar.finish_and_clear();
    Ok(times)
}

fn serving(service: &Service) -> Option<String> {
    service
        .plugins
        .get("noop")
        .map(|plugin| plugin.version.clone())
}

/// Insert `per_sec` events a second in small transactions until told to stop; returns
/// how many.
async fn load(db: Db, per_sec: u64, mut stop: watch::Receiver<bool>) -> anyhow::Result<u64> {
    let per_tick = (per_sec / TICKS_PER_SEC).max(1);
    let mut interval = tokio::time::interval(Duration::from_millis(1000 / TICKS_PER_SEC));
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut inserted = 0u64;
    while !*stop.borrow() {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => break,
        }
        let first = inserted + 1;
        let last = inserted + per_tick;
        db.insert_range("events", EVENT_TYPE, first as i64, last as i64)
            .await
            .context("inserting load")?;
        inserted = last;
    }
    Ok(inserted)
}

/// `sha256:<hex>`, the version Herald gives a plugin file.
fn version_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The same component with a custom section appended: another file, another version,
/// the same behaviour. Section id 0, size, then the name (length-prefixed) and payload.
fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    let mut contents = leb128(name.len());
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(payload);
    let mut out = wasm.to_vec();
    out.push(0);
    out.extend(leb128(contents.len()));
    out.extend(contents);
    out
}

fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_encodes_unsigned() {
        assert_eq!(leb128(0), vec![0]);
        assert_eq!(leb128(127), vec![0x7f]);
        assert_eq!(leb128(128), vec![0x80, 0x01]);
        assert_eq!(leb128(624_485), vec![0xe5, 0x8e, 0x26]);
    }

    #[test]
    fn custom_section_is_appended_whole() {
        let out = with_custom_section(b"\0asm", "n", b"xy");
        assert_eq!(out, b"\0asm\x00\x04\x01nxy");
    }
}
