//! The `email` action against a real SMTP server (aiosmtpd, `tests/peers/smtp_server.py`,
//! started per test): headers, bodies, envelope and AUTH as the server received them; a templated
//! recipient held to one address unless `to_list`; a 5xx reply dead-lettered, a 4xx retried;
//! templates and addresses checked at load.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};

use common::{config_errors_from_yaml, config_from_yaml, executor_from_yaml};
use fraiseql_observers::config::DeliveryMode;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use serde_json::{Value, json};

/// The SMTP server, writing what it accepts to a directory; stopped on drop.
struct SmtpPeer {
    port: u16,
    received: tempfile::TempDir,
    process: Child,
}

impl SmtpPeer {
    fn start() -> SmtpPeer {
        let received = tempfile::tempdir().unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/smtp_server.py");
        let mut process: Child = common::tools::py_tools()
            .python()
            .arg(script)
            .arg(received.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the SMTP server");
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("the SMTP server did not start ({error}): {line:?}"));
        SmtpPeer {
            port: u16::try_from(ready["port"].as_u64().unwrap()).unwrap(),
            received,
            process,
        }
    }

    /// Every message accepted, in order.
    fn messages(&self) -> Vec<Value> {
        let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(self.received.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "json")
            })
            .map(|path| {
                let number = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                (number, path)
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn order_paid() -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({"id": "ord-7", "total": 250, "email": "bob@example.com", "note": "<script>alert(1)</script>"}),
        None,
    )
}

fn observer_yaml(port: u16, recipients: &str, extra: &str) -> String {
    format!(
        "
observers:
  - name: order-paid
    entity: Order
    events: [update]
    actions:
      - type: email
        host: 127.0.0.1
        port: {port}
        security: plain
        username_env: SMTP_USER
        password_env: SMTP_PASSWORD
        from: 'Orders <orders@example.com>'
{recipients}
        subject: 'Order {{{{ entity_id }}}} paid'
        text: 'Order {{{{ entity_id }}}}: {{{{ data.total }}}} EUR'
{extra}
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
"
    )
}

const ENV: [(&str, &str); 2] = [("SMTP_USER", "mailer"), ("SMTP_PASSWORD", "hunter2")];

/// The header block of a raw message, unfolded, one `Name: value` per line.
fn headers(raw: &str) -> Vec<String> {
    let block = raw.split("\r\n\r\n").next().unwrap();
    let mut lines: Vec<String> = Vec::new();
    for line in block.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            lines.last_mut().unwrap().push_str(line.trim_start());
        } else {
            lines.push(line.to_owned());
        }
    }
    lines
}

fn header<'lines>(lines: &'lines [String], name: &str) -> Option<&'lines str> {
    lines.iter().find_map(|line| {
        let (key, value) = line.split_once(": ")?;
        key.eq_ignore_ascii_case(name).then_some(value)
    })
}

#[tokio::test]
async fn sends_headers_bodies_and_envelope_with_auth() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(
        smtp.port,
        "        to: [ann@example.com]\n        cc: 'Audit <audit@example.com>'\n        reply_to: support@example.com",
        "        html: '<p>Order <b>{{ entity_id }}</b>: {{ data.note }}</p>'",
    );
    let (executor, dead_letters) = executor_from_yaml(&yaml, &ENV);
    let event = order_paid();

    let report = &executor.execute_event(&event).await.actions[0];

    assert_eq!(report.action_type, "email");
    let ActionStatus::Succeeded { detail } = &report.status else {
        panic!("expected success: {report:?}");
    };
    assert_eq!(
        detail,
        "SMTP 250 to 2 recipients: 2.0.0 queued as message-1"
    );
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message["mail_from"], "orders@example.com");
    assert_eq!(
        message["rcpt_tos"],
        json!(["ann@example.com", "audit@example.com"])
    );
    assert_eq!(message["login"], "mailer");
    assert_eq!(message["password"], "hunter2");
    let raw = message["message"].as_str().unwrap();
    let lines = headers(raw);
    assert_eq!(header(&lines, "From"), Some("Orders <orders@example.com>"));
    assert_eq!(header(&lines, "To"), Some("ann@example.com"));
    assert_eq!(header(&lines, "Cc"), Some("Audit <audit@example.com>"));
    assert_eq!(header(&lines, "Reply-To"), Some("support@example.com"));
    assert_eq!(header(&lines, "Subject"), Some("Order ord-7 paid"));
    assert_eq!(
        header(&lines, "Message-ID"),
        Some(format!("<{}.order-paid.0@fraiseql-observers>", event.id).as_str())
    );
    assert_eq!(
        header(&lines, "X-FraiseQL-Idempotency-Key"),
        Some(format!("{}:order-paid:0", event.id).as_str())
    );
    assert!(
        header(&lines, "Content-Type")
            .unwrap()
            .starts_with("multipart/alternative"),
        "{raw}"
    );
    assert!(raw.contains("Order ord-7: 250 EUR"), "{raw}");
    assert!(
        raw.contains("<p>Order <b>ord-7</b>: &lt;script&gt;alert(1)&lt;&#x2f;script&gt;</p>"),
        "values in the HTML body are escaped: {raw}"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_templated_recipient_comes_from_the_event() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(
        smtp.port,
        "        to_template: 'Bob <{{ data.email }}>'",
        "",
    );
    let (executor, _) = executor_from_yaml(&yaml, &ENV);

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    let messages = smtp.messages();
    assert_eq!(messages[0]["rcpt_tos"], json!(["bob@example.com"]));
    let lines = headers(messages[0]["message"].as_str().unwrap());
    assert_eq!(header(&lines, "To"), Some("Bob <bob@example.com>"));
}

