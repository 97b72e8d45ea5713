-- pgbench script (not plain SQL): a writer transaction that updates two counters (lower id first,
-- so writers never deadlock), inserts an item, sleeps a little while holding its xid (so commits
-- land out of xid and pk order), rolls a savepoint back, and aborts one time in ten.
\set a random(1, 30)
\set b random(1, 30)
\set low least(:a, :b)
\set high greatest(:a, :b)
\set outcome random(1, 10)
BEGIN;
UPDATE public.counters SET n = n + 1 WHERE id = :low;
INSERT INTO public.items (note) VALUES ('kept');
SELECT pg_sleep(random() * 0.004);
SAVEPOINT undo_me;
INSERT INTO public.items (note) VALUES ('rolled back');
ROLLBACK TO SAVEPOINT undo_me;
UPDATE public.counters SET n = n + 1 WHERE id = :high;
\if :outcome = 1
ROLLBACK;
\else
COMMIT;
\endif
