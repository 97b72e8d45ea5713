//! Routing actions through the job queue from the change-log listener: `mode: async`, hand-over
//! of inline transient failures, atomic enqueue with the checkpoint, no re-enqueue on replay, and
//! per-entity order between inline actions and jobs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::{Receiver, Recorded, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::breaker::{BreakerPolicy, Breakers, InMemoryBreakerStore};
use fraiseql_observers::checkpoint::PostgresCheckpointStore;
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::dlq::PostgresDeadLetterQueue;
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::jobs::PostgresJobQueue;
use fraiseql_observers::listener::{Listener, ListenerError, ListenerSettings};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::node::{Node, SharedState};
use fraiseql_observers::observers::ObserversConfig;
use fraiseql_observers::worker::JobWorker;
use tokio_util::sync::CancellationToken;

fn config(receiver: &Receiver, action_extra: &str) -> ObserversConfig {
    let yaml = format!(
        "jobs: {{workers: {{default: 2}}}}\nobservers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 6, initial_delay: 10ms, max_delay: 50ms}}\n    actions:\n      - {{type: webhook, url: '{}'{action_extra}}}\n",
        receiver.url("/orders")
    );
    common::config_from_yaml(&yaml)
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

/// A whole node (listener, job workers) on `database`, polling every 100 ms; cancel the token to
/// stop it.
async fn start_node(
    database: &TestDatabase,
    config: ObserversConfig,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), fraiseql_observers::cluster::ClusterError>>,
) {
    let node = Node::build(
        database.pool.clone(),
        config,
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
    (shutdown, running)
}

/// Jobs enqueued (in the queue, or completed), and how many of them took more than one attempt.
async fn jobs_and_retried(database: &TestDatabase) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE attempts > 1)
           FROM (SELECT attempts FROM fraiseql_observers.jobs
                 UNION ALL
                 SELECT attempts FROM fraiseql_observers.jobs_completed) AS every_job",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

