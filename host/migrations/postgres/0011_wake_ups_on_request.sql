-- Producers' commit rate and latency (measured with pgbench and herald-bench, see
-- BENCHMARKS.md, twelfth refresh).
--
-- The queue trigger sent a wake-up (NOTIFY) on every INSERT into `events`. At commit, a
-- transaction that notified takes a lock that Postgres holds, for the whole cluster, until
-- the commit is flushed: producers' commits took turns, and eight concurrent producers
-- committed half as often as the same inserts without the NOTIFY.
--
-- Now producers send the wake-up only while a Herald instance has asked for it. An instance
-- asks just before it sleeps for want of new events, and stops asking with its first look
-- after it wakes: a busy Herald finds new events by looking, and producers pay nothing.
--
-- The request is a sequence, not a row, because a sequence is read without a snapshot: a
-- producer at REPEATABLE READ whose transaction began before the request still sees it.
-- 1 means asked. It starts unasked: with `listen = false` nobody ever asks, and producers
-- send nothing. (Instances of an earlier version, which never ask, find new events by
-- their poll until they are replaced.)
CREATE SEQUENCE herald_wake_ups_requested MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;

-- A producer that read "not asked" just before an instance asked would commit events that
-- no wake-up announces, and the instance would sleep through them until its next poll. So
-- a producer that reads "not asked" takes a shared advisory lock, held until its
-- transaction ends, and reads again: asked by then, it sends the wake-up after all. An
-- instance that asked takes its last look only once it could take that lock exclusively,
-- i.e. once every producer that read "not asked" after taking the lock has ended. It only
-- ever tries the lock (herald_request_wake_ups), so no producer queues behind it, and a
-- producer that read "asked" takes no lock and does not hold the instance up.
CREATE OR REPLACE FUNCTION herald_queue_for_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO herald_fan_out_queue (event_id) SELECT event_id FROM new_events;
    IF (SELECT last_value FROM herald_wake_ups_requested) = 0 THEN
        PERFORM pg_advisory_xact_lock_shared(1751478881, 2002873189);
        IF (SELECT last_value FROM herald_wake_ups_requested) = 0 THEN
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('herald_events', '');
    RETURN NULL;
END
$$;

-- Ask for wake-ups; true once no producer that may have read "not asked" is still in
-- flight (the caller tries again until then, or until its poll is due).
CREATE FUNCTION herald_request_wake_ups() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT last_value FROM herald_wake_ups_requested) <> 1 THEN
        PERFORM setval('herald_wake_ups_requested', 1);
    END IF;
    RETURN pg_try_advisory_xact_lock(1751478881, 2002873189);
END
$$;
