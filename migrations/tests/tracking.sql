-- Tracking: core.observer_track_table / observer_capture write the right change-log rows.
\ir lib.sql

CREATE TABLE public.orders (
    id        int PRIMARY KEY,
    status    text,
    total     numeric,
    tenant_id text,
    tags      json,   -- json and point have no equality operator: the no-op check must cope
    location  point
);
CREATE TABLE public.notes (note_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), body text);

SELECT core.observer_track_table('public.orders'::regclass, 'Order');
SELECT core.observer_track_table('public.notes'::regclass, 'Note', 'note_id');

SELECT pg_temp.expect_eq(
    (SELECT string_agg(format('%s:%s:%s', table_name, entity_type, id_column), ',' ORDER BY entity_type)
       FROM core.observer_tracked_tables),
    'notes:Note:note_id,orders:Order:id', 'observer_tracked_tables lists both tables');
-- A plain table gets three AFTER … FOR EACH STATEMENT triggers with transition tables:
-- tgtype = INSERT(4), UPDATE(16), DELETE(8), no ROW(1) bit.
SELECT pg_temp.expect_eq((SELECT string_agg(tgname || ':' || tgtype, ',' ORDER BY tgname) FROM pg_trigger
                           WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal),
                         'observer_capture_delete:8,observer_capture_insert:4,observer_capture_update:16',
                         'a plain table is captured by AFTER INSERT/UPDATE/DELETE FOR EACH STATEMENT triggers');
SELECT pg_temp.expect_eq((SELECT string_agg(core.observer_capture_of(table_name), ',') FROM core.observer_tracked_tables),
                         'statement,statement', 'observer_capture_of says how each table is captured');

-- INSERT, with actor and trace set for the transaction ---------------------------------------
BEGIN;
SET LOCAL fraiseql.actor_type = 'user';
SET LOCAL fraiseql.actor_id = '42';
SET LOCAL fraiseql.trace_id = 'trace-abc';
INSERT INTO public.orders VALUES (1, 'new', 10.50, 'tenant-a', '{"a": 1}', '(1,2)');
SELECT pg_temp.expect_eq((pg_temp.last_change()).txid::text, pg_current_xact_id()::text,
                         'txid is the writer''s transaction');
COMMIT;

SELECT pg_temp.expect_eq(pg_temp.change_count()::text, '1', 'one row per insert');
SELECT pg_temp.expect_eq(c.object_type, 'Order', 'object_type'),
       pg_temp.expect_eq(c.object_id, '1', 'object_id is the id column as text'),
       pg_temp.expect_eq(c.modification_type, 'INSERT', 'modification_type'),
       pg_temp.expect_eq(c.object_data::text,
           '{"id": 1, "tags": {"a": 1}, "total": 10.50, "status": "new", "location": "(1,2)", "tenant_id": "tenant-a"}',
           'object_data is the after image'),
       pg_temp.expect_eq(c.object_data_before::text, NULL, 'no before image on INSERT'),
       pg_temp.expect_eq(c.updated_fields::text, NULL, 'no updated_fields on INSERT'),
       pg_temp.expect_eq(c.tenant_id, 'tenant-a', 'tenant_id from the row'),
       pg_temp.expect_eq(c.actor_type, 'user', 'actor_type from fraiseql.actor_type'),
       pg_temp.expect_eq(c.actor_id, '42', 'actor_id from fraiseql.actor_id'),
       pg_temp.expect_eq(c.trace_id, 'trace-abc', 'trace_id from fraiseql.trace_id'),
       pg_temp.expect_eq(c.extra_metadata::text, '{"captured_from": "public.orders"}', 'extra_metadata'),
       pg_temp.expect_eq(c.entity_hash::text, core.observer_entity_hash('Order', '1')::text, 'entity_hash')
  FROM pg_temp.last_change() AS c;

-- UPDATE of one field ------------------------------------------------------------------------
UPDATE public.orders SET status = 'paid' WHERE id = 1;
SELECT pg_temp.expect_eq(pg_temp.change_count()::text, '2', 'one row per update');
SELECT pg_temp.expect_eq(c.modification_type, 'UPDATE', 'UPDATE kind'),
       pg_temp.expect_eq(c.updated_fields::text, '{status}', 'updated_fields = changed columns'),
       pg_temp.expect_eq(c.object_data ->> 'status', 'paid', 'after image'),
       pg_temp.expect_eq(c.object_data_before ->> 'status', 'new', 'before image'),
       pg_temp.expect_eq(c.actor_type, NULL, 'actor not set outside the SET LOCAL transaction'),
       pg_temp.expect_eq(c.trace_id, NULL, 'trace not set outside the SET LOCAL transaction')
  FROM pg_temp.last_change() AS c;

