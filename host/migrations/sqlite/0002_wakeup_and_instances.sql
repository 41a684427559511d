-- Live Herald processes, for operators (see the Postgres migration of the same name;
-- SQLite has no notifications, so only the table).
CREATE TABLE herald_instances (
    instance_id TEXT PRIMARY KEY,
    version     TEXT NOT NULL,
    started_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    last_seen   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
