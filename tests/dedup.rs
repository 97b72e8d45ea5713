//! Deduplication of side effects against real Redis (the shared server, a unique key prefix per
//! test; a private redis-server for the outage test) and real HTTP receivers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::redis::PrivateRedis;
use common::{Receiver, Reply, executor_from_yaml};
use fraiseql_observers::dedup::{
    Claim, Deduplication, DeduplicationStore, Gate, RedisDeduplicationStore, Unavailable,
    conformance,
};
use fraiseql_observers::domain::{ActionKey, EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use serde_json::json;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("fqo-test-{}:", uuid::Uuid::new_v4().simple())
}

fn redis_store(prefix: &str) -> Arc<RedisDeduplicationStore> {
    Arc::new(RedisDeduplicationStore::new(SHARED_REDIS, prefix).unwrap())
}

fn dedup(store: Arc<dyn DeduplicationStore>, when_unavailable: Unavailable) -> Deduplication {
    Deduplication {
        store,
        window: Duration::from_mins(10),
        when_unavailable,
        metrics: None,
        claim_lease: fraiseql_observers::dedup::DEFAULT_CLAIM_LEASE,
        holder: "node-a".to_owned(),
        liveness: None,
    }
}

fn webhook_executor(receiver: &Receiver, dedup: Deduplication) -> Executor {
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 1}}\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    );
    executor_from_yaml(&yaml, &[]).0.with_deduplication(dedup)
}

fn order(id: &str) -> EntityEvent {
    EntityEvent::new(EventKind::Insert, "Order", id, json!({"id": id}), None)
}

