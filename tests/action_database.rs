//! The `database` action against a real PostgreSQL database (one per test, migrated: the action
//! records itself in the service's completed-actions ledger): the function is called with the
//! event's values, in its own transaction, under a statement timeout; SQLSTATEs are classified
//! transient or permanent; the call and its ledger row commit together, so an action is called
//! once per event even across attempts, concurrent runners and a `kill -9` of the node.

mod common;

use common::nodes::eventually;
use common::postgres::TestDatabase;
use common::{config_errors_from_yaml, executor_from_yaml_with};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use serde_json::json;
use sqlx::Connection as _;

const SCHEMA: &str = "
CREATE SCHEMA app;
CREATE TABLE app.paid_orders (
    order_id text NOT NULL,
    total numeric NOT NULL,
    items jsonb,
    idempotency_key text NOT NULL
);
CREATE FUNCTION app.on_order_paid(order_id text, total numeric, items jsonb) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF total < 0 THEN
        RAISE EXCEPTION 'order % has a negative total', order_id;
    END IF;
    INSERT INTO app.paid_orders
    VALUES (order_id, total, items, current_setting('fraiseql.idempotency_key'));
    RETURN 'recorded ' || order_id;
END $$;
CREATE SEQUENCE app.calls;
CREATE FUNCTION app.busy_once(order_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- A sequence is not rolled back with the failed transaction, so it counts attempts.
    IF nextval('app.calls') = 1 THEN
        RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO app.paid_orders VALUES (order_id, 0, NULL, 'busy_once');
END $$;
CREATE FUNCTION app.slow(order_id text) RETURNS void
LANGUAGE sql AS $$ SELECT pg_sleep(5) $$;
CREATE FUNCTION app.record_slowly(order_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO app.paid_orders VALUES (order_id, 0, NULL, current_setting('fraiseql.idempotency_key'));
    PERFORM pg_sleep(0.3);
END $$;
";

async fn database() -> TestDatabase {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(SCHEMA)
        .execute(&database.pool)
        .await
        .expect("schema");
    database
}

fn order_paid(total: f64) -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({"id": "ord-7", "total": total, "items": [{"sku": "a\"b", "qty": 2}]}),
        None,
    )
}

fn observer_yaml(action: &str) -> String {
    format!(
        "
observers:
  - name: order-paid
    entity: Order
    events: [update]
    actions:
      - type: database
{action}
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
"
    )
}

const ON_ORDER_PAID: &str = r#"        function: app.on_order_paid
        params:
          - "{{ entity_id }}"
          - {value: "{{ data.total }}", type: numeric}
          - {value: "{{ data['items'] }}", type: jsonb}"#;

fn executor(
    database: &TestDatabase,
    action: &str,
) -> (
    Executor,
    std::sync::Arc<fraiseql_observers::dlq::InMemoryDeadLetterQueue>,
) {
    let pool = database.pool.clone();
    executor_from_yaml_with(&observer_yaml(action), &[], move |runner| {
        runner.with_database(pool)
    })
}

#[tokio::test]
async fn calls_the_function_with_typed_parameters_and_the_idempotency_key() {
    let database = database().await;
    let (executor, dead_letters) = executor(&database, ON_ORDER_PAID);
    let event = order_paid(250.5);

    let summary = executor.execute_event(&event).await;

    let report = &summary.actions[0];
    assert_eq!(report.action_type, "database");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "called app.on_order_paid: recorded ord-7".into()
        }
    );
    let rows: Vec<(String, String, serde_json::Value, String)> =
        sqlx::query_as("SELECT order_id, total::text, items, idempotency_key FROM app.paid_orders")
            .fetch_all(&database.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    let (order_id, total, items, key) = &rows[0];
    assert_eq!(order_id, "ord-7");
    assert_eq!(total, "250.5");
    assert_eq!(*items, json!([{"sku": "a\"b", "qty": 2}]));
    assert_eq!(*key, format!("{}:order-paid:0", event.id));
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_raised_exception_is_permanent_and_dead_lettered_with_postgres_message() {
    let database = database().await;
    let (executor, dead_letters) = executor(&database, ON_ORDER_PAID);

    let report = &executor.execute_event(&order_paid(-1.0)).await.actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "app.on_order_paid: SQLSTATE P0001: order ord-7 has a negative total"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "database");
    assert_eq!(letters[0].letter.error_message, *message);
    let inserted: i64 = sqlx::query_scalar("SELECT count(*) FROM app.paid_orders")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(inserted, 0, "the failed call's transaction was rolled back");
}

