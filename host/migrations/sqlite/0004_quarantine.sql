-- Plugins whose routes are paused after too many consecutive faults (see the Postgres
-- migration of the same name).
CREATE TABLE herald_quarantine (
    plugin TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    faults INTEGER NOT NULL,
    since  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
