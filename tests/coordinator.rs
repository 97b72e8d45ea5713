//! The coordinator role against a fresh PostgreSQL database per test: one node at a time holds
//! it, a killed coordinator is replaced, its duties (job rescue, retention) run on it alone and
//! are fenced by its epoch, and change-log retention never deletes a row some partition still
//! needs.

mod common;

use std::time::{Duration, Instant};

use common::Receiver;
use common::nodes::{
    DEADLINE, Writer, assert_once_and_in_order, eventually, orders_config, prepare_orders,
};
use common::postgres::TestDatabase;
use fraiseql_observers::cluster::{ClusterError, ClusterHandle, ClusterSettings};
use fraiseql_observers::coordinator::{self, DutyRun};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::metrics::Metrics;
use fraiseql_observers::node::Node;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NODE_TIMEOUT: Duration = Duration::from_secs(2);

struct RunningNode {
    id: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ClusterError>>,
    handle: ClusterHandle,
    metrics: std::sync::Arc<Metrics>,
}

async fn start(
    database: &TestDatabase,
    receiver: &Receiver,
    node_id: &str,
    partitions: u32,
    change_log_retention: Option<Duration>,
) -> RunningNode {
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
        ClusterSettings {
            partitions,
            node_timeout: NODE_TIMEOUT,
            tick: Duration::from_millis(100),
        },
    )
    .await
    .unwrap()
    .with_coordinator_intervals(Duration::from_millis(100), Duration::from_millis(200))
    .with_retention(None, change_log_retention);
    let handle = node.handle();
    let metrics = node.metrics();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    RunningNode {
        id: node_id.to_owned(),
        shutdown,
        task,
        handle,
        metrics,
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

    /// Aborts the node: its tasks and connections are dropped, as when the process is killed.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    fn metric(&self, series: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.parse().unwrap())
    }
}

/// The coordinator as the database has it: the node whose live session holds the lock.
async fn coordinator_row(pool: &PgPool) -> Option<(String, i64)> {
    fraiseql_observers::membership::coordinator(pool)
        .await
        .unwrap()
        .map(|row| (row.node_id, row.epoch))
}

/// Waits until exactly one of `nodes` holds the role, and the database agrees; its index and
/// epoch.
async fn single_coordinator(pool: &PgPool, nodes: &[&RunningNode]) -> (usize, i64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let holders: Vec<(usize, i64)> = nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| Some((index, node.handle.coordinator_epoch()?)))
            .collect();
        if let ([(index, epoch)], Some((node_id, recorded))) =
            (holders.as_slice(), coordinator_row(pool).await)
            && node_id == nodes[*index].id
            && recorded == *epoch
        {
            return (*index, *epoch);
        }
        assert!(
            Instant::now() < deadline,
            "no single coordinator: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_holds_the_role_and_a_killed_coordinator_is_replaced_within_the_node_timeout() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let mut nodes = vec![
        start(&database, &receiver, "node-a", 4, None).await,
        start(&database, &receiver, "node-b", 4, None).await,
        start(&database, &receiver, "node-c", 4, None).await,
    ];
    let (index, first_epoch) = single_coordinator(pool, &nodes.iter().collect::<Vec<_>>()).await;
    for (other, node) in nodes.iter().enumerate() {
        let expected = if other == index { 1.0 } else { 0.0 };
        assert!(
            (node.metric("fraiseql_observers_coordinator") - expected).abs() < f64::EPSILON,
            "{} reports the role wrongly",
            node.id
        );
    }

    let killed_node = nodes.remove(index);
    let killed_id = killed_node.id.clone();
    killed_node.kill().await;
    let killed = Instant::now();
    let (new_index, new_epoch) = single_coordinator(pool, &nodes.iter().collect::<Vec<_>>()).await;
    let failover = killed.elapsed();
    eprintln!(
        "coordinator {killed_id} killed; {} took the role (epoch {first_epoch} -> {new_epoch}) after {failover:?}",
        nodes[new_index].id
    );
    assert!(new_epoch > first_epoch, "taking the role bumps the epoch");
    assert!(
        failover < NODE_TIMEOUT + Duration::from_secs(1),
        "the role moved after {failover:?}, more than the node timeout"
    );

    // A draining coordinator gives the role back to a node that is not draining.
    let coordinator = &nodes[new_index];
    coordinator.handle.drain();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let row = coordinator_row(pool).await;
        if row
            .as_ref()
            .is_some_and(|(node_id, epoch)| *node_id != coordinator.id && *epoch > new_epoch)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a draining coordinator kept the role: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(coordinator.handle.coordinator_epoch(), None);
    for node in nodes {
        node.stop().await;
    }
}

