//! Routing actions through the job queue from the change-log listener: `mode: async`, hand-over
//! of inline transient failures, atomic enqueue with the checkpoint, no re-enqueue on replay.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::checkpoint::PostgresCheckpointStore;
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv, ObserversConfig, load_str};
use fraiseql_observers::dlq::PostgresDeadLetterQueue;
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::listener::{Listener, ListenerError, ListenerSettings};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::node::Node;
use tokio_util::sync::CancellationToken;

fn config(receiver: &Receiver, action_extra: &str) -> ObserversConfig {
    let yaml = format!(
        "jobs: {{workers: {{default: 2}}}}\nobservers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 6, initial_delay: 10ms, max_delay: 50ms}}\n    actions:\n      - {{type: webhook, url: '{}'{action_extra}}}\n",
        receiver.url("/orders")
    );
    let no_env = |_: &str| None;
    load_str(
        &yaml,
        Format::Yaml,
        "routing.yaml",
        &LoadOptions {
            env: &no_env,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap()
}

async fn prepare(database: &TestDatabase) {
    sqlx::raw_sql("CREATE TABLE orders (id int PRIMARY KEY); SELECT core.observer_track_table('orders'::regclass, 'Order');")
        .execute(&database.pool)
        .await
        .unwrap();
}

fn listener_parts(database: &TestDatabase, config: ObserversConfig) -> Executor {
    Executor::new(
        Arc::new(Matcher::new(config.observers)),
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(database.pool.clone())),
        &config.executor,
    )
    .with_job_routing()
}

async fn start_listener(database: &TestDatabase, executor: Executor, node: &str) -> Listener {
    let settings = ListenerSettings {
        node_id: node.into(),
        ..ListenerSettings::default()
    };
    Listener::start(
        database.pool.clone(),
        Arc::new(PostgresCheckpointStore::new(database.pool.clone())),
        executor,
        settings,
    )
    .await
    .unwrap()
}

async fn job_count(database: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs")
        .fetch_one(&database.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_actions_are_enqueued_with_the_checkpoint_and_run_by_a_worker() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let node = Node::build(
        database.pool.clone(),
        config(&receiver, ", mode: async, priority: 8"),
        ListenerSettings {
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    sqlx::query("INSERT INTO orders SELECT generate_series(1, 5)")
        .execute(&database.pool)
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while receiver.request_count() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} jobs delivered",
            receiver.request_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let rows: Vec<(String, i16, String)> = sqlx::query_as("SELECT status, priority, idempotency_key FROM fraiseql_observers.jobs ORDER BY idempotency_key")
        .fetch_all(&database.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter()
            .all(|(status, priority, _)| status == "completed" && *priority == 8),
        "{rows:?}"
    );
    let mut keys: Vec<String> = receiver
        .requests()
        .iter()
        .map(|request| request.header("idempotency-key").unwrap().to_owned())
        .collect();
    keys.sort();
    let stored: Vec<String> = rows.into_iter().map(|(_, _, key)| key).collect();
    assert_eq!(
        keys, stored,
        "the worker calls with the job's idempotency key"
    );
    let ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.processed_actions")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(
        ledger, 5,
        "handed-over actions are in the ledger, with their jobs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_transient_failures_move_to_the_queue_instead_of_holding_the_page() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/orders",
        [
            Reply::status(503),
            Reply::status(503),
            Reply::status(503),
            Reply::status(503),
        ],
    );
    let mut listener = start_listener(
        &database,
        listener_parts(&database, config(&receiver, "")),
        "n",
    )
    .await;
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&database.pool)
        .await
        .unwrap();

    let outcome = listener.deliver_page().await.unwrap();

    let report = &outcome.summaries[0].actions[0];
    assert_eq!(report.attempts, 3, "the in-page retry is short");
    assert_eq!(
        report.status,
        ActionStatus::Enqueued {
            queue: "default".into()
        }
    );
    let (max_attempts, status): (i32, String) =
        sqlx::query_as("SELECT max_attempts, status FROM fraiseql_observers.jobs")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(
        (max_attempts, status.as_str()),
        (3, "pending"),
        "the job gets the attempts the policy has left"
    );
    assert_eq!(receiver.requests_to("/orders").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_page_does_not_enqueue_again_and_a_fenced_page_enqueues_nothing() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let mut first = start_listener(
        &database,
        listener_parts(&database, config(&receiver, ", mode: async")),
        "one",
    )
    .await;
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&database.pool)
        .await
        .unwrap();
    assert_eq!(first.deliver_page().await.unwrap().rows, 1);
    assert_eq!(job_count(&database).await, 1);

    // Replay: the checkpoint goes back to the start; a new listener reads the row again.
    sqlx::query("UPDATE fraiseql_observers.partitions SET snapshot = NULL, batch_upto = NULL, batch_position = NULL")
        .execute(&database.pool)
        .await
        .unwrap();
    let mut second = start_listener(
        &database,
        listener_parts(&database, config(&receiver, ", mode: async")),
        "two",
    )
    .await;
    let outcome = second.deliver_page().await.unwrap();
    assert_eq!(
        outcome.summaries[0].actions[0].status,
        ActionStatus::AlreadyCompleted
    );
    assert_eq!(job_count(&database).await, 1);

    // The first listener lost the partition: its next page's jobs must not appear.
    sqlx::query("INSERT INTO orders VALUES (2)")
        .execute(&database.pool)
        .await
        .unwrap();
    let fenced = first.deliver_page().await;
    assert!(
        matches!(fenced, Err(ListenerError::FencedOut(_))),
        "{fenced:?}"
    );
    assert_eq!(
        job_count(&database).await,
        1,
        "jobs are enqueued only with a checkpoint that commits"
    );
    second.deliver_page().await.unwrap();
    assert_eq!(job_count(&database).await, 2);
}