#[tokio::test]
async fn a_serialization_failure_is_retried_and_then_succeeds() {
    let database = database().await;
    let (executor, dead_letters) = executor(
        &database,
        "        function: app.busy_once\n        params: [\"{{ entity_id }}\"]",
    );

    let report = &executor.execute_event(&order_paid(1.0)).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 2);
    let calls: i64 = sqlx::query_scalar("SELECT last_value FROM app.calls")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(calls, 2);
    let inserted: Vec<String> = sqlx::query_scalar("SELECT order_id FROM app.paid_orders")
        .fetch_all(&database.pool)
        .await
        .unwrap();
    assert_eq!(inserted, ["ord-7"]);
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn the_statement_timeout_cancels_a_slow_function_as_a_transient_timeout() {
    let database = database().await;
    let (executor, dead_letters) = executor(
        &database,
        "        function: app.slow\n        params: [\"{{ entity_id }}\"]\n        timeout: 300ms",
    );
    let started = std::time::Instant::now();

    let report = &executor.execute_event(&order_paid(1.0)).await.actions[0];

    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert_eq!(report.attempts, 3, "a timeout is transient: {report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::ActionTimeout);
    assert!(message.contains("SQLSTATE 57014"), "{message}");
    assert_eq!(dead_letters.count().await.unwrap(), 1);
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND position('\"slow\"' in query) > 0 AND state = 'active'",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(running, 0, "PostgreSQL cancelled the statement");
}

#[tokio::test]
async fn an_unknown_function_is_permanent() {
    let database = database().await;
    let (executor, _) = executor(&database, "        function: app.missing");

    let report = &executor.execute_event(&order_paid(1.0)).await.actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert!(message.contains("SQLSTATE 42883"), "{message}");
}

#[tokio::test]
async fn without_a_pool_the_action_fails_permanently() {
    let (executor, _) = common::executor_from_yaml(&observer_yaml(ON_ORDER_PAID), &[]);

    let report = &executor.execute_event(&order_paid(1.0)).await.actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::ConfigInvalid);
    assert!(message.contains("PostgreSQL pool"), "{message}");
}

#[test]
fn template_errors_function_names_and_types_are_refused_at_load() {
    let errors = config_errors_from_yaml(
        &observer_yaml(
            r#"        function: "app.on_order_paid(); DROP TABLE x"
        params:
          - "{{ entity_id"
          - {value: "{{ data.total }}", type: "numeric); DROP TABLE x; --"}"#,
        ),
        &[],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "test.yaml:8:19: observers[0].actions[0].function: expected a function name"
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].starts_with("test.yaml:10:13: observers[0].actions[0].params[0]: invalid template (line 1 of the template): syntax error"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].starts_with(
            "test.yaml:11:47: observers[0].actions[0].params[1].type: expected a type name"
        ),
        "{}",
        errors[2]
    );
}

#[tokio::test]
async fn dlq_retry_calls_the_function_through_the_service_database() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(SCHEMA)
        .execute(&database.pool)
        .await
        .expect("schema");
    let queue = fraiseql_observers::dlq::PostgresDeadLetterQueue::new(database.pool.clone());
    let event = order_paid(12.0);
    let id = queue
        .push(fraiseql_observers::dlq::NewDeadLetter {
            event: event.clone(),
            observer: "order-paid".into(),
            action_index: 0,
            action_type: "database".into(),
            error_code: ErrorCode::ConnectionFailed,
            error_message: "the database was restarting".into(),
            attempts: 3,
        })
        .await
        .unwrap();
    let config = common::config_from_yaml(&observer_yaml(ON_ORDER_PAID));

    let output = fraiseql_observers::commands::dlq_retry(&queue, config, id, None)
        .await
        .unwrap();

    assert!(
        output.contains("called app.on_order_paid: recorded ord-7"),
        "{output}"
    );
    let key: String = sqlx::query_scalar("SELECT idempotency_key FROM app.paid_orders")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(key, format!("{}:order-paid:0", event.id));
    assert_eq!(queue.count().await.unwrap(), 0);
}

