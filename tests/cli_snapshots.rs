//! The human output of the commands an operator reads under pressure, as snapshots
//! (`tests/snapshots/`), taken from the real binary against a real database: `backfill` with its
//! progress, `replay --dry-run`, `dlq list` with a filter, `dlq stats`, `dlq retry` of many,
//! `migrate --status`, and the errors of a bad letter id and an unreachable database. What
//! changes from run to run — ids, times, ages, rates, durations, checksums, ports — is masked; a
//! change of wording or layout is a diff to review (`cargo insta review`, or
//! `INSTA_UPDATE=always cargo test --test cli_snapshots`).

mod common;

use common::Receiver;
use common::postgres::TestDatabase;
use fraiseql_observers::dlq::{DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use serde_json::json;

/// Masks of what differs between runs, most specific first.
const MASKS: &[(&str, &str)] = &[
    (
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[uuid]",
    ),
    (
        r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d(:\d\d)?)?",
        "[time]",
    ),
    (r"\b[0-9a-f]{64}\b", "[checksum]"),
    (r"checksum [0-9a-f]{8,}", "checksum [checksum]"),
    (r"http://127\.0\.0\.1:\d+", "[receiver]"),
    (r"\d+(\.\d+)? (rows|changes|letters)/s", "[rate] $2/s"),
    (r"in \d+(\.\d+)?s", "in [secs]"),
    (r"\b\d+\.\d+s\b", "[secs]"),
    // Ages and durations as humantime prints them (`3s`, `1m 2s`, `250ms`).
    (
        r"\b\d+(ms|us|µs|ns|s|m|h|d)( \d+(ms|us|µs|ns|s|m|h|d))*\b",
        "[age]",
    ),
];

fn snapshot(name: &str, text: &str) {
    let filters: Vec<(&str, &str)> = MASKS.to_vec();
    insta::with_settings!({ filters => filters, omit_expression => true }, {
        insta::assert_snapshot!(name, text);
    });
}

