-- 0017_statement_capture.sql — change capture once per statement instead of once per row.
--
-- The per-row capture trigger (0003/0011) runs PL/pgSQL for every changed row: it builds the images,
-- calls core.observer_change_entry() and executes one INSERT per row, and the change log's BEFORE
-- INSERT trigger runs PL/pgSQL again for that row. Here:
--
-- 1. core.observer_capture_statement(): AFTER … FOR EACH STATEMENT with transition tables, one
--    INSERT … SELECT per statement writing the same change-log rows the per-row trigger writes
--    (every column, every value; the tests compare both). The change log's BEFORE INSERT
--    trigger still stamps txid and entity_hash per row (a WHEN clause letting it skip rows that
--    already carry both was measured: it saved 10 % of a statement's capture and cost the per-row
--    trigger 30 %, which prepares the clause again for every row it inserts).
-- 2. core.observer_track_table() attaches statement triggers (observer_capture_insert,
--    observer_capture_update, observer_capture_delete) to plain tables when the change log's
--    columns have their standard types. It keeps the per-row trigger for partitioned tables (a
--    statement trigger on the parent does not fire for a write addressed to a partition; the row
--    trigger is cloned to every partition, present and future) and for change logs whose columns
--    have other types (an existing FraiseQL log with a uuid tenant_id: only the row trigger's
--    PL/pgSQL assignment converts text to those types).
--
-- Tables tracked before this migration keep their per-row trigger until observer_track_table() is
-- called for them again (which switches them in one transaction: no change is missed). The
-- migration does not do it itself: it would lock every tracked table.

-- The error a row without an id gets (the per-row trigger raises the same): called only for such a
-- row (coalesce evaluates it lazily). VOLATILE, so the planner never folds it into a constant.
CREATE OR REPLACE FUNCTION core.observer_missing_id(
    operation     text,
    source_schema text,
    source_table  text,
    id_column     text,
    entity_type   text)
RETURNS text
LANGUAGE plpgsql
VOLATILE
AS $function$
BEGIN
    RAISE EXCEPTION 'fraiseql-observers: % on %.% has no value in id column "%" (entity %)',
        operation, source_schema, source_table, id_column, entity_type
        USING HINT = 'Re-attach with core.observer_track_table(table, entity_type, id_column).';
END
$function$;

COMMENT ON FUNCTION core.observer_missing_id(text, text, text, text, text) IS
    'Raises the capture error for a row whose id column is NULL (used by core.observer_capture_statement()).';

-- Writes the change-log rows of one statement. Transition tables: observer_new (INSERT, UPDATE)
-- and observer_old (UPDATE, DELETE). An UPDATE's old and new rows are paired by position:
-- PostgreSQL appends a row's old and new images to the two transition tables together, so the
-- n-th old row is the n-th new row's before image (also when the update changes the id column;
-- the tests check both). An INSERT's and a DELETE's rows are written in the order the statement
-- changed them; an UPDATE's in the order of the pairing (each entity appears once per statement,
-- so no entity's changes are reordered).
--
-- jit off: the join's row estimate (the planner cannot know the pairing is one to one) would
-- otherwise make every large statement pay for JIT compilation. work_mem: the pairing of a
-- 100,000-row UPDATE fits in memory instead of spilling to disk.
CREATE OR REPLACE FUNCTION core.observer_capture_statement()
RETURNS trigger
LANGUAGE plpgsql
SET jit = off
SET work_mem = '64MB'
AS $function$
DECLARE
    entity_type text := TG_ARGV[0];
    id_column   text := coalesce(TG_ARGV[1], 'id');
    -- Per transaction, not per row: the same for every row of the statement.
    actor_type  text := nullif(current_setting('fraiseql.actor_type', true), '');
    actor_id    text := nullif(current_setting('fraiseql.actor_id', true), '');
    trace_id    text := nullif(current_setting('fraiseql.trace_id', true), '');
    metadata    jsonb := jsonb_build_object('captured_from', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME));
