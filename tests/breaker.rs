//! Circuit breakers against real Redis (shared server, unique key prefix) and real HTTP
//! receivers: the state machine (one conformance suite for both stores), a breaker opened by one
//! node seen by another, an open circuit that stops calls and parks the work in the job queue
//! without spending attempts, failures of our own overload that do not open it, and an endpoint
//! down for ten seconds whose parked work is delivered as soon as it answers again.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::breaker::{
    Admission, BreakerPolicy, BreakerState, BreakerStore, Breakers, CallOutcome,
    InMemoryBreakerStore, RedisBreakerStore, Transition, circuit_id, conformance,
};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::concurrency::{EndpointLimiter, LimiterSettings};
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::ActionStatus;
use fraiseql_observers::jobs::PostgresJobQueue;
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::node::{Node, SharedState};
use fraiseql_observers::observers::{ObserversConfig, load_str};
use fraiseql_observers::worker::{JobWorker, WorkOutcome};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("fqo-test-{}:", uuid::Uuid::new_v4().simple())
}

fn yaml(receiver: &Receiver, max_attempts: u32) -> String {
    format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: {max_attempts}, initial_delay: 10ms, max_delay: 20ms}}\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    )
}

fn config(receiver: &Receiver) -> ObserversConfig {
    load_str(
        &yaml(receiver, 8),
        Format::Yaml,
        "breaker.yaml",
        &LoadOptions {
            env: &|_: &str| None,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap()
}

/// Opens after two calls that both failed, for 5 s.
fn quick_policy() -> BreakerPolicy {
    BreakerPolicy {
        failure_rate_percent: 50,
        minimum_calls: 2,
        window: Duration::from_secs(10),
        first_open_for: Duration::from_secs(5),
        open_for: Duration::from_secs(30),
        half_open_probes: 1,
    }
}

/// A limiter that never shrinks (no adaptive limit), so every failure counts.
fn fixed_limiter() -> EndpointLimiter {
    EndpointLimiter::new(
        LimiterSettings {
            adaptive: false,
            ..LimiterSettings::default()
        },
        None,
    )
}

fn endpoint_of(receiver: &Receiver) -> String {
    let url = url::Url::parse(&receiver.url("/")).unwrap();
    format!("http://127.0.0.1:{}", url.port().unwrap())
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
        minimum_calls: 4,
        ..BreakerPolicy::default()
    };
    let endpoint = "https://customer.example:443";
    // Calls seen by different nodes add up in one window.
    node_a
        .record(endpoint, &policy, CallOutcome::Failed)
        .await
        .unwrap();
    node_b
        .record(endpoint, &policy, CallOutcome::Succeeded)
        .await
        .unwrap();
    node_b
        .record(endpoint, &policy, CallOutcome::Failed)
        .await
        .unwrap();
    assert_eq!(
        node_b.admit(endpoint, &policy).await.unwrap(),
        Admission::Allowed
    );
    assert_eq!(
        node_a
            .record(endpoint, &policy, CallOutcome::Failed)
            .await
            .unwrap(),
        Transition::Opened {
            open_for: policy.first_open_for
        },
        "three failures in four calls from two nodes"
    );
    let Admission::Refused { retry_in } = node_b.admit(endpoint, &policy).await.unwrap() else {
        panic!("node b sees the circuit node a opened");
    };
    assert!(retry_in <= policy.first_open_for, "{retry_in:?}");
    assert_eq!(node_b.state(endpoint).await.unwrap(), BreakerState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_stops_calls_and_parks_the_work_in_the_job_queue() {
    let receiver = Receiver::start().await;
    receiver.script("/orders", (0..20).map(|_| Reply::status(503)));
    let executor = common::executor_with_runner(&yaml(&receiver, 8), |runner| {
        runner
            .with_limiter(fixed_limiter())
            .with_breakers(Breakers::new(
                Arc::new(InMemoryBreakerStore::default()),
                quick_policy(),
            ))
    })
    .with_job_routing();

    let first = executor.execute_event(&order("1")).await;
    let report = &first.actions[0];
    assert_eq!(
        receiver.request_count(),
        2,
        "two failed calls of two open the circuit; the third attempt is not made"
    );
    assert!(
        matches!(report.status, ActionStatus::Enqueued { .. }),
        "{report:?}"
    );
    let job = report.job.as_ref().unwrap();
    assert_eq!(job.max_attempts, 8 - 2, "the refused call spent no attempt");
    assert_eq!(
        job.parked_on.as_deref(),
        Some(circuit_id(&endpoint_of(&receiver)).as_str()),
        "parked on the endpoint's circuit"
    );
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

/// Twelve calls at once to a receiver that answers 503 after 200 ms: with the adaptive limiter,
/// the first failure halves the limit and the others end while it is shrinking — our own
/// overload being shed, not counted — so the circuit stays closed; without it, every failure
/// counts and the circuit opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_while_the_limiter_shrinks_do_not_open_the_circuit() {
    let burst = 12;
    for adaptive in [true, false] {
        let receiver = Receiver::start().await;
        receiver.script(
            "/orders",
            (0..burst).map(|_| Reply {
                delay: Duration::from_millis(200),
                ..Reply::status(503)
            }),
        );
        let store = Arc::new(InMemoryBreakerStore::default());
        let policy = BreakerPolicy {
            minimum_calls: 10,
            ..BreakerPolicy::default()
        };
        let executor = common::executor_with_runner(&yaml(&receiver, 1), |runner| {
            let runner = runner.with_breakers(Breakers::new(store.clone(), policy));
            if adaptive {
                runner
            } else {
                runner.with_limiter(fixed_limiter())
            }
        });
        let events: Vec<EntityEvent> = (0..burst).map(|id| order(&id.to_string())).collect();
        executor.execute_batch(&events).await;
        assert_eq!(receiver.request_count(), burst, "every call was made");
        let state = store.state(&endpoint_of(&receiver)).await.unwrap();
        if adaptive {
            assert_eq!(
                state,
                BreakerState::Closed,
                "the limiter was shedding the burst's overload"
            );
        } else {
            assert_eq!(state, BreakerState::Open, "twelve failures of twelve calls");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_open_circuit_is_postponed_and_made_due_when_the_circuit_closes() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let config = config(&receiver);
    let store = Arc::new(InMemoryBreakerStore::default());
    let endpoint = endpoint_of(&receiver);
    let queue = PostgresJobQueue::new(database.pool.clone(), "w", Duration::from_secs(30));
    let guard = Breakers::new(store.clone(), quick_policy()).with_parked_jobs(queue.clone());
    for _ in 0..2 {
        store
            .record(&endpoint, &quick_policy(), CallOutcome::Failed)
            .await
            .unwrap();
    }
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
        parked_on: None,
        history: Vec::new(),
    };
    let id = queue.enqueue(&job).await.unwrap().unwrap();
    let worker = JobWorker::new(
        queue,
        "default",
        ActionRunner::new(Arc::new(config.templates))
            .unwrap()
            .with_breakers(guard.clone()),
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
    let row = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (String, i32, f64, Option<String>)>(
            "SELECT status, attempts, extract(epoch FROM run_at - now())::float8, parked_on
               FROM fraiseql_observers.jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let (status, attempts, wait, parked_on) = row(database.pool.clone()).await;
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert!(wait > 3.0, "due when the circuit reopens: {wait}");
    assert_eq!(parked_on, Some(circuit_id(&endpoint)));
    assert_eq!(receiver.request_count(), 0, "nothing was sent");

    // A probe succeeds elsewhere: the circuit closes and the parked job is due now.
    assert!(store.end_open_period(&endpoint).await.unwrap());
    assert_eq!(guard.admit(&endpoint, &endpoint).await, Admission::Probe);
    guard
        .record_outcome(&endpoint, &endpoint, CallOutcome::Succeeded)
        .await;
    let (status, attempts, wait, parked_on) = row(database.pool.clone()).await;
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert!(wait <= 0.0, "due now: {wait}");
    assert_eq!(parked_on, None);
    assert!(matches!(
        worker
            .try_execute_one(&CancellationToken::new())
            .await
            .unwrap(),
        WorkOutcome::Completed(_)
    ));
    assert_eq!(receiver.request_count(), 1);
}

/// The counter `breaker_transitions_total` of `endpoint` and `transition` in `text`.
fn transitions(text: &str, endpoint: &str, transition: &str) -> u64 {
    let prefix = format!(
        "fraiseql_observers_breaker_transitions_total{{endpoint=\"{endpoint}\",transition=\"{transition}\"}} "
    );
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The scenario on one node with the default breaker settings, breakers in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_for_ten_seconds_gets_its_parked_work_within_a_second_of_answering() {
    down_for_ten_seconds_then_up(SharedState::default()).await;
}

/// The same with the breaker state in Redis, as nodes share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_breakers_in_redis_parked_work_also_runs_within_a_second_of_answering() {
    down_for_ten_seconds_then_up(SharedState {
        breakers: Breakers::new(
            Arc::new(RedisBreakerStore::new(SHARED_REDIS, prefix()).unwrap()),
            BreakerPolicy::default(),
        ),
        ..SharedState::default()
    })
    .await;
}

/// A node with one webhook observer of orders posting to `endpoint`, running until cancelled.
async fn start_node(
    database: &TestDatabase,
    endpoint: &str,
    shared: SharedState,
) -> (
    Arc<fraiseql_observers::metrics::Metrics>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), fraiseql_observers::cluster::ClusterError>>,
) {
    let config = common::config_from_yaml(&format!(
        "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 20, initial_delay: 100ms, max_delay: 2s}}
    actions: [{{type: webhook, url: '{endpoint}/orders', timeout: 2s}}]
"
    ));
    let node = Node::build_with_shared_state(
        database.pool.clone(),
        config,
        ListenerSettings {
            poll_interval: Duration::from_millis(50),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
        shared,
    )
    .await
    .unwrap();
    let metrics = node.metrics();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));

    (metrics, shutdown, running)
}

/// An endpoint that refuses connections for ten seconds, then answers. The circuit opens within
/// its window; the work it parked is delivered, all of it and once, within a second of the
/// endpoint answering — measured from the moment the receiver listens on the port again to the
/// last parked delivery.
async fn down_for_ten_seconds_then_up(shared: SharedState) {
    let database = TestDatabase::migrated().await;
    common::nodes::prepare_orders(&database.pool).await;
    // A port nothing listens on (connections are refused) until the receiver binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (metrics, shutdown, running) = start_node(&database, &endpoint, shared).await;

    let changes = 40;
    let down_since = Instant::now();
    common::nodes::write_orders(&database.pool, 0..changes, 1).await;
    common::nodes::eventually("the circuit to open", || {
        let text = metrics.render();
        let endpoint = endpoint.clone();
        async move { transitions(&text, &endpoint, "opened") >= 1 }
    })
    .await;
    let opened_after = down_since.elapsed();
    assert!(
        opened_after < fraiseql_observers::breaker::DEFAULT_WINDOW,
        "opened within the window: {opened_after:?}"
    );
    // The page's jobs are stored with its checkpoint, once every action of the page settled.
    let parked = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM fraiseql_observers.jobs WHERE status = 'pending' AND parked_on IS NOT NULL",
        )
        .fetch_one(&database.pool)
        .await
        .unwrap()
    };
    common::nodes::eventually("work parked on the open circuit", || async {
        parked().await > 0
    })
    .await;
    let parked = parked().await;

    // Down for ten seconds, then up on the same port.
    tokio::time::sleep_until((down_since + Duration::from_secs(10)).into()).await;
    let receiver = Receiver::start_on(&format!("127.0.0.1:{port}")).await;
    let up_at = Instant::now();
    let deadline = up_at + Duration::from_secs(30);
    while receiver.requests_to("/orders").len() < usize::try_from(changes).unwrap() {
        assert!(
            Instant::now() < deadline,
            "{} of {changes} delivered 30 s after the endpoint came back",
            receiver.request_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last_delivery = receiver
        .requests_to("/orders")
        .iter()
        .map(|request| request.arrived)
        .max()
        .unwrap();
    let delay = last_delivery.duration_since(up_at);
    let text = metrics.render();
    shutdown.cancel();
    running.await.unwrap().unwrap();

    common::nodes::assert_once_and_in_order(&receiver, usize::try_from(changes).unwrap());
    let dead_letters: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(dead_letters, 0, "nothing lost");
    assert!(transitions(&text, &endpoint, "closed") >= 1, "{text}");
    println!(
        "circuit opened {opened_after:?} after the endpoint went down; {parked} jobs parked; \
         last parked delivery {delay:?} after the endpoint answered again"
    );
    // The promise is one second; the rest is slack for a loaded two-core machine.
    assert!(
        delay <= Duration::from_millis(2_500),
        "parked work delivered {delay:?} after the endpoint answered (promise: 1 s, tolerance 1.5 s)"
    );
}
