//! The SSRF guard against real HTTP servers on loopback: a webhook URL whose host comes from
//! event data is refused (OB017, dead-lettered, nothing sent) when it reaches a loopback,
//! private, link-local or unspecified address, whether written as an address or as a host name
//! that resolves to one; it is delivered with `allow_private_targets: true` or a node-wide
//! allow-list; literal URLs and templates whose host is written in the file are never checked;
//! `validate-config` names the actions whose URLs come from event data.

mod common;

use std::process::Command;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::{Receiver, executor_from_yaml, executor_with_runner};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::config::Network;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use serde_json::json;

/// An INSERT of an order whose `host` field says where its webhook goes.
fn order_for(host: &str, entity: usize) -> EntityEvent {
    EntityEvent::new(
        EventKind::Insert,
        "Order",
        format!("ord-{entity}"),
        json!({"id": entity, "host": host}),
        None,
    )
}

fn observer_yaml(url: &str, extra: &str) -> String {
    format!(
        r"
observers:
  - name: routed
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: '{url}'
        timeout: 2s
{extra}
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
"
    )
}

/// The template whose host (and port) come from the event.
const HOST_FROM_DATA: &str = "http://{{ data.host }}/hook?token=query-secret";

/// Loopback receivers on IPv4 and IPv6; a refused URL must reach neither.
struct Loopback {
    v4: Receiver,
    v6: Receiver,
}

impl Loopback {
    async fn start() -> Loopback {
        Loopback {
            v4: Receiver::start().await,
            v6: Receiver::start_on("[::1]:0").await,
        }
    }

    fn port_v4(&self) -> String {
        self.v4.url("").rsplit(':').next().unwrap().to_owned()
    }

    fn port_v6(&self) -> String {
        self.v6.url("").rsplit(':').next().unwrap().to_owned()
    }

    fn requests(&self) -> usize {
        self.v4.request_count() + self.v6.request_count()
    }
}

/// Runs one event through `executor` and returns the failure's code and message.
async fn failure_of(executor: &Executor, event: &EntityEvent) -> (ErrorCode, String, u32) {
    let summary = executor.execute_event(event).await;
    let report = &summary.actions[0];
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}")
    };
    (*code, message.clone(), report.attempts)
}

#[tokio::test]
async fn non_public_targets_from_event_data_are_refused_dead_lettered_and_never_called() {
    let loopback = Loopback::start().await;
    let (port4, port6) = (loopback.port_v4(), loopback.port_v6());
    let (executor, dead_letters) = executor_from_yaml(&observer_yaml(HOST_FROM_DATA, ""), &[]);
    let cases = [
        (
            "169.254.169.254".to_owned(),
            "169.254.169.254",
            "link-local",
        ),
        ("10.0.0.1".to_owned(), "10.0.0.1", "private (RFC 1918)"),
        (format!("[::1]:{port6}"), "::1", "loopback"),
        (format!("localhost:{port4}"), "127.0.0.1", "loopback"),
        (
            format!("[::ffff:127.0.0.1]:{port4}"),
            "::ffff:127.0.0.1",
            "loopback",
        ),
        (format!("0.0.0.0:{port4}"), "0.0.0.0", "unspecified"),
        (format!("127.1:{port4}"), "127.0.0.1", "loopback"),
    ];
    for (index, (host, address, range)) in cases.iter().enumerate() {
        let (code, message, attempts) = failure_of(&executor, &order_for(host, index)).await;
        assert_eq!(code, ErrorCode::TargetRefused, "{host}: {message}");
        assert_eq!(attempts, 1, "{host}: a refusal is permanent");
        assert!(
            message.starts_with(&format!("{address} ({range}")),
            "{host}: {message}"
        );
        assert!(
            message.contains("allow_private_targets"),
            "{host}: {message}"
        );
        assert!(
            !message.contains("query-secret") && !message.contains("/hook"),
            "{host}: the URL stays out of the message: {message}"
        );
    }
    assert_eq!(loopback.requests(), 0, "nothing was sent");
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), cases.len());
    for letter in &letters {
        assert_eq!(letter.letter.error_code, ErrorCode::TargetRefused);
        assert_eq!(letter.letter.error_code.as_str(), "OB017");
        assert!(!letter.letter.error_code.is_transient());
    }
}