BEGIN
    IF TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER' OR entity_type IS NULL THEN
        RAISE EXCEPTION 'core.observer_capture_statement() must be attached with core.observer_track_table() (table %.%)',
            TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;

    IF TG_OP = 'INSERT' THEN
        INSERT INTO core.tb_entity_change_log (
            tenant_id, object_type, object_id, modification_type,
            object_data, object_data_before, updated_fields,
            actor_type, actor_id, trace_id, extra_metadata)
        SELECT image ->> 'tenant_id', entity_type, entity_id, 'INSERT',
               image, NULL, NULL,
               actor_type, actor_id, trace_id, metadata
          FROM (SELECT image,
                       coalesce(image ->> id_column,
                                core.observer_missing_id(TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                                         id_column, entity_type)) AS entity_id
                  FROM (SELECT to_jsonb(inserted) AS image FROM observer_new AS inserted) AS images
               ) AS changes;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO core.tb_entity_change_log (
            tenant_id, object_type, object_id, modification_type,
            object_data, object_data_before, updated_fields,
            actor_type, actor_id, trace_id, extra_metadata)
        SELECT after_image ->> 'tenant_id', entity_type, entity_id, 'UPDATE',
               after_image, before_image,
               -- Both images have the same columns, so the keys of one are the keys of both.
               ARRAY(SELECT field.key FROM jsonb_each(after_image) AS field
                      WHERE field.value IS DISTINCT FROM before_image -> field.key
                      ORDER BY field.key),
               actor_type, actor_id, trace_id, metadata
          FROM (SELECT after_rows.ordinal, after_image, before_image,
                       coalesce(after_image ->> id_column,
                                core.observer_missing_id(TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                                         id_column, entity_type)) AS entity_id
                  FROM (SELECT row_number() OVER () AS ordinal, to_jsonb(updated) AS after_image
                          FROM observer_new AS updated) AS after_rows
                  JOIN (SELECT row_number() OVER () AS ordinal, to_jsonb(previous) AS before_image
                          FROM observer_old AS previous) AS before_rows
                    ON before_rows.ordinal = after_rows.ordinal
                 WHERE after_image <> before_image  -- nothing changed: no event
               ) AS changes;
    ELSE
        INSERT INTO core.tb_entity_change_log (
            tenant_id, object_type, object_id, modification_type,
            object_data, object_data_before, updated_fields,
            actor_type, actor_id, trace_id, extra_metadata)
        SELECT image ->> 'tenant_id', entity_type, entity_id, 'DELETE',
               NULL, image, NULL,
               actor_type, actor_id, trace_id, metadata
          FROM (SELECT image,
                       coalesce(image ->> id_column,
                                core.observer_missing_id(TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                                         id_column, entity_type)) AS entity_id
                  FROM (SELECT to_jsonb(deleted) AS image FROM observer_old AS deleted) AS images
               ) AS changes;
    END IF;
    RETURN NULL;  -- AFTER trigger: the return value is ignored
END
$function$;

COMMENT ON FUNCTION core.observer_capture_statement() IS
    'AFTER STATEMENT trigger (transition tables) writing core.tb_entity_change_log; arguments '
    '(entity_type, id_column). Attach with core.observer_track_table().';

-- Whether the change log's columns have the types the statement trigger writes (text-like for the
-- text values, jsonb, text[]): FraiseQL's standard table and the one 0001 creates do.
CREATE OR REPLACE FUNCTION core.observer_change_log_is_standard()
RETURNS boolean
LANGUAGE sql
STABLE
AS $function$
    SELECT count(*) = 11
      FROM pg_attribute AS attribute
     WHERE attribute.attrelid = 'core.tb_entity_change_log'::regclass
       AND NOT attribute.attisdropped
       AND CASE attribute.attname
               WHEN 'tenant_id' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'object_type' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'object_id' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'modification_type' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'actor_type' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'actor_id' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'trace_id' THEN attribute.atttypid IN ('text'::regtype, 'varchar'::regtype)
               WHEN 'object_data' THEN attribute.atttypid = 'jsonb'::regtype
               WHEN 'object_data_before' THEN attribute.atttypid = 'jsonb'::regtype
               WHEN 'extra_metadata' THEN attribute.atttypid = 'jsonb'::regtype
               WHEN 'updated_fields' THEN attribute.atttypid = 'text[]'::regtype
               ELSE false
           END
