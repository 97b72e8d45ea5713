-- 0013_inline_attempts.sql — a job's history starts with the attempts made before the queue.
--
-- An action tried in the page and then handed to the job queue carries those attempts' errors in
-- `errors` from the start, and how many there were in `inline_attempts`: the queue numbers its
-- own attempts after them, so a dead letter's history reads attempt 1 to N across both, and its
-- attempt count is the whole count.
--
-- A NOT NULL addition with a constant default (a catalog change, no rewrite).

ALTER TABLE fraiseql_observers.jobs
    ADD COLUMN IF NOT EXISTS inline_attempts integer NOT NULL DEFAULT 0;

COMMENT ON COLUMN fraiseql_observers.jobs.inline_attempts IS
    'Attempts made in the page before the action was handed to the queue (their errors open `errors`); the queue numbers its attempts after them.';
