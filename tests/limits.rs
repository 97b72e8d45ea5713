//! Endpoint rate and in-flight limits against real Redis (shared server, unique key prefix) and
//! a real HTTP receiver: the limits hold across two nodes and on the wire.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Receiver, Reply};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::limits::{LimitStore, RedisLimitStore, conformance};
use serde_json::json;

fn redis(prefix: &str) -> Arc<RedisLimitStore> {
    Arc::new(RedisLimitStore::new("redis://127.0.0.1:6379", prefix).unwrap())
}

fn prefix() -> String {
    format!("fqo-test-{}:", uuid::Uuid::new_v4().simple())
}

/// A node: an executor whose webhook has `limits`, counting them in `store`.
fn node(receiver: &Receiver, limits: &str, store: Arc<dyn LimitStore>) -> Executor {
    let yaml = format!(
        "executor: {{max_concurrent_entities: 64, max_concurrent_actions: 64}}\nobservers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}', {limits}}}]\n",
        receiver.url("/orders")
    );
    common::executor_with_runner(&yaml, |runner| runner.with_limits(store))
}

fn orders(range: std::ops::Range<usize>) -> Vec<EntityEvent> {
    range
        .map(|id| {
            EntityEvent::new(
                EventKind::Insert,
                "Order",
                id.to_string(),
                json!({"id": id}),
                None,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_conforms_across_two_nodes() {
    let prefix = prefix();
    let (a, b) = (redis(&prefix), redis(&prefix));
    conformance::check(&[a.as_ref(), b.as_ref()], "http://127.0.0.1:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_have_more_calls_in_flight_than_the_limit() {
    let prefix = prefix();
    let receiver = Receiver::start().await;
    let mut slow = Reply::status(200);
    slow.delay = Duration::from_millis(100);
    receiver.script("/orders", (0..16).map(|_| slow.clone()));
    let node_a = node(&receiver, "max_in_flight: 2", redis(&prefix));
    let node_b = node(&receiver, "max_in_flight: 2", redis(&prefix));
    let (first, second) = (orders(0..8), orders(8..16));
    let (a, b) = tokio::join!(node_a.execute_batch(&first), node_b.execute_batch(&second));
    assert_eq!(receiver.request_count(), 16);
    assert!(
        a.iter()
            .chain(&b)
            .all(|summary| matches!(summary.actions[0].status, ActionStatus::Succeeded { .. }))
    );
    assert_eq!(
        receiver.max_in_flight(),
        2,
        "the limit holds across both nodes (and is reached)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_rate() {
    let prefix = prefix();
    let receiver = Receiver::start().await;
    let limits = "rate_limit: {per_second: 20, burst: 4}";
    let node_a = node(&receiver, limits, redis(&prefix));
    let node_b = node(&receiver, limits, redis(&prefix));
    let (first, second) = (orders(0..12), orders(12..24));
    let started = Instant::now();
    tokio::join!(node_a.execute_batch(&first), node_b.execute_batch(&second));
    let elapsed = started.elapsed();
    assert_eq!(receiver.request_count(), 24);
    // 4 at once, then 20 more at 20 per second between the two nodes: at least ~1 s in all.
    assert!(
        elapsed >= Duration::from_millis(900),
        "24 calls at 20/s (burst 4) across two nodes took only {elapsed:?}"
    );
}