#[tokio::test]
async fn the_redis_store_conforms() {
    let prefix = prefix();
    conformance::check(redis_store(&prefix).as_ref(), "conformance").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_one_claim_exactly_one_wins() {
    let prefix = prefix();
    let (a, b) = (redis_store(&prefix), redis_store(&prefix));
    conformance::race(&[a.as_ref(), b.as_ref()], "the-same-action").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_executing_the_same_event_send_one_webhook() {
    let prefix = prefix();
    let receiver = Receiver::start().await;
    let mut slow = Reply::status(200);
    slow.delay = Duration::from_millis(300);
    receiver.script("/orders", [slow]);
    let node_a = webhook_executor(&receiver, dedup(redis_store(&prefix), Unavailable::Process));
    let node_b = webhook_executor(&receiver, dedup(redis_store(&prefix), Unavailable::Process));
    let event = order("1");

    let (a, b) = tokio::join!(node_a.execute_event(&event), node_b.execute_event(&event));
    let statuses = [&a.actions[0].status, &b.actions[0].status];
    assert_eq!(receiver.request_count(), 1, "{statuses:?}");
    let succeeded = statuses
        .iter()
        .filter(|status| matches!(status, ActionStatus::Succeeded { .. }))
        .count();
    assert_eq!(succeeded, 1, "{statuses:?}");
    assert!(
        statuses.iter().any(|status| matches!(
            status,
            ActionStatus::Failed {
                code: ErrorCode::InProgressElsewhere,
                ..
            }
        )),
        "the loser defers (its page is read again), it does not claim success: {statuses:?}"
    );
    let deferred = if matches!(a.actions[0].status, ActionStatus::Failed { .. }) {
        &a
    } else {
        &b
    };
    assert!(!deferred.actions[0].settled);

    // A replay of the same event (failover overlap, duplicated row) is skipped, on either node.
    let again = node_b.execute_event(&event).await;
    assert_eq!(again.actions[0].status, ActionStatus::AlreadyCompleted);
    assert_eq!(receiver.request_count(), 1);
    // Another entity, and another event of the same entity, are never merged with it.
    node_a.execute_event(&order("2")).await;
    node_a.execute_event(&order("1")).await;
    assert_eq!(receiver.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_gives_the_claim_back_so_a_retry_runs() {
    let prefix = prefix();
    let receiver = Receiver::start().await;
    receiver.script("/orders", [Reply::status(503), Reply::status(200)]);
    let store = redis_store(&prefix);
    let node = webhook_executor(&receiver, dedup(store.clone(), Unavailable::Process));
    let event = order("7");
    let first = node.execute_event(&event).await;
    assert!(matches!(
        first.actions[0].status,
        ActionStatus::Failed { .. }
    ));
    let second = node.execute_event(&event).await;
    assert!(
        matches!(second.actions[0].status, ActionStatus::Succeeded { .. }),
        "{:?}",
        second.actions[0].status
    );
    assert_eq!(receiver.request_count(), 2);
    let key = ActionKey::new(event.id, "orders", 0).to_string();
    assert_eq!(
        store
            .claim(&key, "node-a", Duration::from_secs(5))
            .await
            .unwrap(),
        Claim::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_log_row_duplicated_under_the_same_event_id_is_delivered_once() {
    let database = TestDatabase::migrated().await;
    common::nodes::prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = fraiseql_observers::node::Node::build_with_shared_state(
        database.pool.clone(),
        common::nodes::orders_config(&receiver),
        fraiseql_observers::listener::ListenerSettings {
            poll_interval: Duration::from_millis(100),
            ..fraiseql_observers::listener::ListenerSettings::default()
        },
        fraiseql_observers::cluster::ClusterSettings {
            tick: Duration::from_millis(100),
            ..fraiseql_observers::cluster::ClusterSettings::default()
        },
        fraiseql_observers::node::SharedState {
            dedup_store: redis_store(&prefix()),
            ..fraiseql_observers::node::SharedState::default()
        },
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    sqlx::query("INSERT INTO orders VALUES (1, 1)")
        .execute(&database.pool)
        .await
        .unwrap();
    // The same change written twice by a misbehaving writer: same event id, two rows.
    sqlx::query(
        "INSERT INTO core.tb_entity_change_log
             (id, tenant_id, object_type, object_id, modification_type, object_data)
         SELECT id, tenant_id, object_type, object_id, modification_type, object_data
           FROM core.tb_entity_change_log WHERE object_id = '1'",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    common::nodes::eventually("the delivery", || async { receiver.request_count() >= 1 }).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        receiver.request_count(),
        1,
        "two rows with one event id are one side effect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_actions_still_run_or_defer_as_configured_and_claims_resume() {
    let mut redis = PrivateRedis::start();
    let store = Arc::new(RedisDeduplicationStore::new(&redis.url(), "outage:").unwrap());
    let receiver = Receiver::start().await;
    let processing = webhook_executor(&receiver, dedup(store.clone(), Unavailable::Process));
    let deferring = webhook_executor(&receiver, dedup(store.clone(), Unavailable::Defer));
    processing.execute_event(&order("1")).await;
    assert_eq!(receiver.request_count(), 1);

    redis.kill();
    let during = processing.execute_event(&order("2")).await;
    assert!(
        matches!(during.actions[0].status, ActionStatus::Succeeded { .. }),
        "default: at-least-once wins over silence: {:?}",
        during.actions[0].status
    );
    assert_eq!(receiver.request_count(), 2);
    let deferred = deferring.execute_event(&order("3")).await;
    assert!(
        matches!(
            deferred.actions[0].status,
            ActionStatus::Failed {
                code: ErrorCode::InProgressElsewhere,
                ..
            }
        ) && !deferred.actions[0].settled,
        "defer: not run, not settled (read again later): {:?}",
        deferred.actions[0].status
    );
    assert_eq!(receiver.request_count(), 2);

    // The same port again: the managed connection reconnects and claims work again.
    let _restarted = PrivateRedis::start_on(redis.port);
    let gate = dedup(store.clone(), Unavailable::Defer);
    let mut resumed = false;
    for _ in 0..50 {
        if matches!(gate.gate("after-restart").await, Gate::Run(Some(_))) {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "claims resume once Redis is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_breakers_limits_and_cache_let_the_call_through() {
    let mut redis = PrivateRedis::start();
    let receiver = Receiver::start().await;
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 1}}\n    actions: [{{type: webhook, url: '{}', rate_limit: {{per_second: 5}}, max_in_flight: 1, cache: {{ttl: 1m}}}}]\n",
        receiver.url("/orders")
    );
    let url = redis.url();
    let node = common::executor_with_runner(&yaml, |runner| {
        runner
            .with_breakers(fraiseql_observers::breaker::Breakers::new(
                Arc::new(fraiseql_observers::breaker::RedisBreakerStore::new(&url, "o:").unwrap()),
                fraiseql_observers::breaker::BreakerPolicy::default(),
            ))
            .with_limits(Arc::new(
                fraiseql_observers::limits::RedisLimitStore::new(&url, "o:").unwrap(),
            ))
            .with_cache(fraiseql_observers::cache::Cache {
                backend: Arc::new(fraiseql_observers::cache::RedisCache::new(&url).unwrap()),
                prefix: "o:".into(),
                metrics: None,
            })
    })
    .with_deduplication(dedup(
        Arc::new(RedisDeduplicationStore::new(&url, "o:").unwrap()),
        Unavailable::Process,
    ));
    assert!(matches!(
        node.execute_event(&order("1")).await.actions[0].status,
        ActionStatus::Succeeded { .. }
    ));
    redis.kill();
    for id in ["2", "3"] {
        let summary = node.execute_event(&order(id)).await;
        assert!(
            matches!(summary.actions[0].status, ActionStatus::Succeeded { .. }),
            "Redis down: every guard fails open, nothing is lost: {:?}",
            summary.actions[0].status
        );
    }
    assert_eq!(receiver.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_claim_is_renewed_while_its_attempt_runs_and_lapses_soon_after_it_ends() {
    let prefix = prefix();
    let holder_store = redis_store(&prefix);
    let other_node = redis_store(&prefix);
    let lease = Duration::from_millis(600);
    let holder = Deduplication {
        claim_lease: lease,
        ..dedup(holder_store, Unavailable::Process)
    };
    let Gate::Run(Some(token)) = holder.gate("long-attempt").await else {
        panic!("a fresh claim is acquired");
    };
    // An attempt lasting three leases: another node finds the claim busy all along, never with
    // more than one lease left, because the holder renews it.
    let attempt = async {
        let started = tokio::time::Instant::now();
        let mut checks = 0;
        while started.elapsed() < lease * 3 {
            match other_node
                .claim("long-attempt", "node-b", lease)
                .await
                .unwrap()
            {
                Claim::Busy { expires_in, .. } => assert!(expires_in <= lease, "{expires_in:?}"),
                other => panic!("the claim lapsed while its attempt ran: {other:?}"),
            }
            checks += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        checks
    };
    let checks = holder.hold("long-attempt", Some(&token), attempt).await;
    assert!(checks > 10, "{checks} checks");
    // The attempt ended without settling (as when its node is killed right after): renewals
    // stopped with it, so the claim is free within one lease.
    let ended = tokio::time::Instant::now();
    let taken_after = loop {
        if let Claim::Acquired(_) = other_node
            .claim("long-attempt", "node-b", lease)
            .await
            .unwrap()
        {
            break ended.elapsed();
        }
        assert!(
            ended.elapsed() < lease * 3,
            "the claim was still renewed after its attempt ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        taken_after <= lease + Duration::from_millis(100),
        "{taken_after:?}"
    );
}

/// A `fraiseql-observers run` process, killed (SIGKILL) on drop.
struct NodeProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl NodeProcess {
    fn spawn(
        database: &TestDatabase,
        config: &std::path::Path,
        node_id: &str,
        node_timeout: &str,
        redis_prefix: &str,
        directory: &std::path::Path,
    ) -> NodeProcess {
        let log = directory.join(format!("{node_id}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(["--node-id", node_id, "--node-timeout", node_timeout])
            .args(["--poll-interval", "200ms"])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("DATABASE_URL", &database.url)
            .env("REDIS_URL", SHARED_REDIS)
            .env("FRAISEQL_OBSERVERS_REDIS_PREFIX", redis_prefix)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the binary starts");
        NodeProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no shutdown, no claim released, no checkpoint saved.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The node whose lease session holds the advisory lock of `partition`, if any.
async fn partition_holder(pool: &sqlx::PgPool, partition: i32) -> Option<String> {
    sqlx::query_scalar(
        "SELECT substr(activity.application_name, length('fraiseql-observers lease ') + 1)
           FROM pg_locks AS lock JOIN pg_stat_activity AS activity ON activity.pid = lock.pid
          WHERE lock.locktype = 'advisory' AND lock.classid = $1::bigint::oid
            AND lock.objid = $2::bigint::oid AND lock.objsubid = 2 AND lock.granted
            AND lock.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(fraiseql_observers::cluster::LEASE_NAMESPACE))
    .bind(i64::from(partition))
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Once `leader` and `other` lead every partition between them (each at least one), an order id
/// whose partition `leader` leads.
async fn order_led_by(
    pool: &sqlx::PgPool,
    leader: &str,
    other: &str,
    partitions: i32,
) -> Option<i32> {
    let mut holders = Vec::new();
    for partition in 0..partitions {
        holders.push(partition_holder(pool, partition).await);
    }
    let leads = |node: &str| {
        holders
            .iter()
            .filter(|holder| holder.as_deref() == Some(node))
            .count()
    };
    if leads(leader) == 0 || leads(other) == 0 || leads(leader) + leads(other) < holders.len() {
        return None;
    }
    for id in 1..1000 {
        let partition = fraiseql_observers::change_log::partition_of(
            pool,
            "Order",
            &id.to_string(),
            partitions,
        )
        .await
        .unwrap();
        if holders[usize::try_from(partition).unwrap()].as_deref() == Some(leader) {
            return Some(id);
        }
    }
    None
}

/// Versions of order `id` the receiver saw, in arrival order, with their arrival times.
fn deliveries_of(receiver: &Receiver, id: i32) -> Vec<(i64, std::time::Instant)> {
    let entity_id = id.to_string();
    receiver
        .requests_to("/orders")
        .iter()
        .filter(|request| request.json()["entity_id"].as_str() == Some(entity_id.as_str()))
        .map(|request| {
            (
                request.json()["data"]["version"].as_i64().unwrap(),
                request.arrived,
            )
        })
        .collect()
}

/// Two real node processes sharing Redis; the one leading an order's partition is killed with
/// SIGKILL while its webhook call for that order is held open by the receiver. Its claim on the
/// action is not released, only no longer renewed: it ends within one claim lease (half the node
/// timeout), so the survivor delivers the interrupted change again and then the order's next
/// change within node timeout + 1 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_mid_attempt_the_entity_s_next_change_is_delivered_within_the_node_timeout() {
    const NODE_TIMEOUT: Duration = Duration::from_secs(3);
    /// Allowance for a loaded 2-core machine (scheduling, process start-up of nothing: both
    /// nodes already run), on top of the guarantee of node timeout + 1 s.
    const TOLERANCE: Duration = Duration::from_secs(1);
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    common::nodes::prepare_orders(pool).await;
    let receiver = Receiver::start().await;
    // The first call is held open far longer than the test: the kill lands mid-attempt.
    let mut held_open = Reply::status(200);
    held_open.delay = Duration::from_mins(2);
    receiver.script("/orders", [held_open]);
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions: [{{type: webhook, url: '{}', timeout: 5m}}]\n",
            receiver.url("/orders")
        ),
    )
    .unwrap();
    let redis_prefix = prefix();
    let timeout_flag = format!("{}s", NODE_TIMEOUT.as_secs());
    let spawn = |node_id: &str| {
        NodeProcess::spawn(
            &database,
            &config,
            node_id,
            &timeout_flag,
            &redis_prefix,
            directory.path(),
        )
    };
    let mut node_a = spawn("a");
    let node_b = spawn("b");

    // Both nodes run and split the partitions; pick an order whose partition node a leads.
    let partitions = i32::try_from(fraiseql_observers::cluster::DEFAULT_PARTITIONS).unwrap();
    let started = std::time::Instant::now();
    let order = loop {
        if let Some(order) = order_led_by(pool, "a", "b", partitions).await {
            break order;
        }
        assert!(
            started.elapsed() < common::nodes::DEADLINE,
            "the nodes did not split the partitions\nnode a:\n{}",
            node_a.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    common::nodes::write_orders(pool, order..order + 1, 1).await;
    common::nodes::eventually("node a's call for version 1 to arrive", || async {
        !deliveries_of(&receiver, order).is_empty()
    })
    .await;
    // The entity's next change, waiting behind the call in progress.
    common::nodes::write_orders(pool, order..order + 1, 2).await;
    node_a.kill();
    let killed = std::time::Instant::now();

    let deadline = killed + NODE_TIMEOUT + Duration::from_secs(1) + TOLERANCE + DEADLINE_MARGIN;
    let next_change_after = loop {
        let delivered = deliveries_of(&receiver, order);
        if let Some((_, arrived)) = delivered.iter().find(|(version, _)| *version == 2) {
            break arrived.duration_since(killed);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "version 2 of order {order} not delivered {:?} after the kill: {delivered:?}\nnode b:\n{}",
            killed.elapsed(),
            node_b.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let versions: Vec<i64> = deliveries_of(&receiver, order)
        .into_iter()
        .map(|(version, _)| version)
        .collect();
    eprintln!(
        "kill -9 mid-attempt → the entity's next change delivered after {next_change_after:?} (node timeout {NODE_TIMEOUT:?}); deliveries of the order: {versions:?}"
    );
    assert!(
        next_change_after <= NODE_TIMEOUT + Duration::from_secs(1) + TOLERANCE,
        "{next_change_after:?}: the entity waited behind the killed node's claim\nnode b:\n{}",
        node_b.log()
    );
    // The interrupted change is delivered again (at-least-once), before the next one.
    assert_eq!(versions, [1, 1, 2], "per-entity order after the kill");
    let dead_letters: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(dead_letters, 0);
}

/// How much longer than the asserted bound the test waits before giving up, so a slow run
/// reports its measured delay instead of a bare timeout.
const DEADLINE_MARGIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_action_another_node_holds_is_postponed_to_the_claim_s_end_without_an_attempt()
{
    let database = TestDatabase::migrated().await;
    let prefix = prefix();
    let receiver = Receiver::start().await;
    let config = common::config_from_yaml(&format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    ));
    let queue = fraiseql_observers::jobs::PostgresJobQueue::new(
        database.pool.clone(),
        "w",
        Duration::from_secs(30),
    );
    let event = order("busy");
    let job = fraiseql_observers::jobs::NewJob {
        queue: "default".into(),
        priority: 5,
        run_at: None,
        event: event.clone(),
        observer: "orders".into(),
        action_index: 0,
        action_type: "webhook".into(),
        max_attempts: 1,
        initial_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(10),
        parked_on: None,
        history: Vec::new(),
    };
    let id = queue.enqueue(&job).await.unwrap().unwrap();
    // Another node holds the action's claim, with 2 s of its lease left.
    let key = ActionKey::new(event.id, "orders", 0).to_string();
    let other_node = redis_store(&prefix);
    assert!(matches!(
        other_node
            .claim(&key, "node-a", Duration::from_secs(2))
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));
    let worker = fraiseql_observers::worker::JobWorker::new(
        queue,
        "default",
        fraiseql_observers::actions::ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(fraiseql_observers::matcher::Matcher::new(config.observers)),
        Duration::from_millis(100),
    )
    .with_deduplication(dedup(redis_store(&prefix), Unavailable::Process));
    let stopping = tokio_util::sync::CancellationToken::new();
    assert_eq!(
        worker.try_execute_one(&stopping).await.unwrap(),
        fraiseql_observers::worker::WorkOutcome::Postponed(id)
    );
    let (status, attempts, wait): (String, i32, f64) = sqlx::query_as(
        "SELECT status, attempts, extract(epoch FROM run_at - now())::float8
           FROM fraiseql_observers.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&database.pool)
    .await
    .unwrap();
    // Its only attempt is not spent (no dead letter), and it is due when the claim ends, not
    // after the policy's 10 s backoff.
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert!((1.0..=2.0).contains(&wait), "due in {wait} s");
    assert_eq!(receiver.request_count(), 0, "nothing was sent");
}
