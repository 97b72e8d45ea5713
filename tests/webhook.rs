//! The webhook action against a real HTTP server: envelope, headers, signature, status
//! classification (redirects included), retries, `Retry-After`, timeouts and unreachable
//! targets — whose secret URLs (webhook, Slack, SMS, search) stay out of dead letters, job
//! histories and the node's log.

mod common;

use std::time::Duration;

use common::{Receiver, Reply, executor_from_yaml};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

fn order_update() -> EntityEvent {
    let mut event = EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({"id": "ord-7", "status": "paid", "total": 250}),
        Some(json!({"id": "ord-7", "status": "new", "total": 250})),
    );
    event.tenant_id = Some("acme".into());
    event
}

fn observer_yaml(url: &str, extra: &str) -> String {
    format!(
        r"
observers:
  - name: order-paid
    entity: Order
    events: [update]
    actions:
      - type: webhook
        url: {url}
{extra}
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
"
    )
}

#[tokio::test]
async fn delivers_the_envelope_with_identity_headers_and_a_verifiable_signature() {
    let receiver = Receiver::start().await;
    let yaml = observer_yaml(
        &receiver.url("/orders"),
        "        headers: {X-Team: billing, Authorization: 'Bearer ${TOKEN}'}\n        signing_secret_env: HOOK_SECRET",
    );
    let (executor, _) =
        executor_from_yaml(&yaml, &[("HOOK_SECRET", "whsec_123"), ("TOKEN", "tok")]);
    let event = order_update();

    let summary = executor.execute_event(&event).await;

    assert_eq!(summary.matched_observers, ["order-paid"]);
    assert!(summary.actions[0].succeeded(), "{summary:?}");
    let requests = receiver.requests_to("/orders");
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-team"), Some("billing"));
    assert_eq!(request.header("authorization"), Some("Bearer tok"));
    assert_eq!(
        request.header("idempotency-key").unwrap(),
        format!("{}:order-paid:0", event.id)
    );
    assert_eq!(
        request.header("x-fraiseql-event-id").unwrap(),
        event.id.to_string()
    );

    let body = request.json();
    assert_eq!(body["id"], event.id.to_string());
    assert_eq!(body["event_type"], "UPDATE");
    assert_eq!(body["entity_type"], "Order");
    assert_eq!(body["entity_id"], "ord-7");
    assert_eq!(body["data"]["status"], "paid");
    assert_eq!(body["before"]["status"], "new");
    assert_eq!(
        body["changes"],
        json!({"status": {"old": "new", "new": "paid"}})
    );
    assert_eq!(body["observer"], "order-paid");
    assert_eq!(body["tenant_id"], "acme");

    // Verify the signature the way a receiver would: HMAC-SHA256 over "<t>.<raw body>".
    let signature = request.header("x-fraiseql-signature-256").expect("signed");
    let (timestamp, digest) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .expect("t=<ts>,v1=<hex>");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_123").unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&request.body);
    mac.verify_slice(&hex::decode(digest).unwrap())
        .expect("signature verifies with the shared secret");
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp is now: {age}s old");
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_idempotency_key() {
    let receiver = Receiver::start().await;
    receiver.script("/flaky", [Reply::status(503), Reply::status(500)]);
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(&receiver.url("/flaky"), ""), &[]);

    let summary = executor.execute_event(&order_update()).await;

    let report = &summary.actions[0];
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 3);
    let keys: Vec<_> = receiver
        .requests_to("/flaky")
        .iter()
        .map(|request| request.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|key| *key == keys[0]), "{keys:?}");
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn client_errors_are_permanent_and_dead_lettered_after_one_attempt() {
    let receiver = Receiver::start().await;
    receiver.script("/gone", [Reply::status(404)]);
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(&receiver.url("/gone"), ""), &[]);
    let event = order_update();

    let summary = executor.execute_event(&event).await;

    let report = &summary.actions[0];
    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed {
        code,
        message,
        dead_letter,
    } = &report.status
    else {
        panic!("expected a failure: {report:?}")
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert!(message.contains("HTTP 404"), "{message}");
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(Some(letters[0].id), *dead_letter);
    assert_eq!(letters[0].letter.event, event);
    assert_eq!(letters[0].letter.error_code, ErrorCode::RemoteRejected);
    assert_eq!(letters[0].letter.attempts, 1);
    assert_eq!(letters[0].letter.observer, "order-paid");
    assert_eq!(receiver.requests_to("/gone").len(), 1);
}

