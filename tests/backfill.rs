//! `backfill`: rows a table held before capture was attached are delivered, each once, against a
//! fresh database per test — with a real node delivering to a receiver on port 0, under
//! concurrent updates, after an interruption, and as the binary runs it (`--dry-run`, errors).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Receiver;
use common::nodes::{DEADLINE, eventually, orders_config};
use common::postgres::TestDatabase;
use fraiseql_observers::backfill::{self, BackfillError, BackfillSettings};
use fraiseql_observers::cluster::{ClusterError, ClusterSettings};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use rand::Rng as _;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `orders (id, version)` with `rows` rows written before capture, then tracked as `Order`.
async fn orders_before_capture(pool: &PgPool, rows: i32) {
    sqlx::query("CREATE TABLE orders (id int PRIMARY KEY, version int NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(0, $1 - 1) AS id")
        .bind(rows)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("SELECT core.observer_track_table('orders'::regclass, 'Order')")
        .execute(pool)
        .await
        .unwrap();
}

fn settings(batch_size: u32) -> BackfillSettings {
    BackfillSettings {
        batch_size,
        ..BackfillSettings::default()
    }
}

struct RunningNode {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ClusterError>>,
}

async fn start_node(database: &TestDatabase, receiver: &Receiver) -> RunningNode {
    let node = Node::build(
        database.pool.clone(),
        orders_config(receiver),
        ListenerSettings {
            node_id: "backfill-node".to_owned(),
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        ClusterSettings {
            partitions: 4,
            node_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    RunningNode { shutdown, task }
}

impl RunningNode {
    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the node stops")
            .expect("no panic");
        assert!(stopped.is_ok(), "{stopped:?}");
    }
}

/// Per order id, the (event type, version) pairs the receiver got, in arrival order.
fn deliveries(receiver: &Receiver) -> HashMap<String, Vec<(String, i64)>> {
    let mut per_order: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for request in receiver.requests_to("/orders") {
        let body = request.json();
        per_order
            .entry(body["entity_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                body["event_type"].as_str().unwrap().to_owned(),
                body["data"]["version"].as_i64().unwrap(),
            ));
    }
    per_order
}

/// Synthetic or captured INSERT rows in the change log, per object id.
async fn logged_inserts(pool: &PgPool) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT object_id::text, count(*) FROM core.tb_entity_change_log
          WHERE modification_type = 'INSERT' GROUP BY object_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

#[tokio::test]
async fn rows_written_before_capture_are_delivered_once_each() {
    let database = TestDatabase::migrated().await;
    orders_before_capture(&database.pool, 250).await;
    // Rows inserted after capture was attached already have their INSERT: not written again.
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(250, 269) AS id")
        .execute(&database.pool)
        .await
        .unwrap();

    let summary = backfill::run(
        &database.pool,
        "public.orders",
        &settings(37),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (
            summary.rows_scanned,
            summary.rows_written,
            summary.rows_skipped
        ),
        (270, 250, 20)
    );
    assert!(!summary.resumed);

    let receiver = Receiver::start().await;
    let node = start_node(&database, &receiver).await;
    eventually("every order delivered", || async {
        receiver.requests_to("/orders").len() >= 270
    })
    .await;
    node.stop().await;

    let delivered = deliveries(&receiver);
    assert_eq!(delivered.len(), 270, "every order delivered");
    for (order, events) in &delivered {
        assert_eq!(
            events,
            &vec![("INSERT".to_owned(), 1)],
            "order {order}: exactly one INSERT"
        );
    }
    let keys: std::collections::HashSet<String> = receiver
        .requests_to("/orders")
        .iter()
        .map(|request| request.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 270, "no event delivered twice");

    // A second backfill finds the run finished and writes nothing.
    let again = backfill::run(
        &database.pool,
        "orders",
        &settings(37),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert!(again.already_complete);
    assert_eq!(again.rows_written, 0);
    assert!(
        logged_inserts(&database.pool)
            .await
            .values()
            .all(|count| *count == 1)
    );
}

#[tokio::test]
async fn a_synthetic_insert_is_what_capture_writes_for_an_insert() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE accounts (id uuid PRIMARY KEY, tenant_id uuid, name text, tags text[], at timestamptz);
         INSERT INTO accounts VALUES ('7f1c2c6e-25b3-4b7e-9d49-0a4bd0d6a001',
                                      '00000000-0000-0000-0000-00000000000a',
                                      'O''Hara \"q\"', ARRAY['a','b'], '2026-01-02 03:04:05+00');
         SELECT core.observer_track_table('accounts'::regclass, 'Account');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    backfill::run(
        &database.pool,
        "accounts",
        &settings(10),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    // The same row deleted and inserted again, now through capture.
    sqlx::raw_sql(
        "CREATE TEMP TABLE saved AS SELECT * FROM accounts;
         DELETE FROM accounts;
         INSERT INTO accounts SELECT * FROM saved;",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let inserts: Vec<String> = sqlx::query_scalar(
        "SELECT jsonb_build_array(tenant_id, object_type, object_id, modification_type, object_data,
                                  object_data_before, updated_fields, actor_type, actor_id, trace_id,
                                  extra_metadata, entity_hash)::text
           FROM core.tb_entity_change_log WHERE modification_type = 'INSERT'
          ORDER BY pk_entity_change_log",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    assert_eq!(inserts.len(), 2, "{inserts:?}");
    assert_eq!(inserts[0], inserts[1], "synthetic vs captured INSERT");
    assert!(inserts[0].contains("\"captured_from\": \"public.accounts\""));
}

#[tokio::test]
async fn concurrent_updates_during_the_backfill_keep_each_order_once_and_in_order() {
    const ORDERS: i32 = 3_000;
    let database = TestDatabase::migrated().await;
    orders_before_capture(&database.pool, ORDERS).await;

    // A writer bumping random orders, one per transaction, while the backfill runs.
    let stop = CancellationToken::new();
    let writer = {
        let (pool, stop) = (database.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut updates = 0_u32;
            while !stop.is_cancelled() {
                let id = rand::rng().random_range(0..ORDERS);
                sqlx::query("UPDATE orders SET version = version + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                updates += 1;
            }
            updates
        })
    };
    // Let the writer get going before the first batch, so updates land before, inside and after
    // the batches that cover their rows.
    eventually("the writer has updated orders", || async {
        let updated: i64 = sqlx::query_scalar("SELECT count(*) FROM core.tb_entity_change_log")
            .fetch_one(&database.pool)
            .await
            .unwrap();
        updated >= 50
    })
    .await;
    let summary = backfill::run(
        &database.pool,
        "orders",
        &settings(50),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    stop.cancel();
    let updates = writer.await.unwrap();
    assert!(
        updates > 100,
        "the writer ran alongside ({updates} updates)"
    );
    assert_eq!(summary.rows_scanned, u64::try_from(ORDERS).unwrap());
    assert!(
        summary.rows_skipped > 0,
        "some orders were updated before their batch: {summary:?}"
    );

    let finals: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i32)>("SELECT id::text, version FROM orders")
            .fetch_all(&database.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, version)| (id, i64::from(version)))
            .collect();
    let expected_events: i64 = sqlx::query_scalar("SELECT count(*) FROM core.tb_entity_change_log")
        .fetch_one(&database.pool)
        .await
        .unwrap();

    let receiver = Receiver::start().await;
    let node = start_node(&database, &receiver).await;
    eventually("every change delivered", || async {
        i64::try_from(receiver.requests_to("/orders").len()).unwrap() >= expected_events
    })
    .await;
    node.stop().await;

    let delivered = deliveries(&receiver);
    assert_eq!(delivered.len(), finals.len(), "every order delivered");
    let mut updated_before_their_batch = 0;
    for (order, events) in &delivered {
        let inserts = events.iter().filter(|(kind, _)| kind == "INSERT").count();
        assert!(
            inserts <= 1,
            "order {order}: INSERT delivered twice: {events:?}"
        );
        if inserts == 1 {
            assert_eq!(
                events[0].0, "INSERT",
                "order {order}: INSERT first: {events:?}"
            );
        } else {
            updated_before_their_batch += 1;
        }
        assert!(
            events.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "order {order}: delivered out of order: {events:?}"
        );
        assert_eq!(
            events.last().unwrap().1,
            finals[order],
            "order {order}: final state delivered: {events:?}"
        );
    }
    assert_eq!(
        updated_before_their_batch,
        usize::try_from(summary.rows_skipped).unwrap(),
        "the orders without an INSERT are the ones the backfill skipped"
    );
}

#[tokio::test]
async fn an_interrupted_backfill_resumes_without_writing_a_row_twice() {
    let database = TestDatabase::migrated().await;
    orders_before_capture(&database.pool, 500).await;
    let cancel = CancellationToken::new();
    let mut batches = 0;
    let interrupted = backfill::run(&database.pool, "orders", &settings(100), &cancel, |_| {
        batches += 1;
        if batches == 2 {
            cancel.cancel();
        }
    })
    .await;
    match interrupted {
        Err(BackfillError::Interrupted {
            rows_scanned,
            rows_written,
            ..
        }) => assert_eq!((rows_scanned, rows_written), (200, 200)),
        other => panic!("expected an interruption, got {other:?}"),
    }
    assert_eq!(logged_inserts(&database.pool).await.len(), 200);

    let mut progress = Vec::new();
    let resumed = backfill::run(
        &database.pool,
        "orders",
        &settings(100),
        &CancellationToken::new(),
        |step| progress.push(step.rows_scanned),
    )
    .await
    .unwrap();
    assert!(resumed.resumed);
    assert_eq!(
        (resumed.rows_scanned, resumed.rows_written),
        (300, 300),
        "only the rest"
    );
    assert_eq!(
        (resumed.total_rows_scanned, resumed.total_rows_written),
        (500, 500)
    );
    assert_eq!(
        progress.first(),
        Some(&300),
        "progress counts from the earlier run"
    );
    let inserts = logged_inserts(&database.pool).await;
    assert_eq!(inserts.len(), 500);
    assert!(
        inserts.values().all(|count| *count == 1),
        "no row written twice"
    );
}

#[tokio::test]
async fn dry_run_counts_and_samples_and_writes_nothing() {
    let database = TestDatabase::migrated().await;
    orders_before_capture(&database.pool, 40).await;
    sqlx::query("UPDATE orders SET version = 2 WHERE id < 3")
        .execute(&database.pool)
        .await
        .unwrap();
    let (status, stdout, stderr) = database.cli(&[
        "backfill",
        "--table",
        "public.orders",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let preview: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(preview["rows"], 40);
    assert_eq!(
        preview["rows_to_write"], 37,
        "three orders already captured"
    );
    assert_eq!(preview["sample"].as_array().unwrap().len(), 5);
    assert_eq!(preview["sample"][0]["object_id"], "3");
    assert_eq!(preview["sample"][0]["object_data"]["version"], 1);

    let (status, stdout, _) = database.cli(&["backfill", "--table", "orders", "--dry-run"]);
    assert_eq!(status, Some(0));
    assert!(
        stdout.contains("40 rows, 37 would get a synthetic INSERT"),
        "{stdout}"
    );

    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM core.tb_entity_change_log")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(logged, 3, "dry run wrote nothing");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.backfill_runs")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0, "dry run started no run");
}

#[tokio::test]
async fn the_binary_backfills_with_plain_progress_and_a_json_summary() {
    let database = TestDatabase::migrated().await;
    orders_before_capture(&database.pool, 120).await;
    let (status, stdout, stderr) = database.cli(&[
        "backfill",
        "--table",
        "orders",
        "--batch-size",
        "50",
        "--json",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["rows_written"], 120);
    assert_eq!(summary["table"], "orders");
    assert!(
        stderr.contains("backfill orders: 50/120 rows scanned, 50 written"),
        "not a terminal: plain progress lines on stderr: {stderr}"
    );
}

#[tokio::test]
async fn a_table_that_cannot_be_backfilled_is_named_and_exits_2() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE untracked (id int PRIMARY KEY); CREATE TABLE keyless (id int);
                   SELECT core.observer_track_table('keyless'::regclass, 'Keyless');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    for (table, expected) in [
        ("public.missing", "table public.missing does not exist"),
        ("untracked", "table untracked is not tracked"),
        ("keyless", "table keyless has no primary key"),
    ] {
        let (status, _, stderr) = database.cli(&["backfill", "--table", table]);
        assert_eq!(status, Some(2), "{table}: {stderr}");
        assert!(stderr.contains(expected), "{table}: {stderr}");
    }
    let (status, _, stderr) =
        database.cli(&["backfill", "--table", "untracked", "--batch-size", "0"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("--batch-size must be between 1 and 10000"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_composite_text_primary_key_is_walked_in_key_order_once() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE lines (order_ref text, line int, line_id text NOT NULL, PRIMARY KEY (order_ref, line));
         INSERT INTO lines SELECT 'order ' || (n % 7), n, 'line-' || n FROM generate_series(1, 95) AS n;
         SELECT core.observer_track_table('lines'::regclass, 'Line', 'line_id');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let summary = backfill::run(
        &database.pool,
        "public.lines",
        &settings(10),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((summary.rows_scanned, summary.rows_written), (95, 95));
    let inserts = logged_inserts(&database.pool).await;
    assert_eq!(inserts.len(), 95);
    assert!(
        inserts.values().all(|count| *count == 1),
        "no row written twice"
    );
    let last_key: Vec<String> = sqlx::query_scalar(
        "SELECT last_key FROM fraiseql_observers.backfill_runs WHERE table_name = 'lines'",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(last_key, vec!["order 6".to_owned(), "90".to_owned()]);
}
