-- Late commit: a transaction that wrote first (smaller xid, smaller pk) but commits after a later
-- one was already read is still delivered, in the next batch, exactly once.
--
--   session A  BEGIN; INSERT (pk 1)                          ...            COMMIT
--   session B                    INSERT (pk 2); COMMIT
--   reader                                      s1; batch ∅→s1 = {B}                s2; batch s1→s2 = {A}
--
-- A "last processed pk" high-water mark would stand at 2 after the first batch and never see pk 1.
-- Session A is a dblink connection, so the interleaving is exact (no sleeps).
\ir lib.sql

CREATE TABLE public.accounts (id int PRIMARY KEY, balance int);
SELECT core.observer_track_table('public.accounts'::regclass, 'Account');

CREATE TEMP TABLE snapshots (name text PRIMARY KEY, snapshot pg_snapshot);
CREATE TEMP TABLE delivered (batch text, pk bigint, object_id text);
CREATE FUNCTION pg_temp.snap(wanted text) RETURNS pg_snapshot
LANGUAGE sql AS $$ SELECT snapshot FROM snapshots WHERE name = wanted $$;
CREATE FUNCTION pg_temp.batch(wanted text) RETURNS text
LANGUAGE sql AS $$ SELECT coalesce(string_agg(object_id, ',' ORDER BY pk), '') FROM delivered WHERE batch = wanted $$;

SELECT dblink_connect('session_a', :'conn');
SELECT dblink_exec('session_a', 'BEGIN');
SELECT dblink_exec('session_a', 'INSERT INTO public.accounts VALUES (1, 100)');
CREATE TEMP TABLE session_a_xid AS
    SELECT xid::xid8 AS xid FROM dblink('session_a', 'SELECT pg_current_xact_id()::text') AS t(xid text);

-- Session B (this session, autocommit): writes and commits after A wrote.
INSERT INTO public.accounts VALUES (2, 200);

INSERT INTO snapshots VALUES ('s1', pg_current_snapshot());
SELECT pg_temp.expect(pg_visible_in_snapshot((SELECT xid FROM session_a_xid), pg_temp.snap('s1')) IS FALSE,
                      'A is still running at s1');

INSERT INTO delivered SELECT 'b1', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(NULL, pg_temp.snap('s1'));
SELECT pg_temp.expect_eq(pg_temp.batch('b1'), '2', 'batch ∅→s1 holds B only');

SELECT dblink_exec('session_a', 'COMMIT');

INSERT INTO snapshots VALUES ('s2', pg_current_snapshot());
INSERT INTO delivered SELECT 'b2', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s1'), pg_temp.snap('s2'));
SELECT pg_temp.expect_eq(pg_temp.batch('b2'), '1', 'batch s1→s2 holds the late commit A');
SELECT pg_temp.expect(
    (SELECT pk FROM delivered WHERE object_id = '1') < (SELECT pk FROM delivered WHERE object_id = '2'),
    'A has the smaller pk (a pk high-water mark would have skipped it)');

-- Nothing more, nothing twice.
INSERT INTO snapshots VALUES ('s3', pg_current_snapshot());
INSERT INTO delivered SELECT 'b3', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s2'), pg_temp.snap('s3'));
SELECT pg_temp.expect_eq(pg_temp.batch('b3'), '', 'batch s2→s3 is empty');

-- A three-way interleaving, with the reader polling between every step:
--   C begins and writes; D begins and writes; E writes+commits; poll; D commits; poll;
--   F writes+commits; poll; C writes again and commits; poll.
SELECT dblink_connect('session_c', :'conn');
SELECT dblink_connect('session_d', :'conn');
SELECT dblink_exec('session_c', 'BEGIN');
SELECT dblink_exec('session_c', 'INSERT INTO public.accounts VALUES (10, 0)');
SELECT dblink_exec('session_d', 'BEGIN');
SELECT dblink_exec('session_d', 'INSERT INTO public.accounts VALUES (20, 0)');
INSERT INTO public.accounts VALUES (30, 0);                                    -- E
INSERT INTO snapshots VALUES ('s4', pg_current_snapshot());
INSERT INTO delivered SELECT 'b4', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s3'), pg_temp.snap('s4'));
SELECT dblink_exec('session_d', 'COMMIT');
INSERT INTO snapshots VALUES ('s5', pg_current_snapshot());
INSERT INTO delivered SELECT 'b5', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s4'), pg_temp.snap('s5'));
INSERT INTO public.accounts VALUES (40, 0);                                    -- F
INSERT INTO snapshots VALUES ('s6', pg_current_snapshot());
INSERT INTO delivered SELECT 'b6', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s5'), pg_temp.snap('s6'));
SELECT dblink_exec('session_c', 'UPDATE public.accounts SET balance = 5 WHERE id = 10');
SELECT dblink_exec('session_c', 'COMMIT');
INSERT INTO snapshots VALUES ('s7', pg_current_snapshot());
INSERT INTO delivered SELECT 'b7', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s6'), pg_temp.snap('s7'));

SELECT pg_temp.expect_eq(
    format('%s|%s|%s|%s', pg_temp.batch('b4'), pg_temp.batch('b5'), pg_temp.batch('b6'), pg_temp.batch('b7')),
    '30|20|40|10,10', 'each transaction in the batch of its commit; C''s two rows together, in pk order');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM delivered), (SELECT count(*)::text FROM core.tb_entity_change_log),
    'every change-log row delivered');
SELECT pg_temp.expect_eq((SELECT count(DISTINCT pk)::text FROM delivered), (SELECT count(*)::text FROM delivered),
                         'no row delivered twice');

-- A commit that lands between taking upto and reading belongs to the next batch: the read sees the
-- row, but the transaction is not visible in upto. Delivering it now would deliver it twice.
-- (A later transaction commits first, so that C's xid is below xmax(s8) and in xip(s8).)
SELECT dblink_exec('session_c', 'BEGIN');
SELECT dblink_exec('session_c', 'INSERT INTO public.accounts VALUES (50, 0)');
INSERT INTO public.accounts VALUES (51, 0);
INSERT INTO snapshots VALUES ('s8', pg_current_snapshot());
SELECT dblink_exec('session_c', 'COMMIT');
INSERT INTO delivered SELECT 'b8', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s7'), pg_temp.snap('s8'));
INSERT INTO snapshots VALUES ('s9', pg_current_snapshot());
INSERT INTO delivered SELECT 'b9', pk_entity_change_log, object_id
  FROM fraiseql_observers.read_batch(pg_temp.snap('s8'), pg_temp.snap('s9'));
SELECT pg_temp.expect_eq(format('%s|%s', pg_temp.batch('b8'), pg_temp.batch('b9')), '51|50',
                         'a commit after upto was taken waits for the next batch');

SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM delivered), (SELECT count(*)::text FROM core.tb_entity_change_log),
    'every change-log row delivered');
SELECT pg_temp.expect_eq((SELECT count(DISTINCT pk)::text FROM delivered), (SELECT count(*)::text FROM delivered),
                         'no row delivered twice');
SELECT dblink_disconnect(name) FROM unnest(dblink_get_connections()) AS name;
