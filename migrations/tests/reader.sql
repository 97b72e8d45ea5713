-- read_batch mechanics: first start, keyset paging through an oversized batch, partition filter,
-- refusal of snapshots that would make it lose rows.
\ir lib.sql

CREATE TEMP TABLE snapshots (name text PRIMARY KEY, snapshot pg_snapshot);
CREATE FUNCTION pg_temp.snap(wanted text) RETURNS pg_snapshot
LANGUAGE sql AS $$ SELECT snapshot FROM snapshots WHERE name = wanted $$;

-- 30 transactions × 10 rows over 40 entities.
SELECT format($$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
               SELECT 'Thing', ((%s * 10 + g) %% 40)::text, 'UPDATE', jsonb_build_object('seq', %s * 10 + g)
                 FROM generate_series(0, 9) AS g$$, t, t)
  FROM generate_series(0, 29) AS t \gexec
INSERT INTO snapshots VALUES ('s1', pg_current_snapshot());

-- First start (after_snapshot NULL): everything visible in upto.
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM fraiseql_observers.read_batch(NULL, pg_temp.snap('s1'))),
                         '300', 'first start reads the whole log');

-- Paging through it 7 rows at a time gives the same rows, in pk order, none twice.
CREATE TEMP TABLE paged (page int, pk bigint);
DO $$
DECLARE
    position bigint := NULL;
    page int := 0;
    got int;
BEGIN
    LOOP
        INSERT INTO paged SELECT page, pk_entity_change_log
          FROM fraiseql_observers.read_batch(NULL, pg_temp.snap('s1'), position, 7);
        GET DIAGNOSTICS got = ROW_COUNT;
        SELECT max(pk) INTO position FROM paged;
        page := page + 1;
        EXIT WHEN got < 7;
    END LOOP;
END $$;
SELECT pg_temp.expect_eq((SELECT count(*)::text || '/' || count(DISTINCT pk)::text || '/' || max(page)::text FROM paged),
                         '300/300/42', '300 rows in 43 pages of at most 7, none twice');
SELECT pg_temp.expect_eq(
    (SELECT string_agg(pk::text, ',' ORDER BY pk) FROM paged),
    (SELECT string_agg(pk_entity_change_log::text, ',' ORDER BY pk_entity_change_log) FROM core.tb_entity_change_log),
    'pages cover the log in pk order');

-- The same with a previous snapshot: a batch s1 → s2 of 200 rows, paged by 50.
SELECT format($$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
               SELECT 'Thing', ((%s * 10 + g) %% 40)::text, 'UPDATE', jsonb_build_object('seq', %s * 10 + g)
                 FROM generate_series(0, 9) AS g$$, t, t)
  FROM generate_series(30, 49) AS t \gexec
INSERT INTO snapshots VALUES ('s2', pg_current_snapshot());
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'))),
    '200', 'batch s1 → s2 holds exactly the 200 new rows');
SELECT pg_temp.expect_eq(
    (SELECT min((object_data ->> 'seq')::int)::text FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'))),
    '300', 'and none of the old ones');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'),
        (SELECT pk_entity_change_log FROM core.tb_entity_change_log WHERE object_data ->> 'seq' = '449'), 50)),
    '50', 'a page after position (seq 449) holds the next 50 rows');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM fraiseql_observers.read_batch(pg_temp.snap('s2'), pg_temp.snap('s2'))),
    '0', 'an empty batch (s2 → s2)');

-- Partitions: every row in exactly one partition; per partition = entity_hash % 4.
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text || '/' || count(DISTINCT pk_entity_change_log)::text FROM generate_series(0, 3) AS p,
        LATERAL fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'), NULL, 1000, ARRAY[p], 4)),
    '200/200', 'the four partitions split the batch without overlap');
SELECT pg_temp.expect(bool_and(entity_hash % 4 IN (1, 3)), 'partitions {1,3} only return their rows')
  FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'), NULL, 1000, ARRAY[1, 3], 4);
SELECT pg_temp.expect_eq(
    (SELECT count(DISTINCT object_id)::text FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'), NULL, 1000, ARRAY[2], 4)),
    (SELECT count(DISTINCT object_id)::text FROM generate_series(0, 39) AS g(object_id)
      WHERE core.observer_entity_hash('Thing', g::text) % 4 = 2),
    'partition 2 holds exactly the entities that hash to it');

-- Rows written before the service was installed have txid NULL and are never read.
ALTER TABLE core.tb_entity_change_log DISABLE TRIGGER zz_observer_change_log_defaults;
ALTER TABLE core.tb_entity_change_log ALTER COLUMN txid DROP NOT NULL, ALTER COLUMN entity_hash DROP NOT NULL;
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, txid) VALUES ('Legacy', '1', 'INSERT', NULL);
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM fraiseql_observers.read_batch(NULL, pg_current_snapshot()) WHERE object_type = 'Legacy'),
    '0', 'txid NULL rows are not read, even on first start');
DELETE FROM core.tb_entity_change_log WHERE object_type = 'Legacy';
ALTER TABLE core.tb_entity_change_log ALTER COLUMN txid SET NOT NULL, ALTER COLUMN entity_hash SET NOT NULL;
ALTER TABLE core.tb_entity_change_log ENABLE ALWAYS TRIGGER zz_observer_change_log_defaults;

-- Refusals.
SELECT pg_temp.expect_error($$SELECT * FROM fraiseql_observers.read_batch(pg_temp.snap('s2'), pg_temp.snap('s1'))$$,
                            'older than after_snapshot', 'upto before after');
SELECT pg_temp.expect_error($$SELECT * FROM fraiseql_observers.read_batch(NULL, NULL)$$,
                            'upto_snapshot is required', 'no upto');
SELECT pg_temp.expect_error($$SELECT * FROM fraiseql_observers.read_batch(NULL, pg_temp.snap('s1'), NULL, 0)$$,
                            'batch_limit must be at least 1', 'zero limit');
SELECT pg_temp.expect_error($$SELECT * FROM fraiseql_observers.read_batch(NULL, pg_temp.snap('s1'), NULL, 10, ARRAY[0])$$,
                            'without a positive partition_count', 'partitions without count');
-- An upto taken after the reading transaction's snapshot: rows it counts as committed may be
-- invisible to the read. Here: a REPEATABLE READ transaction, then a commit elsewhere, then a
-- snapshot taken by another session.
SELECT dblink_connect('other', :'conn');
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) FROM core.tb_entity_change_log;  -- fixes this transaction's snapshot
SELECT dblink_exec('other', $$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type)
                              VALUES ('Thing', 'late', 'INSERT')$$);
SELECT pg_temp.expect_error(
    format('SELECT * FROM fraiseql_observers.read_batch(%L, %L)', pg_temp.snap('s2'),
           (SELECT snapshot FROM dblink('other', 'SELECT pg_current_snapshot()::text') AS t(snapshot pg_snapshot))),
    'newer than the reading transaction''s snapshot', 'upto from the future is refused');
COMMIT;
-- The same snapshot is fine once the reader can see what it covers.
SELECT pg_temp.expect_eq(
    (SELECT string_agg(object_id, ',') FROM fraiseql_observers.read_batch(pg_temp.snap('s2'),
        (SELECT snapshot FROM dblink('other', 'SELECT pg_current_snapshot()::text') AS t(snapshot pg_snapshot)))),
    'late', 'a snapshot taken before the reading statement is accepted');
SELECT dblink_disconnect('other');
