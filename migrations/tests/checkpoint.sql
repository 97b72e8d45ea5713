-- The service tables: fenced checkpoints, processed-action ledger, dead letters.
\ir lib.sql

-- claim_partition creates the row on first use, and bumps the epoch on every claim.
SELECT pg_temp.expect_eq(p.epoch::text || '/' || p.leader || '/' || coalesce(p.snapshot::text, 'start'),
                         '1/node-a/start', 'first claim: epoch 1, no snapshot yet')
  FROM fraiseql_observers.claim_partition(3, 'node-a') AS p;

-- node-a saves a checkpoint under epoch 1.
SELECT pg_temp.expect_eq(
    fraiseql_observers.save_checkpoint(3, 1, 0, '10:12:10', NULL, NULL)::text, '1', 'save under the current epoch');
-- … and a mid-batch one.
SELECT pg_temp.expect_eq(
    fraiseql_observers.save_checkpoint(3, 1, 1, '10:12:10', '15:20:15,17', 1234)::text, '2', 'save a batch in flight');
SELECT pg_temp.expect_eq(format('%s|%s|%s|%s', snapshot, batch_upto, batch_position, checkpoint_version),
                         '10:12:10|15:20:15,17|1234|2', 'checkpoint stored')
  FROM fraiseql_observers.partitions WHERE partition = 3;

-- A stale write from the same epoch (old version) is refused.
SELECT pg_temp.expect_eq(
    fraiseql_observers.save_checkpoint(3, 1, 1, '11:11:', NULL, NULL)::text, NULL, 'stale version is fenced out');

-- node-b takes over: epoch 2. node-a, paused meanwhile, can no longer move the checkpoint.
SELECT pg_temp.expect_eq(p.epoch::text || '/' || p.leader || '/' || p.batch_position,
                         '2/node-b/1234', 'takeover bumps the epoch and keeps the checkpoint')
  FROM fraiseql_observers.claim_partition(3, 'node-b') AS p;
SELECT pg_temp.expect_eq(
    fraiseql_observers.save_checkpoint(3, 1, 2, '30:30:', NULL, NULL)::text, NULL, 'old epoch is fenced out');
SELECT pg_temp.expect_eq(
    fraiseql_observers.save_checkpoint(3, 2, 2, '20:20:', NULL, NULL)::text, '3', 'new leader saves');
SELECT pg_temp.expect_eq(format('%s|%s|%s', snapshot, batch_upto, batch_position), '20:20:||',
                         'finished batch clears batch_upto and position')
  FROM fraiseql_observers.partitions WHERE partition = 3;

-- A position without a batch in flight is meaningless and refused.
SELECT pg_temp.expect_error($$SELECT fraiseql_observers.save_checkpoint(3, 2, 3, '20:20:', NULL, 5)$$,
                            'partitions_position_needs_batch', 'position needs batch_upto');
SELECT pg_temp.expect_error($$INSERT INTO fraiseql_observers.partitions (partition) VALUES (-1)$$,
                            'check constraint', 'negative partition refused');

-- processed_actions: one row per (event, observer, action); the replay insert is a no-op.
INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
VALUES ('018f0000-0000-7000-8000-000000000001', 'order-paid', 0),
       ('018f0000-0000-7000-8000-000000000001', 'order-paid', 1);
INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
VALUES ('018f0000-0000-7000-8000-000000000001', 'order-paid', 1)
ON CONFLICT DO NOTHING;
SELECT pg_temp.expect_eq((SELECT count(*)::text FROM fraiseql_observers.processed_actions), '2',
                         'duplicate completion recorded once');
SELECT pg_temp.expect_error($$INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
                              VALUES ('018f0000-0000-7000-8000-000000000001', 'order-paid', 1)$$,
                            'duplicate key', 'primary key (event_id, observer, action_index)');

-- dead_letters: insert with defaults, list by created_at / observer using the indexes.
INSERT INTO fraiseql_observers.dead_letters
    (observer, action_index, action_type, error_code, error_message, attempts, event, entity_type, event_id)
VALUES ('order-paid', 0, 'webhook', 'OB008', 'HTTP 400 from https://example.test', 3,
        '{"id": "018f0000-0000-7000-8000-000000000001", "kind": "UPDATE", "entity_type": "Order"}',
        'Order', '018f0000-0000-7000-8000-000000000001');
SELECT pg_temp.expect(id IS NOT NULL AND created_at IS NOT NULL, 'dead letter gets id and created_at')
  FROM fraiseql_observers.dead_letters;
SELECT pg_temp.expect_eq(
    (SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes
      WHERE schemaname = 'fraiseql_observers' AND tablename = 'dead_letters'),
    'dead_letters_created_at_idx,dead_letters_entity_type_idx,dead_letters_event_id_idx,dead_letters_observer_idx,dead_letters_pkey',
    'dead_letters indexes');
