//! The PostgreSQL side of the service's own storage: migrations and the dead-letter queue, on a
//! fresh database per test.

mod common;

use common::postgres::TestDatabase;
use fraiseql_observers::dlq::{PostgresDeadLetterQueue, conformance};
use fraiseql_observers::migrate::{self, MIGRATIONS};

#[tokio::test]
async fn migrations_apply_once_and_are_idempotent() {
    let database = TestDatabase::create().await;

    let first = migrate::run(&database.pool).await.unwrap();
    let second = migrate::run(&database.pool).await.unwrap();

    assert_eq!(first.applied.len(), MIGRATIONS.len());
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, MIGRATIONS.len());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
          WHERE table_schema IN ('core', 'fraiseql_observers') ORDER BY 1",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    for expected in [
        "core.tb_entity_change_log",
        "fraiseql_observers.dead_letters",
        "fraiseql_observers.partitions",
        "fraiseql_observers.processed_actions",
    ] {
        assert!(
            tables.iter().any(|table| table == expected),
            "{expected} missing from {tables:?}"
        );
    }
}

#[tokio::test]
async fn nodes_starting_together_migrate_exactly_once() {
    let database = TestDatabase::create().await;

    let runs = futures::future::join_all((0..4).map(|_| migrate::run(&database.pool))).await;

    let applied: usize = runs
        .iter()
        .map(|run| run.as_ref().unwrap().applied.len())
        .sum();
    assert_eq!(
        applied,
        MIGRATIONS.len(),
        "each migration applied by exactly one of the racing nodes"
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.schema_migrations")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(recorded, i64::try_from(MIGRATIONS.len()).unwrap());
}

#[tokio::test]
async fn a_changed_migration_is_refused() {
    let database = TestDatabase::migrated().await;
    sqlx::query(
        "UPDATE fraiseql_observers.schema_migrations SET checksum = 'edited' WHERE version = 1",
    )
    .execute(&database.pool)
    .await
    .unwrap();

    let error = migrate::run(&database.pool).await.unwrap_err();

    assert!(
        error
            .to_string()
            .contains("0001_change_log was changed after it was applied"),
        "{error}"
    );
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused() {
    let database = TestDatabase::migrated().await;
    sqlx::query("INSERT INTO fraiseql_observers.schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
        .execute(&database.pool)
        .await
        .unwrap();

    let error = migrate::run(&database.pool).await.unwrap_err();

    assert!(error.to_string().contains("version 999"), "{error}");
}

#[tokio::test]
async fn postgres_dead_letter_queue_conforms() {
    let database = TestDatabase::migrated().await;
    conformance::run(&PostgresDeadLetterQueue::new(database.pool.clone())).await;
}

#[tokio::test]
async fn postgres_checkpoint_store_conforms() {
    let database = TestDatabase::migrated().await;
    let store = fraiseql_observers::checkpoint::PostgresCheckpointStore::new(database.pool.clone());
    fraiseql_observers::checkpoint::conformance::run(&store, ["100:105:101,103", "106:106:"]).await;
}

#[tokio::test]
async fn group_commit_checkpoint_store_conforms() {
    let database = TestDatabase::migrated().await;
    let store = fraiseql_observers::checkpoint::PostgresCheckpointStore::with_group_commit(
        database.pool.clone(),
    );
    fraiseql_observers::checkpoint::conformance::run(&store, ["100:105:101,103", "106:106:"]).await;
}

/// Saves of many partitions at once share statements; one partition fenced out (another holder
/// claimed it) fails alone, with its ledger rows left out, while the rest move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_saves_fence_each_partition_on_its_own() {
    use fraiseql_observers::checkpoint::{
        ActionKey, BatchPosition, CheckpointError, CheckpointStore, PostgresCheckpointStore,
    };
    let database = TestDatabase::migrated().await;
    let store = std::sync::Arc::new(PostgresCheckpointStore::with_group_commit(
        database.pool.clone(),
    ));
    let mut checkpoints = Vec::new();
    for partition in 0..16 {
        checkpoints.push(store.claim(partition, "node-a").await.unwrap());
    }
    // Partition 5 is taken over: node a's view of it is stale.
    store.claim(5, "node-b").await.unwrap();
    let saves = checkpoints.into_iter().map(|checkpoint| {
        let store = store.clone();
        async move {
            let mut checkpoint = checkpoint;
            let mut outcomes = Vec::new();
            for round in 0..20_u32 {
                let key = ActionKey {
                    event_id: uuid::Uuid::new_v4(),
                    observer: format!("partition-{}", checkpoint.partition),
                    action_index: 0,
                };
                let next = BatchPosition {
                    snapshot: Some(format!("{}:{}:", 100 + round, 100 + round)),
                    batch_upto: None,
                    batch_position: None,
                };
                match store
                    .save(&checkpoint, next, std::slice::from_ref(&key))
                    .await
                {
                    Ok(saved) => {
                        assert_eq!(saved.version, checkpoint.version + 1);
                        checkpoint = saved;
                        outcomes.push(Ok(key));
                    }
                    Err(error) => outcomes.push(Err((error, key))),
                }
            }
            (checkpoint, outcomes)
        }
    });
    let results = futures::future::join_all(saves).await;
    let mut recorded = Vec::new();
    let mut refused = Vec::new();
    for (checkpoint, outcomes) in results {
        for outcome in outcomes {
            match outcome {
                Ok(key) => {
                    assert_ne!(checkpoint.partition, 5, "the fenced partition saved");
                    recorded.push(key.event_id);
                }
                Err((error, key)) => {
                    assert!(
                        matches!(error, CheckpointError::FencedOut { partition: 5, .. }),
                        "only partition 5 is refused: {error}"
                    );
                    refused.push(key.event_id);
                }
            }
        }
        if checkpoint.partition != 5 {
            let stored = store.load(checkpoint.partition).await.unwrap().unwrap();
            assert_eq!(
                stored.version, 20,
                "partition {} saved 20 times",
                checkpoint.partition
            );
            assert_eq!(stored.position.snapshot.as_deref(), Some("119:119:"));
        }
    }
    assert_eq!(recorded.len(), 15 * 20);
    assert_eq!(refused.len(), 20);
    let completed = store.completed_among(&recorded).await.unwrap();
    assert_eq!(
        completed.len(),
        recorded.len(),
        "every saved page's ledger rows are stored"
    );
    assert!(
        store.completed_among(&refused).await.unwrap().is_empty(),
        "a refused save stores no ledger rows"
    );
}

#[tokio::test]
async fn the_ledger_is_pruned_past_its_retention_only() {
    use fraiseql_observers::checkpoint::{
        ActionKey, CheckpointStore, PostgresCheckpointStore, prune_completed,
    };
    let database = TestDatabase::migrated().await;
    let store = PostgresCheckpointStore::new(database.pool.clone());
    let keys: Vec<ActionKey> = (0..25_000)
        .map(|n| ActionKey {
            event_id: uuid::Uuid::from_u128(n),
            observer: "orders".into(),
            action_index: 0,
        })
        .collect();
    store.record_completed(&keys).await.unwrap();
    // The first 23,000 completed two days ago; the rest just now.
    sqlx::query(
        "UPDATE fraiseql_observers.processed_actions SET completed_at = now() - interval '2 days'
          WHERE event_id < $1",
    )
    .bind(uuid::Uuid::from_u128(23_000))
    .execute(&database.pool)
    .await
    .unwrap();

    let pruned = prune_completed(&database.pool, std::time::Duration::from_hours(24))
        .await
        .unwrap();

    assert_eq!(pruned, 23_000, "old rows go, over several batches");
    let ids: Vec<uuid::Uuid> = keys.iter().map(|key| key.event_id).collect();
    let left = store.completed_among(&ids).await.unwrap();
    assert_eq!(left.len(), 2_000);
    assert!(
        left.iter()
            .all(|key| key.event_id >= uuid::Uuid::from_u128(23_000))
    );
}

/// A transaction whose `BEGIN` is cancelled in flight (a shutdown aborting a task, a timeout)
/// must not leave its connection inside a transaction: the pool would hand it to the next
/// borrower, whose statements would then run inside it and keep their row locks (a checkpoint
/// row held that way stalls a node's stop). sqlx 0.9.0 had this bug; 0.9.1 queues the ROLLBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_begin_leaves_no_transaction_open_in_the_pool() {
    let database = TestDatabase::create().await;
    // One connection, so every attempt and the check below use the same session.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database.url)
        .await
        .unwrap();
    for attempt in 0..400_u64 {
        // Cut at every point of the round trip: from before BEGIN is sent to after it returned.
        let cut = std::time::Duration::from_micros(attempt % 40 * 10);
        if let Ok(Ok(transaction)) = tokio::time::timeout(cut, pool.begin()).await {
            drop(transaction);
        }
        // The connection back from the pool, used, and held while another session looks at it.
        let mut connection = pool.acquire().await.unwrap();
        // (A connection whose round trip was cut may have been closed and replaced.)
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&database.pool)
            .await
            .unwrap();
        assert_eq!(
            state, "idle",
            "attempt {attempt}: a BEGIN cancelled after {cut:?} left the pooled connection in a transaction"
        );
    }
}
