-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Fan-out marked every event it read (`fanned_out = 1`): a write of the event's row and
-- of the events_to_fan_out index per event, the third most costly statement of a drain.
-- On SQLite a cursor does the same job. There is one writer at a time, so events commit
-- in the order of their ids, and AUTOINCREMENT never hands an id out twice: every event
-- above the last one fan-out read is new, and none below it can appear later. One row
-- remembers that last event; fan-out reads the events above it by primary key and moves
-- it on, one write per pass instead of one per event.
CREATE TABLE herald_fan_out_cursor (
    only_row      INTEGER PRIMARY KEY CHECK (only_row = 1),
    last_event_id INTEGER NOT NULL
);

-- Fan-out took events oldest first, so those it marked are all below those it did not.
INSERT INTO herald_fan_out_cursor (only_row, last_event_id)
    VALUES (1, coalesce((SELECT max(event_id) FROM events WHERE fanned_out = 1), 0));

-- An id that a producer sets itself below the cursor would never be fanned out: refuse
-- it in the producer's transaction instead of losing the event.
CREATE TRIGGER events_behind_fan_out_cursor AFTER INSERT ON events
    WHEN NEW.event_id <= (SELECT last_event_id FROM herald_fan_out_cursor)
BEGIN
    SELECT RAISE(ABORT, 'event_id is at or below the last event Herald has fanned out, so the event would never be delivered; leave event_id to SQLite');
END;

DROP INDEX events_to_fan_out;
ALTER TABLE events DROP COLUMN fanned_out;
