//! `fraiseql-observers demo`: the product end to end on the local database in one command.
//!
//! Creates (afresh) a `fraiseql_observers_demo` database, starts a built-in webhook receiver that
//! prints what it receives, runs a node with `examples/demo.yaml`, creates and tracks an `orders`
//! table, makes a few changes, waits for the deliveries and stops. Everything printed is what
//! actually crossed the wire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterSettings;
use crate::config::{Format, LoadOptions, MissingEnv};
use crate::listener::ListenerSettings;
use crate::node::Node;
use crate::observers::load_str;

/// The demo's observers file, compiled in so the demo runs from any directory.
const DEMO_OBSERVERS: &str = include_str!("../examples/demo.yaml");
const DEMO_DATABASE: &str = "fraiseql_observers_demo";
/// Deliveries the demo's changes produce (3 inserts, 1 qualifying update, 1 delete).
const EXPECTED_DELIVERIES: usize = 5;
const DELIVERY_DEADLINE: Duration = Duration::from_secs(20);

type Deliveries = Arc<Mutex<Vec<String>>>;

fn receive(deliveries: &Deliveries, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> &'static str {
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-");
    let body: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let line = format!(
        "  ← POST {}  Idempotency-Key: {}\n      {}",
        uri.path(),
        key,
        serde_json::to_string(&summarize(&body)).unwrap_or_default()
    );
    println!("{line}");
    deliveries
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(line);
    "ok"
}

/// The interesting part of a delivery body, to keep the demo output readable.
fn summarize(body: &serde_json::Value) -> serde_json::Value {
    if body.get("event_type").is_none() {
        return body.clone();
    }
    serde_json::json!({
        "event_type": body["event_type"],
        "entity_id": body["entity_id"],
        "data": body["data"],
        "changes": body["changes"],
    })
}

/// The partition order 1 lives in, and its checkpoint's snapshot now.
async fn where_order_one_is(pool: &sqlx::PgPool) -> anyhow::Result<(i32, Option<String>)> {
    let count = crate::membership::partition_count(pool)
        .await?
        .context("the cluster's partition count is recorded")?;
    let partition = crate::change_log::partition_of(pool, "Order", "1", count).await?;
    let mut connection = crate::database::connection(pool).await?;
    let checkpoint = crate::checkpoint::partition_rows(&mut connection, count)
        .await?
        .into_iter()
        .find(|row| row.partition == partition)
        .and_then(|row| row.snapshot);
    Ok((partition, checkpoint))
}

/// Runs the demo against the PostgreSQL server at `server_url` (any database on it).
///
/// # Errors
/// The server cannot be reached, or deliveries did not arrive in time.
pub async fn run(server_url: &str) -> anyhow::Result<()> {
    let server: PgConnectOptions = server_url.parse().context("parse the database URL")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone())
        .await
        .context("connect to PostgreSQL (set DATABASE_URL)")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {DEMO_DATABASE}"
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(server.database(DEMO_DATABASE))
        .await?;
    println!("1. created database {DEMO_DATABASE}");

    let deliveries: Deliveries = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}", listener.local_addr()?);
    let recorded = deliveries.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let recorded = recorded.clone();
        async move { receive(&recorded, &uri, &headers, &body) }
    });
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("2. webhook receiver listening on {receiver_url}");

    let environment = |name: &str| (name == "DEMO_RECEIVER_URL").then(|| receiver_url.clone());
    let options = LoadOptions {
        env: &environment,
        missing_env: MissingEnv::Error,
    };
    let config = load_str(DEMO_OBSERVERS, Format::Yaml, "examples/demo.yaml", &options)?;
    let observers = config.observers.len();
    let node = Node::build(
        pool.clone(),
        config,
        ListenerSettings {
            poll_interval: Duration::from_millis(500),
            node_id: "demo".into(),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    println!("3. node running: migrations applied, {observers} observers from examples/demo.yaml");

    sqlx::raw_sql(
        "CREATE TABLE public.orders (id int PRIMARY KEY, customer text NOT NULL, status text NOT NULL, total numeric NOT NULL);
         SELECT core.observer_track_table('public.orders'::regclass, 'Order');
         INSERT INTO public.orders VALUES (1, 'ada@example.com', 'new', 250), (2, 'alan@example.com', 'new', 40), (3, 'grace@example.com', 'new', 990);
         UPDATE public.orders SET status = 'paid' WHERE id IN (1, 2);
         DELETE FROM public.orders WHERE id = 3;",
    )
    .execute(&pool)
    .await?;
    println!(
        "4. created and tracked public.orders; inserted 3 orders, paid orders 1 and 2 (only 1 is over 100), deleted order 3\n"
    );
    println!("deliveries:");

    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    while deliveries
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
        < EXPECTED_DELIVERIES
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {EXPECTED_DELIVERIES} deliveries arrived within {DELIVERY_DEADLINE:?}",
            deliveries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await??;
    receiver.abort();
    // The partition order 1 lives in, and where its checkpoint stands now.
    let (partition, checkpoint) = where_order_one_is(&pool).await?;
    println!(
        "\n✓ {EXPECTED_DELIVERIES} deliveries, node stopped cleanly; Order 1 is in partition {partition}, checkpointed at snapshot {}",
        checkpoint.unwrap_or_default()
    );
    println!(
        "  inspect: psql {DEMO_DATABASE} -c 'TABLE {}'",
        crate::change_log::TABLE
    );
    Ok(())
}
