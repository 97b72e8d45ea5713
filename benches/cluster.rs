//! Cluster numbers on the local PostgreSQL, nodes in this process with default cluster settings
//! (8 partitions, 500 ms tick, 5 s node timeout), one webhook action per change, a local receiver.
//!
//! - failover: two nodes under a steady load (one change per transaction every 2 ms over 200
//!   orders); one node is dropped without cleanup (its task aborted: its lease session and pool
//!   connections close, as when the process is killed) and the time until the survivor delivers
//!   the first change of one of the lost partitions is measured — each node posts to a path of
//!   its own (`/orders/<node id>`), so a request the dropped node had in flight and that lands
//!   after the drop is not taken for the survivor's; the dropped node is replaced by a
//!   new one and the split restored before the next trial. `TRIALS` trials (default 20).
//! - hand-over: the time `HandOverLease` takes under the same load, `TRIALS` times.
//! - throughput: a backlog of `BACKLOG` changes (default 20,000) drained by 1, 2 and 3 nodes.
//!
//! Run: `cargo bench --bench cluster`. Prints a Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Receiver;
use common::config_from_yaml;
use common::nodes::prepare_orders;
use common::postgres::TestDatabase;
use fraiseql_observers::cluster::{ClusterHandle, ClusterSettings};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const ORDERS: i32 = 200;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

struct Running {
    handle: ClusterHandle,
    control: fraiseql_observers::control::Control,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(database: &TestDatabase, receiver: &Receiver, node_id: &str) -> Running {
    // Its own pool, as a separate process would have (the default size of `run`).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&database.url)
        .await
        .unwrap();
    let node = Node::build(
        pool,
        config_from_yaml(&format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions: [{{type: webhook, url: '{}'}}]\n",
            receiver.url(&format!("/orders/{node_id}"))
        )),
        ListenerSettings {
            node_id: node_id.to_owned(),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let (handle, control) = (node.handle(), node.control());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        node.run_until_stopped(token).await.unwrap();
    });
    Running {
        handle,
        control,
        shutdown,
        task,
    }
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Which partition (of 8) each order lives in.
async fn partitions_of_orders(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT (core.observer_entity_hash('Order', id::text) % 8)::int FROM generate_series(0, $1 - 1) AS id ORDER BY id",
    )
    .bind(ORDERS)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a small vector"
    )]
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:.0} ms · p99 {:.0} ms · max {:.0} ms ({} trials)",
        percentile(&samples, 0.5).as_secs_f64() * 1000.0,
        percentile(&samples, 0.99).as_secs_f64() * 1000.0,
        samples.last().unwrap().as_secs_f64() * 1000.0,
        samples.len()
    )
}

/// One change per transaction every 2 ms, cycling over the orders, until `stop`.
fn steady_writer(pool: PgPool, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut version = 0;
        while !stop.is_cancelled() {
            version += 1;
            for id in 0..ORDERS {
                if stop.is_cancelled() {
                    break;
                }
                sqlx::query(
                    "INSERT INTO orders VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                )
                .bind(id)
                .bind(version)
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
}

async fn failover_and_handover(trials: usize) -> (String, String) {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let partition_of = partitions_of_orders(&database.pool).await;
    let survivor = start(&database, &receiver, "survivor").await;
    let mut victim = start(&database, &receiver, "victim-0").await;
    let even =
        |a: &ClusterHandle, b: &ClusterHandle| a.leading().len() == 4 && b.leading().len() == 4;
    until("an even split", Duration::from_mins(1), || {
        even(&survivor.handle, &victim.handle)
    })
    .await;
    let stop_writing = CancellationToken::new();
    let writer = steady_writer(database.pool.clone(), stop_writing.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut failovers = Vec::with_capacity(trials);
    for trial in 1..=trials {
        let lost: HashSet<i32> = victim.handle.leading().into_iter().collect();
        let killed = Instant::now();
        victim.task.abort();
        let _ = victim.task.await;
        // The survivor's first delivery, after the kill, of an order in a lost partition.
        until(
            "a delivery on a lost partition",
            Duration::from_mins(1),
            || {
                receiver
                    .requests_to("/orders/survivor")
                    .iter()
                    .rev()
                    .any(|request| {
                        request.arrived > killed && {
                            let id: usize = request.json()["entity_id"]
                                .as_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            lost.contains(&partition_of[id])
                        }
                    })
            },
        )
        .await;
        failovers.push(killed.elapsed());
        victim = start(&database, &receiver, &format!("victim-{trial}")).await;
        until("the split restored", Duration::from_mins(1), || {
            even(&survivor.handle, &victim.handle)
        })
        .await;
    }

    let mut handovers = Vec::with_capacity(trials);
    let victim_name = format!("victim-{trials}");
    for trial in 0..trials {
        let (from, to) = if trial % 2 == 0 {
            (&victim, "survivor")
        } else {
            (&survivor, victim_name.as_str())
        };
        let partition = *from.handle.leading().iter().next().unwrap();
        let moved = from
            .control
            .hand_over(
                u32::try_from(partition).unwrap(),
                to,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        handovers.push(moved.took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop_writing.cancel();
    writer.await.unwrap();
    for node in [survivor, victim] {
        node.shutdown.cancel();
        node.task.await.unwrap();
    }
    (summary(failovers), summary(handovers))
}

async fn throughput(nodes: usize, backlog: usize) -> f64 {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    // Register the partition count and write the backlog before any node runs.
    sqlx::query("SELECT fraiseql_observers.register_partition_count(8)")
        .execute(&database.pool)
        .await
        .unwrap();
    let per_commit = 1_000;
    for start in (0..backlog).step_by(per_commit) {
        let end = (start + per_commit).min(backlog);
        sqlx::query(
            "INSERT INTO orders SELECT id, 1 FROM generate_series($1::int, $2::int - 1) AS id",
        )
        .bind(i32::try_from(start).unwrap())
        .bind(i32::try_from(end).unwrap())
        .execute(&database.pool)
        .await
        .unwrap();
    }
    let started = Instant::now();
    let mut running = Vec::new();
    for index in 0..nodes {
        running.push(start(&database, &receiver, &format!("node-{index}")).await);
    }
    until("the backlog delivered", Duration::from_mins(10), || {
        receiver.request_count() >= backlog
    })
    .await;
    let elapsed = started.elapsed();
    for node in running {
        node.shutdown.cancel();
        node.task.await.unwrap();
    }
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = backlog as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{nodes} node(s): {backlog} changes in {:.2} s",
        elapsed.as_secs_f64()
    );
    rate
}

#[tokio::main]
async fn main() {
    let trials = env_number("TRIALS", 20);
    let backlog = env_number("BACKLOG", 20_000);
    let (failover, handover) = failover_and_handover(trials).await;
    let mut rates = Vec::new();
    for nodes in 1..=3 {
        rates.push(throughput(nodes, backlog).await);
    }
    println!("| cluster, 8 partitions, default settings | result |");
    println!("|---|---|");
    println!(
        "| failover: node dropped → survivor's first delivery on a lost partition | {failover} |"
    );
    println!("| hand-over under load (HandOverLease until the target leads) | {handover} |");
    for (index, rate) in rates.iter().enumerate() {
        println!(
            "| drain {backlog} changes (1 webhook each), {} node(s) | {rate:.0} events/s |",
            index + 1
        );
    }
}
