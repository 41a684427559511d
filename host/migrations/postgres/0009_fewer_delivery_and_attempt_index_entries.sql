-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Every delivery and attempt row wrote an entry into each index of its table, and two of
-- those indexes served only operators' reads:
--
-- herald_attempts_event found an event's attempts (`herald events show`). Its
-- deliveries are found by (event_id, route) and their attempts by delivery, so that read
-- goes through herald_deliveries instead: one index entry fewer per attempt.
--
-- herald_deliveries_status listed deliveries by status, and a delivery wrote into it when
-- inserted and again when closed. What operators look for by status is what needs them:
-- deliveries waiting to retry and dead letters. Kept for those two statuses only, a
-- delivery that succeeds never enters it; listing the other statuses walks the
-- deliveries newest first, which is quick for common statuses (PENDING and RETRY are
-- also reached through herald_deliveries_due).
DROP INDEX herald_attempts_event;
DROP INDEX herald_deliveries_status;
CREATE INDEX herald_deliveries_retry_or_dead ON herald_deliveries (status, route, delivery_id)
    WHERE status IN ('RETRY', 'DEAD');
