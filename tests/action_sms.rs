//! The `sms` action against a real HTTP server standing in for Twilio's Messages API: the
//! request (method, path, basic auth, idempotency header, form fields), Twilio's JSON errors
//! (permanent), 429/5xx (retried), templates checked at load, async delivery by default.

mod common;

use common::{Receiver, Reply, config_errors_from_yaml, config_from_yaml, executor_from_yaml};
use fraiseql_observers::config::DeliveryMode;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use serde_json::json;

const ACCOUNT: &str = "AC0123456789abcdef";
const TOKEN: &str = "twilio-auth-token";
const MESSAGES_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json";
const CREATED: &str = r#"{"sid": "SM42", "status": "queued", "to": "+15550001111"}"#;

fn order_shipped() -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({"id": "ord-7", "phone": "+15550001111", "carrier": "Post & Co"}),
        None,
    )
}

fn observer_yaml(base_url: &str) -> String {
    format!(
        "
observers:
  - name: order-shipped
    entity: Order
    events: [update]
    actions:
      - type: sms
        base_url: {base_url}
        account_sid_env: TWILIO_ACCOUNT_SID
        auth_token_env: TWILIO_AUTH_TOKEN
        to: '{{{{ data.phone }}}}'
        from: '+15559998888'
        body: 'Order {{{{ entity_id }}}} shipped with {{{{ data.carrier }}}} = 100%'
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
"
    )
}

const ENV: [(&str, &str); 2] = [
    ("TWILIO_ACCOUNT_SID", ACCOUNT),
    ("TWILIO_AUTH_TOKEN", TOKEN),
];

#[tokio::test]
async fn posts_the_form_with_basic_auth_and_the_idempotency_token() {
    let receiver = Receiver::start().await;
    receiver.script(MESSAGES_PATH, [Reply::with_body(201, CREATED)]);
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(&receiver.base_url), &ENV);
    let event = order_shipped();

    let report = &executor.execute_event(&event).await.actions[0];

    assert_eq!(report.action_type, "sms");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "SMS HTTP 201: SM42 queued".into()
        }
    );
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, MESSAGES_PATH);
    assert_eq!(
        request.header("authorization").unwrap(),
        common::basic_auth(ACCOUNT, TOKEN)
    );
    assert_eq!(
        request.header("i-twilio-idempotency-token").unwrap(),
        format!("{}:order-shipped:0", event.id)
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect();
    assert_eq!(
        form,
        [
            ("To".to_owned(), "+15550001111".to_owned()),
            ("From".to_owned(), "+15559998888".to_owned()),
            (
                "Body".to_owned(),
                "Order ord-7 shipped with Post & Co = 100%".to_owned()
            ),
        ]
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_twilio_error_is_permanent_with_its_message() {
    let receiver = Receiver::start().await;
    receiver.script(
        MESSAGES_PATH,
        [Reply::with_body(
            400,
            r#"{"code": 21211, "message": "The 'To' number +15550001111 is not a valid phone number.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#,
        )],
    );
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(&receiver.base_url), &ENV);

    let report = &executor.execute_event(&order_shipped()).await.actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "SMS HTTP 400: The 'To' number +15550001111 is not a valid phone number. (Twilio error 21211)"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "sms");
    assert_eq!(letters[0].letter.error_message, *message);
}

#[tokio::test]
async fn too_many_requests_and_server_errors_are_retried_with_the_same_token() {
    let receiver = Receiver::start().await;
    receiver.script(
        MESSAGES_PATH,
        [
            Reply::with_body(429, r#"{"code": 20429, "message": "Too Many Requests"}"#),
            Reply::status(503),
            Reply::with_body(201, CREATED),
        ],
    );
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(&receiver.base_url), &ENV);

    let report = &executor.execute_event(&order_shipped()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 3);
    let tokens: Vec<String> = receiver
        .requests()
        .iter()
        .map(|request| {
            request
                .header("i-twilio-idempotency-token")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|token| *token == tokens[0]), "{tokens:?}");
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[test]
fn sms_is_delivered_through_the_job_queue_unless_told_otherwise() {
    let config = config_from_yaml(&observer_yaml("https://api.twilio.com").replace(
        "account_sid_env: TWILIO_ACCOUNT_SID\n        auth_token_env: TWILIO_AUTH_TOKEN",
        "account_sid: ACliteral\n        auth_token: literal",
    ));
    assert_eq!(
        config.observers[0].actions[0].delivery.mode,
        DeliveryMode::Async
    );
    let inline = config_from_yaml(
        &observer_yaml("https://api.twilio.com")
            .replace(
                "account_sid_env: TWILIO_ACCOUNT_SID\n        auth_token_env: TWILIO_AUTH_TOKEN",
                "account_sid: ACliteral\n        auth_token: literal",
            )
            .replace("        to:", "        mode: inline\n        to:"),
    );
    assert_eq!(
        inline.observers[0].actions[0].delivery.mode,
        DeliveryMode::Inline
    );
}

#[test]
fn template_errors_and_missing_settings_are_refused_at_load() {
    let yaml = observer_yaml("ftp://example.com").replace(
        "body: 'Order {{ entity_id }}",
        "body: 'Order {{ entity_id }",
    );
    let errors = config_errors_from_yaml(&yaml, &[("TWILIO_ACCOUNT_SID", ACCOUNT)]);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "test.yaml:8:19: observers[0].actions[0].base_url: expected an http:// or https:// URL"
        ),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1],
        "test.yaml:10:25: observers[0].actions[0].auth_token_env: environment variable TWILIO_AUTH_TOKEN is not set (or is empty)"
    );
    assert!(
        errors[2].starts_with("test.yaml:13:15: observers[0].actions[0].body: invalid template (line 1 of the template): syntax error"),
        "{}",
        errors[2]
    );

    let yaml = observer_yaml("https://api.twilio.com")
        .replace("        auth_token_env: TWILIO_AUTH_TOKEN\n", "");
    assert_eq!(
        config_errors_from_yaml(&yaml, &ENV),
        [
            "test.yaml:7:9: observers[0].actions[0]: missing required key 'auth_token_env' (the auth token, from the environment)"
        ]
    );
}

#[tokio::test]
async fn a_redirect_is_permanent_and_names_its_location() {
    let receiver = Receiver::start().await;
    receiver.script(
        MESSAGES_PATH,
        [Reply::with_body(307, CREATED).header("location", "/elsewhere/Messages.json")],
    );
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(&receiver.base_url), &ENV);

    let report = &executor.execute_event(&order_shipped()).await.actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("a redirect is not a sent message: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "SMS HTTP 307: redirected to \"/elsewhere/Messages.json\"; redirects are not followed"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 1);
    assert_eq!(receiver.request_count(), 1);
}

#[tokio::test]
async fn twilios_answer_naming_the_account_keeps_the_sid_out_of_the_error() {
    let receiver = Receiver::start().await;
    receiver.script(
        MESSAGES_PATH,
        [Reply::with_body(
            404,
            r#"{"code": 20404, "message": "The requested resource /2010-04-01/Accounts/AC0123456789abcdef/Messages.json was not found", "status": 404}"#,
        )],
    );
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(&receiver.base_url), &ENV);

    let report = &executor.execute_event(&order_shipped()).await.actions[0];

    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "SMS HTTP 404: The requested resource <redacted> was not found (Twilio error 20404)"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert!(!letters[0].letter.error_message.contains(ACCOUNT));
}
