-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Fan-out marks the events it has read, so a pass reads only new events instead of
-- walking every READY event whose deliveries are still under way (which made each pass
-- cost as much as the whole backlog).
ALTER TABLE events ADD COLUMN fanned_out BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE events e SET fanned_out = TRUE
    WHERE EXISTS (SELECT 1 FROM herald_deliveries d WHERE d.event_id = e.event_id);
CREATE INDEX events_to_fan_out ON events (event_id)
    WHERE event_status = 'READY' AND NOT fanned_out;
-- events_status (event_status, event_id) answers the READY count as well; one index less
-- to write on every status change.
DROP INDEX events_ready;
-- Room in each page, so a claim (which changes no indexed column) is a HOT update and
-- writes no index entries. Applies to pages written from now on.
ALTER TABLE herald_deliveries SET (fillfactor = 70);
