-- 0020_completed_jobs.sql — a completed job leaves the jobs table for a narrow record.
--
-- Before: completing a job rewrote its whole row (the event payload, the attempt history) with
-- status 'completed', and — status being in every partial index's predicate — inserted a new
-- entry into each of the table's indexes; the row then stayed in the table, beside the live
-- queue, until retention. Now the completing statement (src/jobs) deletes the row and inserts its
-- record into jobs_completed: identity, timings, order and the failed attempts before the
-- success, not the event payload; two indexes.
--
-- 1. jobs_completed: one row per completed job. Its idempotency key is unique, and the enqueue
--    skips a job whose key is there, so replaying an event still enqueues nothing after its job
--    completed, as long as retention keeps the record (the same window as before).
-- 2. A job enqueued while the job of the same key is being completed: the enqueue's check ran on
--    its statement's snapshot, before the completion committed, and the insert found no
--    conflicting row once the completion's delete committed. The statement-level trigger
--    jobs_notify now also removes, with a snapshot taken after the insert, any job it inserted
--    whose key is in jobs_completed — so the replay stays a no-op in that window too (with the
--    default READ COMMITTED isolation, which every enqueue of the service uses).
-- 3. Rows completed before this migration, and by nodes still on the previous release during a
--    rolling upgrade, stay in jobs with status 'completed' until retention prunes them: the
--    statistics, retention and the enqueue's key check read both places. Nothing is moved (a
--    large table is not rewritten by the migration).

CREATE TABLE IF NOT EXISTS fraiseql_observers.jobs_completed (
    id              uuid        NOT NULL,
    idempotency_key text        NOT NULL,
    queue           text        NOT NULL,
    priority        smallint    NOT NULL,
    event_id        uuid        NOT NULL,
    observer        text        NOT NULL,
    action_index    int         NOT NULL,
    action_type     text        NOT NULL,
    ordering_key    text,
    ordinal         bigint,
    attempts        int         NOT NULL,   -- the queue's attempts, the successful one included
    inline_attempts int         NOT NULL,   -- attempts made in the page before the queue
    errors          jsonb       NOT NULL,   -- the failed attempts before the successful one
    created_at      timestamptz NOT NULL,   -- enqueued
    started_at      timestamptz,            -- the successful attempt's claim
    finished_at     timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX IF NOT EXISTS jobs_completed_key_idx
    ON fraiseql_observers.jobs_completed (idempotency_key);
-- Retention: rows arrive in finished_at order, so a block range index finds the old ones at a
-- fraction of a b-tree's upkeep per completion.
CREATE INDEX IF NOT EXISTS jobs_completed_finished_idx
    ON fraiseql_observers.jobs_completed USING brin (finished_at);

COMMENT ON TABLE fraiseql_observers.jobs_completed IS
    'Completed jobs (src/jobs): the record a completion leaves when it deletes the job; its key keeps a replayed enqueue a no-op until retention.';

-- Wake workers, and drop any job of this statement whose key completed meanwhile (see 2 above).
-- The DELETE is a new query in a volatile function: under READ COMMITTED it takes a new snapshot,
-- which sees every completion the insert waited for. It is dynamic SQL, planned at each call for
-- jobs_completed's current size: a plan the session cached while the table was empty or freshly
-- analyzed small hashes a sequential scan of it, and would keep doing so until the next ANALYZE
-- however large the table grew.
CREATE OR REPLACE FUNCTION fraiseql_observers.jobs_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
    EXECUTE 'DELETE FROM fraiseql_observers.jobs AS job
              USING enqueued, fraiseql_observers.jobs_completed AS completed
              WHERE job.id = enqueued.id
                AND completed.idempotency_key = enqueued.idempotency_key';
    PERFORM pg_notify('fraiseql_observers_jobs', '');
    RETURN NULL;
END
$function$;

DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'fraiseql_observers.jobs'::regclass
                     AND tgname = 'jobs_notify' AND tgnewtable = 'enqueued') THEN
        DROP TRIGGER IF EXISTS jobs_notify ON fraiseql_observers.jobs;
        CREATE TRIGGER jobs_notify
            AFTER INSERT ON fraiseql_observers.jobs
            REFERENCING NEW TABLE AS enqueued
            FOR EACH STATEMENT EXECUTE FUNCTION fraiseql_observers.jobs_notify();
    END IF;
END
$migration$;

COMMENT ON FUNCTION fraiseql_observers.jobs_notify() IS
    'AFTER INSERT statement trigger on jobs: removes jobs whose key completed while they were being enqueued, and wakes the workers.';
