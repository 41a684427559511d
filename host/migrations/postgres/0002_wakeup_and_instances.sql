-- Wake listening Herald instances when events arrive. One notification per statement, not
-- per row: a bulk insert wakes once, and Postgres folds identical notifications of one
-- transaction anyway. The payload is empty; listeners only need to know "look now".
CREATE FUNCTION herald_notify_new_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify_herald
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION herald_notify_new_events();

-- Live Herald processes, for operators: each refreshes its row while it runs and deletes
-- it on a clean stop. Nothing depends on it for correctness: leases alone decide who owns
-- a delivery.
CREATE TABLE herald_instances (
    instance_id TEXT PRIMARY KEY,
    version     TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now()
);
