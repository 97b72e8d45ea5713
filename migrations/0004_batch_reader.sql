-- 0004_batch_reader.sql — the batch reader: which change-log rows to deliver next.
--
-- Guarantee 1 (nothing skipped, nothing stalls), the Skytools PgQ way. Every row carries the xid8
-- of the transaction that wrote it (0001). The service takes a snapshot with
-- pg_current_snapshot() at each poll; the batch between consecutive snapshots S → U is the set of
-- rows whose transaction is visible in U but not in S. Since a transaction becomes visible exactly
-- once and stays visible, every committed transaction lands in exactly one batch:
--
--   * late commit: a transaction still running at S is in xip(S), so it is not visible in S; when
--     it has committed by U, it is in batch S → U however small its pks are. A pk high-water mark
--     would have skipped it.
--   * long transaction: rows of transactions that committed after S are found by the xid range
--     [xmax(S), xmax(U)) whatever older transaction is still open; the open one stays in xip(U)
--     and is picked up by a point look-up in the batch that follows its commit. An xmin watermark
--     would have stalled behind it.
--   * cost: one index range scan over the transactions that started since S plus one point
--     look-up per transaction that was running at S — proportional to the batch, not to history.
--
-- Within a batch rows come in pk_entity_change_log order. Commit order is unknown (and xid order
-- is not commit order), but two changes of one entity are serialized by the row lock on that
-- entity, so the later change has the larger pk: pk order is per-entity change order. (This needs
-- the identity's sequence to have CACHE 1, the default.)

CREATE OR REPLACE FUNCTION fraiseql_observers.read_batch(
    after_snapshot  pg_snapshot,
    upto_snapshot   pg_snapshot,
    after_position  bigint DEFAULT NULL,
    batch_limit     int    DEFAULT 1000,
    partitions      int[]  DEFAULT NULL,
    partition_count int    DEFAULT NULL)
RETURNS SETOF core.tb_entity_change_log
LANGUAGE plpgsql
STABLE
AS $function$
-- after_snapshot   the checkpoint: transactions visible in it were delivered already.
--                  NULL = first start: the batch is every row visible in upto_snapshot (the whole
--                  log, minus rows written before the service was installed, whose txid is NULL).
-- upto_snapshot    the end of the batch: pg_current_snapshot(), taken on the reading connection
--                  before this call (or by this very statement). Checked below.
-- after_position   keyset position inside an oversized batch: only rows with a larger pk.
--                  NULL = from the start of the batch.
-- batch_limit      page size. A page shorter than batch_limit means the batch is exhausted.
-- partitions       only rows with entity_hash % partition_count = ANY(partitions); NULL = all.
DECLARE
    reader_snapshot constant pg_snapshot := pg_current_snapshot();
    query text;
BEGIN
    IF upto_snapshot IS NULL THEN
        RAISE EXCEPTION 'read_batch: upto_snapshot is required';
    END IF;
    IF batch_limit IS NULL OR batch_limit < 1 THEN
        RAISE EXCEPTION 'read_batch: batch_limit must be at least 1, got %', batch_limit;
    END IF;
    IF partitions IS NOT NULL AND (partition_count IS NULL OR partition_count < 1) THEN
        RAISE EXCEPTION 'read_batch: partitions given without a positive partition_count';
    END IF;
    IF after_snapshot IS NOT NULL
       AND pg_snapshot_xmax(upto_snapshot) < pg_snapshot_xmax(after_snapshot) THEN
        RAISE EXCEPTION 'read_batch: upto_snapshot (%) is older than after_snapshot (%)',
            upto_snapshot, after_snapshot;
    END IF;
    -- The rows of a transaction visible in upto must be visible to the query that reads them, or
    -- they would be counted as delivered without being read. That holds when upto was taken by
    -- this connection before this statement; it fails for a snapshot taken elsewhere, or later
    -- than the snapshot of a REPEATABLE READ transaction doing the read.
    IF pg_snapshot_xmax(upto_snapshot) > pg_snapshot_xmax(reader_snapshot)
       OR EXISTS (SELECT 1 FROM pg_snapshot_xip(reader_snapshot) AS running(txid)
                  WHERE pg_visible_in_snapshot(running.txid, upto_snapshot)) THEN
        RAISE EXCEPTION 'read_batch: upto_snapshot % is newer than the reading transaction''s snapshot %',
            upto_snapshot, reader_snapshot
            USING HINT = 'Take upto_snapshot with pg_current_snapshot() on the reading connection, before reading.';
    END IF;

    -- Dynamic SQL: planned for the actual snapshots every time (a generic plan cannot know whether
    -- the xid range holds ten rows or ten million).
    IF after_snapshot IS NULL THEN
        -- First start: everything up to upto. Walk the pk index, so that paging through a large
        -- history costs one page per call.
        query := 'SELECT change.* FROM core.tb_entity_change_log AS change'
              || ' WHERE change.txid < pg_snapshot_xmax($2)';
    ELSE
        -- Transactions that started after S (index range), or were running at S (point look-ups).
        query := 'SELECT change.* FROM core.tb_entity_change_log AS change'
              || ' WHERE ((change.txid >= pg_snapshot_xmax($1) AND change.txid < pg_snapshot_xmax($2))'
              ||        ' OR change.txid = ANY ($7))'
              || ' AND NOT pg_visible_in_snapshot(change.txid, $1)';
    END IF;
    -- Committed as of U (drops the transactions still running at U: they are in xip(U) and will be
    -- point look-ups of the next batch).
    query := query || ' AND pg_visible_in_snapshot(change.txid, $2)';
    IF after_position IS NOT NULL THEN
        query := query || ' AND change.pk_entity_change_log > $3';
    END IF;
    IF partitions IS NOT NULL THEN
        query := query || ' AND change.entity_hash % $6 = ANY ($5)';
    END IF;
    query := query || ' ORDER BY change.pk_entity_change_log LIMIT $4';

    RETURN QUERY EXECUTE query
        USING after_snapshot, upto_snapshot, after_position, batch_limit, partitions, partition_count,
              ARRAY(SELECT pg_snapshot_xip(after_snapshot));
END
$function$;

COMMENT ON FUNCTION fraiseql_observers.read_batch(pg_snapshot, pg_snapshot, bigint, int, int[], int) IS
    'Change-log rows of transactions visible in upto_snapshot but not in after_snapshot (NULL = from '
    'the start), pk order, keyset-paged by after_position, optionally restricted to partitions.';
