//! The webhook action against a real HTTP server: envelope, headers, signature, status
//! classification, retries, `Retry-After`, timeouts and unreachable targets.

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