/// The ledger rows of `event`'s actions, as `(observer, action index)`.
async fn ledger_rows(pool: &sqlx::PgPool, event_id: uuid::Uuid) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT observer, action_index FROM fraiseql_observers.processed_actions
          WHERE event_id = $1 ORDER BY observer, action_index",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn paid_orders(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM app.paid_orders")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_action_already_in_the_ledger_is_not_called_again() {
    let database = database().await;
    let (executor, _) = executor(&database, ON_ORDER_PAID);
    let event = order_paid(5.0);

    let first = executor.execute_event(&event).await;
    // `execute_event` does not look the ledger up first: the action's own transaction does.
    let second = executor.execute_event(&event).await;

    assert!(first.actions[0].succeeded(), "{first:?}");
    assert_eq!(
        second.actions[0].status,
        ActionStatus::Succeeded {
            detail: "app.on_order_paid was already called for this event; not called again".into()
        }
    );
    assert_eq!(paid_orders(&database.pool).await, 1);
    assert_eq!(
        ledger_rows(&database.pool, event.id).await,
        [("order-paid".to_owned(), 0)],
        "the call recorded itself"
    );
    // Another event of the same entity is another action: called.
    let next = order_paid(6.0);
    assert!(executor.execute_event(&next).await.actions[0].succeeded());
    assert_eq!(paid_orders(&database.pool).await, 2);
}

