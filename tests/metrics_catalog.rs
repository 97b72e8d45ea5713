//! The metrics catalog against a running node and a fresh database: events no observer matched,
//! in-page retries, dead letters added, failed pages (the change-log reader made unavailable,
//! then restored) and the oldest due job's age.

mod common;

use std::time::Duration;

use common::nodes::{eventually, orders_config, prepare_orders, write_orders};
use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use tokio_util::sync::CancellationToken;

/// One sample of the node's metrics (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one node's story, step by step")]
async fn the_catalog_counts_unmatched_events_retries_dead_letters_page_errors_and_job_age() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    prepare_orders(pool).await;
    sqlx::raw_sql(
        "CREATE TABLE customers (id int PRIMARY KEY);
         SELECT core.observer_track_table('customers'::regclass, 'Customer');",
    )
    .execute(pool)
    .await
    .unwrap();
    let receiver = Receiver::start().await;
    // First change: 503 then 200 (a retry that succeeds); second: 400 (a dead letter).
    receiver.script("/orders", [Reply::status(503), Reply::status(200)]);
    let node = Node::build(
        pool.clone(),
        orders_config(&receiver),
        ListenerSettings {
            node_id: "node-a".to_owned(),
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        ClusterSettings {
            partitions: 2,
            node_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    let (metrics, control, handle) = (node.metrics(), node.control(), node.handle());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    let render = || metrics.render();

    write_orders(pool, 1..2, 1).await;
    eventually("the retried delivery", || async {
        receiver.requests_to("/orders").len() >= 2
    })
    .await;
    receiver.script("/orders", [Reply::status(400)]);
    write_orders(pool, 2..3, 1).await;
    sqlx::query("INSERT INTO customers VALUES (1), (2), (3)")
        .execute(pool)
        .await
        .unwrap();
    eventually("the unmatched events and the dead letter", || async {
        let text = render();
        sample(&text, "fraiseql_observers_events_unmatched_total") >= 3.0
            && sample(
                &text,
                r#"fraiseql_observers_dead_letters_added_total{source="page"}"#,
            ) >= 1.0
    })
    .await;
    let text = render();
    assert!(
        (sample(
            &text,
            r#"fraiseql_observers_retried_actions_total{action_type="webhook",outcome="succeeded"}"#
        ) - 1.0)
            .abs()
            < f64::EPSILON,
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"fraiseql_observers_action_retry_attempts_total{action_type="webhook"}"#
        ) >= 1.0
    );

    // The page reader goes away: pages fail in a row, counted per code and partition.
    sqlx::query("ALTER FUNCTION fraiseql_observers.read_batch RENAME TO read_batch_away")
        .execute(pool)
        .await
        .unwrap();
    write_orders(pool, 3..4, 1).await;
    eventually("failed pages in a row", || async {
        let text = render();
        let in_a_row = sample(
            &text,
            r#"fraiseql_observers_listener_consecutive_errors{partition="0"}"#,
        )
        .max(sample(
            &text,
            r#"fraiseql_observers_listener_consecutive_errors{partition="1"}"#,
        ));
        in_a_row >= 2.0
    })
    .await;
    assert!(
        render()
            .lines()
            .any(|line| line.starts_with("fraiseql_observers_listener_page_errors_total{code=")),
        "page errors are counted by code"
    );
    sqlx::query("ALTER FUNCTION fraiseql_observers.read_batch_away RENAME TO read_batch")
        .execute(pool)
        .await
        .unwrap();
    eventually("the run of failures to end", || async {
        let text = render();
        receiver.requests_to("/orders").len() >= 4
            && sample(
                &text,
                r#"fraiseql_observers_listener_consecutive_errors{partition="0"}"#,
            ) < 1.0
            && sample(
                &text,
                r#"fraiseql_observers_listener_consecutive_errors{partition="1"}"#,
            ) < 1.0
    })
    .await;

    // A job due a minute ago in a queue no worker serves: its wait shows on the coordinator.
    sqlx::query(
        "INSERT INTO fraiseql_observers.jobs
                (id, queue, status, max_attempts, backoff_initial_ms, backoff_max_ms,
                 idempotency_key, event_id, observer, action_index, action_type, event, run_at)
         VALUES (gen_random_uuid(), 'nobody-serves-this', 'pending', 5, 100, 1000, 'waiting-1',
                 gen_random_uuid(), 'orders', 0, 'webhook', '{}'::jsonb, now() - interval '1 minute')",
    )
    .execute(pool)
    .await
    .unwrap();
    eventually("this node to hold the coordinator role", || async {
        handle.coordinator_epoch().is_some()
    })
    .await;
    control.refresh_gauges().await.unwrap();
    let age = sample(
        &render(),
        r#"fraiseql_observers_jobs_oldest_due_age_seconds{queue="nobody-serves-this"}"#,
    );
    assert!((60.0..120.0).contains(&age), "oldest due job age {age}");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
