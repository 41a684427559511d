-- The producers' table. A producer INSERTs event_target, event_type, entity_type,
-- entity_id and event_data; everything else has a default. event_data stays TEXT so a
-- malformed payload is still stored and then refused visibly (DEAD, with the reason)
-- instead of failing the producer's business transaction.
CREATE TABLE events (
    event_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_target    TEXT,
    event_type      TEXT NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    event_data      TEXT,
    event_status    TEXT NOT NULL DEFAULT 'READY'
                    CHECK (event_status IN ('READY','SUCCESS','FAILED','DEAD','SKIPPED','DUPLICATE')),
    idempotency_key TEXT,
    headers         TEXT DEFAULT '{}',
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    status_reason   TEXT
);
-- Fan-out scans only what is still READY.
CREATE INDEX events_ready ON events (event_id) WHERE event_status = 'READY';
CREATE INDEX events_entity ON events (entity_type, entity_id, event_id);
CREATE INDEX events_status ON events (event_status, event_id);
CREATE INDEX events_idempotency_key ON events (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- One row per (event, route). entity_type/entity_id are copied from the event so the
-- per-entity ordering check is one index probe.
CREATE TABLE herald_deliveries (
    delivery_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        INTEGER NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    route           TEXT NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    ordered         INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING','RETRY','SUCCESS','SKIPPED','DEAD')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    locked_by       TEXT,
    locked_until    TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    UNIQUE (event_id, route)
);
CREATE INDEX herald_deliveries_due ON herald_deliveries (next_attempt_at, delivery_id)
    WHERE status IN ('PENDING','RETRY');
CREATE INDEX herald_deliveries_lane ON herald_deliveries (route, entity_type, entity_id, event_id)
    WHERE status IN ('PENDING','RETRY');
CREATE INDEX herald_deliveries_status ON herald_deliveries (status, route, delivery_id);

-- Append-only audit log: one row per finished attempt.
CREATE TABLE herald_attempts (
    attempt_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id    INTEGER NOT NULL REFERENCES herald_deliveries (delivery_id) ON DELETE CASCADE,
    event_id       INTEGER NOT NULL,
    route          TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    outcome        TEXT NOT NULL CHECK (outcome IN ('DELIVERED','RETRY','DEAD','SKIPPED')),
    detail         TEXT,
    plugin_version TEXT,
    instance       TEXT NOT NULL,
    started_at     TEXT NOT NULL,
    duration_us    INTEGER NOT NULL,
    recorded_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
CREATE INDEX herald_attempts_delivery ON herald_attempts (delivery_id, attempt_id);
CREATE INDEX herald_attempts_event ON herald_attempts (event_id, attempt_id);

-- Completed effects per (route, key). No foreign key: the ledger outlives event retention,
-- so a key stays "done" after its event row is purged.
CREATE TABLE herald_idempotency (
    route           TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    event_id        INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('DELIVERED','SKIPPED')),
    detail          TEXT,
    completed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (route, idempotency_key)
);
