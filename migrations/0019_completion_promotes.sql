-- 0019_completion_promotes.sql — a completing statement promotes the next waiting job of its key
-- itself; the row trigger stays for the other ways a job finishes.
--
-- Before: jobs_promote_successor (0018) fired for every finished ordered job, completions
-- included: a PL/pgSQL call and a second UPDATE per completed job, about a tenth of the server's
-- work when jobs are claimed and completed in batches. The completing statements
-- (src/jobs: complete-and-claim and complete) now find the job each completion makes next in line
-- and promote it (or claim it at once) in the same statement, with the same rule: the first
-- unfinished job of the key after the completed one, promoted only if it is waiting. So the
-- trigger fires only for a job that is dead-lettered ('failed') or cancelled.
--
-- During a rolling upgrade a node still running the previous release completes without promoting:
-- the successor is left waiting with nothing ahead of it, and the coordinator's sweep
-- (promote_stranded_jobs, every rescue interval) promotes it within about a second. Order is
-- never at stake: a claim refuses a job while an earlier job of its key is unfinished.

DO $migration$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = 'fraiseql_observers.jobs'::regclass
                 AND tgname = 'jobs_promote_successor') THEN
        DROP TRIGGER jobs_promote_successor ON fraiseql_observers.jobs;
    END IF;
    CREATE TRIGGER jobs_promote_successor
        AFTER UPDATE OF status ON fraiseql_observers.jobs
        FOR EACH ROW
        WHEN (OLD.ordering_key IS NOT NULL
              AND OLD.status IN ('pending', 'running', 'waiting')
              AND NEW.status IN ('failed', 'cancelled'))
        EXECUTE FUNCTION fraiseql_observers.jobs_promote_successor();
END
$migration$;

COMMENT ON FUNCTION fraiseql_observers.jobs_promote_successor() IS
    'AFTER UPDATE row trigger on jobs: a dead-lettered or cancelled ordered job promotes the next waiting job of its key (completions promote in their own statement).';
