-- Cost: with 200k rows already processed, reading a small or empty batch touches the txid index
-- and the few rows of the batch, never the history.
--
-- Plan of the reader's query for the 4-row batch below, after 200k processed rows (auto_explain,
-- PostgreSQL 15, this machine; 0.15 ms per read_batch call including the plpgsql around it):
--
--   Limit  (actual rows=4)                                                   Buffers: shared hit=5
--     ->  Sort  Sort Key: pk_entity_change_log
--           ->  Bitmap Heap Scan on tb_entity_change_log change  (actual rows=4)
--                 Recheck Cond: (((txid >= '7255'::xid8) AND (txid < '7259'::xid8))
--                                OR (txid = ANY ('{7253}'::xid8[])))
--                 Filter: ((NOT pg_visible_in_snapshot(txid, '7253:7255:7253'::pg_snapshot))
--                          AND pg_visible_in_snapshot(txid, '7259:7259:'::pg_snapshot))
--                 ->  BitmapOr
--                       ->  Bitmap Index Scan on tb_entity_change_log_txid_idx  (actual rows=3)
--                             Index Cond: ((txid >= '7255'::xid8) AND (txid < '7259'::xid8))
--                       ->  Bitmap Index Scan on tb_entity_change_log_txid_idx  (actual rows=1)
--                             Index Cond: (txid = ANY ('{7253}'::xid8[]))
--
-- The range is the transactions that started after the checkpoint; '{7253}' is the one that was
-- still running at the checkpoint (xip) and committed since. The test below asserts the same
-- thing from the table statistics (no sequential scan, a handful of index fetches).
-- Run the suite with VERBOSE=1 to see the plans and timings of this machine.
\ir lib.sql

-- 200k rows of history, 200 rows per transaction.
SELECT format($$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
               SELECT 'Order', (random() * 50000)::int::text, 'UPDATE',
                      jsonb_build_object('n', g, 'status', 'paid', 'note', repeat('x', 100))
                 FROM generate_series(1, 200) AS g$$)
  FROM generate_series(1, 1000) \gexec
ANALYZE core.tb_entity_change_log;

-- A transaction that wrote before the checkpoint and commits after it: the batch needs a point
-- look-up for it, on top of the xid range.
SELECT dblink_connect('late', :'conn');
SELECT dblink_exec('late', 'BEGIN');
SELECT dblink_exec('late', $$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
                             VALUES ('Order', 'late', 'UPDATE')$$);

CREATE TEMP TABLE snapshots (name text PRIMARY KEY, snapshot pg_snapshot);
INSERT INTO snapshots VALUES ('processed', pg_current_snapshot());  -- the 200k rows are behind us
SELECT format($$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
               VALUES ('Order', 'new-%s', 'UPDATE')$$, g) FROM generate_series(1, 3) AS g \gexec
SELECT dblink_exec('late', 'COMMIT');
INSERT INTO snapshots VALUES ('small', pg_current_snapshot());

LOAD 'auto_explain';
SET auto_explain.log_nested_statements = on;
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_timing = off;
SET client_min_messages = log;

BEGIN;
-- Small batch: the 3 new rows and the late one (plans logged for this statement only).
SET auto_explain.log_min_duration = 0;
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',' ORDER BY pk_entity_change_log) FROM fraiseql_observers.read_batch(
        (SELECT snapshot FROM snapshots WHERE name = 'processed'), (SELECT snapshot FROM snapshots WHERE name = 'small'))),
    'late,new-1,new-2,new-3', 'small batch after 200k processed rows');
SET auto_explain.log_min_duration = -1;
-- Empty batch.
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM fraiseql_observers.read_batch(
        (SELECT snapshot FROM snapshots WHERE name = 'small'), pg_current_snapshot())),
    '0', 'empty batch');
-- What those two reads cost, from this transaction's own table statistics.
SELECT pg_temp.expect_eq(seq_scan::text, '0', 'no sequential scan of the change log'),
       pg_temp.expect(idx_tup_fetch <= 10, format('at most 10 rows fetched through indexes (got %s)', idx_tup_fetch))
  FROM pg_stat_xact_user_tables WHERE relid = 'core.tb_entity_change_log'::regclass;
COMMIT;

SET client_min_messages = notice;
-- Timing, informational (speed targets belong to benchmarks, not tests).
DO $$
DECLARE
    processed constant pg_snapshot := (SELECT snapshot FROM snapshots WHERE name = 'processed');
    small constant pg_snapshot := (SELECT snapshot FROM snapshots WHERE name = 'small');
    started timestamptz := clock_timestamp();
BEGIN
    FOR round IN 1..200 LOOP
        PERFORM count(*) FROM fraiseql_observers.read_batch(processed, small);
    END LOOP;
    RAISE NOTICE 'cost: small batch after 200k rows: % ms per read (200 reads)',
        round(extract(epoch FROM clock_timestamp() - started) * 1000 / 200, 3);
END $$;
SELECT dblink_disconnect('late');
