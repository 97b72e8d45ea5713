-- 0005_job_queue.sql — the durable job queue: actions that run outside the change-log page.
--
-- One row per (event, observer, action) — the idempotency key is unique, so a replayed event
-- cannot enqueue work twice. A job is claimed with FOR UPDATE SKIP LOCKED (priority first, then
-- run_at), held under a visibility timeout that its worker keeps extending (heartbeat); a job whose
-- worker died is pending again once locked_until passes. A failed attempt reschedules the same row
-- (run_at, attempts, error history); the last one moves it to the dead-letter queue in the same
-- transaction. Completed and cancelled jobs are pruned after a retention period; failed jobs stay
-- until their dead letters are dealt with.

CREATE TABLE IF NOT EXISTS fraiseql_observers.jobs (
    id                 uuid        PRIMARY KEY,
    queue              text        NOT NULL CHECK (queue <> ''),
    priority           smallint    NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 10),
    status             text        NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    run_at             timestamptz NOT NULL DEFAULT now(),
    attempts           int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts       int         NOT NULL CHECK (max_attempts >= 1),
    backoff_initial_ms bigint      NOT NULL CHECK (backoff_initial_ms >= 0),
    backoff_max_ms     bigint      NOT NULL CHECK (backoff_max_ms >= backoff_initial_ms),
    idempotency_key    text        NOT NULL UNIQUE,   -- <event id>:<observer>:<action index>
    event_id           uuid        NOT NULL,
    observer           text        NOT NULL,
    action_index       int         NOT NULL CHECK (action_index >= 0),
    action_type        text        NOT NULL,
    event              jsonb       NOT NULL,           -- the EntityEvent
    errors             jsonb       NOT NULL DEFAULT '[]'::jsonb,  -- [{attempt, code, message, at}]
    locked_by          text,
    locked_until       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    CONSTRAINT jobs_running_is_locked CHECK (status <> 'running' OR (locked_by IS NOT NULL AND locked_until IS NOT NULL))
);

-- Claim order: the next ready jobs of a queue, most important first.
CREATE INDEX IF NOT EXISTS jobs_ready_idx
    ON fraiseql_observers.jobs (queue, priority DESC, run_at) WHERE status = 'pending';
-- Rescue: running jobs whose visibility timeout passed.
CREATE INDEX IF NOT EXISTS jobs_running_idx
    ON fraiseql_observers.jobs (locked_until) WHERE status = 'running';
-- Retention and statistics.
CREATE INDEX IF NOT EXISTS jobs_finished_idx
    ON fraiseql_observers.jobs (finished_at) WHERE status IN ('completed', 'cancelled');

-- Wake workers: one notification per enqueuing statement, payload = nothing (workers re-claim).
CREATE OR REPLACE FUNCTION fraiseql_observers.jobs_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_notify('fraiseql_observers_jobs', '');
    RETURN NULL;
END
$function$;

DO $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'fraiseql_observers.jobs'::regclass AND tgname = 'jobs_notify') THEN
        CREATE TRIGGER jobs_notify
            AFTER INSERT ON fraiseql_observers.jobs
            FOR EACH STATEMENT EXECUTE FUNCTION fraiseql_observers.jobs_notify();
    END IF;
END
$migration$;

COMMENT ON TABLE fraiseql_observers.jobs IS
    'Durable job queue (src/jobs): one row per (event, observer, action); rescheduled in place on failure.';