/// An order whose `email` value names two addresses.
fn order_with_two_addresses() -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-8",
        json!({"id": "ord-8", "total": 9, "email": "bob@example.com, eve@example.net"}),
        None,
    )
}

#[tokio::test]
async fn a_value_naming_several_addresses_is_refused_without_to_list() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(smtp.port, "        to_template: '{{ data.email }}'", "");
    let (executor, dead_letters) = executor_from_yaml(&yaml, &ENV);

    let report = &executor
        .execute_event(&order_with_two_addresses())
        .await
        .actions[0];

    assert_eq!(report.attempts, 1, "permanent: {report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::TemplateFailed);
    assert_eq!(
        message,
        "template observers[0].actions[0].to_template.txt rendered 2 addresses \
         (\"bob@example.com, eve@example.net\") where one is expected; set to_list: true if its \
         values may name several recipients"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.error_message, *message);
    assert!(smtp.messages().is_empty(), "nothing sent to either address");
}

#[tokio::test]
async fn with_to_list_a_template_may_name_several_recipients() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(
        smtp.port,
        "        to_template: '{{ data.email }}, Ops <ops@example.com>'\n        to_list: true",
        "",
    );
    let (executor, _) = executor_from_yaml(&yaml, &ENV);

    let report = &executor
        .execute_event(&order_with_two_addresses())
        .await
        .actions[0];

    assert!(report.succeeded(), "{report:?}");
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0]["rcpt_tos"],
        json!(["bob@example.com", "eve@example.net", "ops@example.com"])
    );
    let lines = headers(messages[0]["message"].as_str().unwrap());
    assert_eq!(
        header(&lines, "To"),
        Some("bob@example.com, eve@example.net, Ops <ops@example.com>")
    );
}

#[tokio::test]
async fn a_literal_list_of_recipients_needs_no_to_list() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(
        smtp.port,
        "        to: [ann@example.com, 'Ops <ops@example.com>']",
        "",
    );
    let (executor, _) = executor_from_yaml(&yaml, &ENV);

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(
        smtp.messages()[0]["rcpt_tos"],
        json!(["ann@example.com", "ops@example.com"])
    );
}

#[test]
fn to_list_is_a_boolean_for_to_template_only() {
    let errors = config_errors_from_yaml(
        &observer_yaml(25, "        to: ann@example.com\n        to_list: true", ""),
        &ENV,
    );
    assert_eq!(
        errors,
        [
            "test.yaml:15:18: observers[0].actions[0].to_list: 'to_list' applies to 'to_template'; a literal 'to' lists its addresses itself"
        ]
    );
    let errors = config_errors_from_yaml(
        &observer_yaml(
            25,
            "        to_template: '{{ data.email }}'\n        to_list: several",
            "",
        ),
        &ENV,
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "test.yaml:15:18: observers[0].actions[0].to_list: expected true or false"
        ),
        "{}",
        errors[0]
    );
}

#[tokio::test]
async fn a_5xx_reply_is_permanent_and_dead_lettered_with_the_servers_reason() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(smtp.port, "        to: reject-ann@example.com", "");
    let (executor, dead_letters) = executor_from_yaml(&yaml, &ENV);

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert!(
        message.contains("<reject-ann@example.com>: mailbox unavailable"),
        "{message}"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "email");
    assert_eq!(letters[0].letter.error_message, *message);
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn a_4xx_reply_is_retried_and_the_next_attempt_is_delivered() {
    let smtp = SmtpPeer::start();
    let yaml = observer_yaml(smtp.port, "        to: defer-once-ann@example.com", "");
    let (executor, dead_letters) = executor_from_yaml(&yaml, &ENV);

    let report = &executor.execute_event(&order_paid()).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.attempts, 2);
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0]["rcpt_tos"],
        json!(["defer-once-ann@example.com"])
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[test]
fn email_is_delivered_through_the_job_queue_by_default() {
    let config = config_from_yaml(
        &observer_yaml(25, "        to: ann@example.com", "").replace(
            "        username_env: SMTP_USER\n        password_env: SMTP_PASSWORD\n",
            "",
        ),
    );
    assert_eq!(
        config.observers[0].actions[0].delivery.mode,
        DeliveryMode::Async
    );
}

#[test]
fn template_errors_and_bad_addresses_are_refused_at_load() {
    let yaml = observer_yaml(
        25,
        "        to: [ann@example.com, 'not an address']\n        reply_to: '@example.com'",
        "",
    )
    .replace(
        "subject: 'Order {{ entity_id }} paid'",
        "subject: 'Order {{ entity_id paid'",
    )
    .replace("        password_env: SMTP_PASSWORD\n", "");
    let errors = config_errors_from_yaml(&yaml, &ENV);
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert_eq!(
        errors[0],
        "test.yaml:7:9: observers[0].actions[0]: set both 'username_env' and 'password_env' (or neither, for a server without authentication)"
    );
    assert!(
        errors[1].starts_with("test.yaml:13:31: observers[0].actions[0].to[1]: expected an email address such as \"Orders <orders@example.com>\", found \"not an address\""),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].starts_with(
            "test.yaml:14:19: observers[0].actions[0].reply_to: expected an email address"
        ),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].starts_with("test.yaml:15:18: observers[0].actions[0].subject: invalid template (line 1 of the template): syntax error"),
        "{}",
        errors[3]
    );
}
