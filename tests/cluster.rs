//! Several nodes sharing the change log by partition, against a fresh PostgreSQL database per
//! test: the split, take-over after a node dies or stops heartbeating, drain and resume, and the
//! guards (partition count, duplicate node id).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Receiver;
use common::nodes::{
    DEADLINE, Writer, assert_once_and_in_order, eventually, orders_config, prepare_orders,
    write_orders,
};
use common::postgres::TestDatabase;
use fraiseql_observers::cluster::{ClusterError, ClusterSettings, LEASE_NAMESPACE};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use sqlx::{Connection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 8;

fn cluster_settings() -> ClusterSettings {
    ClusterSettings {
        partitions: PARTITIONS,
        node_timeout: Duration::from_secs(2),
        tick: Duration::from_millis(100),
    }
}

struct RunningNode {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ClusterError>>,
    drain: fraiseql_observers::cluster::ClusterHandle,
}

async fn start(database: &TestDatabase, receiver: &Receiver, node_id: &str) -> RunningNode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let node = Node::build(
        database.pool.clone(),
        orders_config(receiver),
        ListenerSettings {
            node_id: node_id.to_owned(),
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        cluster_settings(),
    )
    .await
    .unwrap();
    let drain = node.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    RunningNode {
        shutdown,
        task,
        drain,
    }
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

/// Partition locks held by each node's lease session, by node id.
async fn leases(pool: &PgPool) -> HashMap<String, usize> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT substr(activity.application_name, length('fraiseql-observers lease ') + 1), count(*)
           FROM pg_locks AS lock JOIN pg_stat_activity AS activity ON activity.pid = lock.pid
          WHERE lock.locktype = 'advisory' AND lock.classid = $1::bigint::oid AND lock.objsubid = 2
            AND lock.granted AND lock.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          GROUP BY 1",
    )
    .bind(i64::from(LEASE_NAMESPACE))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(node, count)| (node, usize::try_from(count).unwrap()))
        .collect()
}

