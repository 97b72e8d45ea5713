-- 0010_parked_jobs.sql — jobs parked by an open circuit, found again when their endpoint answers.
--
-- A job handed to the queue (or postponed by a worker) because its endpoint's circuit breaker was
-- open carries the circuit's identity: a digest of the endpoint's scheme://host:port (not the
-- host itself, which may come from a secret environment variable). When the circuit closes, or
-- the endpoint accepts connections again, the node makes every pending job parked on that
-- circuit due now instead of at the end of the open period. Any other reschedule clears it.
--
-- A nullable addition (a catalog change, no rewrite); the partial index holds parked pending
-- jobs only, so it stays as small as the work an outage parked.

ALTER TABLE fraiseql_observers.jobs
    ADD COLUMN IF NOT EXISTS parked_on text;

CREATE INDEX IF NOT EXISTS jobs_parked_idx
    ON fraiseql_observers.jobs (parked_on)
    WHERE status = 'pending' AND parked_on IS NOT NULL;

COMMENT ON COLUMN fraiseql_observers.jobs.parked_on IS
    'The circuit (digest of scheme://host:port) whose open breaker parked this pending job; NULL: not parked.';
