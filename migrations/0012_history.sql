-- 0012_history.sql — the audit trail: one row per processed event (what matched, what each action
-- did, where it ran) and one more row per later outcome of a queued job (its success, its dead
-- letter). Owned by src/history.rs.
--
-- Natively partitioned by day on `processed_at`: partitions are created ahead
-- (`ensure_history_partitions`) and dropped whole for retention (`drop_history_partitions`), never
-- emptied with a bulk DELETE. Both run in the coordinator's fenced transaction. The default
-- partition only catches rows written while no day partition existed (the coordinator has not run
-- for longer than the days created ahead); it is never dropped by retention.
--
-- The event's data and changes are not copied: `change_log_id` refers to the change-log row
-- (`pk_entity_change_log`), which holds them. Copying would double the size of every event in the
-- WAL and on disk; the change log is the source, and keeps them as long as its own retention says.

CREATE SEQUENCE IF NOT EXISTS fraiseql_observers.history_id_seq;

CREATE TABLE IF NOT EXISTS fraiseql_observers.history (
    history_id          bigint      NOT NULL DEFAULT nextval('fraiseql_observers.history_id_seq'),
    processed_at        timestamptz NOT NULL DEFAULT now(),
    -- 'event': the event as its page ran it; 'job': a later outcome of one of its queued actions.
    record_kind         text        NOT NULL CHECK (record_kind IN ('event', 'job')),
    event_id            uuid        NOT NULL,
    entity_type         text        NOT NULL,
    entity_id           text        NOT NULL,
    event_kind          text        NOT NULL,
    change_log_id       bigint,
    tenant_id           text,
    actor_type          text,
    actor_id            text,
    event_at            timestamptz,
    matched_observers   text[]      NOT NULL DEFAULT '{}',
    -- Observers of the entity and kind whose condition was false.
    unmatched_observers text[]      NOT NULL DEFAULT '{}',
    -- The distinct outcomes of the row's actions, for searching by outcome.
    outcomes            text[]      NOT NULL DEFAULT '{}',
    -- [{observer, action_index, type, target, outcome, attempts, latency_ms, error_code,
    --   error_message, job_id}]
    actions             jsonb       NOT NULL DEFAULT '[]',
    -- The actions' error messages, one per line: the full-text search reads these.
    errors              text,
    node_id             text,
    partition           int,
    epoch               bigint,
    processing_ms       double precision
) PARTITION BY RANGE (processed_at);

ALTER SEQUENCE fraiseql_observers.history_id_seq OWNED BY fraiseql_observers.history.history_id;

CREATE TABLE IF NOT EXISTS fraiseql_observers.history_default
    PARTITION OF fraiseql_observers.history DEFAULT;

-- Searches: newest first (history_id), by entity, by event, by observer, by outcome, by text.
CREATE INDEX IF NOT EXISTS history_id_idx ON fraiseql_observers.history (history_id);
CREATE INDEX IF NOT EXISTS history_entity_idx
    ON fraiseql_observers.history (entity_type, entity_id, history_id);
CREATE INDEX IF NOT EXISTS history_event_idx ON fraiseql_observers.history (event_id);
CREATE INDEX IF NOT EXISTS history_observers_idx
    ON fraiseql_observers.history USING gin (matched_observers);
CREATE INDEX IF NOT EXISTS history_outcomes_idx
    ON fraiseql_observers.history USING gin (outcomes);
CREATE INDEX IF NOT EXISTS history_errors_idx
    ON fraiseql_observers.history USING gin (to_tsvector('simple', coalesce(errors, '')))
    WHERE errors IS NOT NULL;

-- Creates the day partitions from yesterday to `days_ahead` days after today (UTC) that do not
-- exist yet; how many it created. A day whose rows already sit in the default partition is
-- skipped (they stay there).
CREATE OR REPLACE FUNCTION fraiseql_observers.ensure_history_partitions(days_ahead int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    today   date := (now() AT TIME ZONE 'UTC')::date;
    day     date;
    name    text;
    created int := 0;
BEGIN
    FOR offset_days IN -1 .. greatest(days_ahead, 0) LOOP
        day := today + offset_days;
        name := 'history_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass('fraiseql_observers.' || name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE fraiseql_observers.%I PARTITION OF fraiseql_observers.history
                         FOR VALUES FROM (%L) TO (%L)',
                    name,
                    (day::timestamp AT TIME ZONE 'UTC'),
                    ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                -- Rows of that day are in the default partition already.
                NULL;
            END;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;

-- Drops the day partitions whose whole day ended more than `older_than` ago; how many.
CREATE OR REPLACE FUNCTION fraiseql_observers.drop_history_partitions(older_than interval)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    child   record;
    dropped int := 0;
BEGIN
    FOR child IN
        SELECT c.relname
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'fraiseql_observers.history'::regclass
           AND c.relname ~ '^history_p[0-9]{8}$'
         ORDER BY c.relname
    LOOP
        IF ((to_date(substr(child.relname, 10), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC')
               <= now() - older_than THEN
            EXECUTE format('DROP TABLE fraiseql_observers.%I', child.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END;
$$;

SELECT fraiseql_observers.ensure_history_partitions(7);

COMMENT ON TABLE fraiseql_observers.history IS
    'Audit trail: one row per processed event and per later job outcome, partitioned by day (src/history.rs).';
