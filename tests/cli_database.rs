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
