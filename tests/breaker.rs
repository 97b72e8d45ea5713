//! Circuit breakers against real Redis (shared server, unique key prefix) and real HTTP
//! receivers: the state machine, a breaker opened by one node seen by another, an open circuit
//! that stops calls and parks the work in the job queue without spending attempts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::breaker::{
    Admission, BreakerPolicy, BreakerStore, Breakers, InMemoryBreakerStore, RedisBreakerStore,
    conformance,
};
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::ActionStatus;
use fraiseql_observers::jobs::PostgresJobQueue;
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::{ObserversConfig, load_str};
use fraiseql_observers::worker::{JobWorker, WorkOutcome};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("fqo-test-{}:", uuid::Uuid::new_v4().simple())
}

fn yaml(receiver: &Receiver) -> String {
    format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 8, initial_delay: 10ms, max_delay: 20ms}}\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    )
}

fn config(receiver: &Receiver) -> ObserversConfig {
    load_str(
        &yaml(receiver),
        Format::Yaml,
        "breaker.yaml",
        &LoadOptions {
            env: &|_: &str| None,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap()
}

fn breakers(store: Arc<dyn BreakerStore>) -> Breakers {
    Breakers {
        store,
        policy: BreakerPolicy {
            consecutive_failures: 2,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        },
    }
}

fn order(id: &str) -> EntityEvent {
    EntityEvent::new(EventKind::Insert, "Order", id, json!({"id": id}), None)
}

#[tokio::test]
async fn the_redis_store_conforms() {
    let store = RedisBreakerStore::new(SHARED_REDIS, prefix()).unwrap();
    conformance::check(&store, "http://127.0.0.1:1").await;
}

#[tokio::test]
async fn a_breaker_opened_by_one_node_is_seen_by_another() {
    let prefix = prefix();
    let node_a = RedisBreakerStore::new(SHARED_REDIS, prefix.clone()).unwrap();
    let node_b = RedisBreakerStore::new(SHARED_REDIS, prefix).unwrap();
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        open_for: Duration::from_secs(30),
        half_open_probes: 1,
    };
    let endpoint = "https://customer.example:443";
    // Failures seen by different nodes add up.
    node_a.record(endpoint, &policy, true).await.unwrap();
    node_b.record(endpoint, &policy, true).await.unwrap();
    assert_eq!(
        node_b.admit(endpoint, &policy).await.unwrap(),
        Admission::Allowed
    );
    node_a.record(endpoint, &policy, true).await.unwrap();
    let Admission::Refused { retry_in } = node_b.admit(endpoint, &policy).await.unwrap() else {
        panic!("node b sees the circuit node a opened");
    };
    assert!(retry_in > Duration::from_secs(25), "{retry_in:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_stops_calls_and_parks_the_work_in_the_job_queue() {
    let receiver = Receiver::start().await;
    receiver.script("/orders", (0..20).map(|_| Reply::status(503)));
    let executor = common::executor_with_runner(&yaml(&receiver), |runner| {
        runner.with_breakers(breakers(Arc::new(InMemoryBreakerStore::default())))
    })
    .with_job_routing();

    let first = executor.execute_event(&order("1")).await;
    let report = &first.actions[0];
    assert_eq!(
        receiver.request_count(),
        2,
        "two failures open the circuit; the third attempt is not made"
    );
    assert!(
        matches!(report.status, ActionStatus::Enqueued { .. }),
        "{report:?}"
    );
    let job = report.job.as_ref().unwrap();
    assert_eq!(job.max_attempts, 8 - 2, "the refused call spent no attempt");
    let due = job.run_at.expect("due when the circuit reopens");
    assert!(
        due > chrono::Utc::now() + chrono::Duration::seconds(3),
        "{due}"
    );

    // Other events for the endpoint wait too, with their whole retry budget, and call nothing.
    let second = executor.execute_event(&order("2")).await;
    let report = &second.actions[0];
    assert!(
        matches!(report.status, ActionStatus::Enqueued { .. }),
        "{report:?}"
    );
    assert_eq!(report.job.as_ref().unwrap().max_attempts, 8);
    assert_eq!(receiver.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_open_circuit_is_postponed_without_spending_an_attempt() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let config = config(&receiver);
    let store = Arc::new(InMemoryBreakerStore::default());
    let guard = breakers(store.clone());
    let endpoint = format!(
        "http://127.0.0.1:{}",
        url::Url::parse(&receiver.url("/")).unwrap().port().unwrap()
    );
    store.record(&endpoint, &guard.policy, true).await.unwrap();
    store.record(&endpoint, &guard.policy, true).await.unwrap();
    let queue = PostgresJobQueue::new(database.pool.clone(), "w", Duration::from_secs(30));
    let job = fraiseql_observers::jobs::NewJob {
        queue: "default".into(),
        priority: 5,
        run_at: None,
        event: order("9"),
        observer: "orders".into(),
        action_index: 0,
        action_type: "webhook".into(),
        max_attempts: 3,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
    };
    let id = queue.enqueue(&job).await.unwrap().unwrap();
    let worker = JobWorker::new(
        queue,
        "default",
        ActionRunner::new(Arc::new(config.templates))
            .unwrap()
            .with_breakers(guard),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_millis(100),
    );
    assert_eq!(
        worker
            .try_execute_one(&CancellationToken::new())
            .await
            .unwrap(),
        WorkOutcome::Postponed(id)
    );
    let (status, attempts, wait): (String, i32, f64) = sqlx::query_as(
        "SELECT status, attempts, extract(epoch FROM run_at - now())::float8 FROM fraiseql_observers.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert!(wait > 3.0, "due when the circuit reopens: {wait}");
    assert_eq!(receiver.request_count(), 0, "nothing was sent");
}
