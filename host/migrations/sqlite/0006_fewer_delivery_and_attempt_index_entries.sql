-- Throughput (measured by herald-bench, see BENCHMARKS.md); Postgres's migration 0009.
--
-- Every delivery and attempt row wrote an entry into each index of its table, and two of
-- those indexes served only operators' reads:
--
-- herald_attempts_event found an event's attempts (`herald events show`); they are found
-- through the event's deliveries instead, one index entry fewer per attempt.
--
-- herald_deliveries_status listed deliveries by status, and a delivery wrote into it when
-- inserted and moved in it when closed. What operators look for by status is what needs
-- them: deliveries waiting to retry and dead letters, one small index each. SQLite uses a
-- partial index only for a query that names the index's own condition, so each holds one
-- status, and the listing names the status as a literal. Listing the other statuses
-- walks the deliveries in id order.
DROP INDEX herald_attempts_event;
DROP INDEX herald_deliveries_status;
CREATE INDEX herald_deliveries_retrying ON herald_deliveries (route) WHERE status = 'RETRY';
CREATE INDEX herald_deliveries_dead ON herald_deliveries (route) WHERE status = 'DEAD';
