-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Fan-out marked every event it read (`fanned_out = TRUE`). The index that found new
-- events named that column in its condition, so the mark was never a HOT update: a new
-- row version written off its page and an entry in every index of `events`. It was the
-- drain's costliest statement (17-19 us of Postgres time per event).
--
-- New events now wait for fan-out in a queue of their own, filled by a statement trigger
-- in the producer's transaction, so an event and its place in the queue commit together
-- (nothing is skipped because another transaction committed later with a lower id).
-- Fan-out deletes what it takes from the queue, which writes no index entry, and the
-- `events` row is written once more only, by its outcome's HOT status change.
--
-- What the producer pays instead: one queue row and its key per event, in place of the
-- `events_to_fan_out` entry it wrote before. The trigger also sends the wake-up of
-- migration 0002, so an INSERT statement still runs one trigger. Measured with pgbench
-- (one client, autocommit, one row per statement): 0.31 -> 0.32 ms per insert; one
-- statement of 100,000 rows: 430 -> 465 ms (a row trigger instead: 624 ms).
CREATE TABLE herald_fan_out_queue (
    event_id BIGINT PRIMARY KEY
);

INSERT INTO herald_fan_out_queue (event_id)
    SELECT event_id FROM events WHERE NOT fanned_out;

CREATE FUNCTION herald_queue_for_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO herald_fan_out_queue (event_id) SELECT event_id FROM new_events;
    PERFORM pg_notify('herald_events', '');
    RETURN NULL;
END
$$;

DROP TRIGGER events_notify_herald ON events;
DROP FUNCTION herald_notify_new_events();

CREATE TRIGGER events_queue_for_fan_out
    AFTER INSERT ON events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION herald_queue_for_fan_out();
-- Also when rows arrive by logical replication (session_replication_role = replica), which
-- skips ordinary triggers: an event that is not queued is never fanned out. A restore
-- that disables triggers must queue its READY events itself:
--   INSERT INTO herald_fan_out_queue SELECT event_id FROM events e
--     WHERE event_status = 'READY' AND NOT EXISTS
--       (SELECT 1 FROM herald_deliveries d WHERE d.event_id = e.event_id)
--   ON CONFLICT DO NOTHING;
ALTER TABLE events ENABLE ALWAYS TRIGGER events_queue_for_fan_out;

DROP INDEX events_to_fan_out;
ALTER TABLE events DROP COLUMN fanned_out;
