//! The opt-in action result cache against real Redis (shared server, unique key prefix) and a
//! real receiver: it reuses only identical requests, never skips a first side effect, and is
//! cleared by entity and by action type.

mod common;

use std::sync::Arc;

use common::Receiver;
use fraiseql_observers::cache::{Cache, RedisCache, conformance};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::{ActionStatus, Executor};
use serde_json::json;

fn redis_cache() -> Cache {
    Cache {
        backend: Arc::new(RedisCache::new("redis://127.0.0.1:6379").unwrap()),
        prefix: format!("fqo-test-{}:", uuid::Uuid::new_v4().simple()),
        metrics: None,
    }
}

fn executor(receiver: &Receiver, cache: Cache) -> Executor {
    // A body that does not mention the event: two different changes render the same body.
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions:\n      - type: webhook\n        url: '{}'\n        body_template: '{{\"status\": {{{{ data.status }}}}}}'\n        cache: {{ttl: 1m}}\n",
        receiver.url("/orders")
    );
    common::executor_with_runner(&yaml, |runner| runner.with_cache(cache))
}

fn paid(id: &str) -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        id,
        json!({"status": "paid"}),
        Some(json!({"status": "new"})),
    )
}

#[tokio::test]
async fn the_redis_cache_conforms() {
    conformance::check(&redis_cache()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_reuses_identical_requests_and_never_skips_a_first_side_effect() {
    let receiver = Receiver::start().await;
    let cache = redis_cache();
    let node = executor(&receiver, cache.clone());
    let first = paid("1");
    // Another change of the same order with the same body: a real second update.
    let second = paid("1");

    let delivered = node.execute_event(&first).await;
    assert!(matches!(
        &delivered.actions[0].status,
        ActionStatus::Succeeded { detail } if !detail.contains("cached")
    ));
    node.execute_event(&second).await;
    assert_eq!(
        receiver.request_count(),
        2,
        "identical bodies of two events are two side effects (the idempotency key differs)"
    );

    // The same event again (a re-delivery): reused, not sent.
    let again = node.execute_event(&first).await;
    assert!(
        matches!(&again.actions[0].status, ActionStatus::Succeeded { detail } if detail.ends_with("(cached)")),
        "{:?}",
        again.actions[0].status
    );
    assert_eq!(receiver.request_count(), 2);

    // Dropping the entity's entries sends it again.
    assert_eq!(cache.invalidate_entity("Order", "1").await.unwrap(), 2);
    node.execute_event(&first).await;
    assert_eq!(receiver.request_count(), 3);
    assert_eq!(cache.invalidate_action_type("webhook").await.unwrap(), 1);
}
