-- Stress scenario, setup: tracked tables written by pgbench (stress_writer.sql) and a reader that
-- follows the algorithm the service uses (README.md, "Reading loop"): per partition, resume the
-- batch in flight or take a new snapshot, read one page, record what it delivered and the
-- checkpoint in one transaction, and "crash" (roll back) at random.
\set ON_ERROR_STOP on
SET client_min_messages = warning;

CREATE TABLE public.counters (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
CREATE TABLE public.items (id bigserial PRIMARY KEY, note text);
SELECT core.observer_track_table('public.counters'::regclass, 'Counter');
SELECT core.observer_track_table('public.items'::regclass, 'Item');
INSERT INTO public.counters (id) SELECT g FROM generate_series(1, 30) AS g;

-- What the readers delivered, in delivery order (seq). Written in the reader's checkpoint
-- transaction, like processed_actions would be.
CREATE TABLE public.delivered (
    seq               bigserial PRIMARY KEY,
    partition         int,
    pk                bigint,
    object_type       text,
    object_id         text,
    modification_type text,
    n                 int,
    entity_hash       bigint
);
CREATE TABLE public.reader_events (kind text, at timestamptz DEFAULT clock_timestamp());

CREATE PROCEDURE public.consume(
    my_partitions   int[],
    partition_count int,
    stop_at         timestamptz,
    page_size       int,
    crash_rate      float8)
LANGUAGE plpgsql
AS $$
DECLARE
    target       int;
    state        fraiseql_observers.partitions;
    upto         pg_snapshot;
    got          int;
    last_pk      bigint;
    new_version  bigint;
    idle         boolean;
BEGIN
    FOREACH target IN ARRAY my_partitions LOOP
        PERFORM fraiseql_observers.claim_partition(target, 'stress-reader');
    END LOOP;
    COMMIT;
    LOOP
        idle := true;
        FOREACH target IN ARRAY my_partitions LOOP
            SELECT * INTO state FROM fraiseql_observers.partitions WHERE partition = target;
            IF state.batch_upto IS NULL THEN
                SELECT pg_current_snapshot() INTO upto;       -- a new batch
            ELSE
                upto := state.batch_upto;                -- resume the batch in flight
            END IF;

            WITH page AS (
                SELECT * FROM fraiseql_observers.read_batch(state.snapshot, upto,
                    state.batch_position, page_size, ARRAY[target], partition_count)
            ), stored AS (
                INSERT INTO public.delivered (partition, pk, object_type, object_id, modification_type, n, entity_hash)
                SELECT target, pk_entity_change_log, object_type, object_id, modification_type,
                       (object_data ->> 'n')::int, entity_hash
                  FROM page ORDER BY pk_entity_change_log
                RETURNING pk
            )
            SELECT count(*), max(pk) INTO got, last_pk FROM stored;

            IF got < page_size THEN   -- batch exhausted: the checkpoint moves to upto
                new_version := fraiseql_observers.save_checkpoint(target, state.epoch,
                    state.checkpoint_version, upto, NULL, NULL);
            ELSE                      -- more to come: remember the batch and the position in it
                new_version := fraiseql_observers.save_checkpoint(target, state.epoch,
                    state.checkpoint_version, state.snapshot, upto, last_pk);
                INSERT INTO public.reader_events (kind) VALUES ('mid-batch checkpoint');
            END IF;
            IF new_version IS NULL THEN
                RAISE EXCEPTION 'partition % fenced out', target;
            END IF;
            IF got > 0 THEN
                idle := false;
            END IF;

            IF random() < crash_rate THEN
                ROLLBACK;             -- crash before the commit: page and checkpoint both lost
                INSERT INTO public.reader_events (kind) VALUES ('crash');
            END IF;
            COMMIT;
        END LOOP;
        EXIT WHEN idle AND clock_timestamp() > stop_at;
        IF idle THEN
            PERFORM pg_sleep(0.02);   -- poll interval
            COMMIT;
        END IF;
    END LOOP;
END
$$;