#[tokio::test]
async fn allow_private_targets_delivers_to_loopback_names_and_addresses() {
    let loopback = Loopback::start().await;
    let (port4, port6) = (loopback.port_v4(), loopback.port_v6());
    let (executor, dead_letters) = executor_from_yaml(
        &observer_yaml(HOST_FROM_DATA, "        allow_private_targets: true"),
        &[],
    );
    for (index, host) in [format!("localhost:{port4}"), format!("[::1]:{port6}")]
        .iter()
        .enumerate()
    {
        let summary = executor.execute_event(&order_for(host, index)).await;
        assert!(summary.actions[0].succeeded(), "{host}: {summary:?}");
    }
    assert_eq!(loopback.v4.requests_to("/hook").len(), 1);
    assert_eq!(loopback.v6.requests_to("/hook").len(), 1);
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn allow_private_targets_lets_unroutable_private_addresses_be_attempted() {
    // Nothing answers at these addresses here: the call is attempted (and times out, fails to
    // connect, or is answered by whatever egress proxy the environment names) instead of being
    // refused before it is made.
    let (executor, _) = executor_from_yaml(
        &observer_yaml(
            HOST_FROM_DATA,
            "        allow_private_targets: true\n        timeout: 300ms",
        )
        .replace("        timeout: 2s\n", "")
        .replace("max_attempts: 3", "max_attempts: 1"),
        &[],
    );
    for (index, host) in ["169.254.169.254:9", "10.0.0.1:9"].iter().enumerate() {
        let (code, message, _) = failure_of(&executor, &order_for(host, index)).await;
        assert_ne!(
            code,
            ErrorCode::TargetRefused,
            "{host}: attempted, not refused: {message}"
        );
    }
}

#[tokio::test]
async fn a_node_wide_allow_list_lets_only_its_networks_through() {
    let loopback = Loopback::start().await;
    let (port4, port6) = (loopback.port_v4(), loopback.port_v6());
    let networks: Vec<Network> = ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|network| network.parse().unwrap())
        .collect();
    let executor = executor_with_runner(&observer_yaml(HOST_FROM_DATA, ""), |runner| {
        runner.with_private_targets_allowed(&networks).unwrap()
    });
    for (index, host) in [format!("localhost:{port4}"), format!("[::1]:{port6}")]
        .iter()
        .enumerate()
    {
        let summary = executor.execute_event(&order_for(host, index)).await;
        assert!(summary.actions[0].succeeded(), "{host}: {summary:?}");
    }
    assert_eq!(loopback.requests(), 2);
    let (code, message, _) = failure_of(&executor, &order_for("10.0.0.1", 9)).await;
    assert_eq!(code, ErrorCode::TargetRefused, "{message}");
}

#[tokio::test]
async fn literal_loopback_urls_and_templates_with_a_written_host_are_not_checked() {
    let loopback = Loopback::start().await;
    let port4 = loopback.port_v4();
    for url in [
        format!("http://127.0.0.1:{port4}/literal"),
        format!("http://localhost:{port4}/literal"),
        format!("http://[::1]:{}/literal", loopback.port_v6()),
        // Event data fills the path only: the host is the operator's.
        format!("http://localhost:{port4}/literal/{{{{ data.id }}}}"),
    ] {
        let (executor, _) = executor_from_yaml(&observer_yaml(&url, ""), &[]);
        let summary = executor.execute_event(&order_for("ignored", 7)).await;
        assert!(summary.actions[0].succeeded(), "{url}: {summary:?}");
    }
    assert_eq!(loopback.v4.requests_to("/literal").len(), 2);
    assert_eq!(loopback.v4.requests_to("/literal/7").len(), 1);
    assert_eq!(loopback.v6.requests_to("/literal").len(), 1);

    // The same written host, but event data follows it before the path starts: data could
    // add `.evil.example`, a port or user info, so the URL is checked.
    let template = "http://127.0.0.1{{ data.host }}/literal";
    let (executor, _) = executor_from_yaml(&observer_yaml(template, ""), &[]);
    let (code, message, _) = failure_of(&executor, &order_for(&format!(":{port4}"), 8)).await;
    assert_eq!(code, ErrorCode::TargetRefused, "{message}");
    // A template is checked whenever its host is not written before the first tag, even if it
    // reads no variable itself (it could read the event through an included template).
    let constant = format!("http://{{{{ \"127.0.0.1\" }}}}:{port4}/literal");
    let (executor, _) = executor_from_yaml(&observer_yaml(&constant, ""), &[]);
    let (code, message, _) = failure_of(&executor, &order_for("ignored", 9)).await;
    assert_eq!(code, ErrorCode::TargetRefused, "{message}");
    assert_eq!(loopback.v4.requests_to("/literal").len(), 2);
}

