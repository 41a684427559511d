-- Throughput (measured by herald-bench, see BENCHMARKS.md).
--
-- Every attempt row wrote an entry into two indexes: the primary key on attempt_id, and
-- (delivery_id, attempt_id). Nothing reads an attempt by its id alone. Attempts are read
-- by delivery, in id order: a claim's look-up of a completed key, an event's attempts,
-- and retention's delete through the deliveries. So the one index the table keeps is
-- (delivery_id, attempt_id), as its primary key, which logical replication also
-- identifies rows by. attempt_id stays an identity: it orders the attempts and the API
-- shows it.
ALTER TABLE herald_attempts DROP CONSTRAINT herald_attempts_pkey;
DROP INDEX herald_attempts_delivery;
ALTER TABLE herald_attempts ADD CONSTRAINT herald_attempts_pkey PRIMARY KEY (delivery_id, attempt_id);