-- UPDATE of several fields: sorted names ----------------------------------------------------
UPDATE public.orders SET total = 12, tags = '{"a": 2}', status = 'shipped' WHERE id = 1;
SELECT pg_temp.expect_eq((pg_temp.last_change()).updated_fields::text, '{status,tags,total}',
                         'updated_fields sorted, all changed columns');

-- No-op UPDATEs write nothing (including json/point columns rewritten to the same value) ------
UPDATE public.orders SET status = 'shipped' WHERE id = 1;
UPDATE public.orders SET tags = tags, location = location, total = 12.0 WHERE id = 1;
UPDATE public.orders SET status = status;
SELECT pg_temp.expect_eq(pg_temp.change_count()::text, '3', 'no row for a no-op update');

-- DELETE ----------------------------------------------------------------------------------------
DELETE FROM public.orders WHERE id = 1;
SELECT pg_temp.expect_eq(c.modification_type, 'DELETE', 'DELETE kind'),
       pg_temp.expect_eq(c.object_id, '1', 'object_id of the deleted row'),
       pg_temp.expect_eq(c.object_data::text, NULL, 'no after image on DELETE'),
       pg_temp.expect_eq(c.object_data_before ->> 'status', 'shipped', 'before image = deleted row'),
       pg_temp.expect_eq(c.updated_fields::text, NULL, 'no updated_fields on DELETE'),
       pg_temp.expect_eq(c.tenant_id, 'tenant-a', 'tenant_id taken from the old row')
  FROM pg_temp.last_change() AS c;

-- Other id column, no tenant_id column --------------------------------------------------------
INSERT INTO public.notes (note_id, body) VALUES ('7f9c0d3e-0000-4000-8000-000000000001', 'hello');
SELECT pg_temp.expect_eq(c.object_type || '/' || c.object_id, 'Note/7f9c0d3e-0000-4000-8000-000000000001',
                         'custom id column'),
       pg_temp.expect_eq(c.tenant_id, NULL, 'no tenant_id column -> NULL')
  FROM pg_temp.last_change() AS c;

-- Multi-row statement: one row each, in statement order ---------------------------------------
INSERT INTO public.orders (id, status) SELECT g, 'bulk' FROM generate_series(10, 14) AS g;
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',' ORDER BY pk_entity_change_log) FROM core.tb_entity_change_log
      WHERE object_data ->> 'status' = 'bulk'),
    '10,11,12,13,14', 'multi-row insert: one row each, pk in statement order');
SELECT pg_temp.expect_eq((SELECT count(DISTINCT txid)::text FROM core.tb_entity_change_log
                           WHERE object_data ->> 'status' = 'bulk'), '1', 'one statement, one txid');

-- Rolled back work leaves nothing: a whole transaction, and a savepoint ------------------------
BEGIN;
INSERT INTO public.orders (id, status) VALUES (20, 'rolled back');
ROLLBACK;
BEGIN;
INSERT INTO public.orders (id, status) VALUES (21, 'kept');
SAVEPOINT before_mistake;
INSERT INTO public.orders (id, status) VALUES (22, 'mistake');
ROLLBACK TO SAVEPOINT before_mistake;
UPDATE public.orders SET status = 'kept too' WHERE id = 21;
COMMIT;
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id || ':' || modification_type, ',' ORDER BY pk_entity_change_log)
       FROM core.tb_entity_change_log WHERE object_id IN ('20', '21', '22')),
    '21:INSERT,21:UPDATE', 'rolled-back transaction and savepoint write no rows');

-- Re-tracking ---------------------------------------------------------------------------------
CREATE TEMP TABLE trigger_before AS
    SELECT string_agg(oid::text, ',' ORDER BY tgname) AS oids FROM pg_trigger
     WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal;
SELECT core.observer_track_table('public.orders'::regclass, 'Order');
SELECT pg_temp.expect_eq((SELECT string_agg(oid::text, ',' ORDER BY tgname) FROM pg_trigger
                           WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal),
                         (SELECT oids FROM trigger_before),
                         're-tracking with the same arguments leaves the triggers alone');
INSERT INTO public.orders (id, status) VALUES (30, 'once');
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM core.tb_entity_change_log WHERE object_id = '30'),
                         '1', 're-tracked table still writes exactly one row per change');

SELECT core.observer_track_table('public.orders'::regclass, 'PurchaseOrder');
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM pg_trigger
                           WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal),
                         '3', 're-tracking with another entity type replaces the triggers');
