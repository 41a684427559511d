//! Noticing new events on SQLite, which has no notifications of its own. Every commit, by
//! any connection of any process, writes to the store's WAL file, and the operating system
//! reports those writes (inotify on Linux). A commit is visible only once its frames are
//! written (and flushed), so after a report a read-only connection asks every few hundred
//! microseconds whether a commit has landed since it last asked (`PRAGMA data_version`, a
//! read of the WAL index in shared memory), and when one has, whether the newest event id
//! moved. So an idle store costs nothing to watch, and producers in other processes are
//! seen the same way as Herald's own appends and a plugin's emitted events.
//!
//! Without it the dispatcher found new events by its poll alone: half of `poll_interval`
//! of latency on average (250 ms at the default). Polling stays on as the safety net, for
//! file systems that report no events (network mounts).

use std::ffi::OsString;
use std::path::Path;
use std::sync::Weak;
use std::time::{Duration, Instant};

use notify::event::{EventKind, ModifyKind};
use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::Notify;

use crate::store::error::QueryContext;
use crate::store::{StoreError, StoreResult};

/// How long after a write to the WAL its commit may take to land. One that takes longer
/// (a long transaction, a very slow flush) is found by the poll instead; a later commit
/// writes again and is seen.
const COMMIT_LANDS_WITHIN: Duration = Duration::from_millis(250);

/// Between looks while a commit is awaited.
const LOOK_AGAIN_AFTER: Duration = Duration::from_micros(200);

/// Watching for as long as it lives.
pub(super) struct NewEventWatch {
    _watcher: RecommendedWatcher,
}

/// Wake `wake` whenever the store's newest event id moves up, while both the returned
/// watch and `wake` live.
pub(super) fn watch_new_events(path: &Path, wake: Weak<Notify>) -> StoreResult<NewEventWatch> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .doing("opening the new-event watcher")?;
    let mut seen = Seen::now(&connection).doing("reading the newest event")?;
    let failed = |source: notify::Error| StoreError::Watch {
        path: path.to_path_buf(),
        source,
    };
    // The directory, not the WAL file: SQLite deletes the WAL when its last connection
    // closes and creates it anew, which a watch of the file itself would not survive.
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut wal_name = path.file_name().map(OsString::from).unwrap_or_default();
    wal_name.push("-wal");
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let Some(wake) = wake.upgrade() else {
            return;
        };
        match event {
            // The kernel's queue overflowed: writes may have gone unreported.
            Ok(event) if event.need_rescan() => wake.notify_one(),
            Ok(event) if !is_a_write_to(&event, &wal_name) => {}
            Ok(_) => match seen.await_commit(&connection) {
                Ok(true) => wake.notify_one(),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%err, "new-event watcher could not read the store");
                    wake.notify_one();
                }
            },
            // Events may have been missed: look now rather than at the next poll.
            Err(err) => {
                tracing::warn!(%err, "new-event watcher lost file events");
                wake.notify_one();
            }
        }
    })
    .map_err(failed)?;
    watcher
        .watch(directory, RecursiveMode::NonRecursive)
        .map_err(failed)?;
    Ok(NewEventWatch { _watcher: watcher })
}

/// Whether `event` reports data written to, or the creation of, the file `name`.
fn is_a_write_to(event: &Event, name: &OsString) -> bool {
    let written = matches!(
        event.kind,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) | EventKind::Create(_)
    );
    written
        && event
            .paths
            .iter()
            .any(|path| path.file_name() == Some(name.as_os_str()))
}

/// What the watcher last saw.
struct Seen {
    data_version: i64,
    newest_event: i64,
}

impl Seen {
    fn now(connection: &Connection) -> rusqlite::Result<Self> {
        Ok(Seen {
            data_version: data_version(connection)?,
            newest_event: newest_event(connection)?,
        })
    }

    /// After a write to the WAL: wait for a commit to land (SQLite has one writer at a
    /// time, so the first to land is the writer's), then say whether an event newer than
    /// any seen before is there.
    fn await_commit(&mut self, connection: &Connection) -> rusqlite::Result<bool> {
        let since = Instant::now();
        loop {
            let version = data_version(connection)?;
            if version != self.data_version {
                self.data_version = version;
                return self.newest_moved(connection);
            }
            if since.elapsed() >= COMMIT_LANDS_WITHIN {
                return Ok(false);
            }
            std::thread::sleep(LOOK_AGAIN_AFTER);
        }
    }

    fn newest_moved(&mut self, connection: &Connection) -> rusqlite::Result<bool> {
        let newest = newest_event(connection)?;
        // Retention may delete the newest events; ids are never handed out again
        // (AUTOINCREMENT), so the next insert is still above what is kept here.
        let moved = newest > self.newest_event;
        self.newest_event = newest;
        Ok(moved)
    }
}

fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.pragma_query_value(None, "data_version", |row| row.get(0))
}

fn newest_event(connection: &Connection) -> rusqlite::Result<i64> {
    connection
        .prepare_cached("SELECT coalesce(max(event_id), 0) FROM events")?
        .query_row([], |row| row.get(0))
}