#[tokio::test]
async fn a_failed_call_leaves_no_ledger_row_so_the_retry_calls_it() {
    let database = database().await;
    let (executor, _) = executor(
        &database,
        "        function: app.busy_once\n        params: [\"{{ entity_id }}\"]",
    );
    let event = order_paid(1.0);

    let report = &executor.execute_event(&event).await.actions[0];

    assert_eq!(report.attempts, 2, "{report:?}");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "called app.busy_once".into()
        },
        "the second attempt made the call: the first one's ledger row was rolled back with it"
    );
    assert_eq!(paid_orders(&database.pool).await, 1);
    assert_eq!(ledger_rows(&database.pool, event.id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_racing_for_one_action_call_the_function_once() {
    let database = database().await;
    // Two executors, as the inline path of one node and a job worker (or a second node) would be:
    // nothing shared between them but the database.
    let action = "        function: app.record_slowly\n        params: [\"{{ entity_id }}\"]";
    let (inline, _) = executor(&database, action);
    let (queued, _) = executor(&database, action);
    let event = order_paid(1.0);

    let (first, second) = tokio::join!(inline.execute_event(&event), queued.execute_event(&event));

    let details: Vec<String> = [&first, &second]
        .iter()
        .map(|summary| match &summary.actions[0].status {
            ActionStatus::Succeeded { detail } => detail.clone(),
            other => panic!("expected success: {other:?}"),
        })
        .collect();
    assert!(
        details.contains(&"called app.record_slowly".to_owned())
            && details.contains(
                &"app.record_slowly was already called for this event; not called again".to_owned()
            ),
        "one called it, the other waited for its commit and found it done: {details:?}"
    );
    assert_eq!(paid_orders(&database.pool).await, 1);
}

/// Advisory lock the test holds to keep the node's ledger writes outside an action's transaction
/// (the early writer, the checkpoint save) waiting.
const LEDGER_HOLD: i64 = 4_217_017;
/// The node's connections carry this name, so the test can end the sessions of the killed node.
const NODE_APPLICATION: &str = "fqo-node-under-test";

/// Makes every ledger and history insert that is not part of an action's own transaction (where
/// the idempotency key is set) wait for [`LEDGER_HOLD`]: the checkpoint save of a page (which
/// writes the page's history rows) and the early ledger writer block; an action's call does not.
const HOLD_LEDGER_WRITES: &str = "
CREATE FUNCTION app.hold_ledger_writes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('fraiseql.idempotency_key', true), '') = '' THEN
        PERFORM pg_advisory_xact_lock_shared(4217017);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER hold_ledger_writes BEFORE INSERT ON fraiseql_observers.processed_actions
    FOR EACH ROW EXECUTE FUNCTION app.hold_ledger_writes();
CREATE TRIGGER hold_history_writes BEFORE INSERT ON fraiseql_observers.history
    FOR EACH ROW EXECUTE FUNCTION app.hold_ledger_writes();
";

fn start_node(config: &std::path::Path, database_url: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .args(["--node-id", "exactly-once", "--partitions", "1"])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--poll-interval", "100ms"])
        .env(
            "DATABASE_URL",
            format!("{database_url}?application_name={NODE_APPLICATION}"),
        )
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the binary runs")
}

/// A check of `count` against the database, polled until it holds.
async fn count_is(pool: &sqlx::PgPool, sql: &'static str, expected: i64) -> bool {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .is_ok_and(|count| count == expected)
}

/// Tracked `orders`, the ledger hold, and an observers file at `config` with a `database` action
/// and a webhook to `receiver` (which shows the event being delivered again after a restart).
async fn prepare_kill_scenario(
    database: &TestDatabase,
    receiver: &common::Receiver,
    config: &std::path::Path,
) {
    sqlx::raw_sql(
        "CREATE TABLE orders (id text PRIMARY KEY, status text NOT NULL);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    sqlx::raw_sql(HOLD_LEDGER_WRITES)
        .execute(&database.pool)
        .await
        .unwrap();
    std::fs::write(
        config,
        format!(
            r#"observers:
  - name: order-paid
    entity: Order
    events: [insert]
    actions:
      - type: database
        function: app.on_order_paid
        params: ["{{{{ entity_id }}}}", {{value: "1", type: numeric}}, {{value: "null", type: jsonb}}]
      - type: webhook
        url: "{}"
"#,
            receiver.url("/orders")
        ),
    )
    .unwrap();
}

/// The killed node's sessions would linger until PostgreSQL noticed the dead client; ends them,
/// so that its waiting checkpoint statement can never commit.
async fn end_sessions_of_killed_node(pool: &sqlx::PgPool) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database()
            AND (application_name = $1 OR application_name LIKE 'fraiseql-observers lease %')",
    )
    .bind(NODE_APPLICATION)
    .execute(pool)
    .await
    .unwrap();
    eventually("the killed node's sessions gone", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                AND (application_name = $1 OR application_name LIKE 'fraiseql-observers lease %')",
        )
        .bind(NODE_APPLICATION)
        .fetch_one(pool)
        .await
        .is_ok_and(|count| count == 0)
    })
    .await;
}