$function$;

COMMENT ON FUNCTION core.observer_change_log_is_standard() IS
    'True when core.tb_entity_change_log has the standard column types the statement capture trigger writes.';

-- Tracked tables, whichever triggers capture them (the same columns as before: 0003 may be applied
-- again by hand, and a view cannot lose columns). Only the trigger of the table it was attached to
-- is listed, not the clones PostgreSQL makes on the partitions of a partitioned table.
CREATE OR REPLACE VIEW core.observer_tracked_tables AS
SELECT trigger.tgrelid::regclass            AS table_name,
       convert_from(substring(trigger.tgargs FROM 1 FOR first_end - 1), getdatabaseencoding())
                                            AS entity_type,
       convert_from(substring(rest FROM 1 FOR position('\x00'::bytea IN rest) - 1), getdatabaseencoding())
                                            AS id_column,
       trigger.tgenabled <> 'D'             AS enabled
  FROM pg_trigger AS trigger
 CROSS JOIN LATERAL (SELECT position('\x00'::bytea IN trigger.tgargs) AS first_end) AS first_argument
 CROSS JOIN LATERAL (SELECT substring(trigger.tgargs FROM first_end + 1) AS rest) AS second_argument
 WHERE ((trigger.tgfoid = 'core.observer_capture()'::regprocedure AND trigger.tgname = 'observer_capture')
        OR (trigger.tgfoid = 'core.observer_capture_statement()'::regprocedure
            AND trigger.tgname = 'observer_capture_insert'))
   AND trigger.tgparentid = 0
   AND trigger.tgnargs = 2;

COMMENT ON VIEW core.observer_tracked_tables IS
    'Tables carrying the capture triggers, with entity type and id column (core.observer_capture_of() says which kind).';

-- How a table is captured: 'statement' (all three statement triggers enabled), 'row' (the per-row
-- trigger), 'partial' (some of the statement triggers missing or disabled) or NULL (untracked).
CREATE OR REPLACE FUNCTION core.observer_capture_of(target regclass)
RETURNS text
LANGUAGE sql
STABLE
AS $function$
    SELECT CASE
               WHEN bool_or(tgname = 'observer_capture') THEN 'row'
               WHEN count(*) FILTER (WHERE tgenabled <> 'D') = 3 THEN 'statement'
               WHEN count(*) > 0 THEN 'partial'
           END
      FROM pg_trigger
     WHERE tgrelid = target AND tgparentid = 0
       AND ((tgname = 'observer_capture' AND tgfoid = 'core.observer_capture()'::regprocedure)
            OR (tgname IN ('observer_capture_insert', 'observer_capture_update', 'observer_capture_delete')
                AND tgfoid = 'core.observer_capture_statement()'::regprocedure))
$function$;

COMMENT ON FUNCTION core.observer_capture_of(regclass) IS
    'How a table is captured: statement, row, partial (statement triggers missing or disabled) or NULL.';

-- Drops whichever capture triggers a table has; returns whether it had any.
CREATE OR REPLACE FUNCTION core.observer_drop_capture(target regclass)
RETURNS boolean
LANGUAGE plpgsql
AS $function$
DECLARE
    name    text;
    dropped boolean := false;
BEGIN
    FOR name IN
        SELECT tgname FROM pg_trigger
         WHERE tgrelid = target AND tgparentid = 0
           AND ((tgname = 'observer_capture' AND tgfoid = 'core.observer_capture()'::regprocedure)
                OR (tgname IN ('observer_capture_insert', 'observer_capture_update', 'observer_capture_delete')
                    AND tgfoid = 'core.observer_capture_statement()'::regprocedure))
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', name, target);
        dropped := true;
    END LOOP;
    RETURN dropped;