async fn even_split(pool: &PgPool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let held = leases(pool).await;
        if held.get("node-a") == Some(&4) && held.get("node-b") == Some(&4) {
            return;
        }
        assert!(Instant::now() < deadline, "no even split: {held:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_split_the_partitions_and_deliver_every_change_once_in_order() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let a = start(&database, &receiver, "node-a").await;
    let b = start(&database, &receiver, "node-b").await;
    let pool = &database.pool;
    even_split(pool).await;

    for version in 1..=3 {
        write_orders(pool, 0..100, version).await;
    }
    eventually("300 deliveries", || async {
        receiver.request_count() >= 300
    })
    .await;
    a.stop().await;
    b.stop().await;
    assert_once_and_in_order(&receiver, 300);
    assert!(
        leases(pool).await.is_empty(),
        "stopped nodes give their leases back"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.nodes")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "stopped nodes leave the membership table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_partitions_are_taken_over_and_nothing_is_lost() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let a = start(&database, &receiver, "node-a").await;
    let b = start(&database, &receiver, "node-b").await;
    even_split(pool).await;
    write_orders(pool, 0..50, 1).await;
    // Delivered and their pages saved (a page's history rows are written by its checkpoint's
    // statement): a kill now leaves nothing in flight to repeat (what a kill in the middle of a
    // page repeats is bounded by the page; see the listener tests).
    eventually("the first deliveries to be recorded", || async {
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fraiseql_observers.history WHERE record_kind = 'event'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        receiver.request_count() >= 50 && recorded >= 50
    })
    .await;

    // Abort node a: its tasks and connections are dropped, as when the process is killed.
    a.task.abort();
    let _ = a.task.await;
    let killed = Instant::now();
    eventually("node b to lead every partition", || async {
        leases(pool).await.get("node-b") == Some(&8)
    })
    .await;
    eprintln!("take-over after the kill: {:?}", killed.elapsed());
    eventually("node b to have claimed every partition", || async {
        let leaders: Vec<String> =
            sqlx::query_scalar("SELECT leader FROM fraiseql_observers.partitions")
                .fetch_all(pool)
                .await
                .unwrap();
        leaders.len() == 8 && leaders.iter().all(|leader| leader == "node-b")
    })
    .await;

    write_orders(pool, 0..50, 2).await;
    eventually("every change delivered", || async {
        receiver.request_count() >= 100
    })
    .await;
    b.stop().await;
    assert_once_and_in_order(&receiver, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_heartbeating_has_its_lease_session_ended_and_is_fenced() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    // A paused node: its lease session holds every partition lock and its claims, but its
    // heartbeat stopped long ago.
    let mut zombie = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query(
        "INSERT INTO fraiseql_observers.nodes (node_id, lease_pid, lease_started, version, heartbeat_at)
         SELECT 'zombie', pid, backend_start, 'old', now() - interval '1 minute'
           FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .execute(&mut zombie)
    .await
    .unwrap();
    sqlx::query("SELECT fraiseql_observers.register_partition_count(8)")
        .execute(&mut zombie)
        .await
        .unwrap();
    let mut zombie_epochs = Vec::new();
    for partition in 0..8 {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LEASE_NAMESPACE)
            .bind(partition)
            .fetch_one(&mut zombie)
            .await
            .unwrap();
        assert!(locked);
        let epoch: i64 = sqlx::query_scalar(
            "SELECT epoch FROM fraiseql_observers.claim_partition($1, 'zombie')",
        )
        .bind(partition)
        .fetch_one(&mut zombie)
        .await
        .unwrap();
        zombie_epochs.push(epoch);
    }

    let node = start(&database, &receiver, "node-a").await;
    eventually("node a to take every partition from the zombie", || async {
        leases(pool).await.get("node-a") == Some(&8)
    })
    .await;
    let ended = sqlx::query("SELECT 1").execute(&mut zombie).await;
    assert!(
        ended.is_err(),
        "the zombie's lease session was ended by the live node"
    );
    let zombie_epochs_ref = &zombie_epochs;
    eventually(
        "every partition claimed again with a higher epoch",
        || async move {
            let epochs: Vec<i64> = sqlx::query_scalar(
                "SELECT epoch FROM fraiseql_observers.partitions ORDER BY partition",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            epochs
                .iter()
                .zip(zombie_epochs_ref)
                .all(|(now, was)| now > was)
        },
    )
    .await;
    // The zombie's view of partition 0 (its epoch) can no longer move the checkpoint.
    let moved: Option<i64> = sqlx::query_scalar(
        "SELECT fraiseql_observers.save_checkpoint(0, $1,
                    (SELECT checkpoint_version FROM fraiseql_observers.partitions WHERE partition = 0),
                    NULL, NULL, NULL)",
    )
    .bind(zombie_epochs[0])
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(moved, None, "a write with the zombie's epoch is refused");

    write_orders(pool, 0..20, 1).await;
    eventually("deliveries by the new leader", || async {
        receiver.request_count() >= 20
    })
    .await;
    node.stop().await;
    assert_once_and_in_order(&receiver, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_hands_every_partition_over_and_resumes_its_share() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let a = start(&database, &receiver, "node-a").await;
    let b = start(&database, &receiver, "node-b").await;
    even_split(pool).await;
    write_orders(pool, 0..40, 1).await;

    a.drain.drain();
    eventually("node b to lead everything", || async {
        let held = leases(pool).await;
        held.get("node-b") == Some(&8) && !held.contains_key("node-a")
    })
    .await;
    write_orders(pool, 0..40, 2).await;
    a.drain.resume();
    even_split(pool).await;
    write_orders(pool, 0..40, 3).await;
    eventually("every change delivered", || async {
        receiver.request_count() >= 120
    })
    .await;
    a.stop().await;
    b.stop().await;
    assert_once_and_in_order(&receiver, 120);
}

#[tokio::test]
async fn a_node_with_another_partition_count_is_refused() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    Node::build(
        database.pool.clone(),
        orders_config(&receiver),
        ListenerSettings::default(),
        cluster_settings(),
    )
    .await
    .unwrap();
    let refused = Node::build(
        database.pool.clone(),
        orders_config(&receiver),
        ListenerSettings::default(),
        ClusterSettings {
            partitions: 16,
            ..cluster_settings()
        },
    )
    .await
    .unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("split into 8 partitions") && message.contains("started with 16"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_id_is_refused() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let first = start(&database, &receiver, "same").await;
    eventually("the first node to lead", || async {
        leases(pool).await.get("same") == Some(&8)
    })
    .await;
    let second = start(&database, &receiver, "same").await;
    let refused = tokio::time::timeout(DEADLINE, second.task)
        .await
        .expect("the second node stops on its own")
        .expect("no panic");
    assert!(
        matches!(refused, Err(ClusterError::DuplicateNode(ref id)) if id == "same"),
        "{refused:?}"
    );
    assert_eq!(leases(pool).await.get("same"), Some(&8));
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_session_is_killed_stops_at_once_and_nothing_is_lost() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let a = start(&database, &receiver, "node-a").await;
    let b = start(&database, &receiver, "node-b").await;
    even_split(pool).await;

    let writer = Writer::start(pool.clone(), 20, false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The server ends node a's lease session (as when its connection is cut): its locks go with it.
    let ended: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'fraiseql-observers lease node-a'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(ended);
    let killed = Instant::now();
    eventually("node b to lead the lost partitions", || async {
        leases(pool).await.get("node-b").copied().unwrap_or(0) >= 4
            && leases(pool).await.values().sum::<usize>() == 8
    })
    .await;
    eprintln!(
        "take-over after the session was killed: {:?}",
        killed.elapsed()
    );
    // Node a reconnects and takes its share back.
    even_split(pool).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changes = writer.finish().await;
    eventually("every change delivered", || async {
        let distinct: std::collections::HashSet<String> = receiver
            .requests_to("/orders")
            .iter()
            .map(|request| request.header("idempotency-key").unwrap().to_owned())
            .collect();
        distinct.len() >= changes
    })
    .await;
    a.stop().await;
    b.stop().await;

    // Nothing lost; a page node a was delivering when its session died may be repeated by its
    // successor (at-least-once), never more than a page per partition it lost.
    let requests = receiver.requests_to("/orders");
    let mut per_key: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for request in &requests {
        *per_key
            .entry(request.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_key.len(), changes, "every change delivered");
    let repeated = requests.len() - per_key.len();
    eprintln!("repeated after the session was killed: {repeated}");
    assert!(
        repeated <= 4 * 1000,
        "at most a page per lost partition is repeated: {repeated}"
    );
}