UPDATE public.orders SET status = 'renamed' WHERE id = 30;
SELECT pg_temp.expect_eq((pg_temp.last_change()).object_type, 'PurchaseOrder',
                         'the replacement trigger uses the new entity type');
SELECT core.observer_track_table('public.orders'::regclass, 'Order');

-- Untracking ----------------------------------------------------------------------------------
SELECT pg_temp.expect_eq(core.observer_untrack_table('public.notes'::regclass)::text, 'true',
                         'untrack returns true for a tracked table');
SELECT pg_temp.expect_eq(core.observer_untrack_table('public.notes'::regclass)::text, 'false',
                         'untrack returns false the second time');
CREATE TEMP TABLE count_before AS SELECT pg_temp.change_count() AS n;
INSERT INTO public.notes (body) VALUES ('not captured');
SELECT pg_temp.expect_eq(pg_temp.change_count()::text, (SELECT n::text FROM count_before),
                         'an untracked table writes nothing');

-- Refusals ------------------------------------------------------------------------------------
SELECT pg_temp.expect_error($$SELECT core.observer_track_table('public.orders'::regclass, 'Order', 'order_id')$$,
                            'has no column "order_id"', 'unknown id column');
SELECT pg_temp.expect_error($$SELECT core.observer_track_table('core.tb_entity_change_log'::regclass, 'Log')$$,
                            'change log itself', 'tracking the change log');
CREATE VIEW public.order_view AS SELECT * FROM public.orders;
SELECT pg_temp.expect_error($$SELECT core.observer_track_table('public.order_view'::regclass, 'Order')$$,
                            'is not a table', 'tracking a view');
SELECT pg_temp.expect_error($$SELECT core.observer_track_table('public.orders'::regclass, ' ')$$,
                            'non-empty entity_type', 'blank entity type');
CREATE TABLE public.loose (id int, label text);  -- id may be NULL
SELECT core.observer_track_table('public.loose'::regclass, 'Loose');
SELECT pg_temp.expect_error($$INSERT INTO public.loose VALUES (NULL, 'x')$$,
                            'INSERT on public.loose has no value in id column "id"',
                            'a row without an id is refused, not lost');
INSERT INTO public.loose VALUES (1, 'x'), (2, 'y');
SELECT pg_temp.expect_error($$UPDATE public.loose SET id = NULL WHERE id = 2$$,
                            'UPDATE on public.loose has no value in id column "id"',
                            'an update leaving no id is refused');
ALTER TABLE public.loose DISABLE TRIGGER observer_capture_insert;
INSERT INTO public.loose VALUES (NULL, 'uncaptured');
ALTER TABLE public.loose ENABLE TRIGGER observer_capture_insert;
SELECT pg_temp.expect_error($$DELETE FROM public.loose WHERE id IS NULL$$,
                            'DELETE on public.loose has no value in id column "id"',
                            'a delete of a row without an id is refused');

-- Partitioned table: track the parent, changes through any partition are captured once --------
CREATE TABLE public.readings (id bigint, region text, value int, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE public.readings_eu PARTITION OF public.readings FOR VALUES IN ('eu');
SELECT core.observer_track_table('public.readings'::regclass, 'Reading');
CREATE TABLE public.readings_us PARTITION OF public.readings FOR VALUES IN ('us');  -- after tracking
INSERT INTO public.readings VALUES (1, 'eu', 5), (2, 'us', 6);
UPDATE public.readings_us SET value = 7 WHERE id = 2;
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id || ':' || modification_type, ',' ORDER BY pk_entity_change_log)
       FROM core.tb_entity_change_log WHERE object_type = 'Reading'),
    '1:INSERT,2:INSERT,2:UPDATE', 'partitioned table captured once per change, new partitions included');
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM core.observer_tracked_tables WHERE entity_type = 'Reading'),
                         '1', 'tracked_tables lists the parent only');
SELECT pg_temp.expect_eq(core.observer_capture_of('public.readings'::regclass),
                         'row', 'a partitioned table keeps the per-row trigger (cloned to every partition)');

-- Statement capture writes what the per-row trigger writes -------------------------------------
-- Two identical tables, one with the per-row trigger, one tracked (statement triggers), the same
-- statements on both: the change-log rows must be equal in every column but the ones that
-- identify the log row itself (pk, id, created_at) and the source table's name.
CREATE TABLE public.twin_row (id int PRIMARY KEY, status text, total numeric, tenant_id text,
                              tags json, location point, note text);
