//! Helpers for tests that run whole nodes against a tracked `orders (id, version)` table:
//! the table, an observers file posting every insert and update to a receiver, polling, and the
//! delivery invariants (each change once, per-order versions in order).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::observers::{ObserversConfig, load_str};
use sqlx::PgPool;

use super::Receiver;

/// How long `eventually` waits.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it holds; fails the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `orders (id int, version int)`, tracked as `Order`.
pub async fn prepare_orders(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, version int NOT NULL);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// One observer posting every order insert and update to the receiver's `/orders`.
pub fn orders_config(receiver: &Receiver) -> ObserversConfig {
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    );
    load_str(
        &yaml,
        Format::Yaml,
        "orders.yaml",
        &LoadOptions {
            env: &|_: &str| None,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap()
}

/// Every change delivered once (by idempotency key), and each order's versions in change order.
pub fn assert_once_and_in_order(receiver: &Receiver, changes: usize) {
    let mut per_key: HashMap<String, usize> = HashMap::new();
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for request in receiver.requests_to("/orders") {
        *per_key
            .entry(request.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
        let body = request.json();
        versions
            .entry(body["entity_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["data"]["version"].as_i64().unwrap());
    }
    assert_eq!(per_key.len(), changes, "every change delivered");
    let repeated: Vec<_> = per_key.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    for (order, seen) in versions {
        assert!(
            seen.windows(2).all(|pair| pair[0] < pair[1]),
            "order {order} delivered out of order: {seen:?}"
        );
    }
}

/// Writes version `version` of orders `ids` in one statement.
pub async fn write_orders(pool: &PgPool, ids: std::ops::Range<i32>, version: i32) {
    sqlx::query(
        "INSERT INTO orders SELECT id, $3 FROM generate_series($1, $2) AS id
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
    )
    .bind(ids.start)
    .bind(ids.end - 1)
    .bind(version)
    .execute(pool)
    .await
    .unwrap();
}

/// A steady load: rounds of new versions of orders `0..orders` until finished.
pub struct Writer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl Writer {
    /// `one_per_transaction`: each order in its own transaction; otherwise a round per statement,
    /// 5 ms apart.
    pub fn start(pool: PgPool, orders: i32, one_per_transaction: bool) -> Writer {
        let stop = tokio_util::sync::CancellationToken::new();
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let (mut version, mut changes) = (0, 0_usize);
            while !stopping.is_cancelled() {
                version += 1;
                if one_per_transaction {
                    for id in 0..orders {
                        write_orders(&pool, id..id + 1, version).await;
                    }
                } else {
                    write_orders(&pool, 0..orders, version).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                changes += usize::try_from(orders).unwrap();
            }
            changes
        });
        Writer { stop, task }
    }

    /// Stops after the round in progress; how many changes were written.
    pub async fn finish(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}