/// The checkpoint's version (the nodes run one partition).
async fn checkpoint_version(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT max(checkpoint_version) FROM fraiseql_observers.partitions")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_the_call_committed_and_before_the_checkpoint_does_not_call_it_twice() {
    let database = database().await;
    let receiver = common::Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    prepare_kill_scenario(&database, &receiver, &config).await;
    let mut holder = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LEDGER_HOLD)
        .execute(&mut holder)
        .await
        .unwrap();

    let mut node = start_node(&config, &database.url);
    sqlx::query("INSERT INTO orders VALUES ('ord-1', 'paid')")
        .execute(&database.pool)
        .await
        .unwrap();
    // Both actions done (the call committed, the webhook answered) and the page's checkpoint
    // save waiting on the held ledger: the moment between the call and the checkpoint.
    eventually("the function's row", || {
        count_is(&database.pool, "SELECT count(*) FROM app.paid_orders", 1)
    })
    .await;
    eventually("the webhook", || async {
        receiver.requests_to("/orders").len() == 1
    })
    .await;
    eventually("the page's checkpoint save waiting", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                AND objid = 4217017 AND objsubid = 1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&database.pool)
        .await
        .is_ok_and(|waiting| waiting >= 1)
    })
    .await;
    // One partition: no other partition's saves move the version read here.
    let saved_before = checkpoint_version(&database.pool).await;

    node.kill().unwrap(); // SIGKILL
    node.wait().unwrap();
    end_sessions_of_killed_node(&database.pool).await;
    sqlx::raw_sql(
        "DROP TRIGGER hold_ledger_writes ON fraiseql_observers.processed_actions;
         DROP TRIGGER hold_history_writes ON fraiseql_observers.history;",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LEDGER_HOLD)
        .execute(&mut holder)
        .await
        .unwrap();
    let saved_after_kill = checkpoint_version(&database.pool).await;
    assert_eq!(
        saved_after_kill, saved_before,
        "the page's checkpoint was not saved before the kill"
    );
    let event_id: uuid::Uuid =
        sqlx::query_scalar("SELECT (idempotency_key::text) FROM app.paid_orders")
            .fetch_one(&database.pool)
            .await
            .map(|key: String| key.split(':').next().unwrap().parse().unwrap())
            .unwrap();
    assert_eq!(
        ledger_rows(&database.pool, event_id).await,
        [("order-paid".to_owned(), 0)],
        "only the call, recorded in its own transaction, is in the ledger"
    );

    let mut restarted = start_node(&config, &database.url);
    eventually("the event delivered again", || async {
        receiver.requests_to("/orders").len() == 2
    })
    .await;
    eventually("the replayed page saved", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM fraiseql_observers.history
              WHERE record_kind = 'event' AND event_id = $1",
        )
        .bind(event_id)
        .fetch_one(&database.pool)
        .await
        .is_ok_and(|rows| rows == 1)
    })
    .await;
    restarted.kill().unwrap();
    restarted.wait().unwrap();

    let keys: Vec<String> = receiver
        .requests_to("/orders")
        .iter()
        .map(|request| request.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys[0], keys[1], "the same event, replayed");
    assert_eq!(keys[0], format!("{event_id}:order-paid:1"));
    let calls: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM app.paid_orders")
        .fetch_all(&database.pool)
        .await
        .unwrap();
    assert_eq!(
        calls,
        [format!("{event_id}:order-paid:0")],
        "the function's effect exists exactly once"
    );
}

#[tokio::test]
async fn a_job_for_a_call_that_already_committed_inline_completes_without_calling_again() {
    use fraiseql_observers::jobs::{NewJob, PostgresJobQueue};
    use fraiseql_observers::worker::{JobWorker, WorkOutcome};
    use std::time::Duration;

    let database = database().await;
    let (executor, _) = executor(&database, ON_ORDER_PAID);
    let event = order_paid(3.0);
    // The inline attempt commits; then the same action reaches the job queue, as when the
    // executor's own timeout fired after the call had committed and the action was handed over.
    assert!(executor.execute_event(&event).await.actions[0].succeeded());
    let config = common::config_from_yaml(&observer_yaml(ON_ORDER_PAID));
    let jobs = PostgresJobQueue::new(database.pool.clone(), "node-a", Duration::from_secs(30));
    let id = jobs
        .enqueue(&NewJob {
            queue: "default".into(),
            priority: 5,
            run_at: None,
            event: event.clone(),
            observer: "order-paid".into(),
            action_index: 0,
            action_type: "database".into(),
            max_attempts: 3,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            parked_on: None,
            history: Vec::new(),
        })
        .await
        .unwrap()
        .unwrap();
    let worker = JobWorker::new(
        jobs,
        "default",
        fraiseql_observers::actions::ActionRunner::new(std::sync::Arc::new(config.templates))
            .unwrap()
            .with_database(database.pool.clone()),
        std::sync::Arc::new(fraiseql_observers::matcher::Matcher::new(config.observers)),
        Duration::from_millis(100),
    );

    let outcome = worker
        .try_execute_one(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(outcome, WorkOutcome::Completed(id));
    assert_eq!(
        paid_orders(&database.pool).await,
        1,
        "the job found the call in the ledger"
    );
}
