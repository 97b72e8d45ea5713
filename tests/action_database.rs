//! The `database` action against a real PostgreSQL database (one per test): the function is
//! called with the event's values, in its own transaction, under a statement timeout; SQLSTATEs
//! are classified transient or permanent.

mod common;

use common::postgres::TestDatabase;
use common::{config_errors_from_yaml, executor_from_yaml_with};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use serde_json::json;

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
";

async fn database() -> TestDatabase {
    let database = TestDatabase::create().await;
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
