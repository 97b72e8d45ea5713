-- FraiseQL's own writers insert into core.tb_entity_change_log directly, knowing nothing of txid
-- or entity_hash: their rows must get both, and be read like trigger-written rows.
\ir lib.sql

BEGIN;
INSERT INTO core.tb_entity_change_log
    (tenant_id, object_type, object_id, modification_type, object_data, object_data_before,
     updated_fields, actor_type, actor_id, trace_id, extra_metadata)
VALUES ('tenant-a', 'Order', 'ord-1', 'UPDATE', '{"status": "paid"}', '{"status": "new"}',
        ARRAY['status'], 'user', '42', 'trace-1', '{"mutation": "payOrder"}');
SELECT pg_temp.expect_eq(c.txid::text, pg_current_xact_id()::text, 'txid defaults to the writer''s xid'),
       pg_temp.expect_eq(c.entity_hash::text, core.observer_entity_hash('Order', 'ord-1')::text,
                         'entity_hash filled in')
  FROM pg_temp.last_change() AS c;
COMMIT;

-- Only the contract's NOT NULL columns given.
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
VALUES ('Order', 'ord-2', 'CUSTOM');
SELECT pg_temp.expect(c.txid IS NOT NULL AND c.entity_hash IS NOT NULL AND c.id IS NOT NULL
                      AND c.created_at IS NOT NULL, 'minimal insert gets every default')
  FROM pg_temp.last_change() AS c;

-- A writer that does set them (a copy of an old row, a confused client) is overridden: the txid
-- must be the one of the transaction that makes the row visible.
BEGIN;
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, txid, entity_hash)
VALUES ('Order', 'ord-3', 'INSERT', '5', -1);
SELECT pg_temp.expect_eq(c.txid::text, pg_current_xact_id()::text, 'explicit txid is overridden'),
       pg_temp.expect_eq(c.entity_hash::text, core.observer_entity_hash('Order', 'ord-3')::text,
                         'explicit entity_hash is overridden')
  FROM pg_temp.last_change() AS c;
-- Inside a savepoint the row still carries the top-level xid (the one snapshots list).
SAVEPOINT nested;
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
VALUES ('Order', 'ord-4', 'INSERT');
SELECT pg_temp.expect_eq((pg_temp.last_change()).txid::text, pg_current_xact_id()::text,
                         'a subtransaction writes the top-level xid');
RELEASE SAVEPOINT nested;
COMMIT;

-- The contract's own constraints still hold.
SELECT pg_temp.expect_error($$INSERT INTO core.tb_entity_change_log (object_type, modification_type)
                              VALUES ('Order', 'INSERT')$$,
                            'null value in column "object_id"', 'object_id stays NOT NULL');

-- The stored hash: non-negative, stable, spreads entities over partitions.
SELECT pg_temp.expect(core.observer_entity_hash('Order', 'x') >= 0, 'hash is non-negative');
SELECT pg_temp.expect_eq(core.observer_entity_hash('Order', '42')::text,
                         ((hashtextextended('Order:42', 0)) & x'7fffffffffffffff'::bigint)::text,
                         'hash = hashtextextended(object_type:object_id, 0) without sign bit');
SELECT pg_temp.expect_eq(
    (SELECT count(DISTINCT core.observer_entity_hash('Order', g::text) % 8)::text
       FROM generate_series(1, 1000) AS g), '8', '1000 entities reach all 8 partitions');
SELECT pg_temp.expect(
    (SELECT max(n) < 1.25 * min(n) FROM (
        SELECT count(*) AS n FROM generate_series(1, 80000) AS g
         GROUP BY core.observer_entity_hash('Order', g::text) % 8) AS per_partition),
    'partitions within 25% of each other over 80k entities');

-- The reader returns these rows like any other.
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',' ORDER BY pk_entity_change_log)
       FROM fraiseql_observers.read_batch(NULL, pg_current_snapshot())),
    'ord-1,ord-2,ord-3,ord-4', 'direct inserts are read');

-- Wake-up: one AFTER INSERT statement-level trigger (tgtype INSERT(4), not ROW(1), not BEFORE(2)).
SELECT pg_temp.expect_eq(
    (SELECT tgtype::text FROM pg_trigger
      WHERE tgrelid = 'core.tb_entity_change_log'::regclass AND tgname = 'observer_change_log_notify'),
    '4', 'notify trigger is AFTER INSERT FOR EACH STATEMENT');
SELECT pg_temp.expect_eq(
    (SELECT tgenabled::text FROM pg_trigger
      WHERE tgrelid = 'core.tb_entity_change_log'::regclass AND tgname = 'zz_observer_change_log_defaults'),
    'A', 'defaults trigger fires ALWAYS (also under session_replication_role = replica)');
SET session_replication_role = replica;
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
VALUES ('Order', 'ord-5', 'INSERT');
RESET session_replication_role;
SELECT pg_temp.expect((pg_temp.last_change()).entity_hash IS NOT NULL, 'replica-role insert gets entity_hash');
