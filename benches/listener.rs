//! End-to-end numbers of one node on the local PostgreSQL: change-log rows written through a
//! tracked table, delivered to a local webhook receiver.
//!
//! - drain: a backlog of `DRAIN_ROWS` committed changes, delivered as fast as possible (events/s,
//!   checkpoint writes/s);
//! - steady: 1,000 changes/s (10 per commit every 10 ms) for `STEADY_SECONDS`; commit-to-delivery
//!   latency p50/p95/p99/max;
//! - checkpoint saves in a loop (writes/s).
//!
//! Run: `cargo bench --bench listener` (needs the local PostgreSQL; `TEST_DATABASE_URL` overrides).
//! Prints a Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use fraiseql_observers::checkpoint::{BatchPosition, CheckpointStore, PostgresCheckpointStore};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv, load_str};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use tokio_util::sync::CancellationToken;

const DRAIN_ROWS: usize = 50_000;
const STEADY_SECONDS: u64 = 10;
const STEADY_PER_COMMIT: usize = 10;

async fn start_node(
    database: &TestDatabase,
    receiver: &common::Receiver,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    );
    let no_env = |_: &str| None;
    let options = LoadOptions {
        env: &no_env,
        missing_env: MissingEnv::Error,
    };
    let config = load_str(&yaml, Format::Yaml, "bench.yaml", &options).unwrap();
    let settings = ListenerSettings {
        node_id: "bench".into(),
        poll_interval: Duration::from_millis(200),
        ..ListenerSettings::default()
    };
    let node = Node::build(
        database.pool.clone(),
        config,
        settings,
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let running = tokio::spawn(async move {
        node.run_until_stopped(token).await.unwrap();
    });
    (shutdown, running)
}

async fn wait_for(receiver: &common::Receiver, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while receiver.requests().len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} delivered",
            receiver.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checkpoint writes so far, over every partition.
async fn checkpoint_version(database: &TestDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(checkpoint_version), 0)::bigint FROM fraiseql_observers.partitions",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

/// A fresh, migrated database with a tracked `orders` table.
async fn orders_database() -> TestDatabase {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, total int);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    database
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a small vector"
    )]
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

#[tokio::main]
#[allow(
    clippy::too_many_lines,
    reason = "one benchmark script, read top to bottom"
)]
async fn main() {
    let mut table = Vec::new();

    // Drain a backlog.
    let database = orders_database().await;
    sqlx::query("INSERT INTO orders SELECT n, n % 500 FROM generate_series(1, $1) AS n")
        .bind(i64::try_from(DRAIN_ROWS).unwrap())
        .execute(&database.pool)
        .await
        .unwrap();
    let receiver = common::Receiver::start().await;
    let started = Instant::now();
    let (shutdown, running) = start_node(&database, &receiver).await;
    wait_for(&receiver, DRAIN_ROWS, Duration::from_mins(10)).await;
    let drained = started.elapsed();
    let saves = checkpoint_version(&database).await;
    shutdown.cancel();
    running.await.unwrap();
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = DRAIN_ROWS as f64 / drained.as_secs_f64();
    table.push(format!(
        "| drain {DRAIN_ROWS} committed changes (1 webhook each) | {rate:.0} events/s ({:.1} s) |",
        drained.as_secs_f64()
    ));
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let save_rate = saves as f64 / drained.as_secs_f64();
    table.push(format!(
        "| checkpoint saves while draining (pages of 1000, 8 partitions) | {saves} ({save_rate:.0}/s) |"
    ));
    drop(database);

    // Steady 1,000 changes/s.
    let database = orders_database().await;
    let receiver = common::Receiver::start().await;
    let (shutdown, running) = start_node(&database, &receiver).await;
    let commits = usize::try_from(STEADY_SECONDS * 100).unwrap();
    let mut committed_at = Vec::with_capacity(commits * STEADY_PER_COMMIT);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for commit in 0..commits {
        ticker.tick().await;
        let first = i64::try_from(commit * STEADY_PER_COMMIT).unwrap();
        sqlx::query(
            "INSERT INTO orders SELECT n, 1 FROM generate_series($1::bigint, $2::bigint) AS n",
        )
        .bind(first)
        .bind(first + i64::try_from(STEADY_PER_COMMIT).unwrap() - 1)
        .execute(&database.pool)
        .await
        .unwrap();
        let now = Instant::now();
        committed_at.extend(std::iter::repeat_n(now, STEADY_PER_COMMIT));
    }
    wait_for(&receiver, committed_at.len(), Duration::from_mins(1)).await;
    shutdown.cancel();
    running.await.unwrap();
    let mut latencies: Vec<Duration> = receiver
        .requests()
        .iter()
        .map(|request| {
            let id: usize = request.json()["entity_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            request.arrived.saturating_duration_since(committed_at[id])
        })
        .collect();
    latencies.sort_unstable();
    table.push(format!(
        "| commit-to-delivery at 1,000 events/s (10 per commit, {STEADY_SECONDS} s) | p50 {} · p95 {} · p99 {} · max {} |",
        millis(percentile(&latencies, 0.50)),
        millis(percentile(&latencies, 0.95)),
        millis(percentile(&latencies, 0.99)),
        millis(*latencies.last().unwrap())
    ));

    // Checkpoint saves in a loop.
    let store = Arc::new(PostgresCheckpointStore::new(database.pool.clone()));
    let mut checkpoint = store.claim(1, "bench").await.unwrap();
    let started = Instant::now();
    let mut writes = 0_u32;
    while started.elapsed() < Duration::from_secs(3) {
        let next = BatchPosition {
            snapshot: Some("100:100:".into()),
            batch_upto: None,
            batch_position: None,
        };
        checkpoint = store.save(&checkpoint, next, &[]).await.unwrap();
        writes += 1;
    }
    table.push(format!(
        "| checkpoint saves, one partition, sequential | {:.0} writes/s |",
        f64::from(writes) / started.elapsed().as_secs_f64()
    ));

    println!("| one node, local PostgreSQL 15 and receiver | result |");
    println!("|---|---|");
    for row in table {
        println!("{row}");
    }
}
