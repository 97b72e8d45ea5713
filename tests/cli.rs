//! The `fraiseql-observers` binary as a user runs it: `validate-config` output and exit statuses.

use std::process::Command;

fn fraiseql_observers(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(arguments)
        .env_remove("ORDERS_HOOK_SECRET")
        .env("RUST_LOG", "off")
        .output()
        .expect("the binary runs")
}

fn write(directory: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = directory.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn the_example_validates_with_a_report_counted_from_the_file() {
    let output = fraiseql_observers(&["validate-config", "examples/observers.yaml"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("├── Observers: 3"), "{stdout}");
    assert!(stdout.contains("Entities: Order (2), User (1)"), "{stdout}");
    assert!(stdout.contains("├── Actions: 4"), "{stdout}");
    assert!(
        stdout.contains("│   ├── log: 2") && stdout.contains("│   └── webhook: 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ORDERS_HOOK_SECRET is not set"),
        "unset secret shown as a warning: {stdout}"
    );
    assert!(
        stdout.contains("✓ Configuration is valid: 3 observers, 4 actions"),
        "{stdout}"
    );
}

#[test]
fn the_action_catalog_example_shows_every_type_and_what_it_needs() {
    let output = Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["validate-config", "examples/actions.yaml"])
        .env_clear()
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("├── Actions: 7"), "{stdout}");
    for line in [
        "│   ├── cache: 1 — needs Redis (REDIS_URL)",
        "│   ├── database: 1 — needs app.on_order_paid in the service database (DATABASE_URL)",
        "│   ├── email: 1 — needs SMTP smtp.example.com:587 (STARTTLS)",
        "│   ├── search: 2 — needs the cluster at SEARCH_URL",
        "│   ├── slack: 1",
        "│   └── sms: 1 — needs https://api.twilio.com",
        "├── Secrets from environment: 7",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    for variable in [
        "SLACK_WEBHOOK_URL",
        "SEARCH_URL",
        "SMTP_USER",
        "SMTP_PASSWORD",
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
    ] {
        assert!(
            stdout.contains(&format!("environment variable {variable} is not set")),
            "{variable} reported as a warning: {stdout}"
        );
    }
    assert!(stdout.contains("REDIS_URL is not set here"), "{stdout}");
}

#[test]
fn require_env_turns_unset_secrets_into_errors() {
    let output = fraiseql_observers(&[
        "validate-config",
        "--require-env",
        "examples/observers.yaml",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(
            "observers[0].actions[0].signing_secret_env: environment variable ORDERS_HOOK_SECRET"
        ),
        "{stderr}"
    );
}

#[test]
fn an_invalid_file_lists_every_error_and_exits_2() {
    let directory = tempfile::tempdir().unwrap();
    let file = write(
        &directory,
        "bad.yaml",
        "observers:\n  - name: a\n    entity: Order\n    events: [upsert]\n    actions: [{type: smtp}]\n  - name: a\n    entity: Order\n    events: [insert]\n    actions: [{type: log, level: loud}]\n",
    );
    let output = fraiseql_observers(&["validate-config", &file]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("4 errors in observers configuration:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.yaml:4:14: observers[0].events[0]"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("bad.yaml:5:22: observers[0].actions[0].type: unknown action type \"smtp\""),
        "{stderr}"
    );
    assert!(stderr.contains("bad.yaml:6:11: observers[1].name: duplicate observer name 'a' (first defined at line 2)"), "{stderr}");
    assert!(stderr.contains("observers[1].actions[0].level"), "{stderr}");
    assert!(
        stderr.contains("✗ Configuration is invalid (OB001)"),
        "{stderr}"
    );
}

#[test]
fn json_output_is_machine_readable_for_valid_and_invalid_files() {
    let output = fraiseql_observers(&["validate-config", "--json", "examples/observers.yaml"]);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!(report["observers"][0]["name"], "order-paid");
    assert_eq!(
        report["observers"][0]["events"],
        serde_json::json!(["UPDATE"])
    );
    assert_eq!(
        report["action_types"],
        serde_json::json!({"log": 2, "webhook": 2})
    );
    assert_eq!(report["warnings"].as_array().unwrap().len(), 1);

    let directory = tempfile::tempdir().unwrap();
    let file = write(&directory, "bad.toml", "[[observers]]\nname = \"x\"\n");
    let output = fraiseql_observers(&["validate-config", "--json", &file]);
    assert_eq!(output.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|error| error["message"]
            .as_str()
            .unwrap()
            .contains("missing required key 'entity'")),
        "{report}"
    );
    assert!(
        errors
            .iter()
            .all(|error| error["line"].is_u64() && error["path"] == "observers[0]"),
        "{report}"
    );
}

#[test]
fn an_unknown_extension_or_missing_file_is_a_clear_error() {
    let output = fraiseql_observers(&["validate-config", "observers.json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("expected a file ending in .yaml, .yml or .toml")
    );
    let output = fraiseql_observers(&["validate-config", "does-not-exist.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("does-not-exist.yaml: cannot read the file")
    );
}

/// A mutating cluster command as a user runs it, the token in the environment.
fn cluster_drain_with_token(endpoint: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["cluster", "drain", "--endpoint", endpoint])
        .env("FRAISEQL_OBSERVERS_CONTROL_TOKEN", "t0ken-never-printed")
        .env("RUST_LOG", "off")
        .output()
        .expect("the binary runs")
}

#[test]
fn a_token_sent_in_plaintext_beyond_loopback_is_warned_about() {
    // TEST-NET-1: not this machine; the call fails (unreachable or timed out) after the warning.
    let output = cluster_drain_with_token("192.0.2.1:50051");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.starts_with(
            "warning: the control token is sent in plaintext to 192.0.2.1, which is not a loopback address"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("t0ken-never-printed"), "{stderr}");

    // Loopback: nothing crosses the network, no warning.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = cluster_drain_with_token(&closed.to_string());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn an_unreachable_control_plane_says_why_wherever_the_flag_is_given() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    for arguments in [
        vec!["cluster", "--endpoint", &closed, "status"],
        vec!["cluster", "status", "--endpoint", &closed],
        vec!["status", "--endpoint", &closed],
    ] {
        let output = fraiseql_observers(&arguments);
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(1), "{arguments:?}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!(
                "error: cannot reach the control plane at http://{closed}: connection refused (is the node running, and is this its --grpc-listen address?)"
            ),
            "{arguments:?}"
        );
    }
}

