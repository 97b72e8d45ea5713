//! `status`, `cluster status` and `metrics` of the real binary against a real node (gRPC and
//! HTTP on port 0, real PostgreSQL, a real webhook receiver): the figures match what happened,
//! the JSON has its shape, `--watch --count` prints its frames and stops, `metrics --raw` is the
//! node's `/metrics`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::Receiver;
use common::nodes::{DEADLINE, eventually, orders_config, prepare_orders};
use common::postgres::TestDatabase;
use fraiseql_observers::cluster::{ClusterError, ClusterHandle, ClusterSettings};
use fraiseql_observers::control::Control;
use fraiseql_observers::dlq::{DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::grpc::{GrpcEndpoint, MutationPolicy};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::{Endpoints, Node};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const ORDERS: usize = 20;

struct RunningNode {
    grpc: SocketAddr,
    http: SocketAddr,
    handle: ClusterHandle,
    control: Control,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ClusterError>>,
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

async fn start(database: &TestDatabase, receiver: &Receiver) -> RunningNode {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_address, http_address) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let node = Node::build(
        database.pool.clone(),
        orders_config(receiver),
        ListenerSettings {
            node_id: "node-a".to_owned(),
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        ClusterSettings {
            partitions: 8,
            node_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(100),
        },
    )
    .await
    .unwrap()
    .with_endpoints(Endpoints {
        grpc: Some(GrpcEndpoint {
            listener: grpc,
            policy: MutationPolicy::for_address(None, grpc_address, false),
            tls: None,
        }),
        http: Some(http),
    });
    let (handle, control) = (node.handle(), node.control());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    RunningNode {
        grpc: grpc_address,
        http: http_address,
        handle,
        control,
        shutdown,
        task,
    }
}

/// A node that delivered [`ORDERS`] orders, with one dead letter in the queue, and a rate
/// window at least a second long.
async fn node_that_delivered(database: &TestDatabase, receiver: &Receiver) -> RunningNode {
    prepare_orders(&database.pool).await;
    let node = start(database, receiver).await;
    let handle = node.handle.clone();
    eventually("every lease", || async { handle.leading().len() == 8 }).await;
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(1, $1) AS id")
        .bind(i32::try_from(ORDERS).unwrap())
        .execute(&database.pool)
        .await
        .unwrap();
    eventually("every delivery", || async {
        receiver.request_count() >= ORDERS
    })
    .await;
    PostgresDeadLetterQueue::new(database.pool.clone())
        .push(NewDeadLetter {
            event: EntityEvent::new(EventKind::Insert, "Order", "1", serde_json::json!({}), None),
            observer: "orders".to_owned(),
            action_index: 0,
            action_type: "webhook".to_owned(),
            error_code: ErrorCode::RemoteUnavailable,
            error_message: "HTTP 503".to_owned(),
            attempts: 3,
        })
        .await
        .unwrap();
    let control = node.control.clone();
    eventually("every event counted and a rate window", || async {
        control.status().await.is_ok_and(|status| {
            status.counters.events_processed == ORDERS as u64
                && status
                    .figures
                    .rates
                    .is_some_and(|rates| rates.window_seconds >= 1.0)
        })
    })
    .await;
    node
}

/// Runs the binary (off the runtime's threads) and returns its stdout; it must succeed.
async fn cli(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
            .args(&args)
            .env_remove("FRAISEQL_OBSERVERS_ENDPOINT")
            .env_remove("FRAISEQL_OBSERVERS_HTTP_ENDPOINT")
            .output()
            .expect("the binary runs");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|&arg| arg.to_owned()).collect()
}

/// The tree's layout and wording as a snapshot (`tests/snapshots/`); the figures are checked
/// above, so every number, id, address and duration is masked here.
fn snapshot(name: &str, text: &str) {
    insta::with_settings!({
        filters => vec![
            (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "[uuid]"),
            // Which partitions the orders hashed to varies with their events' ids.
            // (and whether a transaction was still open at a checkpoint).
            (r"(?m)(after every transaction before|at the start of the log).*$", "[checkpoint]"),
            (r"http://127\.0\.0\.1:\d+", "[receiver]"),
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", "[time]"),
            (r"\d+(\.\d+)?( ?(ms|µs|us|ns|s|m|h|d)\b)?( \d+(ms|µs|us|ns|s|m|h|d)\b)*", "N"),
        ],
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, text);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_figures_of_what_happened_as_a_tree_and_json() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let node = node_that_delivered(&database, &receiver).await;
    let endpoint = node.grpc.to_string();

    let text = cli(args(&["status", "--endpoint", &endpoint])).await;
    for expected in [
        "Observer System Status — node node-a",
        "│   ├── Partitions led: 8 of 8",
        &format!("│   ├── Processed events: {ORDERS}"),
        "│   ├── Backlog: 0 rows",
        "│   ├── Observers: 1",
        &format!("│   ├── Actions: {ORDERS} succeeded, 0 failed, 0 enqueued"),
        "│   └── DLQ items: 1 (cluster-wide)",
        "│   └── Cache hit rate: no lookup yet",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let events_per_second = text
        .lines()
        .find_map(|line| {
            line.split_once("│   ├── Events/s over the last ")?
                .1
                .split_once("s: ")
        })
        .map_or_else(
            || panic!("an events/s line in:\n{text}"),
            |(_, rate)| rate.parse::<f64>().unwrap(),
        );
    assert!(events_per_second > 0.0, "{text}");
    let receiver_endpoint = receiver.url("");
    let receiver_endpoint = receiver_endpoint.trim_end_matches('/');
    assert!(
        text.lines()
            .any(|line| line.contains(receiver_endpoint) && line.contains("limit ")),
        "the receiver's endpoint and its limit in:\n{text}"
    );
    assert!(text.contains("Action time (p99): ≤ "), "{text}");

    let json: serde_json::Value =
        serde_json::from_str(&cli(args(&["status", "--endpoint", &endpoint, "--json"])).await)
            .unwrap();
    assert_eq!(json["counters"]["events_processed"], ORDERS, "{json}");
    assert_eq!(json["counters"]["actions_succeeded"], ORDERS, "{json}");
    assert_eq!(json["figures"]["observers"], 1, "{json}");
    assert_eq!(json["figures"]["dead_letters"], 1, "{json}");
    assert_eq!(json["leases"].as_array().unwrap().len(), 8, "{json}");
    assert!(
        json["figures"]["rates"]["events_per_second"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{json}"
    );
    assert!(
        json["figures"]["action_duration_p99_seconds"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{json}"
    );
    assert_eq!(
        json["figures"]["endpoints"].as_array().unwrap().len(),
        1,
        "{json}"
    );

    assert_eq!(json["figures"]["history"]["backend"], "postgres", "{json}");
    assert!(
        json["figures"]["history"]["event_rows"].as_u64().unwrap() >= 20,
        "the events' history rows counted: {json}"
    );

    snapshot("status", &text);

    let cluster = cli(args(&["cluster", "--endpoint", &endpoint, "status"])).await;
    snapshot("cluster_status", &cluster);
    assert!(
        cluster.contains("├── node-a (v") && cluster.contains("backlog 0, oldest checkpoint"),
        "{cluster}"
    );
    let cluster: serde_json::Value = serde_json::from_str(
        &cli(args(&[
            "cluster",
            "--endpoint",
            &endpoint,
            "status",
            "--json",
        ]))
        .await,
    )
    .unwrap();
    assert_eq!(cluster["nodes"][0]["backlog"], 0, "{cluster}");
    assert_eq!(cluster["dead_letters"], 1, "{cluster}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_count_frames_and_stops() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let node = node_that_delivered(&database, &receiver).await;
    let endpoint = node.grpc.to_string();

    // Not a terminal: frames follow each other, nothing clears the screen.
    let text = cli(args(&[
        "status",
        "--endpoint",
        &endpoint,
        "--watch",
        "100ms",
        "--count",
        "2",
    ]))
    .await;
    assert_eq!(text.matches("Observer System Status").count(), 2, "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");

    let lines = cli(args(&[
        "cluster",
        "--endpoint",
        &endpoint,
        "status",
        "--json",
        "--watch",
        "50ms",
        "--count",
        "3",
    ]))
    .await;
    let frames: Vec<serde_json::Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(frames.len(), 3, "{lines}");
    assert!(
        frames.iter().all(|frame| frame["partition_count"] == 8),
        "{lines}"
    );
    node.stop().await;
}

/// `name{labels}` of every sample line: the series, without the values that move between scrapes.
fn series(text: &str) -> Vec<String> {
    let mut series: Vec<String> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect();
    series.sort();
    series
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_passes_the_text_through_and_summarizes_real_numbers() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let node = node_that_delivered(&database, &receiver).await;
    let http = node.http.to_string();

    let raw = cli(args(&["metrics", "--http-endpoint", &http, "--raw"])).await;
    let scraped = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.ends_with("# EOF\n"), "{raw}");
    assert_eq!(series(&raw), series(&scraped));

    let text = cli(args(&["metrics", "--http-endpoint", &http])).await;
    for expected in [
        &format!("Metrics of http://{http}/metrics"),
        "├── Rates over ",
        &format!("├── Events: {ORDERS} processed, 0 with a failed action, 0 unmatched"),
        &format!("├── Actions by outcome: succeeded {ORDERS}"),
        "├── Leases held: 8",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }

    let json: serde_json::Value = serde_json::from_str(
        &cli(args(&[
            "metrics",
            "--http-endpoint",
            &format!("http://{http}"),
            "--json",
            "--sample-interval",
            "0s",
        ]))
        .await,
    )
    .unwrap();
    assert_eq!(json["summary"]["events_processed"], ORDERS, "{json}");
    assert_eq!(json["summary"]["actions"]["succeeded"], ORDERS, "{json}");
    assert_eq!(json["summary"]["leases_held"], 8, "{json}");
    assert!(json["rates"].is_null(), "{json}");
    node.stop().await;
}

#[test]
fn metrics_names_a_malformed_or_unreachable_endpoint() {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["metrics", "--http-endpoint", "ftp://example", "--raw"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("--http-endpoint \"ftp://example\" is neither host:port nor an http(s) URL"),
        "{stderr}"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap().to_string();
    drop(listener);
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["metrics", "--http-endpoint", &closed])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("scraping http://{closed}/metrics failed")),
        "{stderr}"
    );
}
