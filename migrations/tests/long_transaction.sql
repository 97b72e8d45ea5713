-- Long transaction: a transaction holding an old xid open (idle in transaction, or busy elsewhere)
-- does not hold back rows that other transactions committed after it started. It is the xmin of
-- every snapshot meanwhile, so a pure xmin watermark would deliver nothing until it ends.
\ir lib.sql

CREATE TABLE public.items (id int PRIMARY KEY, note text);
SELECT core.observer_track_table('public.items'::regclass, 'Item');

CREATE TEMP TABLE snapshots (round int PRIMARY KEY, snapshot pg_snapshot);
CREATE TEMP TABLE delivered (round int, pk bigint, object_id text);

-- L1 holds an xid and has written nothing; L2 holds an xid and has written a row already.
SELECT dblink_connect('long_1', :'conn');
SELECT dblink_connect('long_2', :'conn');
SELECT dblink_exec('long_1', 'BEGIN');
CREATE TEMP TABLE long_xids AS
    SELECT 'long_1' AS session, xid::xid8 AS xid
      FROM dblink('long_1', 'SELECT pg_current_xact_id()::text') AS t(xid text);
SELECT dblink_exec('long_2', 'BEGIN');
SELECT dblink_exec('long_2', 'INSERT INTO public.items VALUES (0, ''long 2, first write'')');
INSERT INTO long_xids
    SELECT 'long_2', xid::xid8 FROM dblink('long_2', 'SELECT pg_current_xact_id()::text') AS t(xid text);

INSERT INTO snapshots VALUES (0, pg_current_snapshot());

-- Three rounds: 20 single-row transactions, then a poll (batch previous → current snapshot).
-- (\gexec runs each generated INSERT as its own statement, so as its own transaction.)
SELECT format('INSERT INTO public.items VALUES (%s, ''round 1'')', n) FROM generate_series(101, 120) AS n \gexec
INSERT INTO snapshots VALUES (1, pg_current_snapshot());
INSERT INTO delivered SELECT 1, pk_entity_change_log, object_id FROM fraiseql_observers.read_batch(
    (SELECT snapshot FROM snapshots WHERE round = 0), (SELECT snapshot FROM snapshots WHERE round = 1));
SELECT format('INSERT INTO public.items VALUES (%s, ''round 2'')', n) FROM generate_series(201, 220) AS n \gexec
INSERT INTO snapshots VALUES (2, pg_current_snapshot());
INSERT INTO delivered SELECT 2, pk_entity_change_log, object_id FROM fraiseql_observers.read_batch(
    (SELECT snapshot FROM snapshots WHERE round = 1), (SELECT snapshot FROM snapshots WHERE round = 2));
SELECT format('INSERT INTO public.items VALUES (%s, ''round 3'')', n) FROM generate_series(301, 320) AS n \gexec
INSERT INTO snapshots VALUES (3, pg_current_snapshot());
INSERT INTO delivered SELECT 3, pk_entity_change_log, object_id FROM fraiseql_observers.read_batch(
    (SELECT snapshot FROM snapshots WHERE round = 2), (SELECT snapshot FROM snapshots WHERE round = 3));

SELECT pg_temp.expect_eq(
    (SELECT string_agg(format('%s:%s', round, n), ',' ORDER BY round)
       FROM (SELECT round, count(*) AS n FROM delivered GROUP BY round) AS per_round),
    '1:20,2:20,3:20', 'each round delivers its 20 committed rows while the long transactions run');
SELECT pg_temp.expect(bool_and(d.object_id::int / 100 = d.round), 'each row in the round it committed in')
  FROM delivered AS d;
-- At or below it: another session's older transaction on a shared server holds it back too.
SELECT pg_temp.expect(pg_snapshot_xmin(snapshot) <= (SELECT min(xid) FROM long_xids),
                      'the snapshot xmin is held back by the long transaction (an xmin watermark would stall)')
  FROM snapshots WHERE round = 3;

-- L2 writes again and commits; L1 writes and commits: each lands in the following batch.
SELECT dblink_exec('long_2', 'UPDATE public.items SET note = ''long 2, second write'' WHERE id = 0');
SELECT dblink_exec('long_2', 'COMMIT');
INSERT INTO snapshots VALUES (4, pg_current_snapshot());
INSERT INTO delivered SELECT 4, pk_entity_change_log, object_id FROM fraiseql_observers.read_batch(
    (SELECT snapshot FROM snapshots WHERE round = 3), (SELECT snapshot FROM snapshots WHERE round = 4));
SELECT dblink_exec('long_1', 'INSERT INTO public.items VALUES (1, ''long 1, only write'')');
SELECT dblink_exec('long_1', 'COMMIT');
INSERT INTO snapshots VALUES (5, pg_current_snapshot());
INSERT INTO delivered SELECT 5, pk_entity_change_log, object_id FROM fraiseql_observers.read_batch(
    (SELECT snapshot FROM snapshots WHERE round = 4), (SELECT snapshot FROM snapshots WHERE round = 5));

SELECT pg_temp.expect_eq(
    (SELECT string_agg(format('%s:%s', round, object_id), ',' ORDER BY round, pk) FROM delivered WHERE round >= 4),
    '4:0,4:0,5:1', 'the long transactions are delivered in the batch after their commit');
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM delivered), (SELECT count(*)::text FROM core.tb_entity_change_log),
                         'every change-log row delivered');
SELECT pg_temp.expect_eq((SELECT count(DISTINCT pk)::text FROM delivered), (SELECT count(*)::text FROM delivered),
                         'no row delivered twice');
SELECT dblink_disconnect(name) FROM unnest(dblink_get_connections()) AS name;
