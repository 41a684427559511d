-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- An outcome sets its event's status, and that update wrote a new entry into every index
-- of `events` (a new row version off its page, then index entries for it), because two
-- indexes named `event_status`: events_status, and events_to_fan_out's condition. It
-- was the drain's second most costly statement (22 µs of Postgres time per event).
-- With no index on `event_status` and room left in each page, it is a HOT update: the
-- new version stays on its page and no index is written (4 µs per event).
--
-- What gives way: listing events by status (`herald events list --status`, the admin API)
-- walks the events newest first instead of reading an index, which is fast for common
-- statuses and slow for rare ones on a large table; dead letters are listed from the
-- deliveries, whose status index stays. The READY count of the backlog gauge is reached
-- through events_to_fan_out and the open deliveries instead.
ALTER TABLE events SET (fillfactor = 50);
DROP INDEX events_status;
DROP INDEX events_to_fan_out;
-- Only new events: a producer inserts them READY, and fan-out marks each one it reads.
CREATE INDEX events_to_fan_out ON events (event_id) WHERE NOT fanned_out;
