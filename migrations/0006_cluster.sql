-- 0006_cluster.sql — cluster membership and the partition count.
--
-- Every node keeps a row in `nodes`, refreshed through its lease session (the dedicated connection
-- that holds its partitions' advisory locks): a node whose heartbeat is older than the node timeout
-- is dead or paused, and a live node ends its lease session (pg_terminate_backend), which releases
-- its locks so that its partitions can be taken over. The session is recognised by its
-- pid and backend start time, so a reused backend pid is never ended by mistake.
--
-- `cluster` records the partition count the change log is split by. Every node must use the same
-- count: rows are assigned by entity_hash % count, so two counts at once would deliver some entities
-- twice and others in two partitions out of order. A node started with another count is refused.

CREATE TABLE IF NOT EXISTS fraiseql_observers.cluster (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    partition_count int         NOT NULL CHECK (partition_count BETWEEN 1 AND 4096),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS fraiseql_observers.nodes (
    node_id      text        PRIMARY KEY CHECK (node_id <> ''),
    lease_pid    int         NOT NULL,       -- backend pid of the node's lease session
    lease_started timestamptz NOT NULL,      -- its backend_start: with the pid, names the session
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    draining     boolean     NOT NULL DEFAULT false
);

-- Records the partition count on first use and refuses a different one later. A database whose
-- partition 0 was checkpointed before partitions existed (it then read every row) gives the
-- other partitions that snapshot, so they do not start again from the beginning of the log.
CREATE OR REPLACE FUNCTION fraiseql_observers.register_partition_count(requested int)
RETURNS int
LANGUAGE plpgsql
AS $function$
DECLARE
    recorded int;
BEGIN
    IF requested IS NULL OR requested < 1 OR requested > 4096 THEN
        RAISE EXCEPTION 'partition count must be between 1 and 4096, got %', requested
            USING ERRCODE = '22023';
    END IF;
    LOCK TABLE fraiseql_observers.cluster IN EXCLUSIVE MODE;
    SELECT partition_count INTO recorded FROM fraiseql_observers.cluster;
    IF recorded IS NULL THEN
        INSERT INTO fraiseql_observers.cluster (partition_count) VALUES (requested);
        INSERT INTO fraiseql_observers.partitions (partition, snapshot)
        SELECT p, legacy.snapshot
          FROM generate_series(1, requested - 1) AS p,
               (SELECT snapshot FROM fraiseql_observers.partitions WHERE partition = 0) AS legacy
        ON CONFLICT (partition) DO NOTHING;
        RETURN requested;
    END IF;
    IF recorded <> requested THEN
        RAISE EXCEPTION 'the change log is split into % partitions, this node was started with %', recorded, requested
            USING ERRCODE = '22023',
                  HINT = 'start every node with the same partition count; changing it needs every node stopped and fraiseql_observers.cluster updated by hand';
    END IF;
    RETURN recorded;
END
$function$;

COMMENT ON TABLE fraiseql_observers.nodes IS
    'Cluster membership: one row per running node, heartbeat through its lease session (src/cluster.rs).';
COMMENT ON TABLE fraiseql_observers.cluster IS
    'The partition count every node must use (register_partition_count).';
