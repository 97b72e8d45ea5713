-- 0014_replay_runs.sql — one row per `replay` run, so that its progress shows from any node and an
-- interrupted run resumes where it stopped. Owner: src/replay.rs.
--
-- A run's selection (entity type and id, time range, the last change-log position included) and
-- its observer filter are fixed when it starts; each batch enqueues its jobs and advances
-- `last_position` and the counts in one transaction, so a resumed run neither skips nor repeats a
-- change (a job's idempotency key also names the run: enqueuing one twice is a no-op).

CREATE TABLE IF NOT EXISTS fraiseql_observers.replay_runs (
    id              uuid        PRIMARY KEY,
    status          text        NOT NULL DEFAULT 'running'
                                CHECK (status IN ('running', 'interrupted', 'completed')),
    selection       jsonb       NOT NULL,
    observer        text,
    rate            integer     NOT NULL,
    total_changes   bigint      NOT NULL,
    changes_done    bigint      NOT NULL DEFAULT 0,
    changes_skipped bigint      NOT NULL DEFAULT 0,
    jobs_enqueued   bigint      NOT NULL DEFAULT 0,
    last_position   bigint      NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

COMMENT ON TABLE fraiseql_observers.replay_runs IS
    'fraiseql-observers replay: per run, its selection, the last change-log position done and counts.';