#[tokio::test]
async fn a_refusal_without_a_body_is_named_by_its_status_phrase() {
    let receiver = Receiver::start().await;
    receiver.script("/removed", [Reply::with_body(410, "")]);
    let (executor, _) = executor_from_yaml(&observer_yaml(&receiver.url("/removed"), ""), &[]);

    let summary = executor.execute_event(&order_update()).await;

    let ActionStatus::Failed { message, .. } = &summary.actions[0].status else {
        panic!("expected a failure: {summary:?}")
    };
    assert_eq!(message, "HTTP 410: Gone (empty body)");
}

#[tokio::test]
async fn request_timeout_and_too_many_requests_are_transient() {
    let receiver = Receiver::start().await;
    receiver.script("/busy", [Reply::status(408), Reply::status(429)]);
    let (executor, _) = executor_from_yaml(&observer_yaml(&receiver.url("/busy"), ""), &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 3);
}

#[tokio::test]
async fn retry_after_is_honoured_between_attempts() {
    let receiver = Receiver::start().await;
    let mut limited = Reply::status(429);
    limited.headers.push(("retry-after", "1".into()));
    receiver.script("/limited", [limited]);
    let yaml =
        observer_yaml(&receiver.url("/limited"), "").replace("max_delay: 50ms", "max_delay: 5s");
    let (executor, _) = executor_from_yaml(&yaml, &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    let requests = receiver.requests_to("/limited");
    assert_eq!(requests.len(), 2);
    let waited = requests[1].arrived - requests[0].arrived;
    assert!(
        waited >= Duration::from_secs(1),
        "waited only {waited:?} despite Retry-After: 1"
    );
}

#[tokio::test]
async fn slow_targets_time_out_each_attempt() {
    let receiver = Receiver::start().await;
    let yaml = observer_yaml(&receiver.url("/delay/3000"), "        timeout: 100ms");
    let (executor, dead_letters) = executor_from_yaml(&yaml, &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    let ActionStatus::Failed { code, .. } = &report.status else {
        panic!("{report:?}")
    };
    assert_eq!(*code, ErrorCode::ActionTimeout);
    assert_eq!(
        report.attempts, 3,
        "a timeout is transient, so every attempt is used"
    );
    assert_eq!(receiver.requests_to("/delay/3000").len(), 3);
    assert_eq!(dead_letters.count().await.unwrap(), 1);
}

#[tokio::test]
async fn unreachable_targets_fail_as_connection_errors() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (executor, _) = executor_from_yaml(
        &observer_yaml(&format!("http://127.0.0.1:{port}/x"), ""),
        &[],
    );

    let report = &executor.execute_event(&order_update()).await.actions[0];

    let ActionStatus::Failed { code, .. } = &report.status else {
        panic!("{report:?}")
    };
    assert_eq!(*code, ErrorCode::ConnectionFailed);
    assert!(code.is_transient());
    assert_eq!(report.attempts, 3);
}

#[tokio::test]
async fn body_templates_insert_values_as_json_so_hostile_strings_stay_inside_their_field() {
    let receiver = Receiver::start().await;
    let template = r#"        body_template: '{"order": {{ entity_id }}, "note": {{ data.note }}, "total": {{ data.total }}}'"#;
    let (executor, _) =
        executor_from_yaml(&observer_yaml(&receiver.url("/templated"), template), &[]);
    let hostile = r#"x", "refund": true, "y": ""#;
    let event = EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-9",
        json!({"note": hostile, "total": 12.5}),
        Some(json!({"note": "", "total": 12.5})),
    );

    let report = &executor.execute_event(&event).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    let body = receiver.requests_to("/templated")[0].json();
    assert_eq!(
        body,
        json!({"order": "ord-9", "note": hostile, "total": 12.5})
    );
}

