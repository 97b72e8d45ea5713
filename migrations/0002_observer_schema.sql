-- 0002_observer_schema.sql — the service's own state, in its own schema.
--
--   partitions         one row per partition: lease epoch (fencing token) and the checkpoint
--                      (last fully processed snapshot + the batch in flight and the position in it)
--   processed_actions  (event, observer, action) triples already completed: effectively-once effects
--                      across replays. Together with the checkpoint it is the "dispatch ledger": a
--                      replay after a crash re-reads the batch in flight and skips what is in here.
--   dead_letters       actions that failed for good, with the event needed to re-run them
--
-- Plus two small functions that encode the fencing rules, so that every node writes checkpoints
-- the same way: claim_partition (after taking the lease) and save_checkpoint (compare-and-swap).
-- Re-runnable: IF NOT EXISTS / CREATE OR REPLACE only.

CREATE SCHEMA IF NOT EXISTS fraiseql_observers;

-- ---------------------------------------------------------------------------------------------
-- partitions: lease epoch + checkpoint.
--
-- Checkpoint meaning (see README.md, "Batches"):
--   snapshot        every transaction visible in it is fully processed. NULL = nothing yet
--                   (first start: the next batch is everything in the log, see read_batch).
--   batch_upto      NULL when no batch is in flight. Otherwise a batch snapshot → batch_upto was
--                   started and every row of it with pk <= batch_position is processed. It must be
--                   resumed with this same batch_upto: a newer one would admit late-committed rows
--                   with a pk below batch_position, which the position would then skip.
--   batch_position  pk_entity_change_log of the last processed row of the batch in flight
--                   (NULL = none yet, or no batch in flight).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS fraiseql_observers.partitions (
    partition          int         PRIMARY KEY CHECK (partition >= 0),
    -- Fencing token: bumped by every lease acquisition (claim_partition). A checkpoint write that
    -- does not carry the current epoch is refused.
    epoch              bigint      NOT NULL DEFAULT 0,
    snapshot           pg_snapshot,
    batch_upto         pg_snapshot,
    batch_position     bigint,
    -- Bumped by every checkpoint write: the "position" half of the compare-and-swap, so one
    -- leader's out-of-order or duplicated write cannot move the checkpoint backwards.
    checkpoint_version bigint      NOT NULL DEFAULT 0,
    -- Node id of the last lease holder (informational; the lease itself is the advisory lock).
    leader             text,
    leased_at          timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT partitions_position_needs_batch CHECK (batch_upto IS NOT NULL OR batch_position IS NULL)
);

COMMENT ON TABLE fraiseql_observers.partitions IS
    'Per-partition lease epoch (fencing token) and checkpoint: snapshot = last fully processed '
    'pg_snapshot (NULL = start); batch_upto/batch_position = batch in flight and keyset position in it.';

-- Called by the node that has just acquired the partition's lease (advisory lock), before it reads
-- anything. Creates the row on first use (snapshot NULL = first start), bumps the epoch and returns
-- the row: its epoch is the fencing token for every later save_checkpoint of this lease.
CREATE OR REPLACE FUNCTION fraiseql_observers.claim_partition(target_partition int, node text)
RETURNS fraiseql_observers.partitions
LANGUAGE sql
VOLATILE
AS $function$
    INSERT INTO fraiseql_observers.partitions AS existing (partition, epoch, leader, leased_at, updated_at)
    VALUES (target_partition, 1, node, now(), now())
    ON CONFLICT (partition) DO UPDATE
        SET epoch      = existing.epoch + 1,
            leader     = excluded.leader,
            leased_at  = excluded.leased_at,
            updated_at = excluded.updated_at
    RETURNING existing.*;
$function$;

COMMENT ON FUNCTION fraiseql_observers.claim_partition(int, text) IS
    'Take over a partition after acquiring its lease: epoch + 1, leader = node; returns the checkpoint row.';

