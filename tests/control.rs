//! The control plane and HTTP endpoints of real nodes: grpcurl against the gRPC server
//! (reflection, health, Status), `/metrics` checked by the Prometheus project's own parser,
//! readiness while draining, tokens on mutating calls, and a hand-over under continuous load
//! that loses and repeats nothing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Receiver;
use common::nodes::{
    DEADLINE, Writer, assert_once_and_in_order, eventually, orders_config, prepare_orders,
};
use common::postgres::TestDatabase;
use fraiseql_observers::cluster::{ClusterError, ClusterHandle, ClusterSettings};
use fraiseql_observers::control::{Control, DEFAULT_GAUGE_REFRESH_INTERVAL};
use fraiseql_observers::dlq::{DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::grpc::{self, GrpcEndpoint, MutationPolicy, Target, TlsIdentity};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::{Endpoints, Node};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

    fn endpoint(&self) -> String {
        self.grpc.to_string()
    }
}

async fn start(
    database: &TestDatabase,
    receiver: &Receiver,
    node_id: &str,
    token: Option<&str>,
) -> RunningNode {
    start_with_tls(database, receiver, node_id, token, None).await
}

async fn start_with_tls(
    database: &TestDatabase,
    receiver: &Receiver,
    node_id: &str,
    token: Option<&str>,
    tls: Option<TlsIdentity>,
) -> RunningNode {
    start_node(
        database,
        receiver,
        node_id,
        token,
        tls,
        DEFAULT_GAUGE_REFRESH_INTERVAL,
    )
    .await
}

