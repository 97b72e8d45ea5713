-- 0011_backfill.sql — backfill of rows that existed before capture was attached.
--
-- 1. core.observer_change_entry(...) builds the change-log row for one change of a tracked table.
--    The capture trigger is redefined to call it, and `fraiseql-observers backfill` calls it with
--    'INSERT' and the row's current image, so a synthetic INSERT is, column for column, what the
--    trigger would have written had the row been inserted now.
-- 2. Index tb_entity_change_log_entity_hash_idx (entity_hash) over delivered rows (txid set): the
--    backfill asks, per row, whether its entity already has a change in the log. On a large
--    existing log, build it first with CREATE INDEX CONCURRENTLY (same name and definition);
--    this file skips an index that exists.
-- 3. fraiseql_observers.backfill_runs: one row per backfilled table — where the scan is, how many
--    rows it wrote — so an interrupted backfill resumes where it stopped. Owner: src/backfill.rs.

CREATE OR REPLACE FUNCTION core.observer_change_entry(
    entity_type   text,
    id_column     text,
    source_schema text,
    source_table  text,
    operation     text,
    after_image   jsonb,
    before_image  jsonb)
RETURNS core.tb_entity_change_log
LANGUAGE plpgsql
AS $function$
DECLARE
    changed_fields text[];
    entity_id      text;
    -- Built in a variable of the change log's own row type: plpgsql converts each value to the
    -- column's actual type (an existing FraiseQL table may type tenant_id or object_id as uuid),
    -- where a plain INSERT … VALUES (text) would refuse.
    entry          core.tb_entity_change_log;
BEGIN
    IF operation = 'UPDATE' THEN
        -- NEW and OLD have the same columns, so the keys of one image are the keys of both.
        changed_fields := ARRAY(SELECT field.key FROM jsonb_each(after_image) AS field
                                 WHERE field.value IS DISTINCT FROM before_image -> field.key
                                 ORDER BY field.key);
    END IF;

    entity_id := coalesce(after_image, before_image) ->> id_column;
    IF entity_id IS NULL THEN
        -- Refuse rather than lose the event: the writer sees why.
        RAISE EXCEPTION 'fraiseql-observers: % on %.% has no value in id column "%" (entity %)',
            operation, source_schema, source_table, id_column, entity_type
            USING HINT = 'Re-attach with core.observer_track_table(table, entity_type, id_column).';
    END IF;

    entry.tenant_id          := coalesce(after_image, before_image) ->> 'tenant_id';
    entry.object_type        := entity_type;
    entry.object_id          := entity_id;
    entry.modification_type  := operation;
    entry.object_data        := after_image;
    entry.object_data_before := before_image;
    entry.updated_fields     := changed_fields;
    -- missing_ok: NULL when never set; '' after a SET LOCAL has ended in this session.
    entry.actor_type         := nullif(current_setting('fraiseql.actor_type', true), '');
    entry.actor_id           := nullif(current_setting('fraiseql.actor_id', true), '');
    entry.trace_id           := nullif(current_setting('fraiseql.trace_id', true), '');
    entry.extra_metadata     := jsonb_build_object('captured_from', format('%I.%I', source_schema, source_table));
    RETURN entry;
END
$function$;

COMMENT ON FUNCTION core.observer_change_entry(text, text, text, text, text, jsonb, jsonb) IS
    'The change-log row for one change of a tracked table (used by core.observer_capture() and by backfill).';

CREATE OR REPLACE FUNCTION core.observer_capture()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
DECLARE
    entity_type    text := TG_ARGV[0];
    id_column      text := coalesce(TG_ARGV[1], 'id');
    after_image    jsonb;
    before_image   jsonb;
    entry          core.tb_entity_change_log;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' OR entity_type IS NULL THEN
        RAISE EXCEPTION 'core.observer_capture() must be attached with core.observer_track_table() (table %.%)',
            TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;

    IF TG_OP = 'INSERT' THEN
        after_image := to_jsonb(NEW);
    ELSIF TG_OP = 'UPDATE' THEN
        after_image := to_jsonb(NEW);
        before_image := to_jsonb(OLD);
        IF after_image = before_image THEN
            RETURN NULL;  -- nothing changed: no event
        END IF;
    ELSE
        before_image := to_jsonb(OLD);
    END IF;

    entry := core.observer_change_entry(entity_type, id_column, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                        TG_OP, after_image, before_image);

    -- Only these columns: id, created_at, txid, entity_hash and any FraiseQL column keep their
    -- defaults.
    INSERT INTO core.tb_entity_change_log (
        tenant_id, object_type, object_id, modification_type,
        object_data, object_data_before, updated_fields,
        actor_type, actor_id, trace_id, extra_metadata)
    VALUES (
        entry.tenant_id, entry.object_type, entry.object_id, entry.modification_type,
        entry.object_data, entry.object_data_before, entry.updated_fields,
        entry.actor_type, entry.actor_id, entry.trace_id, entry.extra_metadata);

    RETURN NULL;  -- AFTER trigger: the return value is ignored
END
$function$;

-- Created only when missing, found by a catalog check: CREATE INDEX IF NOT EXISTS would lock the
-- table before finding out there is nothing to do, and re-applying the migrations must not queue
-- FraiseQL's writers behind a long transaction. Building it waits at most 5 s for the table
-- (unless the runner chose its own lock_timeout); the next start retries.
DO $migration$
BEGIN
    IF to_regclass('core.tb_entity_change_log_entity_hash_idx') IS NULL THEN
        IF current_setting('lock_timeout') = '0' THEN
            PERFORM set_config('lock_timeout', '5s', true);  -- for the rest of this transaction
        END IF;
        CREATE INDEX tb_entity_change_log_entity_hash_idx
            ON core.tb_entity_change_log (entity_hash) WHERE txid IS NOT NULL;
    END IF;
END
$migration$;

CREATE TABLE IF NOT EXISTS fraiseql_observers.backfill_runs (
    table_name   text        PRIMARY KEY,
    entity_type  text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    last_key     text[],
    rows_scanned bigint      NOT NULL DEFAULT 0,
    rows_written bigint      NOT NULL DEFAULT 0
);

COMMENT ON TABLE fraiseql_observers.backfill_runs IS
    'fraiseql-observers backfill: per table, the last primary key scanned (text per key column) and counts.';
