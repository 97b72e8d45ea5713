-- 0018_waiting_jobs.sql — ordered jobs held back by an earlier job of their entity leave the ready
-- index.
--
-- Before: every job of an ordered backlog was 'pending', and each claim walked the ready index past
-- the followers of running or backed-off jobs, checking each for an unfinished predecessor — a
-- 12,000-job backlog over 200 entities drained at a few hundred jobs/s, and the next job of an
-- entity waited for the 1 s poll. Now:
--
-- 1. status 'waiting': a job enqueued while an earlier job of its ordering key is unfinished (or
--    behind an earlier job of its key in the same enqueue) is inserted 'waiting'. It is in no ready
--    index; it is claimable only once promoted to 'pending'. Counted as pending by stats and gauges.
-- 2. Trigger jobs_promote_successor: when a job of an ordering key finishes (completed, failed
--    — dead-lettered —, or cancelled), the statement that finishes it promotes the key's earliest
--    waiting job to 'pending', if no other unfinished job of the key precedes it, and notifies the
--    workers (channel fraiseql_observers_jobs) — whichever path finished it: complete,
--    complete-and-claim, dead letter, cancel.
-- 3. fraiseql_observers.promote_stranded_jobs(limit): promotes waiting jobs that head their key (no
--    unfinished job of the key precedes them). A job can be left waiting with nothing ahead of it
--    when its predecessor finished between the enqueue's snapshot and its commit (the finishing
--    statement did not see it yet); the coordinator runs this every rescue interval (1 s), so such
--    a job waits at most that long. Order is never at stake: a claim still refuses a job while an
--    earlier job of its key is pending, running or waiting.
-- 4. Index jobs_unfinished_order_idx (ordering_key, ordinal) over pending, running and waiting jobs
--    replaces jobs_ordering_idx (pending and running only).

-- The status check, with 'waiting'. Added NOT VALID (no scan: every existing row satisfies the old,
-- narrower check), then the old one dropped.
DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'fraiseql_observers.jobs'::regclass
                     AND conname = 'jobs_status_known') THEN
        ALTER TABLE fraiseql_observers.jobs
            ADD CONSTRAINT jobs_status_known
            CHECK (status IN ('waiting', 'pending', 'running', 'completed', 'failed', 'cancelled')) NOT VALID;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = 'fraiseql_observers.jobs'::regclass
                 AND conname = 'jobs_status_check') THEN
        ALTER TABLE fraiseql_observers.jobs DROP CONSTRAINT jobs_status_check;
    END IF;
END
$migration$;

CREATE INDEX IF NOT EXISTS jobs_unfinished_order_idx
    ON fraiseql_observers.jobs (ordering_key, ordinal)
    WHERE status IN ('pending', 'running', 'waiting') AND ordering_key IS NOT NULL;
DROP INDEX IF EXISTS fraiseql_observers.jobs_ordering_idx;

-- Promotes the earliest waiting job of the finished job's key unless an unfinished job of the key
-- still precedes it. Runs at the end of the finishing statement; its query takes a new snapshot,
-- so it sees that statement's own changes (the finished job no longer counts).
CREATE OR REPLACE FUNCTION fraiseql_observers.jobs_promote_successor()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
DECLARE
    promoted uuid;
BEGIN
    UPDATE fraiseql_observers.jobs AS job
       SET status = 'pending'
     WHERE job.id = (SELECT successor.id FROM fraiseql_observers.jobs AS successor
                      WHERE successor.ordering_key = OLD.ordering_key
                        AND successor.status IN ('pending', 'running', 'waiting')
                      ORDER BY successor.ordinal
                      LIMIT 1)
       AND job.status = 'waiting'
    RETURNING job.id INTO promoted;
    IF promoted IS NOT NULL THEN
        PERFORM pg_notify('fraiseql_observers_jobs', '');
    END IF;
    RETURN NULL;
END
$function$;

COMMENT ON FUNCTION fraiseql_observers.jobs_promote_successor() IS
    'AFTER UPDATE row trigger on jobs: a finished ordered job promotes the next waiting job of its key.';

DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'fraiseql_observers.jobs'::regclass
                     AND tgname = 'jobs_promote_successor') THEN
        CREATE TRIGGER jobs_promote_successor
            AFTER UPDATE OF status ON fraiseql_observers.jobs
            FOR EACH ROW
            WHEN (OLD.ordering_key IS NOT NULL
                  AND OLD.status IN ('pending', 'running', 'waiting')
                  AND NEW.status IN ('completed', 'failed', 'cancelled'))
            EXECUTE FUNCTION fraiseql_observers.jobs_promote_successor();
    END IF;
END
$migration$;

-- Waiting jobs that head their key (the first unfinished job of it, in ordinal order): promoted,
-- at most `max_jobs` per call, and the workers notified. Returns how many.
CREATE OR REPLACE FUNCTION fraiseql_observers.promote_stranded_jobs(max_jobs int)
RETURNS bigint
LANGUAGE sql
AS $function$
    WITH unfinished AS (
        SELECT id, status, ordering_key,
               lag(ordering_key) OVER (ORDER BY ordering_key, ordinal) AS previous_key
          FROM fraiseql_observers.jobs
         WHERE status IN ('pending', 'running', 'waiting') AND ordering_key IS NOT NULL),
    stranded AS (
        SELECT id FROM unfinished
         WHERE status = 'waiting' AND previous_key IS DISTINCT FROM ordering_key
         LIMIT max_jobs),
    promoted AS (
        UPDATE fraiseql_observers.jobs AS job
           SET status = 'pending'
          FROM stranded
         WHERE job.id = stranded.id AND job.status = 'waiting'
     RETURNING job.id),
    notified AS (
        SELECT pg_notify('fraiseql_observers_jobs', '') WHERE EXISTS (SELECT 1 FROM promoted))
    SELECT (SELECT count(*) FROM promoted) + 0 * (SELECT count(*) FROM notified)
$function$;

COMMENT ON FUNCTION fraiseql_observers.promote_stranded_jobs(int) IS
    'Promotes waiting jobs with no unfinished job of their ordering key ahead of them (the coordinator runs it).';
