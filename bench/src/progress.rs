//! Progress bars on stderr (hidden when stderr is not a terminal); the figures go to stdout.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::setup::Db;
use crate::tuning::PROGRESS_EVERY;

/// A bar over `len` items, labelled `label`.
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {pos:>7}/{len:7} {per_sec:>12} {elapsed_precise}",
    )
    .map(|style| style.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A spinner for a phase without a count.
pub fn spinner(label: &str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    let style = ProgressStyle::with_template("{prefix:>28} {spinner} {msg} {elapsed_precise}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    spinner.set_style(style);
    spinner.set_prefix(label.to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// Follows a drain: every [`PROGRESS_EVERY`] the bar shows the attempts recorded since it
/// started (one per event in a drain that delivers each event once). The figure is read
/// from the attempts log's id counter, not counted: counting what is still READY walked
/// the backlog, 86 ms of Postgres time per sample, work the measured drain then lacked.
/// Stops (and clears the bar) when finished or dropped.
pub struct DrainWatch {
    task: JoinHandle<()>,
    bar: ProgressBar,
}

impl DrainWatch {
    pub async fn start(db: Db, total: u64, label: &str) -> DrainWatch {
        let before = db.attempts_numbered().await.unwrap_or(0);
        let bar = bar(total, label);
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(now) = db.attempts_numbered().await {
                    let done = u64::try_from(now.saturating_sub(before)).unwrap_or(0);
                    shown.set_position(done.min(total));
                }
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        });
        DrainWatch { task, bar }
    }

    pub fn finish(self) {
        // Drop does the work.
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
