-- Throughput (measured by herald-bench, see BENCHMARKS.md and docs/benchmarks-history.md,
-- the twentieth and twenty-first refreshes).
--
-- In a drain nearly every delivery is its event's only one, started by fan-out and closed
-- at its first attempt. Each of them cost a delivery row (inserted, then updated) and an
-- attempt row, with their index entries: two thirds of the CPU Postgres spent per event.
-- Such deliveries are now written per batch instead:
--
-- * herald_claims: one row per fan-out pass, leasing the deliveries it started as items
--   (arrays, one entry per item). An item's delivery id is -(claim_id * 4096 + position):
--   negative, so it never meets an id of herald_deliveries, and naming its claim. An item
--   is open while its event is READY and no delivery row carries its id. The lease is the
--   claim's: renewed, given back and recovered per claim. An item that fails, is given
--   back, or whose claim's lease ran out becomes a herald_deliveries row under its own id
--   and goes on from there as any delivery does.
-- * herald_outcome_batches: one row per outcome transaction, holding the deliveries closed
--   at their first attempt as delivered or skipped (arrays, one entry per delivery), under
--   a GiST index of the range of their events, which is how an event's history finds them.
--
-- The views herald_delivery_records and herald_attempt_records read both shapes as the
-- one table each used to be.
CREATE TABLE herald_claims (
    claim_id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner            TEXT NOT NULL,
    locked_until     TIMESTAMPTZ NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_ids        BIGINT[] NOT NULL,
    routes           TEXT[] NOT NULL,
    entity_types     TEXT[] NOT NULL,
    entity_ids       TEXT[] NOT NULL,
    ordered          BOOLEAN[] NOT NULL,
    idempotency_keys TEXT[] NOT NULL
);

CREATE TABLE herald_outcome_batches (
    batch_id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance         TEXT NOT NULL,
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_range      INT8RANGE NOT NULL,
    delivery_ids     BIGINT[] NOT NULL,
    event_ids        BIGINT[] NOT NULL,
    routes           TEXT[] NOT NULL,
    ordered          BOOLEAN[] NOT NULL,
    idempotency_keys TEXT[] NOT NULL,
    outcomes         TEXT[] NOT NULL,
    details          TEXT[] NOT NULL,
    plugin_versions  TEXT[] NOT NULL,
    leased_at        TIMESTAMPTZ[] NOT NULL,
    started_at       TIMESTAMPTZ[] NOT NULL,
    duration_us      BIGINT[] NOT NULL
);
CREATE INDEX herald_outcome_batches_events ON herald_outcome_batches USING gist (event_range);

-- pglz compressing these arrays cost 4.5 % of all CPU samples in a drain; lz4 far less.
ALTER TABLE herald_claims
    ALTER COLUMN event_ids SET COMPRESSION lz4, ALTER COLUMN routes SET COMPRESSION lz4,
    ALTER COLUMN entity_types SET COMPRESSION lz4, ALTER COLUMN entity_ids SET COMPRESSION lz4,
    ALTER COLUMN ordered SET COMPRESSION lz4, ALTER COLUMN idempotency_keys SET COMPRESSION lz4;
ALTER TABLE herald_outcome_batches
    ALTER COLUMN delivery_ids SET COMPRESSION lz4, ALTER COLUMN event_ids SET COMPRESSION lz4,
    ALTER COLUMN routes SET COMPRESSION lz4, ALTER COLUMN ordered SET COMPRESSION lz4,
    ALTER COLUMN idempotency_keys SET COMPRESSION lz4, ALTER COLUMN outcomes SET COMPRESSION lz4,
    ALTER COLUMN details SET COMPRESSION lz4, ALTER COLUMN plugin_versions SET COMPRESSION lz4,
    ALTER COLUMN leased_at SET COMPRESSION lz4, ALTER COLUMN started_at SET COMPRESSION lz4,
    ALTER COLUMN duration_us SET COMPRESSION lz4;

-- The open items of every claim, as the delivery rows they stand for.
CREATE VIEW herald_open_claim_items AS
SELECT -(c.claim_id * 4096 + u.n - 1) AS delivery_id, u.event_id, u.route, u.entity_type,
       u.entity_id, u.ordered, u.idempotency_key, c.owner, c.locked_until, c.created_at,
       c.claim_id
FROM herald_claims c
CROSS JOIN LATERAL unnest(c.event_ids, c.routes, c.entity_types, c.entity_ids, c.ordered,
    c.idempotency_keys) WITH ORDINALITY
    AS u(event_id, route, entity_type, entity_id, ordered, idempotency_key, n)
JOIN events e ON e.event_id = u.event_id AND e.event_status = 'READY'
WHERE NOT EXISTS (SELECT 1 FROM herald_deliveries d
                  WHERE d.delivery_id = -(c.claim_id * 4096 + u.n - 1));

-- The entries of every outcome batch, one per delivery; leased_at is when fan-out leased
-- it (its claim's creation, as a delivery row's created_at). An entry's attempt id is
-- negative, so it never meets an id of herald_attempts, and orders the entries as they
-- were recorded: by batch, then by place in the batch.
CREATE VIEW herald_outcome_entries AS
SELECT b.batch_id * 1048576 + u.n - 1 - 4611686018427387904 AS attempt_id,
       b.batch_id, u.delivery_id, u.event_id, u.route, u.ordered, u.idempotency_key,
       u.outcome, u.detail, u.plugin_version, b.instance, u.leased_at, u.started_at,
       u.duration_us, b.recorded_at
FROM herald_outcome_batches b
CROSS JOIN LATERAL unnest(b.delivery_ids, b.event_ids, b.routes, b.ordered,
    b.idempotency_keys, b.outcomes, b.details, b.plugin_versions, b.leased_at,
    b.started_at, b.duration_us) WITH ORDINALITY
    AS u(delivery_id, event_id, route, ordered, idempotency_key, outcome, detail,
         plugin_version, leased_at, started_at, duration_us, n);

-- Every delivery row and open claim item, with the columns of herald_deliveries that the
-- API shows. An open claim item is leased and on its first attempt.
CREATE VIEW herald_open_delivery_records AS
SELECT delivery_id, event_id, route, status, attempts, ordered, idempotency_key,
       next_attempt_at, locked_by, locked_until, last_error, updated_at
FROM herald_deliveries
UNION ALL
SELECT delivery_id, event_id, route, 'PENDING', 1, ordered, idempotency_key, locked_until,
       owner, locked_until, NULL, created_at
FROM herald_open_claim_items;

-- Every delivery in either shape; a batch entry is closed.
CREATE VIEW herald_delivery_records AS
SELECT * FROM herald_open_delivery_records
UNION ALL
SELECT delivery_id, event_id, route,
       CASE outcome WHEN 'DELIVERED' THEN 'SUCCESS' ELSE outcome END, 1, ordered,
       idempotency_key, recorded_at, NULL, NULL, NULL, recorded_at
FROM herald_outcome_entries;

-- Every attempt in either shape; a batch entry is its delivery's one attempt.
CREATE VIEW herald_attempt_records AS
SELECT attempt_id, delivery_id, event_id, route, attempt, outcome, detail, plugin_version,
       instance, started_at, duration_us, recorded_at
FROM herald_attempts
UNION ALL
SELECT attempt_id, delivery_id, event_id, route, 1, outcome, detail, plugin_version,
       instance, started_at, duration_us, recorded_at
FROM herald_outcome_entries;
