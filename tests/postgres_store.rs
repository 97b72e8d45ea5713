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