#[tokio::test]
async fn a_rendering_that_is_not_an_http_url_is_a_template_failure() {
    let (executor, _) = executor_from_yaml(&observer_yaml("{{ data.host }}", ""), &[]);
    let (code, message, attempts) =
        failure_of(&executor, &order_for("file:///etc/passwd", 1)).await;
    assert_eq!(code, ErrorCode::TemplateFailed, "{message}");
    assert_eq!(attempts, 1);
    assert!(
        message.contains("not an http:// or https:// URL"),
        "{message}"
    );
}

#[test]
fn url_templates_are_only_for_webhooks_and_hold_no_secrets() {
    let with_secret = common::config_errors_from_yaml(
        &observer_yaml("https://{{ data.host }}/in?token=${TOKEN}", ""),
        &[("TOKEN", "t")],
    );
    assert!(
        with_secret[0].contains("actions[0].url: a URL template cannot also hold ${VAR}"),
        "{with_secret:?}"
    );
    let slack = common::config_errors_from_yaml(
        "observers:\n  - name: s\n    entity: Order\n    events: [insert]\n    actions:\n      - type: slack\n        webhook_url: 'https://{{ data.host }}/x'\n        text: hi\n",
        &[],
    );
    assert!(
        slack[0].contains("actions[0].webhook_url: expected a URL without template tags"),
        "{slack:?}"
    );
}