#[test]
fn help_lists_the_exit_statuses() {
    let output = fraiseql_observers(&["--help"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    let statuses = stdout
        .split("Exit status:")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit statuses in --help: {stdout}"));
    for expected in [
        "0  success",
        "1  any other failure",
        "2  invalid configuration or command line",
        "3  the service's own storage failed",
        "4  another node holds the partition now",
        "5  the node is shutting down",
    ] {
        assert!(statuses.contains(expected), "{expected}: {statuses}");
    }
}

#[test]
fn completions_and_the_manual_come_from_the_command_definitions() {
    for (shell, expected) in [
        ("bash", "complete -F _fraiseql__observers"),
        ("zsh", "#compdef fraiseql-observers"),
        ("fish", "complete -c fraiseql-observers"),
    ] {
        let output = fraiseql_observers(&["completions", shell]);
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(output.status.success(), "{shell}");
        assert!(script.contains(expected), "{shell}: {script}");
        for subcommand in ["dlq", "migrate", "cluster", "validate-config"] {
            assert!(
                script.contains(subcommand),
                "{shell} completes {subcommand}"
            );
        }
    }
    let output = fraiseql_observers(&["man"]);
    let manual = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    assert!(
        manual.starts_with(".ie \\n(.g .ds Aq") || manual.contains(".TH fraiseql-observers"),
        "{manual}"
    );
    assert!(
        manual.contains("Exit status"),
        "the exit statuses are in the manual"
    );
    let output = fraiseql_observers(&["completions", "tcsh"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
