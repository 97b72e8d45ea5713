-- 0009_coordinator.sql — the coordinator: one node at a time owns the cluster's singleton duties
-- (rescuing expired job claims, retention of jobs, the completed-actions ledger, dead letters and
-- the change log, and the cluster-wide gauges), so N nodes do not repeat them.
--
-- The role is an advisory lock held on the node's lease session, like a partition lease: a dead
-- or cut-off node's session is ended by its peers and the lock goes with it. Taking the lock
-- bumps `epoch` (a fencing token). Every duty runs in a transaction that first reads this row
-- FOR SHARE and goes on only if the epoch is still the one its node took: a new coordinator's bump
-- waits for a duty in flight to commit, and an old coordinator that lost its session (paused,
-- partitioned) finds a newer epoch and stops.

CREATE TABLE IF NOT EXISTS fraiseql_observers.coordinator (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       bigint      NOT NULL DEFAULT 0,
    node_id     text,
    acquired_at timestamptz
);

INSERT INTO fraiseql_observers.coordinator (singleton) VALUES (true) ON CONFLICT DO NOTHING;

COMMENT ON TABLE fraiseql_observers.coordinator IS
    'The coordinator role: the node that last took its advisory lock and the fencing epoch it got (src/membership.rs).';
