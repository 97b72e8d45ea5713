//! The `slack` action against a real HTTP server standing in for Slack's incoming webhooks: the
//! payload (text, Block Kit blocks, channel), 429 with `Retry-After`, 5xx retried, 4xx
//! dead-lettered with Slack's answer, templates checked at load.

mod common;

use std::time::Duration;

use common::{Receiver, Reply, config_errors_from_yaml, executor_from_yaml};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use serde_json::json;

const HOOK_PATH: &str = "/services/T000/B000/secret-token";

fn order_paid() -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({"id": "ord-7", "total": 250, "customer": "Ann \"the\" <Admin>"}),
        None,
    )
}

fn observer_yaml(action: &str, max_delay: &str) -> String {
    format!(
        "
observers:
  - name: order-paid
    entity: Order
    events: [update]
    actions:
      - type: slack
        webhook_url_env: SLACK_WEBHOOK_URL
{action}
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: {max_delay}}}
"
    )
}

const TEXT_ONLY: &str = "        text: 'Order {{ entity_id }} paid: {{ data.total }}'";

#[tokio::test]
async fn posts_text_blocks_and_channel_as_json() {
    let receiver = Receiver::start().await;
    let action = r##"        text: "Order {{ entity_id }} paid by {{ data.customer }}"
        channel: "#billing"
        blocks: |
          [{"type": "section",
            "text": {"type": "mrkdwn", "text": {{ "*Order* " ~ entity_id ~ " by " ~ data.customer }}}}]"##;
    let url = receiver.url(HOOK_PATH);
    let (executor, dead_letters) = executor_from_yaml(
        &observer_yaml(action, "50ms"),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert_eq!(report.action_type, "slack");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "Slack HTTP 200".into()
        }
    );
    let requests = receiver.requests_to(HOOK_PATH);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].header("content-type"), Some("application/json"));
    assert_eq!(
        requests[0].json(),
        json!({
            "text": "Order ord-7 paid by Ann \"the\" <Admin>",
            "channel": "#billing",
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*Order* ord-7 by Ann \"the\" <Admin>"}}],
        })
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn rate_limited_messages_wait_for_retry_after() {
    let receiver = Receiver::start().await;
    receiver.script(
        HOOK_PATH,
        [Reply::with_body(429, "rate_limited").header("retry-after", "1")],
    );
    let url = receiver.url(HOOK_PATH);
    let (executor, _) = executor_from_yaml(
        &observer_yaml(TEXT_ONLY, "5s"),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 2);
    let requests = receiver.requests_to(HOOK_PATH);
    assert_eq!(requests.len(), 2);
    let waited = requests[1].arrived - requests[0].arrived;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?} despite Retry-After: 1"
    );
    assert_eq!(requests[1].json(), json!({"text": "Order ord-7 paid: 250"}));
}

#[tokio::test]
async fn a_rate_limited_message_handed_to_the_job_queue_is_due_after_retry_after() {
    let receiver = Receiver::start().await;
    receiver.script(
        HOOK_PATH,
        std::iter::repeat_n(
            Reply::with_body(429, "rate_limited").header("retry-after", "30"),
            3,
        ),
    );
    let url = receiver.url(HOOK_PATH);
    let yaml = observer_yaml(TEXT_ONLY, "1m").replace("max_attempts: 3", "max_attempts: 5");
    let (executor, _) = executor_from_yaml(&yaml, &[("SLACK_WEBHOOK_URL", &url)]);
    let executor = executor.with_job_routing();

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(
        matches!(report.status, ActionStatus::Enqueued { .. }),
        "{report:?}"
    );
    assert_eq!(
        receiver.requests_to(HOOK_PATH).len(),
        1,
        "the endpoint is held for its Retry-After: no inline attempt calls it again"
    );
    let job = report.job.as_ref().expect("handed over as a job");
    let due_in = job.run_at.expect("due after Retry-After") - chrono::Utc::now();
    assert!(
        due_in > chrono::Duration::seconds(25) && due_in <= chrono::Duration::seconds(30),
        "due in {due_in}"
    );
    assert_eq!(
        job.max_attempts, 4,
        "the attempts the policy has left: the call refused during the hold spent none"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_slack_accepts() {
    let receiver = Receiver::start().await;
    receiver.script(HOOK_PATH, [Reply::status(503), Reply::status(500)]);
    let url = receiver.url(HOOK_PATH);
    let (executor, dead_letters) = executor_from_yaml(
        &observer_yaml(TEXT_ONLY, "50ms"),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 3);
    assert_eq!(receiver.requests_to(HOOK_PATH).len(), 3);
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_rejected_payload_is_permanent_with_slacks_answer() {
    let receiver = Receiver::start().await;
    receiver.script(HOOK_PATH, [Reply::with_body(404, "channel_not_found")]);
    let url = receiver.url(HOOK_PATH);
    let (executor, dead_letters) = executor_from_yaml(
        &observer_yaml(TEXT_ONLY, "50ms"),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(message, "Slack HTTP 404: channel_not_found");
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "slack");
    assert_eq!(letters[0].letter.error_message, *message);
}

#[tokio::test]
async fn blocks_that_are_not_an_array_fail_without_calling_slack() {
    let receiver = Receiver::start().await;
    let url = receiver.url(HOOK_PATH);
    let (executor, _) = executor_from_yaml(
        &observer_yaml(
            "        text: hi\n        blocks: '{\"type\": \"divider\"}'",
            "50ms",
        ),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::TemplateFailed);
    assert!(
        message.contains("JSON array of Block Kit blocks"),
        "{message}"
    );
    assert_eq!(receiver.request_count(), 0);
}

#[test]
fn template_errors_and_a_missing_text_are_refused_at_load() {
    let errors = config_errors_from_yaml(
        &observer_yaml(
            "        text: 'Order {{ entity_id }'\n        blocks: '[{% for %}]'",
            "50ms",
        ),
        &[("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/x")],
    );
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with("test.yaml:9:15: observers[0].actions[0].text: invalid template"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].starts_with("test.yaml:10:17: observers[0].actions[0].blocks: invalid template"),
        "{}",
        errors[1]
    );

    let errors = config_errors_from_yaml(&observer_yaml("        channel: '#ops'", "50ms"), &[]);
    assert_eq!(
        errors,
        [
            "test.yaml:7:9: observers[0].actions[0]: missing required key 'text' (the message text template)",
            "test.yaml:8:26: observers[0].actions[0].webhook_url_env: environment variable SLACK_WEBHOOK_URL is not set (or is empty)",
        ]
    );
}

#[tokio::test]
async fn a_redirect_is_permanent_and_names_its_location() {
    let receiver = Receiver::start().await;
    receiver.script(
        HOOK_PATH,
        [Reply::status(301).header("location", "https://hooks.example.net/moved")],
    );
    let url = receiver.url(HOOK_PATH);
    let (executor, dead_letters) = executor_from_yaml(
        &observer_yaml(TEXT_ONLY, "50ms"),
        &[("SLACK_WEBHOOK_URL", &url)],
    );

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("a redirect is not a delivery: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "Slack HTTP 301: redirected to \"https://hooks.example.net/moved\"; redirects are not followed"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 1);
    assert_eq!(receiver.request_count(), 1);
}
