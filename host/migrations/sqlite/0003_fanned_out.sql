-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Fan-out marks the events it has read, so a pass reads only new events instead of
-- walking every READY event whose deliveries are still under way (which made each pass
-- cost as much as the whole backlog).
ALTER TABLE events ADD COLUMN fanned_out INTEGER NOT NULL DEFAULT 0;
UPDATE events SET fanned_out = 1
    WHERE EXISTS (SELECT 1 FROM herald_deliveries d WHERE d.event_id = events.event_id);
CREATE INDEX events_to_fan_out ON events (event_id)
    WHERE event_status = 'READY' AND fanned_out = 0;
-- events_status (event_status, event_id) answers the READY count as well; one index less
-- to write on every status change.
DROP INDEX events_ready;