#[tokio::test]
async fn a_template_referring_to_a_missing_field_fails_permanently_without_calling_the_target() {
    let receiver = Receiver::start().await;
    let template = r#"        body_template: '{"x": {{ data.not_there }}}'"#;
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(&receiver.url("/never"), template), &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("{report:?}")
    };
    assert_eq!(*code, ErrorCode::TemplateFailed);
    assert!(message.contains("undefined"), "{message}");
    assert_eq!(report.attempts, 1);
    assert!(receiver.requests_to("/never").is_empty());
    assert_eq!(dead_letters.count().await.unwrap(), 1);
}

#[tokio::test]
async fn a_secret_missing_at_load_fails_permanently_when_used() {
    let receiver = Receiver::start().await;
    let yaml = observer_yaml(
        &receiver.url("/signed"),
        "        signing_secret_env: NOT_SET_ANYWHERE",
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("{report:?}")
    };
    assert_eq!(*code, ErrorCode::SecretMissing);
    assert!(message.contains("NOT_SET_ANYWHERE"), "{message}");
    assert!(
        receiver.requests_to("/signed").is_empty(),
        "nothing is sent unsigned"
    );
}

/// A port nothing listens on (a listener bound, then dropped).
fn refused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The parts of target URLs and credentials that must never be shown.
const SECRETS: [&str; 8] = [
    "T000/B000/XXXXSECRET",
    "hook-path-secret",
    "query-secret",
    "dollar-secret",
    "ACSECRETSID0123",
    "sms-token-secret",
    "search-pw-secret",
    "search-path-secret",
];

fn assert_no_secret(place: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{secret:?} shown in {place}:\n{text}"
        );
    }
}

/// An observer per kind of secret target, all on refused `port`, each with its action twice:
/// inline (a failure is logged where it is dead-lettered) and through the job queue (a failure is
/// kept in the job's error history too).
fn secret_targets_yaml(port: u16) -> String {
    use std::fmt::Write;

    let targets = [
        (
            "to-slack",
            "type: slack, webhook_url_env: SLACK_WEBHOOK_URL, text: hi".to_owned(),
        ),
        ("to-hook-env", "type: webhook, url_env: HOOK_URL".to_owned()),
        (
            "to-hook-var",
            format!("type: webhook, url: 'http://127.0.0.1:{port}/in/${{HOOK_TOKEN}}'"),
        ),
        (
            "to-sms",
            format!(
                "type: sms, base_url: 'http://127.0.0.1:{port}', account_sid_env: TWILIO_ACCOUNT_SID, \
                 auth_token_env: TWILIO_AUTH_TOKEN, to: '+15550001111', from: '+15559998888', body: hi"
            ),
        ),
        (
            "to-search",
            "type: search, url_env: SEARCH_URL, index: orders".to_owned(),
        ),
    ];
    let mut yaml = String::from("observers:\n");
    for (name, action) in &targets {
        writeln!(
            yaml,
            "  - name: {name}\n    entity: Order\n    events: [insert]\n    \
             actions: [{{mode: inline, {action}}}, {{mode: async, {action}}}]\n    \
             retry: {{max_attempts: 2, initial_delay: 10ms, max_delay: 20ms}}"
        )
        .unwrap();
    }
    yaml
}

