-- 0008_job_order.sql — per-entity order in the job queue (guarantee 3 for work that leaves the page).
--
-- A job of a change-log event carries an ordering key — its observer, action index, entity type and
-- entity id — and an ordinal, the event's change-log position (pk_entity_change_log), which follows
-- change order within one entity. A pending job is claimed only when no job with the same key and a
-- smaller ordinal is still pending or running; completed, failed (dead-lettered) and cancelled jobs
-- hold nothing back, so a poison event does not stall its entity. Jobs without a key (those enqueued
-- before this migration, or for an event that did not come from the change log) are claimed as
-- before.
--
-- Both columns are nullable additions (a catalog change, no rewrite). The check that they are set
-- together is NOT VALID: every row that exists when it is added has both NULL, and new rows are
-- held to it.

ALTER TABLE fraiseql_observers.jobs
    ADD COLUMN IF NOT EXISTS ordering_key text,
    ADD COLUMN IF NOT EXISTS ordinal bigint;

DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'fraiseql_observers.jobs'::regclass
                     AND conname = 'jobs_ordering_key_has_ordinal') THEN
        ALTER TABLE fraiseql_observers.jobs
            ADD CONSTRAINT jobs_ordering_key_has_ordinal
            CHECK ((ordering_key IS NULL) = (ordinal IS NULL)) NOT VALID;
    END IF;
END
$migration$;

-- The claim's look-up "an unfinished job of this key with a smaller ordinal", and the listener's
-- "which of these keys have unfinished jobs": only pending and running jobs are in it, so it stays
-- as small as the backlog however many finished jobs are retained.
CREATE INDEX IF NOT EXISTS jobs_ordering_idx
    ON fraiseql_observers.jobs (ordering_key, ordinal)
    WHERE status IN ('pending', 'running') AND ordering_key IS NOT NULL;

COMMENT ON COLUMN fraiseql_observers.jobs.ordering_key IS
    'Jobs of one (observer, action, entity) run one at a time in ordinal order; NULL: unordered.';
COMMENT ON COLUMN fraiseql_observers.jobs.ordinal IS
    'The event''s change-log position (pk_entity_change_log): change order within the ordering key.';
