-- 0003_capture_trigger.sql — a generic change-capture trigger any table can attach with one statement.
--
--   SELECT core.observer_track_table('public.orders'::regclass, 'Order');          -- id column "id"
--   SELECT core.observer_track_table('public.line_items'::regclass, 'LineItem', 'line_item_id');
--   SELECT core.observer_untrack_table('public.orders'::regclass);
--   SELECT * FROM core.observer_tracked_tables;
--
-- Every INSERT/UPDATE/DELETE on a tracked table then writes one core.tb_entity_change_log row in
-- the writer's transaction (so it commits or rolls back with the change):
--
--   object_type         the entity type given to observer_track_table
--   object_id           the row's id column, as text (new row for INSERT/UPDATE, old row for DELETE)
--   modification_type   'INSERT' | 'UPDATE' | 'DELETE'
--   object_data         after image, to_jsonb(NEW); NULL for DELETE (there is no after image — the
--                       deleted row is in object_data_before)
--   object_data_before  before image, to_jsonb(OLD); NULL for INSERT
--   updated_fields      UPDATE: the columns whose values differ (sorted); NULL for INSERT/DELETE.
--                       An UPDATE that changes nothing writes no row at all.
--   tenant_id           the row's tenant_id column, when the table has one
--   actor_type/actor_id current_setting('fraiseql.actor_type' / 'fraiseql.actor_id'), if set
--   trace_id            current_setting('fraiseql.trace_id'), if set
--   extra_metadata      {"captured_from": "<schema>.<table>"}
--
-- Writers set the actor per transaction:  SET LOCAL fraiseql.actor_type = 'user';
--                                          SET LOCAL fraiseql.actor_id = '42';
-- Not captured: TRUNCATE (no row images; a table that is truncated emits no events).
-- Writers of a tracked table need INSERT on core.tb_entity_change_log (the function runs with the
-- writer's rights on purpose: SECURITY DEFINER would let anyone who can attach it forge events).

CREATE OR REPLACE FUNCTION core.observer_capture()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
DECLARE
    entity_type    text := TG_ARGV[0];
    id_column      text := coalesce(TG_ARGV[1], 'id');
    after_image    jsonb;
    before_image   jsonb;
    changed_fields text[];
    entity_id      text;
    -- The new row, built in a variable of the change log's own row type: plpgsql converts each
    -- value to the column's actual type (an existing FraiseQL table may type tenant_id or
    -- object_id as uuid), where a plain INSERT … VALUES (text) would refuse.
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
        -- NEW and OLD have the same columns, so the keys of one image are the keys of both.
        changed_fields := ARRAY(SELECT field.key FROM jsonb_each(after_image) AS field
                                 WHERE field.value IS DISTINCT FROM before_image -> field.key
                                 ORDER BY field.key);
    ELSE
        before_image := to_jsonb(OLD);
    END IF;

    entity_id := coalesce(after_image, before_image) ->> id_column;
    IF entity_id IS NULL THEN
        -- Refuse rather than lose the event: the writer sees why.
        RAISE EXCEPTION 'fraiseql-observers: % on %.% has no value in id column "%" (entity %)',
            TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, id_column, entity_type
            USING HINT = 'Re-attach with core.observer_track_table(table, entity_type, id_column).';
    END IF;

    entry.tenant_id          := coalesce(after_image, before_image) ->> 'tenant_id';
    entry.object_type        := entity_type;
    entry.object_id          := entity_id;
    entry.modification_type  := TG_OP;
    entry.object_data        := after_image;
    entry.object_data_before := before_image;
    entry.updated_fields     := changed_fields;
    -- missing_ok: NULL when never set; '' after a SET LOCAL has ended in this session.
    entry.actor_type         := nullif(current_setting('fraiseql.actor_type', true), '');
    entry.actor_id           := nullif(current_setting('fraiseql.actor_id', true), '');
    entry.trace_id           := nullif(current_setting('fraiseql.trace_id', true), '');
    entry.extra_metadata     := jsonb_build_object('captured_from', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME));

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

COMMENT ON FUNCTION core.observer_capture() IS
    'AFTER ROW trigger writing core.tb_entity_change_log; arguments (entity_type, id_column). '
    'Attach with core.observer_track_table().';

-- Which tables are tracked, with their trigger arguments decoded (tgargs is a bytea of
-- NUL-terminated strings). Only the trigger of the table it was attached to is listed, not the
-- clones PostgreSQL makes on the partitions of a partitioned table.
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
 WHERE trigger.tgfoid = 'core.observer_capture()'::regprocedure
   AND trigger.tgname = 'observer_capture'
   AND trigger.tgparentid = 0
   AND trigger.tgnargs = 2;

COMMENT ON VIEW core.observer_tracked_tables IS
    'Tables carrying the core.observer_capture trigger, with entity type and id column.';

-- Attaches the capture trigger (named observer_capture) to a table. Idempotent: tracking again with
-- the same arguments changes nothing (and takes no lock on the table); with other arguments it
-- replaces the trigger in the same transaction, so no change is missed in between.
CREATE OR REPLACE FUNCTION core.observer_track_table(
    target      regclass,
    entity_type text,
    id_column   text DEFAULT 'id')
RETURNS void
LANGUAGE plpgsql
AS $function$
DECLARE
    table_kind "char";
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

    IF EXISTS (SELECT 1 FROM core.observer_tracked_tables AS tracked
               WHERE tracked.table_name = target
                 AND tracked.entity_type = observer_track_table.entity_type
                 AND tracked.id_column = observer_track_table.id_column
                 AND tracked.enabled) THEN
        RETURN;  -- already tracked exactly like this
    END IF;

    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = target AND tgname = 'observer_capture') THEN
        EXECUTE format('DROP TRIGGER observer_capture ON %s', target);
    END IF;
    EXECUTE format('CREATE TRIGGER observer_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION core.observer_capture(%L, %L)',
                   target, entity_type, id_column);
END
$function$;

COMMENT ON FUNCTION core.observer_track_table(regclass, text, text) IS
    'Attach (or re-attach) the change-capture trigger to a table: every INSERT/UPDATE/DELETE writes core.tb_entity_change_log.';

-- Detaches the capture trigger; returns whether the table was tracked.
CREATE OR REPLACE FUNCTION core.observer_untrack_table(target regclass)
RETURNS boolean
LANGUAGE plpgsql
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = target AND tgname = 'observer_capture'
                     AND tgfoid = 'core.observer_capture()'::regprocedure) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER observer_capture ON %s', target);
    RETURN true;
END
$function$;

COMMENT ON FUNCTION core.observer_untrack_table(regclass) IS
    'Detach the change-capture trigger from a table; true if it was attached.';