CREATE TABLE public.twin_statement (LIKE public.twin_row INCLUDING ALL);
CREATE TRIGGER observer_capture AFTER INSERT OR UPDATE OR DELETE ON public.twin_row
    FOR EACH ROW EXECUTE FUNCTION core.observer_capture('Twin', 'id');
SELECT core.observer_track_table('public.twin_statement'::regclass, 'Twin');
CREATE FUNCTION pg_temp.on_both(statement text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE replace(statement, 'TWIN', 'public.twin_row');
    EXECUTE replace(statement, 'TWIN', 'public.twin_statement');
END $$;
BEGIN;
SET LOCAL fraiseql.actor_type = 'service';
SET LOCAL fraiseql.actor_id = 'billing';
SET LOCAL fraiseql.trace_id = 'trace-twin';
SELECT pg_temp.on_both($$INSERT INTO TWIN SELECT g, 'new', g * 1.5, 'tenant-' || (g % 3),
                                               json_build_object('g', g), point(g, g), NULL
                                          FROM generate_series(1, 50) AS g$$);
COMMIT;
SELECT pg_temp.on_both($$UPDATE TWIN SET status = 'paid', note = 'n' || id WHERE id % 2 = 0$$);
SELECT pg_temp.on_both($$UPDATE TWIN SET status = status, tags = tags WHERE id < 10$$);  -- no-op
SELECT pg_temp.on_both($$UPDATE TWIN SET id = id + 1000, total = total + 1 WHERE id > 40$$);
SELECT pg_temp.on_both($$UPDATE TWIN SET tenant_id = NULL, location = point(0, 0) WHERE id BETWEEN 11 AND 20$$);
SELECT pg_temp.on_both($$INSERT INTO TWIN VALUES (500, 'upsert') ON CONFLICT (id) DO NOTHING$$);
SELECT pg_temp.on_both($$INSERT INTO TWIN VALUES (5, 'upserted'), (501, 'fresh')
                         ON CONFLICT (id) DO UPDATE SET status = excluded.status$$);
SELECT pg_temp.on_both($$DELETE FROM TWIN WHERE id % 5 = 0$$);
SELECT pg_temp.on_both($$UPDATE TWIN SET note = NULL WHERE false$$);  -- no rows
CREATE TEMP VIEW twin_changes AS
SELECT extra_metadata ->> 'captured_from' AS source,
       row(txid IS NOT NULL, entity_hash = core.observer_entity_hash(object_type, object_id),
           tenant_id, object_type, object_id, modification_type, object_data, object_data_before,
           updated_fields, actor_type, actor_id, trace_id,
           extra_metadata - 'captured_from')::text AS content
  FROM core.tb_entity_change_log WHERE object_type = 'Twin';
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM twin_changes WHERE source = 'public.twin_row'),
                         (SELECT count(*)::text FROM twin_changes WHERE source = 'public.twin_statement'),
                         'statement capture writes as many rows as the per-row trigger');
SELECT pg_temp.expect((SELECT count(*) FROM twin_changes WHERE source = 'public.twin_row') = 50 + 25 + 10 + 10 + 1 + 2 + 11,
                      'the twin statements changed the rows they were meant to');
SELECT pg_temp.expect_eq(
    (SELECT string_agg(content, E'\n' ORDER BY content) FROM twin_changes WHERE source = 'public.twin_statement'),
    (SELECT string_agg(content, E'\n' ORDER BY content) FROM twin_changes WHERE source = 'public.twin_row'),
    'statement capture writes the same rows as the per-row trigger, column for column');
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',' ORDER BY pk_entity_change_log) FROM core.tb_entity_change_log
      WHERE extra_metadata ->> 'captured_from' = 'public.twin_statement' AND modification_type = 'INSERT'
        AND object_data ->> 'status' = 'new' AND (object_data ->> 'id')::int <= 5),
    '1,2,3,4,5', 'a multi-row insert is written in statement order');
-- An UPDATE that moves ids pairs each row's images: before id + 1000 = after id, for every row.
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM core.tb_entity_change_log
      WHERE extra_metadata ->> 'captured_from' = 'public.twin_statement' AND modification_type = 'UPDATE'
        AND (object_data ->> 'id')::int > 1000
        AND (object_data ->> 'id')::int = (object_data_before ->> 'id')::int + 1000
        AND object_id = object_data ->> 'id'
        AND updated_fields = '{id,total}'),
    '10', 'an update changing the id column pairs each row''s before and after images');

-- A change log whose columns are not the standard types keeps the per-row trigger: see legacy.sql.
