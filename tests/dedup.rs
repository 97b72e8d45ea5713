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
        store.claim(&key, Duration::from_secs(5)).await.unwrap(),
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
        if matches!(
            gate.gate("after-restart", Duration::from_secs(5)).await,
            Gate::Run(Some(_))
        ) {
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
