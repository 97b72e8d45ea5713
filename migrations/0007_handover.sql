-- 0007_handover.sql — moving a partition to a named node (the control plane's HandOverLease).
--
-- A request sets handover_to: the current leader gives the partition back (page finished,
-- checkpoint saved, lock released), other nodes leave it alone, and the named node takes it and
-- clears the request. A request older than a minute is ignored (its target may have gone).

ALTER TABLE fraiseql_observers.partitions
    ADD COLUMN IF NOT EXISTS handover_to text,
    ADD COLUMN IF NOT EXISTS handover_requested_at timestamptz;

COMMENT ON COLUMN fraiseql_observers.partitions.handover_to IS
    'Node asked to take this partition over (HandOverLease); cleared by that node when it has the lease.';
