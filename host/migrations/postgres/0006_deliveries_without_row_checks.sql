-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- The two foreign keys checked every inserted delivery and attempt row by a query of its
-- own, which also locked the referenced event or delivery row (a write to that row's
-- page). Herald writes a delivery only for an event it holds in the same transaction,
-- and an attempt only for a delivery it has just closed in that transaction, so the
-- checks never failed. What operators relied on stays: deleting events (retention)
-- still deletes their deliveries and attempts, and deleting deliveries their attempts,
-- now once per statement instead of once per row.
ALTER TABLE herald_deliveries DROP CONSTRAINT herald_deliveries_event_id_fkey;
ALTER TABLE herald_attempts DROP CONSTRAINT herald_attempts_delivery_id_fkey;

CREATE FUNCTION herald_delete_with_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM herald_deliveries d USING deleted_events o WHERE d.event_id = o.event_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_delete_deliveries
    AFTER DELETE ON events REFERENCING OLD TABLE AS deleted_events
    FOR EACH STATEMENT EXECUTE FUNCTION herald_delete_with_events();

CREATE FUNCTION herald_delete_with_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM herald_attempts a USING deleted_deliveries o
        WHERE a.delivery_id = o.delivery_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_delete_attempts
    AFTER DELETE ON herald_deliveries REFERENCING OLD TABLE AS deleted_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION herald_delete_with_deliveries();