#[test]
fn allow_private_targets_on_a_url_not_from_event_data_is_a_warning() {
    let config = common::config_from_yaml(&observer_yaml(
        "http://127.0.0.1/x/{{ data.id }}",
        "        allow_private_targets: true",
    ));
    assert!(
        config.warnings.iter().any(|warning| warning
            .to_string()
            .contains("allow_private_targets: has no effect")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn validate_config_names_the_actions_whose_urls_come_from_event_data() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("observers.yaml");
    std::fs::write(
        &file,
        r"
observers:
  - name: regional
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: 'https://{{ data.region }}.hooks.example.com/orders'
      - type: webhook
        url: 'https://hooks.example.com/orders/{{ entity_id }}'
      - type: webhook
        url: 'http://{{ data.host }}/internal'
        allow_private_targets: true
      - type: webhook
        url: 'https://hooks.example.com/fixed'
",
    )
    .unwrap();
    let run = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"));
        command.arg("validate-config");
        if json {
            command.arg("--json");
        }
        let output = command
            .arg(&file)
            .env_clear()
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let text = run(false);
    for line in [
        "├── URLs rendered from event data: 3",
        "│   ├── regional actions[0] (webhook): reads data.region — host from event data; private, loopback and link-local addresses refused",
        "│   ├── regional actions[1] (webhook): reads entity_id — path from event data; host fixed in the file",
        "│   └── regional actions[2] (webhook): reads data.host — host from event data; allow_private_targets: any address",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    let urls = json["urls_from_event_data"].as_array().unwrap();
    assert_eq!(urls.len(), 3, "{json}");
    assert_eq!(urls[0]["action"], "regional actions[0] (webhook)");
    assert_eq!(urls[0]["reads"], json!(["data.region"]));
    assert_eq!(urls[0]["guarded"], true);
    assert_eq!(urls[1]["host_from_event_data"], false);
    assert_eq!(urls[2]["guarded"], false);
}

#[test]
fn a_malformed_allow_list_entry_is_refused_naming_the_flag_and_the_value() {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "run",
            "--config",
            "examples/observers.yaml",
            "--allow-private-targets-cidr",
            "10.0.0.0/8,10.0.0.1/8",
        ])
        .env_clear()
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--allow-private-targets-cidr")
            && stderr.contains("\"10.0.0.1/8\"")
            && stderr.contains("address bits are set beyond the prefix length"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_delivers_to_its_allowed_networks_and_dead_letters_the_rest() {
    let database = TestDatabase::migrated().await;
    common::nodes::prepare_orders(&database.pool).await;
    let loopback = Loopback::start().await;
    // Orders below 10 go to the IPv4 loopback receiver (allowed by the node), the others to the
    // IPv6 one (not allowed).
    let mut config = common::config_from_yaml(&format!(
        "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
    actions:
      - type: webhook
        url: 'http://{{{{ \"127.0.0.1:{}\" if data.id < 10 else \"[::1]:{}\" }}}}/orders'
",
        loopback.port_v4(),
        loopback.port_v6()
    ));
    config.executor.private_targets_allowed = vec!["127.0.0.0/8".parse().unwrap()];
    let node = Node::build(
        database.pool.clone(),
        config,
        ListenerSettings {
            poll_interval: Duration::from_millis(50),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    common::nodes::write_orders(&database.pool, 0..20, 1).await;

    let pool = database.pool.clone();
    common::nodes::eventually("10 deliveries and 10 dead letters", || {
        let pool = pool.clone();
        let delivered = loopback.v4.requests_to("/orders").len();
        async move {
            let letters: i64 =
                sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            delivered == 10 && letters == 10
        }
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    assert_eq!(loopback.v6.request_count(), 0, "nothing sent to ::1");
    let letters: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT error_code, error_message, attempts FROM fraiseql_observers.dead_letters",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    for (code, message, attempts) in &letters {
        assert_eq!(code, "OB017");
        assert_eq!(*attempts, 1, "{message}");
        assert!(message.starts_with("::1 (loopback"), "{message}");
        assert!(!message.contains("/orders"), "{message}");
    }
}

// Multi-threaded: the receiver must keep answering while the test blocks on the CLI process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_retry_of_a_refused_letter_is_refused_again_until_its_network_is_allowed() {
    let database = TestDatabase::migrated().await;
    let queue = fraiseql_observers::dlq::PostgresDeadLetterQueue::new(database.pool.clone());
    let receiver = Receiver::start().await;
    let port = receiver.url("").rsplit(':').next().unwrap().to_owned();
    let letter = queue
        .push(fraiseql_observers::dlq::NewDeadLetter {
            event: order_for(&format!("localhost:{port}"), 1),
            observer: "routed".to_owned(),
            action_index: 0,
            action_type: "webhook".to_owned(),
            error_code: ErrorCode::TargetRefused,
            error_message: "127.0.0.1 (loopback) is not a public address".to_owned(),
            attempts: 1,
        })
        .await
        .unwrap();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("observers.yaml");
    std::fs::write(&file, observer_yaml(HOST_FROM_DATA, "")).unwrap();
    let retry = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
            .args(["dlq", "retry", &letter.to_string(), "--config"])
            .arg(&file)
            .args(extra)
            .env("DATABASE_URL", &database.url)
            .env("RUST_LOG", "off")
            .env_remove("FRAISEQL_OBSERVERS_ALLOW_PRIVATE_TARGETS_CIDR")
            .output()
            .unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };

    let (succeeded, output) = retry(&[]);
    assert!(!succeeded && output.contains("OB017"), "{output}");
    assert_eq!(receiver.request_count(), 0);
    assert!(
        queue.get(letter).await.unwrap().is_some(),
        "the letter stays"
    );

    let (succeeded, output) = retry(&["--allow-private-targets-cidr", "127.0.0.0/8"]);
    assert!(succeeded, "{output}");
    assert_eq!(receiver.requests_to("/hook").len(), 1);
    assert!(queue.get(letter).await.unwrap().is_none(), "{output}");
}