END
$function$;

COMMENT ON FUNCTION core.observer_drop_capture(regclass) IS
    'Drops the capture triggers (statement or row) of a table; true if it had any.';

-- Attaches capture to a table: statement triggers where they see every change (see the top of this
-- file), the per-row trigger otherwise. Idempotent: tracking again with the same arguments, when
-- the table already has the capture it would get, changes nothing (and takes no lock on the
-- table); otherwise the triggers are replaced in the same transaction, so no change is missed.
CREATE OR REPLACE FUNCTION core.observer_track_table(
    target      regclass,
    entity_type text,
    id_column   text DEFAULT 'id')
RETURNS void
LANGUAGE plpgsql
AS $function$
DECLARE
    table_kind     "char";
    wanted_capture text;
BEGIN
    IF target IS NULL OR entity_type IS NULL OR btrim(entity_type) = '' OR id_column IS NULL THEN
        RAISE EXCEPTION 'observer_track_table: target, a non-empty entity_type and id_column are required';
    END IF;
    IF target = 'core.tb_entity_change_log'::regclass THEN
        RAISE EXCEPTION 'observer_track_table: the change log itself cannot be tracked';
    END IF;

    SELECT relkind INTO table_kind FROM pg_class WHERE oid = target;
    IF table_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'observer_track_table: % is not a table (relkind %)', target, table_kind;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = target AND attname = id_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'observer_track_table: % has no column "%"', target, id_column
            USING HINT = 'Pass the name of the column that identifies the entity as id_column.';
    END IF;

    wanted_capture := CASE WHEN table_kind = 'r' AND core.observer_change_log_is_standard()
                    THEN 'statement' ELSE 'row' END;

    IF EXISTS (SELECT 1 FROM core.observer_tracked_tables AS tracked
               WHERE tracked.table_name = target
                 AND tracked.entity_type = observer_track_table.entity_type
                 AND tracked.id_column = observer_track_table.id_column
                 AND tracked.enabled)
       AND core.observer_capture_of(target) = wanted_capture THEN
        RETURN;  -- already tracked exactly like this
    END IF;

    PERFORM core.observer_drop_capture(target);
    IF wanted_capture = 'statement' THEN
        -- One trigger per event: a trigger with transition tables may have only one.
        EXECUTE format('CREATE TRIGGER observer_capture_insert AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS observer_new '
                       'FOR EACH STATEMENT EXECUTE FUNCTION core.observer_capture_statement(%L, %L)',
                       target, entity_type, id_column);
        EXECUTE format('CREATE TRIGGER observer_capture_update AFTER UPDATE ON %s '
                       'REFERENCING OLD TABLE AS observer_old NEW TABLE AS observer_new '
                       'FOR EACH STATEMENT EXECUTE FUNCTION core.observer_capture_statement(%L, %L)',
                       target, entity_type, id_column);
        EXECUTE format('CREATE TRIGGER observer_capture_delete AFTER DELETE ON %s '
                       'REFERENCING OLD TABLE AS observer_old '
                       'FOR EACH STATEMENT EXECUTE FUNCTION core.observer_capture_statement(%L, %L)',
                       target, entity_type, id_column);
    ELSE
        EXECUTE format('CREATE TRIGGER observer_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION core.observer_capture(%L, %L)',
                       target, entity_type, id_column);
    END IF;
END
$function$;

COMMENT ON FUNCTION core.observer_track_table(regclass, text, text) IS
    'Attach (or re-attach) change capture to a table: every INSERT/UPDATE/DELETE writes core.tb_entity_change_log.';

CREATE OR REPLACE FUNCTION core.observer_untrack_table(target regclass)
RETURNS boolean
LANGUAGE plpgsql
AS $function$
BEGIN
    RETURN core.observer_drop_capture(target);
END
$function$;

COMMENT ON FUNCTION core.observer_untrack_table(regclass) IS
    'Detach change capture from a table; true if it was attached.';