async fn start_node(
    database: &TestDatabase,
    receiver: &Receiver,
    node_id: &str,
    token: Option<&str>,
    tls: Option<TlsIdentity>,
    gauge_refresh_interval: Duration,
) -> RunningNode {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_address, http_address) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let node = Node::build(
        database.pool.clone(),
        orders_config(receiver),
        ListenerSettings {
            node_id: node_id.to_owned(),
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
    .with_gauge_refresh_interval(gauge_refresh_interval)
    .with_endpoints(Endpoints {
        grpc: Some(GrpcEndpoint {
            listener: grpc,
            policy: MutationPolicy::for_address(token.map(str::to_owned), grpc_address, false),
            tls,
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

fn grpcurl(args: &[&str]) -> String {
    let output = common::tools::py_tools()
        .script("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl runs");
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_and_calls_status_and_health() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = start(&database, &receiver, "node-a", None).await;
    let endpoint = node.endpoint();
    let handle = node.handle.clone();
    eventually("every lease", || async { handle.leading().len() == 8 }).await;

    let listing = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        move || grpcurl(&["-plaintext", &endpoint, "list"])
    })
    .await
    .unwrap();
    for service in [
        "fraiseql.observers.v1.ObserverControl",
        "grpc.health.v1.Health",
    ] {
        assert!(listing.lines().any(|line| line == service), "{listing}");
    }
    let (status, health) = tokio::task::spawn_blocking(move || {
        (
            grpcurl(&[
                "-plaintext",
                "-d",
                "{}",
                &endpoint,
                "fraiseql.observers.v1.ObserverControl/Status",
            ]),
            grpcurl(&["-plaintext", &endpoint, "grpc.health.v1.Health/Check"]),
        )
    })
    .await
    .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["nodeId"], "node-a", "{status}");
    assert_eq!(status["partitionCount"], 8, "{status}");
    assert_eq!(status["leases"].as_array().unwrap().len(), 8, "{status}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "SERVING");
    node.stop().await;
}

/// Each malformed `SearchEvents` field is refused as `InvalidArgument`, named in the message.
async fn assert_bad_filters_are_named(
    client: &mut grpc::pb::observer_control_client::ObserverControlClient<
        tonic::transport::Channel,
    >,
) {
    use fraiseql_observers::grpc::pb;
    for (request, named) in [
        (
            pb::SearchEventsRequest {
                event_id: "not-an-id".to_owned(),
                ..pb::SearchEventsRequest::default()
            },
            "event_id: expected a UUID",
        ),
        (
            pb::SearchEventsRequest {
                since: "yesterdayish".to_owned(),
                ..pb::SearchEventsRequest::default()
            },
            "since: expected a duration ago",
        ),
        (
            pb::SearchEventsRequest {
                outcome: "fine".to_owned(),
                ..pb::SearchEventsRequest::default()
            },
            "outcome: unknown outcome",
        ),
        (
            pb::SearchEventsRequest {
                limit: 5000,
                ..pb::SearchEventsRequest::default()
            },
            "limit: at most 1000",
        ),
    ] {
        let status = client.search_events(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(named), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_events_answers_from_the_history_in_pages_and_names_a_bad_filter() {
    use fraiseql_observers::grpc::pb;
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = start(&database, &receiver, "node-a", None).await;
    let handle = node.handle.clone();
    eventually("every lease", || async { handle.leading().len() == 8 }).await;
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(1, 12) AS id")
        .execute(&database.pool)
        .await
        .unwrap();
    let pool = database.pool.clone();
    eventually("12 history rows", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fraiseql_observers.history")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 12
    })
    .await;

    // Reflection lists the method, and grpcurl calls it with the JSON names of its fields.
    let endpoint = node.endpoint();
    let (methods, found) = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        move || {
            (
                grpcurl(&[
                    "-plaintext",
                    &endpoint,
                    "list",
                    "fraiseql.observers.v1.ObserverControl",
                ]),
                grpcurl(&[
                    "-plaintext",
                    "-d",
                    r#"{"entityType": "Order", "entityId": "7"}"#,
                    &endpoint,
                    "fraiseql.observers.v1.ObserverControl/SearchEvents",
                ]),
            )
        }
    })
    .await
    .unwrap();
    assert!(
        methods
            .lines()
            .any(|line| line == "fraiseql.observers.v1.ObserverControl.SearchEvents"),
        "{methods}"
    );
    let found: serde_json::Value = serde_json::from_str(&found).unwrap();
    let rows = found["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{found}");
    assert_eq!(rows[0]["entityId"], "7");
    assert_eq!(rows[0]["recordKind"], "event");
    assert_eq!(rows[0]["matchedObservers"], serde_json::json!(["orders"]));
    assert_eq!(rows[0]["actions"][0]["outcome"], "succeeded", "{found}");
    assert_eq!(rows[0]["actions"][0]["type"], "webhook", "{found}");
    assert_eq!(rows[0]["nodeId"], "node-a");

    // Pages of 5: 5, 5, 2, every row once, newest first.
    let mut client =
        pb::observer_control_client::ObserverControlClient::connect(format!("http://{endpoint}"))
            .await
            .unwrap();
    let mut seen = Vec::new();
    let mut after = 0;
    let mut sizes = Vec::new();
    loop {
        let page = client
            .search_events(pb::SearchEventsRequest {
                entity_type: "Order".to_owned(),
                limit: 5,
                after,
                ..pb::SearchEventsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.rows.len());
        seen.extend(page.rows.iter().map(|row| row.history_id));
        if page.next_cursor == 0 {
            break;
        }
        after = page.next_cursor;
    }
    assert_eq!(sizes, [5, 5, 2]);
    let mut newest_first = seen.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    newest_first.dedup();
    assert_eq!(seen, newest_first);

    assert_bad_filters_are_named(&mut client).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_openmetrics_and_count_what_happened() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = start(&database, &receiver, "node-a", None).await;
    let handle = node.handle.clone();
    eventually("every lease", || async { handle.leading().len() == 8 }).await;
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(1, 20) AS id")
        .execute(&database.pool)
        .await
        .unwrap();
    eventually("20 deliveries", || async { receiver.request_count() >= 20 }).await;
    // A page's history rows are counted once its checkpoint is saved, just after its deliveries.
    let metrics_url = format!("http://{}/metrics", node.http);
    eventually("the pages' history rows counted", || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("fraiseql_observers_history_rows_total{kind=\"event\"} 20\n")
    })
    .await;

    let response = reqwest::get(format!("http://{}/metrics", node.http))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    // The Prometheus project's OpenMetrics parser (PyPI prometheus-client) reads every sample.
    let parsed = tokio::task::spawn_blocking(move || {
        let script = "import sys, json\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families\nout = {}\nfor family in text_string_to_metric_families(sys.stdin.read()):\n    for sample in family.samples:\n        out.setdefault(sample.name, []).append([sample.labels, sample.value])\nprint(json.dumps(out))\n";
        let mut child = common::tools::py_tools()
            .python()
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "the OpenMetrics parser rejected /metrics: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    })
    .await
    .unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        parsed[name]
            .as_array()
            .unwrap_or_else(|| panic!("{name} missing: {parsed}"))
            .iter()
            .filter(|sample| label.is_none_or(|(key, value)| sample[0][key] == value))
            .map(|sample| sample[1].as_f64().unwrap())
            .sum()
    };
    assert!(value("fraiseql_observers_events_processed_total", None) >= 20.0);
    assert!(
        value(
            "fraiseql_observers_actions_total",
            Some(("outcome", "succeeded"))
        ) >= 20.0
    );
    assert!(
        value(
            "fraiseql_observers_action_duration_seconds_count",
            Some(("action_type", "webhook"))
        ) >= 20.0
    );
    assert!((value("fraiseql_observers_leases_held", None) - 8.0).abs() < f64::EPSILON);
    assert!(value("fraiseql_observers_epoch_changes_total", None) >= 8.0);
    assert_eq!(
        parsed["fraiseql_observers_partition_backlog_rows"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    assert!(value("fraiseql_observers_dead_letters", None).abs() < f64::EPSILON);
    // One history row per processed event, written with the pages' checkpoints.
    assert!(
        (value(
            "fraiseql_observers_history_rows_total",
            Some(("kind", "event"))
        ) - value("fraiseql_observers_events_processed_total", None))
        .abs()
            < f64::EPSILON,
        "{parsed}"
    );
    node.stop().await;
}

/// One sample of a scrape, by its name and labels as written (`name{label="value"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

async fn scrape(node: &RunningNode) -> (f64, f64) {
    let text = reqwest::get(format!("http://{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (
        sample(&text, "fraiseql_observers_dead_letters").expect("dead_letters"),
        sample(
            &text,
            r#"fraiseql_observers_database_gauge_refreshes_total{outcome="succeeded"}"#,
        )
        .unwrap_or(0.0),
    )
}

/// Scrapes until `condition` holds of (dead letters, successful refreshes); fails after
/// [`DEADLINE`].
async fn scrape_until(
    node: &RunningNode,
    what: &str,
    condition: impl Fn((f64, f64)) -> bool,
) -> (f64, f64) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let seen = scrape(node).await;
        if condition(seen) {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn push_dead_letters(database: &TestDatabase, count: usize) {
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    for _ in 0..count {
        queue
            .push(NewDeadLetter {
                event: EntityEvent::new(
                    EventKind::Insert,
                    "Order",
                    "1",
                    serde_json::json!({}),
                    None,
                ),
                observer: "orders".to_owned(),
                action_index: 0,
                action_type: "webhook".to_owned(),
                error_code: ErrorCode::RemoteUnavailable,
                error_message: "HTTP 503".to_owned(),
                attempts: 3,
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_read_the_gauges_of_the_last_refresh_and_run_no_query() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    // Longer than the test: only the refresh at start runs by itself.
    let node = start_node(
        &database,
        &receiver,
        "node-a",
        None,
        None,
        Duration::from_hours(1),
    )
    .await;
    scrape_until(&node, "the refresh at start", |(_, refreshes)| {
        refreshes >= 1.0
    })
    .await;
    // Taking the coordinator role refreshes once more (within the half-second role check): when
    // the node took it after the refresh at start, that is a second one. Let it settle.
    let deadline = std::time::Instant::now() + DEADLINE;
    while node.handle.coordinator_epoch().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node became coordinator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (dead_letters, settled) = scrape(&node).await;
    assert!(
        dead_letters.abs() < f64::EPSILON,
        "no dead letters yet: {dead_letters}"
    );
    assert!(
        (1.0..=2.0).contains(&settled),
        "refreshed at start and at most once for the role: {settled}"
    );

    push_dead_letters(&database, 3).await;
    for _ in 0..50 {
        assert_eq!(
            scrape(&node).await,
            (0.0, settled),
            "a scrape neither counts dead letters nor refreshes"
        );
    }
    node.control.refresh_gauges().await.unwrap();
    assert_eq!(scrape(&node).await, (3.0, settled + 1.0));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_are_refreshed_in_the_background_at_the_interval() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = start_node(
        &database,
        &receiver,
        "node-a",
        None,
        None,
        Duration::from_millis(200),
    )
    .await;
    scrape_until(&node, "the refresh at start", |(_, refreshes)| {
        refreshes >= 1.0
    })
    .await;
    // The two letters commit one after the other: a refresh between them sees one.
    push_dead_letters(&database, 2).await;
    let seen = scrape_until(
        &node,
        "the dead letters in /metrics",
        |(dead_letters, _)| dead_letters >= 2.0,
    )
    .await;
    assert!((seen.0 - 2.0).abs() < f64::EPSILON, "{seen:?}");
    assert!(seen.1 >= 2.0, "seen by a later refresh: {seen:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_drain_and_mutating_calls_need_the_token() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let node = start(&database, &receiver, "node-a", Some("s3cret")).await;
    let handle = node.handle.clone();
    eventually("every lease", || async { handle.leading().len() == 8 }).await;
    let get = |path: &'static str| {
        let url = format!("http://{}{path}", node.http);
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/readyz").await, 200);

    let endpoint = node.endpoint();
    let refused = grpc::request_drain(&endpoint, None, None, true)
        .await
        .unwrap_err();
    assert!(format!("{refused}").contains("Bearer"), "{refused}");
    let wrong = grpc::request_drain(&endpoint, Some("guess"), None, true)
        .await
        .unwrap_err();
    assert!(
        format!("{wrong}").starts_with("not authorized (check --control-token)"),
        "{wrong}"
    );
    assert!(
        !format!("{wrong}").contains("Unauthenticated"),
        "no gRPC status phrase: {wrong}"
    );
    assert!(!handle.is_draining(), "refused calls change nothing");
    // Read-only calls stay open; the node names itself as its leases' leader, and a checkpoint
    // reads as words.
    let status = grpc::fetch_status(&endpoint).await.unwrap();
    assert_eq!(status.leases.len(), 8);
    for lease in &status.leases {
        assert_eq!(lease.leader.as_deref(), Some("node-a"));
        assert!(
            lease
                .checkpoint
                .starts_with("after every transaction before ")
                || lease.checkpoint == "at the start of the log",
            "{}",
            lease.checkpoint
        );
    }

    assert!(
        grpc::request_drain(&endpoint, Some("s3cret"), None, true)
            .await
            .unwrap()
    );
    eventually("every lease given back", || async {
        handle.leading().is_empty()
    })
    .await;
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200, "a draining node is alive");
    assert!(
        !grpc::request_drain(&endpoint, Some("s3cret"), None, false)
            .await
            .unwrap()
    );
    eventually("the leases back", || async { handle.leading().len() == 8 }).await;
    assert_eq!(get("/readyz").await, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_under_continuous_load_loses_and_repeats_nothing() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let pool = &database.pool;
    let a = start(&database, &receiver, "node-a", None).await;
    let b = start(&database, &receiver, "node-b", None).await;
    let (handle_a, handle_b) = (a.handle.clone(), b.handle.clone());
    eventually("an even split", || async {
        handle_a.leading().len() == 4 && handle_b.leading().len() == 4
    })
    .await;

    // 40 orders updated in turn, one change per transaction, until stopped.
    let writer = Writer::start(pool.clone(), 40, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut took = Vec::new();
    for partition in handle_a.leading().into_iter().take(2) {
        let partition = u32::try_from(partition).unwrap();
        let moved = grpc::request_handover(
            &a.endpoint(),
            None,
            partition,
            "node-b",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(moved.previous_leader.as_deref(), Some("node-a"));
        assert_eq!(moved.leader, "node-b");
        // The answer follows the partition row (node b's claim committed); node b's own view
        // of what it leads follows a moment later.
        let handle = handle_b.clone();
        eventually("node b to report leading the partition", || {
            let handle = handle.clone();
            async move {
                handle
                    .leading()
                    .contains(&i32::try_from(partition).unwrap())
            }
        })
        .await;
        took.push(moved.took);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("hand-over times: {took:?}");
    let changes = writer.finish().await;
    eventually("every change delivered", || async {
        receiver.request_count() >= changes
    })
    .await;
    a.stop().await;
    b.stop().await;

    assert_once_and_in_order(&receiver, changes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_tls_with_the_given_certificate() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let certificate = certified.cert.pem();
    let node = start_with_tls(
        &database,
        &receiver,
        "node-tls",
        None,
        Some(TlsIdentity {
            certificate_pem: certificate.clone().into_bytes(),
            key_pem: certified.signing_key.serialize_pem().into_bytes(),
        }),
    )
    .await;
    let secure = Target {
        endpoint: format!("https://localhost:{}", node.grpc.port()),
        ca_pem: Some(certificate.clone().into_bytes()),
    };
    let status = grpc::fetch_status(secure).await.unwrap();
    assert_eq!(status.node_id, "node-tls");
    assert!(
        grpc::fetch_status(node.endpoint().as_str()).await.is_err(),
        "plaintext is refused"
    );
    // grpcurl, trusting the same CA, over TLS.
    let directory = tempfile::tempdir().unwrap();
    let ca = directory.path().join("ca.pem");
    std::fs::write(&ca, &certificate).unwrap();
    let address = format!("localhost:{}", node.grpc.port());
    let listing = tokio::task::spawn_blocking(move || {
        grpcurl(&["-cacert", ca.to_str().unwrap(), &address, "list"])
    })
    .await
    .unwrap();
    assert!(
        listing.contains("fraiseql.observers.v1.ObserverControl"),
        "{listing}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_drains_and_resumes_another_by_name() {
    let database = TestDatabase::migrated().await;
    prepare_orders(&database.pool).await;
    let receiver = Receiver::start().await;
    let a = start(&database, &receiver, "node-a", None).await;
    let b = start(&database, &receiver, "node-b", None).await;
    let (handle_a, handle_b) = (a.handle.clone(), b.handle.clone());
    eventually("an even split", || async {
        handle_a.leading().len() == 4 && handle_b.leading().len() == 4
    })
    .await;
    assert!(
        grpc::request_drain(&a.endpoint(), None, Some("node-b"), true)
            .await
            .unwrap()
    );
    eventually("node b drained through node a", || async {
        handle_b.is_draining() && handle_b.leading().is_empty() && handle_a.leading().len() == 8
    })
    .await;
    let cluster = grpc::fetch_cluster_status(&a.endpoint()).await.unwrap();
    let b_state = cluster
        .nodes
        .iter()
        .find(|node| node.node_id == "node-b")
        .unwrap();
    assert!(
        b_state.draining && b_state.partitions.is_empty(),
        "{b_state:?}"
    );
    let unknown = grpc::request_drain(&a.endpoint(), None, Some("nobody"), true)
        .await
        .unwrap_err();
    assert!(
        format!("{unknown}").contains("not a live member"),
        "{unknown}"
    );
    grpc::request_drain(&a.endpoint(), None, Some("node-b"), false)
        .await
        .unwrap();
    eventually("the split again", || async {
        !handle_b.is_draining() && handle_a.leading().len() == 4 && handle_b.leading().len() == 4
    })
    .await;
    a.stop().await;
    b.stop().await;
}