-- The only way a checkpoint should move: a compare-and-swap on (epoch, checkpoint_version).
-- Returns the new checkpoint_version, or NULL when the caller is fenced out (another node claimed
-- the partition since, or the caller's view of the checkpoint is stale); the caller must then
-- roll back its transaction (which also holds the batch's processed_actions) and stop leading.
CREATE OR REPLACE FUNCTION fraiseql_observers.save_checkpoint(
    target_partition    int,
    expected_epoch      bigint,
    expected_version    bigint,
    new_snapshot        pg_snapshot,
    new_batch_upto      pg_snapshot,
    new_batch_position  bigint)
RETURNS bigint
LANGUAGE sql
VOLATILE
AS $function$
    UPDATE fraiseql_observers.partitions
       SET snapshot           = new_snapshot,
           batch_upto         = new_batch_upto,
           batch_position     = new_batch_position,
           checkpoint_version = checkpoint_version + 1,
           updated_at         = now()
     WHERE partition = target_partition
       AND epoch = expected_epoch
       AND checkpoint_version = expected_version
    RETURNING checkpoint_version;
$function$;

COMMENT ON FUNCTION fraiseql_observers.save_checkpoint(int, bigint, bigint, pg_snapshot, pg_snapshot, bigint) IS
    'Fenced checkpoint write (CAS on epoch and checkpoint_version); returns the new version, NULL when fenced out.';

-- ---------------------------------------------------------------------------------------------
-- processed_actions: one row per completed (event, observer, action). Written in the same
-- transaction as the checkpoint that covers the event (or by the job worker that completed it),
-- read before running an action on replay. Needed only while an event can still be replayed,
-- i.e. while it is in a batch in flight or in the job queue: prune by completed_at.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS fraiseql_observers.processed_actions (
    event_id     uuid        NOT NULL,  -- core.tb_entity_change_log.id
    observer     text        NOT NULL,
    action_index int         NOT NULL CHECK (action_index >= 0),
    completed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, observer, action_index)
);

CREATE INDEX IF NOT EXISTS processed_actions_completed_at_idx
    ON fraiseql_observers.processed_actions (completed_at);

COMMENT ON TABLE fraiseql_observers.processed_actions IS
    'Completed (event, observer, action) triples: a replay skips them (effectively-once effects). '
    'Insert with ON CONFLICT DO NOTHING.';

-- ---------------------------------------------------------------------------------------------
-- dead_letters: mirrors dlq::DeadLetter. `event` is the serialized EntityEvent (or, for a
-- change-log row that could not be turned into one, the raw row as JSON); entity_type and event_id
-- are copied out of it for filtering.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS fraiseql_observers.dead_letters (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    observer      text        NOT NULL,
    action_index  int         NOT NULL CHECK (action_index >= 0),
    action_type   text        NOT NULL,
    error_code    text        NOT NULL,  -- ErrorCode, e.g. 'OB006'
    error_message text        NOT NULL,
    attempts      int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    event         jsonb       NOT NULL,
    entity_type   text        NOT NULL,
    event_id      uuid                   -- the event's id (change-log row id), when known
);

-- `dlq list` (oldest first, optionally created_before), by observer, by entity type; `dlq show`
-- for one event.
CREATE INDEX IF NOT EXISTS dead_letters_created_at_idx
    ON fraiseql_observers.dead_letters (created_at, id);
CREATE INDEX IF NOT EXISTS dead_letters_observer_idx
    ON fraiseql_observers.dead_letters (observer, created_at);
CREATE INDEX IF NOT EXISTS dead_letters_entity_type_idx
    ON fraiseql_observers.dead_letters (entity_type, created_at);
CREATE INDEX IF NOT EXISTS dead_letters_event_id_idx
    ON fraiseql_observers.dead_letters (event_id);

COMMENT ON TABLE fraiseql_observers.dead_letters IS
    'Actions that failed for good (dlq::DeadLetter); event = serialized EntityEvent or raw change-log row.';