/// Jobs enqueued: in the queue, or completed.
async fn job_count(database: &TestDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM fraiseql_observers.jobs)
                + (SELECT count(*) FROM fraiseql_observers.jobs_completed)",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_actions_are_enqueued_with_the_checkpoint_and_run_by_a_worker() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let (shutdown, running) =
        start_node(&database, config(&receiver, ", mode: async, priority: 8")).await;
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
    let rows: Vec<(String, i16, String)> = sqlx::query_as(
        "SELECT status, priority, idempotency_key FROM fraiseql_observers.jobs
         UNION ALL
         SELECT 'completed', priority, idempotency_key FROM fraiseql_observers.jobs_completed
         ORDER BY idempotency_key",
    )
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
        ledger, 0,
        "handed-over actions are not in the ledger: their jobs run them, and the checkpoint \
         saved with the jobs covers the page"
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
    let (inline_attempts, numbers): (i32, Vec<i32>) = sqlx::query_as(
        "SELECT inline_attempts, array(SELECT (entry->>'attempt')::int FROM jsonb_array_elements(errors) AS entry)
           FROM fraiseql_observers.jobs",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(
        (inline_attempts, numbers),
        (3, vec![1, 2, 3]),
        "the job's history starts with the attempts made in the page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_holds_every_attempt_made_in_the_page_and_by_the_queue() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    receiver.script("/orders", (0..6).map(|_| Reply::status(503)));
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
    listener.deliver_page().await.unwrap();
    let config = config(&receiver, "");
    let worker = JobWorker::new(
        PostgresJobQueue::new(
            database.pool.clone(),
            "w".to_owned(),
            Duration::from_secs(30),
        ),
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_millis(50),
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (attempts, message) = loop {
        let letter: Option<(i32, String)> =
            sqlx::query_as("SELECT attempts, error_message FROM fraiseql_observers.dead_letters")
                .fetch_optional(&database.pool)
                .await
                .unwrap();
        if let Some(letter) = letter {
            break letter;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter; {} calls",
            receiver.request_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.cancel();
    running.await.unwrap();

    assert_eq!(receiver.requests_to("/orders").len(), 6);
    assert_eq!(attempts, 6, "3 in the page and 3 from the queue");
    let numbers: Vec<&str> = message
        .lines()
        .map(|line| line.split(' ').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(numbers, ["1", "2", "3", "4", "5", "6"], "{message}");
    assert!(
        message.lines().all(|line| line.contains("): OB")),
        "each line names its attempt's error: {message}"
    );
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
    // The saved page left no ledger row (its checkpoint covered it): the action is handed over
    // again, and the job's idempotency key keeps the queue at one job.
    let outcome = second.deliver_page().await.unwrap();
    assert!(
        matches!(
            outcome.summaries[0].actions[0].status,
            ActionStatus::Enqueued { .. }
        ),
        "{outcome:?}"
    );
    assert_eq!(job_count(&database).await, 1, "not enqueued again");

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

/// `orders (id, version)` tracked as `Order`; an observer on inserts and updates whose webhook
/// posts to the receiver's `/orders`, with a retry budget larger than any failure streak below.
async fn prepare_versioned(database: &TestDatabase) {
    sqlx::raw_sql("CREATE TABLE orders (id int PRIMARY KEY, version int NOT NULL); SELECT core.observer_track_table('orders'::regclass, 'Order');")
        .execute(&database.pool)
        .await
        .unwrap();
}

fn versioned_config(
    receiver: &Receiver,
    workers: usize,
    initial_delay: &str,
    max_delay: &str,
) -> ObserversConfig {
    let yaml = format!(
        "jobs: {{workers: {{default: {workers}}}}}\nobservers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    retry: {{max_attempts: 30, initial_delay: {initial_delay}, max_delay: {max_delay}}}\n    actions:\n      - {{type: webhook, url: '{}'}}\n",
        receiver.url("/orders")
    );
    common::config_from_yaml(&yaml)
}

async fn write(database: &TestDatabase, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&database.pool)
        .await
        .unwrap();
}

/// The versions of order `id` the receiver accepted (answered 200), in the order it accepted them.
fn delivered_versions(receiver: &Receiver, id: i64) -> Vec<i64> {
    receiver
        .requests_to("/orders")
        .iter()
        .filter(|request| request.status == 200)
        .map(Recorded::json)
        .filter(|body| body["data"]["id"] == id)
        .map(|body| body["data"]["version"].as_i64().unwrap())
        .collect()
}

async fn unfinished_jobs(database: &TestDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM fraiseql_observers.jobs WHERE status IN ('waiting', 'pending', 'running')",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

/// Each event's first action: its status and attempts.
fn statuses(outcome: &fraiseql_observers::listener::PageOutcome) -> Vec<(ActionStatus, u32)> {
    outcome
        .summaries
        .iter()
        .map(|summary| {
            let report = &summary.actions[0];
            (report.status.clone(), report.attempts)
        })
        .collect()
}

/// Runs `workers` job workers for [`versioned_config`] concurrently until no job is pending or
/// running.
async fn drain_queue(database: &TestDatabase, receiver: &Receiver, workers: usize) {
    let shutdown = CancellationToken::new();
    let running: Vec<_> = (0..workers)
        .map(|index| {
            let config = versioned_config(receiver, 1, "10ms", "50ms");
            let worker = JobWorker::new(
                PostgresJobQueue::new(
                    database.pool.clone(),
                    format!("w{index}"),
                    Duration::from_secs(30),
                ),
                "default",
                ActionRunner::new(Arc::new(config.templates)).unwrap(),
                Arc::new(Matcher::new(config.observers)),
                Duration::from_millis(100),
            );
            tokio::spawn(worker.run(shutdown.clone()))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while unfinished_jobs(database).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    for task in running {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_does_not_overtake_an_earlier_change_of_its_entity_waiting_in_the_queue() {
    let database = TestDatabase::migrated().await;
    prepare_versioned(&database).await;
    let receiver = Receiver::start().await;
    let mut listener = start_listener(
        &database,
        listener_parts(&database, versioned_config(&receiver, 1, "10ms", "50ms")),
        "n",
    )
    .await;
    let enqueued = ActionStatus::Enqueued {
        queue: "default".into(),
    };

    // Order 1's first change outlasts the in-page retry: handed to the queue.
    receiver.script("/orders", [503, 503, 503].map(Reply::status));
    write(&database, "INSERT INTO orders VALUES (1, 1)").await;
    let first = listener.deliver_page().await.unwrap();
    assert_eq!(statuses(&first), [(enqueued.clone(), 3)]);

    // The target is back. Order 1's next change must not be delivered before the first: it
    // queues behind it without an attempt. Order 2 is not held back.
    write(
        &database,
        "UPDATE orders SET version = 2 WHERE id = 1; INSERT INTO orders VALUES (2, 1);",
    )
    .await;
    let second = listener.deliver_page().await.unwrap();
    assert_eq!(
        statuses(&second),
        [
            (enqueued.clone(), 0),
            (
                ActionStatus::Succeeded {
                    detail: "HTTP 200".into()
                },
                1
            )
        ]
    );
    assert_eq!(delivered_versions(&receiver, 1), Vec::<i64>::new());
    assert_eq!(delivered_versions(&receiver, 2), [1]);

    // Within one page: order 3's first change is handed over after failing, so its later
    // changes in the same page follow it into the queue, though the target answers them.
    receiver.script("/orders", [503, 503, 503].map(Reply::status));
    write(
        &database,
        "INSERT INTO orders VALUES (3, 1); UPDATE orders SET version = 2 WHERE id = 3; UPDATE orders SET version = 3 WHERE id = 3;",
    )
    .await;
    let third = listener.deliver_page().await.unwrap();
    assert_eq!(
        statuses(&third),
        [(enqueued.clone(), 3), (enqueued.clone(), 0), (enqueued, 0)]
    );
    assert_eq!(
        receiver.request_count(),
        3 + 1 + 3,
        "no attempt for the queued changes"
    );
    // The queued changes carry their order, and the whole retry budget (nothing was spent).
    let queued: Vec<(String, i32)> = sqlx::query_as(
        "SELECT ordering_key, max_attempts FROM fraiseql_observers.jobs ORDER BY ordinal",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    let order_1 = r#"["orders",0,"Order","1"]"#.to_owned();
    let order_3 = r#"["orders",0,"Order","3"]"#.to_owned();
    assert_eq!(
        queued,
        [
            (order_1.clone(), 27),
            (order_1, 30),
            (order_3.clone(), 27),
            (order_3.clone(), 30),
            (order_3, 30)
        ]
    );

    // Workers deliver the queue in change order per entity.
    drain_queue(&database, &receiver, 3).await;
    assert_eq!(delivered_versions(&receiver, 1), [1, 2]);
    assert_eq!(delivered_versions(&receiver, 2), [1]);
    assert_eq!(delivered_versions(&receiver, 3), [1, 2, 3]);

    // With the queue empty, the entity's next change runs inline again.
    write(&database, "UPDATE orders SET version = 3 WHERE id = 1").await;
    let fourth = listener.deliver_page().await.unwrap();
    assert!(matches!(
        fourth.summaries[0].actions[0].status,
        ActionStatus::Succeeded { .. }
    ));
    assert_eq!(delivered_versions(&receiver, 1), [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_delivers_every_change_in_order_once_the_target_recovers() {
    let database = TestDatabase::migrated().await;
    prepare_versioned(&database).await;
    let receiver = Receiver::start().await;
    // Down for the first 12 calls — each order's first change fails its 3 inline attempts and
    // its first attempt as a job — then up, while those jobs wait 300-600 ms for their retry.
    receiver.script("/orders", std::iter::repeat_n(Reply::status(503), 12));
    let shared = SharedState {
        // No circuit breaking here: the calls themselves show the outage and the recovery.
        breakers: Breakers::new(
            Arc::new(InMemoryBreakerStore::default()),
            BreakerPolicy {
                minimum_calls: 1_000_000,
                ..BreakerPolicy::default()
            },
        ),
        ..SharedState::default()
    };
    let node = Node::build_with_shared_state(
        database.pool.clone(),
        versioned_config(&receiver, 4, "300ms", "600ms"),
        ListenerSettings {
            poll_interval: Duration::from_millis(50),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
        shared,
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));

    // Three orders, 25 versions each over about a second: one change per transaction, and every
    // fifth version of all three in one transaction (one page).
    let versions = 25;
    write(
        &database,
        "INSERT INTO orders VALUES (1, 1), (2, 1), (3, 1)",
    )
    .await;
    for version in 2..=versions {
        if version % 5 == 0 {
            write(
                &database,
                &format!("UPDATE orders SET version = {version} WHERE id IN (1, 2, 3)"),
            )
            .await;
        } else {
            for id in 1..=3 {
                write(
                    &database,
                    &format!("UPDATE orders SET version = {version} WHERE id = {id}"),
                )
                .await;
            }
        }
        // Spread the changes over the outage and the recovery.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    let expected: Vec<i64> = (1..=versions).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
    loop {
        let done = (1..=3).all(|id| delivered_versions(&receiver, id).len() >= expected.len());
        if done && unfinished_jobs(&database).await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered in time: {:?}",
            (1..=3)
                .map(|id| delivered_versions(&receiver, id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();

    for id in 1..=3 {
        assert_eq!(
            delivered_versions(&receiver, id),
            expected,
            "order {id}: every change delivered once, in change order"
        );
    }
    let failures = receiver
        .requests_to("/orders")
        .iter()
        .filter(|request| request.status == 503)
        .count();
    assert_eq!(failures, 12, "the outage was seen");
    let (jobs, retried) = jobs_and_retried(&database).await;
    assert!(
        jobs > 3 && retried >= 3,
        "changes queued behind the retried jobs: {jobs} jobs, {retried} retried"
    );
    let dead_letters: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(dead_letters, 0);
}

/// A `database` action run by a job worker calls its function: the page that hands it over
/// covers it with its checkpoint but does not record it as done in the completed-actions ledger,
/// which the action checks before calling (a recorded key means "already called").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_database_action_is_called_by_the_worker_once_per_event() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    sqlx::raw_sql(
        "CREATE TABLE calls (order_id text NOT NULL, idempotency_key text NOT NULL);
         CREATE FUNCTION record_call(order_id text) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO calls VALUES (order_id, current_setting('fraiseql.idempotency_key')) $$;",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let config = common::config_from_yaml(
        "jobs: {workers: {default: 2}}\nobservers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions:\n      - {type: database, function: public.record_call, params: ['{{ entity_id }}'], mode: async}\n",
    );
    let (shutdown, running) = start_node(&database, config).await;
    sqlx::query("INSERT INTO orders SELECT generate_series(1, 3)")
        .execute(&database.pool)
        .await
        .unwrap();

    common::nodes::eventually("the 3 jobs completed and none queued", || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT (SELECT count(*) FROM fraiseql_observers.jobs_completed),
                    (SELECT count(*) FROM fraiseql_observers.jobs)",
        )
        .fetch_one(&database.pool)
        .await
        .is_ok_and(|counts| counts == (3, 0))
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let calls: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, idempotency_key FROM calls ORDER BY order_id")
            .fetch_all(&database.pool)
            .await
            .unwrap();
    assert_eq!(
        calls
            .iter()
            .map(|(order, _)| order.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3"],
        "the function was called once per event by the worker: {calls:?}"
    );
    assert!(
        calls.iter().all(|(_, key)| key.ends_with(":orders:0")),
        "with the action's idempotency key: {calls:?}"
    );
}