fn history(errors: &[(ErrorCode, &str)]) -> String {
    errors
        .iter()
        .enumerate()
        .map(|(index, (code, message))| {
            format!(
                "attempt {} (2026-12-06T01:00:0{index}+00:00): {code} {message}",
                index + 1
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn letter(
    observer: &str,
    entity_type: &str,
    id: &str,
    code: ErrorCode,
    message: String,
) -> NewDeadLetter {
    NewDeadLetter {
        event: EntityEvent::new(EventKind::Insert, entity_type, id, json!({"id": id}), None),
        observer: observer.to_owned(),
        action_index: 0,
        action_type: "webhook".to_owned(),
        error_code: code,
        attempts: u32::try_from(message.lines().count()).unwrap(),
        error_message: message,
    }
}

/// Two observers of orders, both calling `receiver`.
fn observers_file(directory: &tempfile::TempDir, receiver: &Receiver) -> std::path::PathBuf {
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:
  - name: orders
    entity: Order
    events: [insert, update]
    actions:
      - {{type: webhook, url: '{url}'}}
  - name: paid-orders
    entity: Order
    events: [update]
    condition: data.note == 'paid'
    actions:
      - {{type: webhook, url: '{url}'}}
",
            url = receiver.url("/orders")
        ),
    )
    .unwrap();
    config
}

/// Four dead letters: three of `orders` (one of them failed twice the same way), one of
/// `invoices`.
async fn park_letters(database: &TestDatabase) {
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    let busy = (ErrorCode::RemoteUnavailable, "HTTP 503: busy");
    let gone = (ErrorCode::RemoteRejected, "HTTP 410: gone");
    for (id, errors) in [
        ("1", vec![busy, busy]),
        ("2", vec![busy, gone]),
        ("3", vec![gone]),
    ] {
        queue
            .push(letter(
                "orders",
                "Order",
                id,
                errors[errors.len() - 1].0,
                history(&errors),
            ))
            .await
            .unwrap();
    }
    queue
        .push(letter(
            "invoices",
            "Invoice",
            "I-7",
            ErrorCode::ActionTimeout,
            "attempt timed out".to_owned(),
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_print_what_the_snapshots_hold() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text);
         INSERT INTO orders SELECT id, 'before capture' FROM generate_series(1, 25) AS id;
         SELECT core.observer_track_table('orders'::regclass, 'Order');
         INSERT INTO orders VALUES (26, 'captured');
         UPDATE orders SET note = 'paid' WHERE id = 3;",
    )
    .execute(&database.pool)
    .await
    .unwrap();

    let (status, stdout, stderr) = database.cli(&["backfill", "--table", "orders", "--dry-run"]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("backfill_dry_run", &stdout);
    let (status, stdout, stderr) =
        database.cli(&["backfill", "--table", "orders", "--batch-size", "10"]);
    assert_eq!(status, Some(0), "{stderr}");
    // The first progress line only: a loaded machine may take long enough for a second.
    let first_progress = stderr.lines().next().unwrap_or_default();
    snapshot(
        "backfill",
        &format!("stderr:\n{first_progress}\n…\nstdout:\n{stdout}"),
    );

    let receiver = Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let config = observers_file(&directory, &receiver);
    let config = config.to_str().unwrap();
    let (status, stdout, stderr) = database.cli(&[
        "replay",
        "--config",
        config,
        "--entity-type",
        "Order",
        "--dry-run",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("replay_dry_run", &stdout);

    park_letters(&database).await;
    let (status, stdout, stderr) = database.cli(&["dlq", "list", "--observer", "orders"]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("dlq_list_observer", &stdout);
    let (status, stdout, stderr) = database.cli(&["dlq", "stats"]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("dlq_stats", &stdout);
    let (status, stdout, stderr) =
        database.cli(&["dlq", "retry", "--entity-type", "Order", "--config", config]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot(
        "dlq_retry_many",
        &format!("stderr:\n{stderr}\nstdout:\n{stdout}"),
    );

    let (status, stdout, stderr) = database.cli(&["migrate", "--status"]);
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("migrate_status", &stdout);

    let (status, _, stderr) = database.cli(&["dlq", "show", "not-a-letter"]);
    assert_eq!(status, Some(2));
    snapshot("error_letter_id", &stderr);
    let (status, _, stderr) = database.cli(&[
        "dlq",
        "list",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/nowhere",
    ]);
    assert_eq!(status, Some(3));
    snapshot("error_database_refused", &stderr);
}

/// Runs the binary with `arguments`, `stdin` as its input and no database.
fn cli_with_stdin(
    arguments: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> (Option<i32>, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(arguments)
        .envs(env.iter().copied())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn debug_event_explain_shows_each_matching_action_rendered_and_sends_nothing() {
    let receiver = Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            r#"observers:
  - name: order-paid
    entity: Order
    events: [update]
    condition: "data.status == 'paid'"
    actions:
      - type: webhook
        url_env: PAID_HOOK_URL
      - type: webhook
        url: '{crm}?token=s3cret-token'
        body_template: '{{"order": {{{{ data.id }}}}, "total": {{{{ data.total }}}}}}'
      - type: email
        mode: async
        host: smtp.example.com
        from: observers@example.com
        to: ops@example.com
        username: mailer
        password_env: SMTP_PASSWORD
        subject: 'Order {{{{ data.id }}}} paid'
        text: 'Total {{{{ data.total }}}} {{{{ data.currency }}}}'
  - name: order-cancelled
    entity: Order
    events: [update]
    condition: "data.status == 'cancelled'"
    actions: [{{type: log}}]
  - name: new-users
    entity: User
    events: [insert]
    actions: [{{type: log}}]
"#,
            crm = receiver.url("/crm")
        ),
    )
    .unwrap();
    let change = r#"{"object_type": "Order", "object_id": "42", "modification_type": "UPDATE",
        "created_at": "2026-12-06T10:00:00Z",
        "object_data_before": {"id": 42, "status": "new", "total": 99.5},
        "object_data": {"id": 42, "status": "paid", "total": 99.5}}"#;
    let secrets = [
        (
            "PAID_HOOK_URL",
            "https://hooks.example.com/paid?key=hook-secret",
        ),
        ("SMTP_PASSWORD", "smtp-secret"),
    ];
    let config = config.to_str().unwrap();
    let (status, stdout, stderr) = cli_with_stdin(
        &["debug-event", "--config", config, "--explain", "-"],
        &secrets,
        change,
    );
    assert_eq!(status, Some(0), "{stderr}");
    snapshot("debug_event_explain", &stdout);
    for secret in ["s3cret-token", "hook-secret", "smtp-secret"] {
        assert!(!stdout.contains(secret), "{secret} shown:\n{stdout}");
    }
    let (status, json, stderr) = cli_with_stdin(
        &[
            "debug-event",
            "--config",
            config,
            "--explain",
            "-",
            "--json",
        ],
        &secrets,
        change,
    );
    assert_eq!(status, Some(0), "{stderr}");
    let explanation: serde_json::Value = serde_json::from_str(&json).unwrap();
    let paid = &explanation["observers"][0];
    assert_eq!(paid["matches"], true);
    assert_eq!(
        paid["actions"][1]["rendered"][0]["text"],
        r#"{"order": 42, "total": 99.5}"#
    );
    assert_eq!(explanation["observers"][1]["matches"], false);
    assert_eq!(explanation["other_observers"], 1);
    // Nothing was sent: the receiver behind the second webhook saw no request.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(receiver.requests_to("/crm").is_empty());

    let (status, _, stderr) = cli_with_stdin(
        &["debug-event", "--config", config, "--explain", "-"],
        &secrets,
        r#"{"object_type": "Order", "modification_type": "UPDATE", "object_data": {}}"#,
    );
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("object_id"), "{stderr}");
}
