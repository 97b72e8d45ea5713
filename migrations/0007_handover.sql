-- 0007_handover.sql — steering from the control plane: moving a partition to a named node
-- (HandOverLease) and draining or resuming a named node (Drain/Resume with a node id).
--
-- A request sets handover_to: the current leader gives the partition back (page finished,
-- checkpoint saved, lock released), other nodes leave it alone, and the named node takes it and
-- clears the request. A request older than a minute is ignored (its target may have gone).

ALTER TABLE fraiseql_observers.partitions
    ADD COLUMN IF NOT EXISTS handover_to text,
    ADD COLUMN IF NOT EXISTS handover_requested_at timestamptz;

COMMENT ON COLUMN fraiseql_observers.partitions.handover_to IS
    'Node asked to take this partition over (HandOverLease); cleared by that node when it has the lease.';

-- A drain (true) or resume (false) asked for a node through any node's control plane; the named
-- node applies it on its next tick and clears it.
ALTER TABLE fraiseql_observers.nodes
    ADD COLUMN IF NOT EXISTS drain_request boolean;