/// A running job claimed by `locked_by` ten seconds ago, its claim ending `locked_for_seconds`
/// from now (negative: expired, as a worker that died leaves it).
async fn insert_running_job(
    pool: &PgPool,
    key: &str,
    locked_by: &str,
    locked_for_seconds: f64,
) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO fraiseql_observers.jobs
                (id, queue, status, max_attempts, backoff_initial_ms, backoff_max_ms, idempotency_key,
                 event_id, observer, action_index, action_type, event, attempts, locked_by,
                 locked_until, started_at)
         VALUES (gen_random_uuid(), 'nobody-serves-this', 'running', 5, 100, 1000, $1,
                 gen_random_uuid(), 'orders', 0, 'webhook', '{}'::jsonb, 1, $2,
                 now() + make_interval(secs => $3), now() - interval '10 seconds')
         RETURNING id",
    )
    .bind(key)
    .bind(locked_by)
    .bind(locked_for_seconds)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn job_status(pool: &PgPool, id: uuid::Uuid) -> (String, String) {
    sqlx::query_as("SELECT status, errors::text FROM fraiseql_observers.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duties_run_on_the_coordinator_alone_and_a_stale_epoch_is_fenced_out() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let nodes = [
        start(&database, &receiver, "node-a", 4, None).await,
        start(&database, &receiver, "node-b", 4, None).await,
    ];
    let (index, epoch) = single_coordinator(pool, &nodes.iter().collect::<Vec<_>>()).await;
    let (coordinator, other) = (&nodes[index], &nodes[1 - index]);

    let job = insert_running_job(pool, "abandoned-1", "node-gone", -1.0).await;
    eventually("the coordinator to rescue the abandoned job", || async {
        job_status(pool, job).await.0 == "pending"
    })
    .await;
    let (_, errors) = job_status(pool, job).await;
    assert!(
        errors.contains("OB012") && errors.contains("node-gone"),
        "the lost attempt is recorded: {errors}"
    );
    assert!(
        (coordinator.metric("fraiseql_observers_jobs_rescued_total") - 1.0).abs() < f64::EPSILON
    );
    assert!(other.metric("fraiseql_observers_jobs_rescued_total").abs() < f64::EPSILON);
    let rescue_runs =
        r#"fraiseql_observers_coordinator_duty_runs_total{duty="rescue",outcome="succeeded"}"#;
    assert!(coordinator.metric(rescue_runs) >= 1.0);
    assert!(
        other.metric(rescue_runs).abs() < f64::EPSILON,
        "only the coordinator rescues"
    );
    let retention_runs = r#"fraiseql_observers_coordinator_duty_runs_total{duty="job_retention",outcome="succeeded"}"#;
    eventually("job retention to run on the coordinator", || async {
        coordinator.metric(retention_runs) >= 1.0
    })
    .await;
    assert!(other.metric(retention_runs).abs() < f64::EPSILON);

    // A node holding an epoch older than the current one (paused, then back) does nothing.
    let stale = insert_running_job(pool, "abandoned-2", "node-gone", -1.0).await;
    assert_eq!(
        coordinator::rescue_expired_jobs(pool, epoch - 1, Duration::ZERO)
            .await
            .unwrap(),
        DutyRun::Fenced
    );
    assert_eq!(
        coordinator::prune(
            pool,
            epoch - 1,
            coordinator::Retention::ChangeLog,
            Duration::ZERO,
            4
        )
        .await
        .unwrap(),
        DutyRun::Fenced
    );
    let untouched: i64 = sqlx::query_scalar("SELECT count(*) FROM core.tb_entity_change_log")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(untouched, 0);
    // The coordinator's own loop rescues it.
    eventually("the second abandoned job to be rescued", || async {
        job_status(pool, stale).await.0 == "pending"
    })
    .await;

    // A job claimed by a node that left the cluster goes back at once, long before its claim
    // would expire; one claimed by a live node stays.
    let orphan = insert_running_job(pool, "orphan-1", "node-gone", 3600.0).await;
    let held = insert_running_job(pool, "held-1", &other.id, 3600.0).await;
    eventually("the orphaned job to be rescued", || async {
        job_status(pool, orphan).await.0 == "pending"
    })
    .await;
    assert!(
        job_status(pool, orphan)
            .await
            .1
            .contains("left the cluster")
    );
    assert_eq!(job_status(pool, held).await.0, "running");
    for node in nodes {
        node.stop().await;
    }
}

