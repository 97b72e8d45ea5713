//! `migrate` and `dlq list|show|retry|purge` as users run them, against a fresh database.

mod common;

use std::process::Command;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::dlq::{DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use serde_json::json;

fn run(database: &TestDatabase, arguments: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(arguments)
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn letter(observer: &str) -> NewDeadLetter {
    NewDeadLetter {
        event: EntityEvent::new(EventKind::Insert, "Order", "17", json!({"total": 5}), None),
        observer: observer.to_owned(),
        action_index: 0,
        action_type: "webhook".to_owned(),
        error_code: ErrorCode::RemoteUnavailable,
        error_message: "HTTP 503: down".to_owned(),
        attempts: 3,
    }
}

#[tokio::test]
async fn migrate_applies_then_reports_nothing_to_do() {
    let database = TestDatabase::create().await;
    let (status, stdout, stderr) = run(&database, &["migrate"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("applied 0001_change_log"), "{stdout}");
    let (status, stdout, _) = run(&database, &["migrate"]);
    assert_eq!(status, Some(0));
    assert!(stdout.contains("0 applied now"), "{stdout}");
}

#[tokio::test]
async fn an_unreachable_database_exits_with_the_storage_status() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "migrate",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{port}/x"),
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("connect to the database")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_shows_the_oldest_hundred_unless_told_and_counts_them_all() {
    let database = TestDatabase::migrated().await;
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    let mut first = None;
    for _ in 0..101 {
        let id = queue.push(letter("order-created")).await.unwrap();
        first.get_or_insert(id);
    }

    let (status, stdout, stderr) = run(&database, &["dlq", "list"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("Dead letters (showing 100 of 101)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&first.unwrap().to_string()),
        "oldest first: {stdout}"
    );
    let (_, stdout, _) = run(&database, &["dlq", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 100);
    let (_, stdout, _) = run(&database, &["dlq", "list", "--limit", "101", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 101);
}

// Multi-threaded: the receiver must keep answering while the test blocks on the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_listed_shown_retried_and_purged() {
    let database = TestDatabase::migrated().await;
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    let receiver = Receiver::start().await;
    receiver.script("/orders", [Reply::status(200)]);
    let retried = queue.push(letter("order-created")).await.unwrap();
    let kept = queue.push(letter("other")).await.unwrap();

    let (status, stdout, stderr) = run(&database, &["dlq", "list", "--json"]);
    assert_eq!(status, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["id"], retried.to_string());
    assert_eq!(listed[0]["error_code"], "OB006");

    let (_, stdout, _) = run(&database, &["dlq", "list", "--observer", "other"]);
    assert!(
        stdout.starts_with("Dead letters (showing 1 of 2)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&kept.to_string()) && stdout.contains("OB006"),
        "{stdout}"
    );

    let (status, stdout, _) = run(&database, &["dlq", "show", &retried.to_string()]);
    assert_eq!(status, Some(0));
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["event"]["entity_id"], "17");

    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:\n  - name: order-created\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'}}]\n",
            receiver.url("/orders")
        ),
    )
    .unwrap();
    let (status, stdout, stderr) = run(
        &database,
        &[
            "dlq",
            "retry",
            &retried.to_string(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("HTTP 200"), "{stdout}");
    let requests = receiver.requests_to("/orders");
    assert_eq!(requests.len(), 1);
    let event_id = shown["event"]["id"].as_str().unwrap();
    assert_eq!(
        requests[0].header("idempotency-key").unwrap(),
        format!("{event_id}:order-created:0")
    );
    assert!(
        queue.get(retried).await.unwrap().is_none(),
        "a successful retry removes the letter"
    );

    let (status, _, stderr) = run(&database, &["dlq", "purge"]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("without --all"), "{stderr}");
    assert_eq!(
        queue.count().await.unwrap(),
        1,
        "nothing deleted by a refused purge"
    );
    let (status, stdout, _) = run(&database, &["dlq", "purge", "--observer", "other"]);
    assert_eq!(status, Some(0));
    assert!(stdout.contains("deleted 1 dead letter"), "{stdout}");
    assert_eq!(queue.count().await.unwrap(), 0);
}

#[test]
fn the_demo_shows_every_delivery_and_stops_cleanly() {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["demo", "--database-url", &common::postgres::server_url()])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.matches("← POST /orders/created").count(),
        3,
        "{stdout}"
    );
    assert_eq!(stdout.matches("← POST /orders/paid").count(), 1, "{stdout}");
    assert!(
        stdout.contains(r#"{"order":"1","total":250,"was":"new"}"#),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("← POST /orders/deleted").count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.contains("✓ 5 deliveries, node stopped cleanly"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_delivers_changes_and_stops_cleanly_on_sigterm() {
    let database = TestDatabase::create().await;
    let receiver = Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions: [{{type: webhook, url: '{}'}}]\n",
            receiver.url("/orders")
        ),
    )
    .unwrap();
    let node = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--poll-interval",
            "200ms",
            "--node-id",
            "test-node",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // The node migrates on start; wait for the schema before writing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let leader: Option<String> = sqlx::query_scalar(
            "SELECT leader FROM fraiseql_observers.partitions WHERE partition = 0",
        )
        .fetch_optional(&database.pool)
        .await
        .unwrap_or(None);
        if leader.as_deref() == Some("test-node") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not claim the partition"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, status text);
         SELECT core.observer_track_table('orders'::regclass, 'Order');
         INSERT INTO orders VALUES (1, 'new'), (2, 'new');
         UPDATE orders SET status = 'paid' WHERE id = 1;",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    while receiver.requests_to("/orders").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "deliveries did not arrive"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let terminated = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let output = node.wait_with_output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    let kinds_of = |order: &str| -> Vec<String> {
        receiver
            .requests_to("/orders")
            .iter()
            .map(common::Recorded::json)
            .filter(|body| body["entity_id"] == order)
            .map(|body| body["event_type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(kinds_of("1"), ["INSERT", "UPDATE"], "in change order");
    assert_eq!(kinds_of("2"), ["INSERT"]);
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.processed_actions")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(processed, 3, "every completed action is in the ledger");
}

/// The characters a hostile writer or receiver uses against a terminal or a line-oriented reader.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|character| {
            (character.is_control() && *character != '\n') || *character == '\u{202e}'
        })
        .collect()
}

#[tokio::test]
async fn a_dead_letter_with_control_sequences_lists_as_one_escaped_row() {
    let database = TestDatabase::migrated().await;
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    let hostile_error =
        "HTTP 500: \u{1b}[2J\u{1b}[31mboom\r\nFAKE 00000000-0000-0000-0000-000000000000  x\u{9b}1m";
    let hostile_entity = "Ord\u{1b}]0;pwned\u{7}\nX\u{202e}";
    let id = queue
        .push(NewDeadLetter {
            event: EntityEvent::new(EventKind::Insert, hostile_entity, "17", json!({}), None),
            error_message: hostile_error.to_owned(),
            ..letter("orders")
        })
        .await
        .unwrap();

    let (status, stdout, stderr) = run(&database, &["dlq", "list"]);
    assert_eq!(status, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a title, a header and one row:\n{stdout}");
    assert!(lines[2].starts_with(&id.to_string()), "{stdout}");
    assert_eq!(raw_controls(&stdout), Vec::<char>::new(), "{stdout:?}");
    assert!(
        lines[2].contains(r"Ord\u{1b}]0;pwned\u{7}\nX\u{202e}"),
        "{stdout}"
    );
    assert!(
        lines[2].contains(r"HTTP 500: \u{1b}[2J\u{1b}[31mboom\r\nFAKE"),
        "{stdout}"
    );

    // `dlq show` stays JSON, every control character escaped, decoding to the stored text.
    let (status, stdout, _) = run(&database, &["dlq", "show", &id.to_string()]);
    assert_eq!(status, Some(0));
    assert_eq!(raw_controls(&stdout), Vec::<char>::new(), "{stdout:?}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["error_message"], hostile_error);
    assert_eq!(shown["event"]["entity_type"], hostile_entity);

    // `--json` is the exact JSON.
    let (_, stdout, _) = run(&database, &["dlq", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["error_message"], hostile_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_action_writes_one_text_line_whatever_the_data_holds() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE notes (id int PRIMARY KEY, note text);
         SELECT core.observer_track_table('notes'::regclass, 'Note');
         INSERT INTO notes VALUES (1, E'fine\\nFAKE level=ERROR admin logged in\\r\\n\\x1b[2J');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        "observers:\n  - name: notes\n    entity: Note\n    events: [insert]\n    actions: [{type: log, level: info, message: 'note {{ entity_id }}: {{ data.note }}'}]\n",
    )
    .unwrap();
    let node = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "text",
            "--partitions",
            "1",
            "--poll-interval",
            "200ms",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "warn,fraiseql_observers::observer_log=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let settled: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.processed_actions")
                .fetch_optional(&database.pool)
                .await
                .unwrap_or(None);
        if settled.unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the log action did not run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let terminated = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let output = node.wait_with_output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let logged: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("observer_log"))
        .collect();
    assert_eq!(logged.len(), 1, "{stderr}");
    assert!(
        logged[0].contains(r"note 1: fine\nFAKE level=ERROR admin logged in\r\n\u{1b}[2J"),
        "{stderr}"
    );
    assert!(
        stderr.lines().all(|line| !line.starts_with("FAKE")),
        "a forged line: {stderr}"
    );
    assert_eq!(raw_controls(&stderr), Vec::<char>::new(), "{stderr:?}");
}
