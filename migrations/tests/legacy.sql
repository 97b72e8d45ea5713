-- After the migrations on an existing FraiseQL change log (legacy_setup.sql): additive only,
-- no rewrite, history untouched and never delivered, new rows stamped and delivered.
\ir lib.sql

SELECT pg_temp.expect_eq(pg_relation_filenode('core.tb_entity_change_log')::text,
                         (SELECT filenode::text FROM public.before_migration),
                         'the existing table was not rewritten');
SELECT pg_temp.expect_eq(obj_description('core.tb_entity_change_log'::regclass, 'pg_class'),
                         'FraiseQL change log (their comment)', 'FraiseQL''s table comment kept');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM core.tb_entity_change_log WHERE txid IS NULL AND entity_hash IS NULL),
    (SELECT history_rows::text FROM public.before_migration), 'history keeps txid/entity_hash NULL');
SELECT pg_temp.expect_eq(
    (SELECT string_agg(conname || ':' || convalidated, ',' ORDER BY conname) FROM pg_constraint
      WHERE conrelid = 'core.tb_entity_change_log'::regclass AND contype = 'c'),
    'observer_entity_hash_not_null:false,observer_txid_not_null:false',
    'new rows are held to NOT NULL by NOT VALID checks');

-- FraiseQL's writer, unchanged.
INSERT INTO core.tb_entity_change_log (tenant_id, object_type, object_id, modification_type, change_status)
VALUES ('11111111-1111-4111-8111-111111111111', 'Order', 'after-install', 'UPDATE', 'ok');
SELECT pg_temp.expect(c.txid IS NOT NULL AND c.entity_hash = core.observer_entity_hash('Order', 'after-install'),
                      'a FraiseQL insert after install is stamped')
  FROM pg_temp.last_change() AS c;

-- The capture trigger writes into the uuid tenant_id column.
CREATE TABLE public.orders (id int PRIMARY KEY, tenant_id uuid, status text);
SELECT core.observer_track_table('public.orders'::regclass, 'Order');
SELECT pg_temp.expect_eq(core.observer_capture_of('public.orders'::regclass),
                         'row', 'a change log with a uuid tenant_id keeps the per-row trigger (it converts)');
INSERT INTO public.orders VALUES (1, '22222222-2222-4222-8222-222222222222', 'new');
SELECT pg_temp.expect_eq(c.tenant_id::text, '22222222-2222-4222-8222-222222222222', 'tenant_id cast to uuid')
  FROM pg_temp.last_change() AS c;

-- First start delivers what was written after the install, not the history.
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',' ORDER BY pk_entity_change_log)
       FROM fraiseql_observers.read_batch(NULL, pg_current_snapshot())),
    'after-install,1', 'first start: only rows written since the service was installed');