async fn change_log_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM core.tb_entity_change_log")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_log_retention_deletes_only_rows_every_partition_has_delivered() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    // The first delivery is answered after 3 s: its partition's page (and checkpoint) waits for
    // it while the writer goes on and the other partitions move ahead.
    receiver.script(
        "/orders",
        [common::Reply {
            delay: Duration::from_secs(3),
            ..common::Reply::status(200)
        }],
    );
    let node = start(&database, &receiver, "node-a", 4, Some(Duration::ZERO)).await;
    single_coordinator(pool, &[&node]).await;

    let writer = Writer::start(pool.clone(), 20, true);
    eventually("the first delivery to be held", || async {
        receiver.request_count() >= 1
    })
    .await;
    // While its partition lags, the held change stays in the change log however far the
    // other partitions and retention go.
    let held = receiver.requests()[0].json();
    let (held_order, held_version) = (
        held["entity_id"].as_str().unwrap().to_owned(),
        held["data"]["version"].as_i64().unwrap(),
    );
    let lagging_since = Instant::now();
    while lagging_since.elapsed() < Duration::from_secs(2) {
        let kept: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM core.tb_entity_change_log
                             WHERE object_type = 'Order' AND object_id = $1
                               AND (object_data ->> 'version')::bigint = $2)",
        )
        .bind(&held_order)
        .bind(held_version)
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(kept, "the change being delivered left the change log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let changes = writer.finish().await;
    eventually("every change delivered", || async {
        receiver.requests_to("/orders").len() >= changes
    })
    .await;
    eventually("delivered rows pruned from the change log", || async {
        change_log_rows(pool).await < i64::try_from(changes).unwrap() / 2
    })
    .await;
    let pruned = node.metric(r#"fraiseql_observers_pruned_rows_total{table="change_log"}"#);
    eprintln!(
        "{changes} changes written and delivered; {pruned} change-log rows pruned, {} left",
        change_log_rows(pool).await
    );
    assert!(pruned > 0.0);
    node.stop().await;
    assert_once_and_in_order(&receiver, changes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_without_a_checkpoint_stops_change_log_retention() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let pool = &database.pool;
    common::nodes::write_orders(pool, 0..10, 1).await;
    // Partition 0 has a checkpoint past every row, partitions 1..3 none: nothing may go.
    sqlx::query(
        "INSERT INTO fraiseql_observers.partitions (partition, snapshot)
         VALUES (0, pg_current_snapshot())
         ON CONFLICT (partition) DO UPDATE SET snapshot = excluded.snapshot",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO fraiseql_observers.coordinator (singleton, epoch, node_id, acquired_at)
         VALUES (true, 7, 'node-a', now())
         ON CONFLICT (singleton) DO UPDATE SET epoch = 7",
    )
    .execute(pool)
    .await
    .unwrap();
    let run = coordinator::prune(
        pool,
        7,
        coordinator::Retention::ChangeLog,
        Duration::ZERO,
        4,
    )
    .await
    .unwrap();
    assert_eq!(run, DutyRun::Done(0));
    assert_eq!(change_log_rows(pool).await, 10);
    // Every partition checkpointed past the rows: they go; a row written after stays. A
    // snapshot's xmin is server-wide (another test's open transaction lowers it), so the
    // checkpoints are set to the first snapshot whose xmin is past every row written so far.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let set = sqlx::query(
            "INSERT INTO fraiseql_observers.partitions (partition, snapshot)
             SELECT partition, now_snapshot
               FROM generate_series(0, 3) AS partition, (SELECT pg_current_snapshot() AS now_snapshot) AS taken
              WHERE pg_snapshot_xmin(now_snapshot) > (SELECT max(txid) FROM core.tb_entity_change_log)
             ON CONFLICT (partition) DO UPDATE SET snapshot = excluded.snapshot",
        )
        .execute(pool)
        .await
        .unwrap();
        if set.rows_affected() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot past the rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::nodes::write_orders(pool, 10..12, 1).await;
    let run = coordinator::prune(
        pool,
        7,
        coordinator::Retention::ChangeLog,
        Duration::ZERO,
        4,
    )
    .await
    .unwrap();
    assert_eq!(run, DutyRun::Done(10));
    assert_eq!(change_log_rows(pool).await, 2);
    // Younger than the retention: kept even when delivered.
    sqlx::query(
        "UPDATE fraiseql_observers.partitions SET snapshot = pg_current_snapshot() WHERE partition < 4",
    )
    .execute(pool)
    .await
    .unwrap();
    let run = coordinator::prune(
        pool,
        7,
        coordinator::Retention::ChangeLog,
        Duration::from_hours(1),
        4,
    )
    .await
    .unwrap();
    assert_eq!(run, DutyRun::Done(0));
    assert_eq!(change_log_rows(pool).await, 2);
}
