-- Stress scenario, verdict: every change-log row delivered exactly once, in per-entity order,
-- to the partition its entity hashes to; the run really had crashes and mid-batch resumes.
\ir lib.sql

SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM public.delivered), (SELECT count(*)::text FROM core.tb_entity_change_log),
    'as many deliveries as change-log rows');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM (SELECT pk FROM public.delivered GROUP BY pk HAVING count(*) > 1) AS twice),
    '0', 'no row delivered twice');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM core.tb_entity_change_log AS change
      WHERE NOT EXISTS (SELECT 1 FROM public.delivered WHERE pk = change.pk_entity_change_log)),
    '0', 'no row missed');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM public.delivered WHERE entity_hash % 4 <> partition), '0',
    'each row delivered by the partition its entity hashes to');
-- Per-entity order: each counter's values, in delivery order, are 0 (its INSERT), 1, 2, … up to
-- its final value, with no gap and no inversion.
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text FROM public.counters AS counter
      WHERE (SELECT array_agg(n ORDER BY seq) FROM public.delivered
              WHERE object_type = 'Counter' AND object_id = counter.id::text)
            IS DISTINCT FROM (SELECT array_agg(g ORDER BY g) FROM generate_series(0, counter.n) AS g)),
    '0', 'every counter''s changes delivered in order, none missing');
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM public.items WHERE note <> 'kept'), '0',
                         'rolled-back savepoints left nothing');
SELECT pg_temp.expect((SELECT count(*) FROM public.reader_events WHERE kind = 'crash') > 0,
                      'the readers crashed at least once');
SELECT pg_temp.expect((SELECT count(*) FROM public.reader_events WHERE kind = 'mid-batch checkpoint') > 0,
                      'batches were resumed from a mid-batch checkpoint');
SELECT pg_temp.expect((SELECT sum(n) FROM public.counters) > 500, 'the writers did some work');

SET client_min_messages = notice;
DO $$
BEGIN
    RAISE NOTICE 'stress: % change-log rows, % counter updates, % crashes, % mid-batch checkpoints',
        (SELECT count(*) FROM core.tb_entity_change_log), (SELECT sum(n) FROM public.counters),
        (SELECT count(*) FROM public.reader_events WHERE kind = 'crash'),
        (SELECT count(*) FROM public.reader_events WHERE kind = 'mid-batch checkpoint');
END $$;