/// The real binary running `config` against `database_url`, its secrets in the environment, and
/// a thread collecting its log (stderr) until it exits.
fn start_node_with_secrets(
    config: &std::path::Path,
    database_url: &str,
    port: u16,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::Read;

    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--poll-interval", "100ms"])
        // Every target is on one refused endpoint; its circuit must not postpone the jobs.
        .args(["--breaker-minimum-calls", "1000"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info,sqlx=warn")
        .env(
            "SLACK_WEBHOOK_URL",
            format!("http://127.0.0.1:{port}/services/T000/B000/XXXXSECRET"),
        )
        .env(
            "HOOK_URL",
            format!("http://127.0.0.1:{port}/hooks/hook-path-secret?token=query-secret"),
        )
        .env("HOOK_TOKEN", "dollar-secret")
        .env("TWILIO_ACCOUNT_SID", "ACSECRETSID0123")
        .env("TWILIO_AUTH_TOKEN", "sms-token-secret")
        .env(
            "SEARCH_URL",
            format!("http://elastic:search-pw-secret@127.0.0.1:{port}/search-path-secret"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut stderr = node.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    (node, logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_targets_never_show_their_secret_urls_in_dead_letters_job_errors_or_logs() {
    let database = common::postgres::TestDatabase::migrated().await;
    common::nodes::prepare_orders(&database.pool).await;
    let port = refused_port();
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(&config, secret_targets_yaml(port)).unwrap();
    sqlx::query("INSERT INTO orders VALUES (1, 1)")
        .execute(&database.pool)
        .await
        .unwrap();

    let (mut node, logs) = start_node_with_secrets(&config, &database.url, port);
    common::nodes::eventually("every action dead-lettered", || async {
        let letters: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
                .fetch_one(&database.pool)
                .await
                .unwrap();
        letters == 10
    })
    .await;
    let messages: Vec<(String, String)> = sqlx::query_as(
        "SELECT observer, error_message FROM fraiseql_observers.dead_letters ORDER BY observer",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    let job_errors: Vec<(String, String)> = sqlx::query_as(
        "SELECT observer, errors::text FROM fraiseql_observers.jobs ORDER BY observer",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["dlq", "list", "--json"])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    // The log line follows the dead letter's commit; give the last one time to be written.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    node.kill().unwrap();
    node.wait().unwrap();
    let logs = logs.join().unwrap();

    assert_eq!(messages.len(), 10, "{messages:?}");
    let parked: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("parked in the dead-letter queue"))
        .collect();
    assert_eq!(parked.len(), 10, "every dead letter is logged:\n{logs}");
    assert!(
        parked.iter().all(|line| line.contains("WARN")),
        "{parked:#?}"
    );
    assert_eq!(
        parked.iter().filter(|line| line.contains(" job=")).count(),
        5,
        "the job worker's dead letters are logged too: {parked:#?}"
    );
    for (observer, message) in &messages {
        assert!(
            message.contains("Connection refused"),
            "{observer}: the cause is kept: {message}"
        );
        assert_no_secret(&format!("the dead letter of {observer}"), message);
    }
    assert_eq!(
        job_errors.len(),
        5,
        "every async action has a job: {job_errors:?}"
    );
    for (observer, errors) in &job_errors {
        assert!(
            errors.contains("Connection refused"),
            "{observer}: {errors}"
        );
        assert_no_secret(&format!("the job errors of {observer}"), errors);
    }
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains("Connection refused"), "{listed}");
    assert_no_secret("dlq list", &listed);
    assert!(
        logs.contains("parked in the dead-letter queue") && logs.contains("Connection refused"),
        "failures are logged with their cause:\n{logs}"
    );
    assert_no_secret("the node's log", &logs);
}

#[tokio::test]
async fn a_redirect_is_a_permanent_failure_naming_its_location() {
    let receiver = Receiver::start().await;
    receiver.script(
        "/moved",
        [Reply::status(302).header("location", "https://elsewhere.example/new\tpath")],
    );
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(&receiver.url("/moved"), ""), &[]);

    let report = &executor.execute_event(&order_update()).await.actions[0];

    assert_eq!(report.attempts, 1, "a redirect is not retried: {report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("a redirect is not a delivery: {report:?}")
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        r#"HTTP 302: redirected to "https://elsewhere.example/new\tpath"; redirects are not followed"#
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.error_message, *message);
    assert_eq!(receiver.request_count(), 1, "the redirect was not followed");
}
