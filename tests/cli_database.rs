//! `migrate` and `dlq list|show|retry|purge` as users run them, against a fresh database.

mod common;

use std::process::Command;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::dlq::{DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use serde_json::json;

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
async fn migrate_status_and_dry_run_show_what_is_applied_and_change_nothing() {
    let database = TestDatabase::create().await;
    let total = fraiseql_observers::migrate::MIGRATIONS.len();
    let (status, stdout, stderr) = database.cli(&["migrate", "--dry-run"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), total + 1, "{stdout}");
    assert!(
        stdout.starts_with("would apply 0001_change_log (checksum "),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(&format!(
            "{total} migration(s) would be applied; nothing was changed\n"
        )),
        "{stdout}"
    );
    let (_, stdout, _) = database.cli(&["migrate", "--status"]);
    assert!(
        stdout.contains(&format!("✓ 0 applied, {total} pending")),
        "{stdout}"
    );
    let schema: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('fraiseql_observers.schema_migrations')::text")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(schema, None, "neither wrote anything");

    let (status, _, stderr) = database.cli(&["migrate"]);
    assert_eq!(status, Some(0), "{stderr}");
    let (_, stdout, _) = database.cli(&["migrate", "--status"]);
    assert!(
        stdout.contains(&format!("✓ {total} applied, 0 pending")),
        "{stdout}"
    );
    assert!(
        stdout.lines().nth(1).unwrap().contains("0001_change_log"),
        "{stdout}"
    );
    let (_, stdout, _) = database.cli(&["migrate", "--dry-run"]);
    assert_eq!(
        stdout,
        "0 migration(s) would be applied; nothing was changed\n"
    );

    // An applied migration edited afterwards, and one from a newer binary.
    sqlx::raw_sql(
        "UPDATE fraiseql_observers.schema_migrations SET checksum = 'edited' WHERE version = 2;
         INSERT INTO fraiseql_observers.schema_migrations (version, name, checksum)
              VALUES (999, '0999_from_the_future', 'abc');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let (status, stdout, _) = database.cli(&["migrate", "--status", "--json"]);
    assert_eq!(status, Some(0));
    let lines: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(lines[1]["state"]["changed"]["applied_checksum"], "edited");
    assert_eq!(lines[total]["name"], "0999_from_the_future");
    assert_eq!(lines[total]["state"], "unknown");
    let (_, stdout, _) = database.cli(&["migrate", "--status"]);
    assert!(
        stdout.contains("CHANGED") && stdout.contains("UNKNOWN"),
        "{stdout}"
    );
    assert!(
        stdout.contains("✗ 2 migration(s) changed since applied or unknown to this binary"),
        "{stdout}"
    );
}

#[tokio::test]
async fn migrate_applies_then_reports_nothing_to_do() {
    let database = TestDatabase::create().await;
    let (status, stdout, stderr) = database.cli(&["migrate"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("applied 0001_change_log"), "{stdout}");
    let (status, stdout, _) = database.cli(&["migrate"]);
    assert_eq!(status, Some(0));
    assert!(stdout.contains("0 applied now"), "{stdout}");
}

/// The binary with `arguments` and no `DATABASE_URL`: the URL, if any, is on the command line.
fn run_without_database(arguments: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(arguments)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_named_with_its_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = format!("postgres://postgres@127.0.0.1:{closed}/x");
    let cases: &[(&str, &str, i32, &str)] = &[
        (
            "refused",
            &refused,
            3,
            "cannot connect to PostgreSQL at 127.0.0.1:PORT (user \"postgres\", database \"x\"): connection refused",
        ),
        (
            "unknown role",
            "postgres://no_such_role_here@127.0.0.1:5432/postgres",
            3,
            "cannot connect to PostgreSQL at 127.0.0.1:5432 (user \"no_such_role_here\", database \"postgres\"): authentication failed: role \"no_such_role_here\" does not exist",
        ),
        (
            "unknown database",
            "postgres://postgres@127.0.0.1:5432/no_such_database_here",
            3,
            "cannot connect to PostgreSQL at 127.0.0.1:5432 (user \"postgres\", database \"no_such_database_here\"): unknown database: database \"no_such_database_here\" does not exist",
        ),
        (
            "unknown host",
            "postgres://postgres@no-such-host.invalid:5432/x",
            3,
            "cannot connect to PostgreSQL at no-such-host.invalid:5432 (user \"postgres\", database \"x\"): unknown host \"no-such-host.invalid\"",
        ),
        (
            "not a URL",
            "mysql://root:hunter2@db/x",
            2,
            "cannot connect to PostgreSQL at (DATABASE_URL): not a PostgreSQL URL",
        ),
    ];
    for (case, url, status, expected) in cases {
        let started = std::time::Instant::now();
        // The flag after the subcommand, where a user types it.
        let (code, stderr) = run_without_database(&["dlq", "list", "--database-url", url]);
        let expected = expected.replace("PORT", &closed.to_string());
        assert_eq!(code, Some(*status), "{case}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {expected}")),
            "{case}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{case}: said once: {stderr}");
        assert!(!stderr.contains("hunter2"), "{case}: no password: {stderr}");
        assert!(!stderr.contains("pool timed out"), "{case}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(9),
            "{case}: answered before any pool timeout"
        );
    }
    let (code, stderr) = run_without_database(&["migrate"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no database: set DATABASE_URL or pass --database-url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_database_flag_is_taken_before_or_after_the_subcommand() {
    let database = TestDatabase::create().await;
    let (status, _, stderr) = database.cli(&["migrate"]);
    assert_eq!(status, Some(0), "{stderr}");
    for arguments in [
        ["dlq", "--database-url", &database.url, "list"],
        ["dlq", "list", "--database-url", &database.url],
        [
            "migrate",
            "--database-url",
            &database.url,
            "--log-format=text",
        ],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
            .args(arguments)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(0), "{arguments:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_letter_id_that_is_not_a_uuid_says_what_is_expected() {
    let database = TestDatabase::create().await;
    let (status, _, stderr) = database.cli(&["dlq", "show", "garbage"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("expected a dead letter's id, a UUID such as"),
        "{stderr}"
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

    let (status, stdout, stderr) = database.cli(&["dlq", "list"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("Dead letters (showing 100 of 101)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&first.unwrap().to_string()),
        "oldest first: {stdout}"
    );
    let (_, stdout, _) = database.cli(&["dlq", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 100);
    let (_, stdout, _) = database.cli(&["dlq", "list", "--limit", "101", "--json"]);
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

    let (status, stdout, stderr) = database.cli(&["dlq", "list", "--json"]);
    assert_eq!(status, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["id"], retried.to_string());
    assert_eq!(listed[0]["error_code"], "OB006");

    let (_, stdout, _) = database.cli(&["dlq", "list", "--observer", "other"]);
    assert!(
        stdout.starts_with("Dead letters (showing 1 of 2)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&kept.to_string()) && stdout.contains("OB006"),
        "{stdout}"
    );

    let (status, stdout, _) = database.cli(&["dlq", "show", &retried.to_string()]);
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
    let (status, stdout, stderr) = database.cli(&[
        "dlq",
        "retry",
        &retried.to_string(),
        "--config",
        config.to_str().unwrap(),
    ]);
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

    let (status, _, stderr) = database.cli(&["dlq", "purge"]);
    assert_eq!(status, Some(2), "a refused purge is a command-line error");
    assert!(stderr.contains("without --all"), "{stderr}");
    assert_eq!(
        queue.count().await.unwrap(),
        1,
        "nothing deleted by a refused purge"
    );
    let (status, stdout, _) = database.cli(&["dlq", "purge", "--observer", "other"]);
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

/// The change-log rows, and how many of them their partition's checkpoint covers (their
/// transaction is visible in the checkpoint's snapshot).
async fn changes_covered(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE pg_visible_in_snapshot(change.txid, partition.snapshot))
           FROM core.tb_entity_change_log AS change
           JOIN fraiseql_observers.cluster ON true
           LEFT JOIN fraiseql_observers.partitions AS partition
                  ON partition.partition = change.entity_hash % cluster.partition_count",
    )
    .fetch_one(pool)
    .await
    .unwrap()
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
    assert_eq!(
        changes_covered(&database.pool).await,
        (3, 3),
        "the checkpoint covers every delivered change after a clean stop"
    );
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

    let (status, stdout, stderr) = database.cli(&["dlq", "list"]);
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
    let (status, stdout, _) = database.cli(&["dlq", "show", &id.to_string()]);
    assert_eq!(status, Some(0));
    assert_eq!(raw_controls(&stdout), Vec::<char>::new(), "{stdout:?}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["error_message"], hostile_error);
    assert_eq!(shown["event"]["entity_type"], hostile_entity);

    // `--json` is the exact JSON.
    let (_, stdout, _) = database.cli(&["dlq", "list", "--json"]);
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
        // The page's history row is written by its checkpoint's save: the action ran.
        let settled: Option<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM fraiseql_observers.history WHERE record_kind = 'event'",
        )
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

/// `run` on a terminal (a pseudo-terminal from `script`) for a few seconds: what it printed.
fn run_on_a_terminal(database: &TestDatabase, config: &std::path::Path, no_color: bool) -> String {
    let command = format!(
        "timeout -s TERM 6 {} run --config {} --node-id tty --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0",
        env!("CARGO_BIN_EXE_fraiseql-observers"),
        config.display()
    );
    let mut script = Command::new("script");
    script
        .args(["-qefc", &command, "/dev/null"])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    if no_color {
        script.env("NO_COLOR", "1");
    }
    let output = script.output().expect("script(1) runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_color_turns_colours_off_on_a_terminal() {
    let database = TestDatabase::create().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{type: log}]\n",
    )
    .unwrap();
    let coloured = run_on_a_terminal(&database, &config, false);
    assert!(coloured.contains("node running"), "{coloured}");
    assert!(
        coloured.contains("\u{1b}["),
        "a terminal gets colours: {coloured}"
    );
    let plain = run_on_a_terminal(&database, &config, true);
    assert!(plain.contains("node running"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "NO_COLOR: no escape sequence: {plain}"
    );
}

#[test]
fn json_logs_report_a_fatal_error_as_one_json_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "dlq",
            "list",
            "--log-format",
            "json",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{closed}/x"),
        ])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(&stderr).expect("a JSON line");
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["fields"]["message"], "fatal");
    assert_eq!(line["fields"]["code"], "OB010");
    assert_eq!(line["fields"]["exit_status"], 3);
    assert!(
        line["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_is_malformed_or_unreachable_at_start_is_said() {
    let database = TestDatabase::create().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{type: log}]\n",
    )
    .unwrap();
    let run_with_redis = |url: &str| {
        let output = Command::new("timeout")
            .args(["-s", "TERM", "5", env!("CARGO_BIN_EXE_fraiseql-observers")])
            .args([
                "run",
                "--config",
                config.to_str().unwrap(),
                "--node-id",
                "redis-check",
            ])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("DATABASE_URL", &database.url)
            .env("REDIS_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let (status, stderr) = run_with_redis("http://user:hunter2@cache.example");
    assert_eq!(status, Some(2), "a setting error: {stderr}");
    assert!(
        stderr.starts_with("error: REDIS_URL is not a Redis URL such as redis://host:6379/0"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_, stderr) = run_with_redis(&format!("redis://:hunter2@127.0.0.1:{closed}/0"));
    let warning = stderr
        .lines()
        .find(|line| line.contains("Redis does not answer at start"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warning.contains(&format!("server=127.0.0.1:{closed}")),
        "{warning}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn dlq_listings_filter_by_error_text_time_and_entity_type() {
    let database = TestDatabase::migrated().await;
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    queue.push(letter("orders")).await.unwrap();
    queue
        .push(NewDeadLetter {
            error_message: "HTTP 404: No Such Hook".to_owned(),
            ..letter("invoices")
        })
        .await
        .unwrap();
    let observers = |arguments: &[&str]| {
        let (status, stdout, stderr) = database.cli(arguments);
        assert_eq!(status, Some(0), "{arguments:?}: {stderr}");
        let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|letter| letter["observer"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        observers(&["dlq", "list", "--json", "--error", "no such"]),
        ["invoices"]
    );
    assert_eq!(
        observers(&[
            "dlq",
            "list",
            "--json",
            "--since",
            "1h",
            "--entity-type",
            "Order"
        ])
        .len(),
        2
    );
    assert!(observers(&["dlq", "list", "--json", "--since", "2999-01-01T00:00:00Z"]).is_empty());
    let (status, _, stderr) = database.cli(&["dlq", "list", "--since", "yesterdayish"]);
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("expected a duration ago such as 2h or 7d"),
        "{stderr}"
    );
    // Purge by error text removes only those.
    let (status, stdout, stderr) = database.cli(&["dlq", "purge", "--error", "404"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains('1'), "{stdout}");
    assert_eq!(observers(&["dlq", "list", "--json"]), ["orders"]);
}
