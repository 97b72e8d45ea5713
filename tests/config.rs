//! Integration tests for the observers-file loader (`fraiseql_observers::config`).
//!
//! Every error test checks the error's path, its position (line and column, computed from the
//! fixture text by [`at`] / [`after`]) and a distinctive part of its message. Most error cases
//! are rows of one table per section ([`ErrorCase`], run by [`check_error_cases`]); a failing
//! row is reported by its name with every error its fixture produced. The environment is never
//! touched: variables come from a closure over a map.

#![allow(clippy::too_many_lines)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fraiseql_observers::actions::ActionKind;
use fraiseql_observers::actions::log::LogLevel;
use fraiseql_observers::actions::webhook::{BodyFormat, HeaderValue, HttpMethod, WebhookAction};
use fraiseql_observers::condition::Condition;
use fraiseql_observers::config::{
    BackoffKind, ConfigError, ConfigErrors, DEFAULT_ACTION_TIMEOUT, DEFAULT_INITIAL_DELAY,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_CONCURRENT_ACTIONS, DEFAULT_MAX_CONCURRENT_ENTITIES,
    DEFAULT_MAX_DELAY, EndpointLimits, ExecutorSettings, FailurePolicy, Format, LoadOptions,
    MissingEnv, Position, RateLimit, RetryPolicy, Setting, WebhookTarget,
};
use fraiseql_observers::domain::EventKind;
use fraiseql_observers::observers::{
    MAX_CONFIG_FILE_BYTES, ObserverDefinition, ObserversConfig, format_for, load_bytes, load_file,
    load_str,
};

const ORIGIN: &str = "observers.yaml";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Loads `text` with the variables `vars` as the whole environment.
fn load_with(
    text: &str,
    format: Format,
    vars: &[(&str, &str)],
    missing_env: MissingEnv,
) -> Result<ObserversConfig, ConfigErrors> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let lookup = move |name: &str| map.get(name).cloned();
    let options = LoadOptions {
        env: &lookup,
        missing_env,
    };
    load_str(text, format, ORIGIN, &options)
}

/// Loads YAML with an empty environment, missing variables being errors.
fn load_yaml(text: &str) -> Result<ObserversConfig, ConfigErrors> {
    load_with(text, Format::Yaml, &[], MissingEnv::Error)
}

fn yaml_ok(text: &str) -> ObserversConfig {
    load_yaml(text).unwrap_or_else(|errors| panic!("expected the file to load, got:\n{errors}"))
}

fn yaml_errors(text: &str) -> Vec<ConfigError> {
    match load_yaml(text) {
        Ok(config) => panic!("expected errors, the file loaded: {:?}", config.observers),
        Err(errors) => errors.errors,
    }
}

/// The one error the YAML `text` produces.
fn only_error(text: &str) -> ConfigError {
    let mut errors = yaml_errors(text);
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error, got:\n{}",
        list(&errors)
    );
    errors.remove(0)
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().fold(String::new(), |mut text, error| {
        text.push_str("  ");
        text.push_str(&error.to_string());
        text.push('\n');
        text
    })
}

fn pos(line: usize, column: usize) -> Position {
    Position { line, column }
}

/// The position (1-based line, column in characters) of the `occurrence`-th (0-based)
/// occurrence of `needle` in `text`.
fn at_nth(text: &str, needle: &str, occurrence: usize) -> Position {
    let (offset, _) = text
        .match_indices(needle)
        .nth(occurrence)
        .unwrap_or_else(|| panic!("{needle:?} (occurrence {occurrence}) is not in the fixture"));
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    pos(
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The position of `needle`, which must occur exactly once in `text`.
fn at(text: &str, needle: &str) -> Position {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "{needle:?} must occur exactly once in the fixture"
    );
    at_nth(text, needle, 0)
}

/// The position just after `needle` (which must occur once), e.g. of the value after `key: `.
fn after(text: &str, needle: &str) -> Position {
    let start = at(text, needle);
    pos(start.line, start.column + needle.chars().count())
}

#[track_caller]
fn assert_error(error: &ConfigError, path: &str, position: Position, message_part: &str) {
    assert_eq!(error.file, ORIGIN, "file of {error}");
    assert_eq!(error.path, path, "path of {error}");
    assert_eq!(error.position, Some(position), "position of {error}");
    assert!(
        error.message.contains(message_part),
        "the message of {error}\n  does not contain {message_part:?}"
    );
}

/// One observer with one webhook action; `extra` holds further keys of the action, indented
/// by 8 spaces.
fn webhook_fixture(extra: &str) -> String {
    format!(
        "\
observers:
  - name: hook
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: https://hooks.example.com/orders
{extra}"
    )
}

fn webhook(observer: &ObserverDefinition, index: usize) -> &WebhookAction {
    match &observer.actions[index].kind {
        ActionKind::Webhook(webhook) => webhook,
        other => panic!("expected a webhook, found {other:?}"),
    }
}

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_manifest_file(relative: &str) -> String {
    std::fs::read_to_string(manifest_path(relative)).expect("readable fixture")
}

// ---------------------------------------------------------------------------------------------
// Error-case tables
// ---------------------------------------------------------------------------------------------

/// Where an expected error is in its case's fixture.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// At the needle, which must occur exactly once ([`at`]).
    At(&'static str),
    /// At the n-th (0-based) occurrence of the needle ([`at_nth`]).
    AtNth(&'static str, usize),
    /// Just after the needle, which must occur exactly once ([`after`]).
    After(&'static str),
    /// At this line and column, where there is nothing to point at (an empty file).
    Exactly(usize, usize),
}

use Place::{After, At, AtNth, Exactly};

impl Place {
    fn in_fixture(self, text: &str) -> Position {
        match self {
            At(needle) => at(text, needle),
            AtNth(needle, occurrence) => at_nth(text, needle, occurrence),
            After(needle) => after(text, needle),
            Exactly(line, column) => pos(line, column),
        }
    }
}

/// An expected error: its path, its place and a distinctive part of its message.
type Expected<'a> = (&'a str, Place, &'a str);

/// A fixture that must fail to load with exactly the `expected` errors, in that order.
struct ErrorCase<'a> {
    /// Short and unique within its table: a failure report starts with it.
    name: &'static str,
    fixture: String,
    format: Format,
    /// The whole environment; a missing variable is an error.
    vars: &'static [(&'static str, &'static str)],
    expected: Vec<Expected<'a>>,
}

impl<'a> ErrorCase<'a> {
    fn yaml(name: &'static str, fixture: impl Into<String>, expected: Vec<Expected<'a>>) -> Self {
        Self {
            name,
            fixture: fixture.into(),
            format: Format::Yaml,
            vars: &[],
            expected,
        }
    }

    fn toml(name: &'static str, fixture: impl Into<String>, expected: Vec<Expected<'a>>) -> Self {
        Self {
            format: Format::Toml,
            ..Self::yaml(name, fixture, expected)
        }
    }

    fn with_env(self, vars: &'static [(&'static str, &'static str)]) -> Self {
        Self { vars, ..self }
    }

    /// Loads the fixture and checks its errors with [`assert_error`]; on a mismatch, returns
    /// a report with the case's name, the failed check and every error the fixture produced.
    fn check(&self) -> Result<(), String> {
        let errors = match load_with(&self.fixture, self.format, self.vars, MissingEnv::Error) {
            Ok(config) => {
                return Err(format!(
                    "case {:?}: expected errors, the file loaded: {:?}",
                    self.name, config.observers
                ));
            }
            Err(errors) => errors.errors,
        };
        let checks = std::panic::catch_unwind(|| {
            assert_eq!(errors.len(), self.expected.len(), "number of errors");
            for (error, &(path, place, message_part)) in errors.iter().zip(&self.expected) {
                assert_error(error, path, place.in_fixture(&self.fixture), message_part);
            }
        });
        checks.map_err(|panic| {
            let failed_check = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            format!(
                "case {:?}: {failed_check}\n  the fixture's errors:\n{}",
                self.name,
                list(&errors)
            )
        })
    }
}

/// Checks every case, then fails once, naming each case that did not pass.
fn check_error_cases(cases: &[ErrorCase]) {
    let mut names = HashSet::new();
    for case in cases {
        assert!(
            names.insert(case.name),
            "two cases are named {:?}",
            case.name
        );
    }
    let failures: Vec<String> = cases.iter().filter_map(|case| case.check().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} error cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Unknown keys and types
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_keys_and_action_types() {
    let type_names = ActionKind::TYPE_NAMES.join(", ");
    let misspelled_type = format!(
        "unknown action type \"webhok\"; did you mean 'webhook'? expected one of: {type_names}"
    );
    let unknown_type = format!("unknown action type \"fax\"; expected one of: {type_names}");
    let missing_type = format!("missing required key 'type' (one of: {type_names})");
    check_error_cases(&[
        ErrorCase::yaml(
            "unknown top-level key",
            "\
observers: []
executer:
  max_concurrent_actions: 4
",
            vec![(
                "executer",
                At("executer"),
                "unknown key 'executer'; did you mean 'executor'? expected one of: observers, executor",
            )],
        ),
        ErrorCase::yaml(
            "unknown observer key suggests the near one",
            "\
observers:
  - name: typo
    entity: Order
    evnts: [insert]
    event_type: insert
    actions:
      - type: log
",
            vec![(
                "observers[0].evnts",
                At("evnts"),
                "unknown key 'evnts'; did you mean 'events'? expected one of: name, description, entity",
            )],
        ),
        ErrorCase::yaml(
            "unknown action key",
            webhook_fixture("        retries: 3\n"),
            vec![(
                "observers[0].actions[0].retries",
                At("retries"),
                "unknown key 'retries'; expected one of: type, name, url, url_env, method, headers",
            )],
        ),
        ErrorCase::yaml(
            "unknown action types",
            "\
observers:
  - name: types
    entity: Order
    events: [insert]
    actions:
      - type: webhok
        url: https://hooks.example.com/a
      - type: fax
        to: ops@example.com
",
            vec![
                (
                    "observers[0].actions[0].type",
                    At("webhok"),
                    &misspelled_type,
                ),
                ("observers[0].actions[1].type", At("fax"), &unknown_type),
            ],
        ),
        ErrorCase::yaml(
            "missing action type",
            "\
observers:
  - name: untyped
    entity: Order
    events: [insert]
    actions:
      - url: https://hooks.example.com/a
        method: PUT
",
            vec![("observers[0].actions[0]", At("url:"), &missing_type)],
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Observers
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_observer_names_name_the_first_line() {
    let text = "\
observers:
  - name: dup
    entity: Order
    events: [insert]
    actions:
      - type: log
  - name: other
    entity: Order
    events: [insert]
    actions:
      - type: log
  - name: dup
    entity: User
    events: [delete]
    actions:
      - type: log
";
    let first = at_nth(text, "dup", 0);
    assert_eq!(first, pos(2, 11));
    let error = only_error(text);
    assert_error(
        &error,
        "observers[2].name",
        at_nth(text, "dup", 1),
        "duplicate observer name 'dup' (first defined at line 2)",
    );
}

#[test]
fn observer_definition_errors() {
    check_error_cases(&[
        ErrorCase::yaml(
            "duplicate name reported even when the duplicate is invalid",
            "\
observers:
  - name: dup
    entity: Order
    events: [insert]
    actions:
      - type: log
  - name: dup
    events: [nope]
    actions:
      - type: log
",
            vec![
                // The observer mapping starts at its first key, left of the name's value on the
                // same line.
                (
                    "observers[1]",
                    AtNth("name: dup", 1),
                    "missing required key 'entity'",
                ),
                (
                    "observers[1].name",
                    AtNth("dup", 1),
                    "duplicate observer name 'dup' (first defined at line 2)",
                ),
                (
                    "observers[1].events[0]",
                    At("nope"),
                    "expected one of insert, update, delete, custom, found \"nope\"",
                ),
            ],
        ),
        ErrorCase::yaml(
            "missing name",
            "\
observers:
  - entity: Order
    events: [insert]
    actions:
      - type: log
",
            vec![(
                "observers[0]",
                At("entity"),
                "missing required key 'name' (a unique observer name)",
            )],
        ),
        ErrorCase::yaml(
            "missing entity",
            "\
observers:
  - name: no-entity
    events: [insert]
    actions:
      - type: log
",
            vec![(
                "observers[0]",
                At("name"),
                "missing required key 'entity' (the entity type it watches, e.g. Order)",
            )],
        ),
        ErrorCase::yaml(
            "missing actions",
            "\
observers:
  - name: no-actions
    entity: Order
    events: [insert]
",
            vec![(
                "observers[0]",
                At("name"),
                "missing required key 'actions' (a list of actions)",
            )],
        ),
        ErrorCase::yaml(
            "missing events",
            "\
observers:
  - name: no-events
    entity: Order
    actions:
      - type: log
",
            vec![(
                "observers[0]",
                At("name"),
                "missing required key 'events' (e.g. [insert, update]) or 'event_type'",
            )],
        ),
        ErrorCase::yaml(
            "events and event_type together",
            "\
observers:
  - name: both
    entity: Order
    events: [insert]
    event_type: update
    actions:
      - type: log
",
            vec![(
                "observers[0].events",
                At("[insert]"),
                "set either 'events' or 'event_type', not both",
            )],
        ),
        ErrorCase::yaml(
            "bad event kinds",
            "\
observers:
  - name: listed
    entity: Order
    events: [insert, updte]
    actions:
      - type: log
  - name: single
    entity: Order
    event_type: remove
    actions:
      - type: log
",
            vec![
                (
                    "observers[0].events[1]",
                    At("updte"),
                    "did you mean 'update'? expected one of insert, update, delete, custom, found \"updte\"",
                ),
                (
                    "observers[1].event_type",
                    At("remove"),
                    "expected one of insert, update, delete, custom, found \"remove\"",
                ),
            ],
        ),
        ErrorCase::yaml(
            "empty events list",
            "\
observers:
  - name: nothing
    entity: Order
    events: []
    actions:
      - type: log
",
            vec![(
                "observers[0].events",
                At("[]"),
                "expected at least one event kind",
            )],
        ),
        ErrorCase::yaml(
            "empty actions list",
            "\
observers:
  - name: idle
    entity: Order
    events: [insert]
    actions: []
",
            vec![(
                "observers[0].actions",
                At("[]"),
                "expected at least one action",
            )],
        ),
        ErrorCase::yaml(
            "observer name with a space",
            "\
observers:
  - name: order paid
    entity: Order
    events: [insert]
    actions:
      - type: log
",
            vec![(
                "observers[0].name",
                At("order paid"),
                "expected only letters, digits, '_', '-' and '.', found ' '",
            )],
        ),
        ErrorCase::yaml(
            "observer name of 129 characters",
            named_observer_fixture(&"n".repeat(129)),
            vec![(
                "observers[0].name",
                After("name: "),
                "expected at most 128 characters",
            )],
        ),
        ErrorCase::yaml(
            "invalid on_failure",
            "\
observers:
  - name: failing
    entity: Order
    events: [insert]
    on_failure: retry
    actions:
      - type: log
",
            vec![(
                "observers[0].on_failure",
                At("retry"),
                "expected one of dlq, log, found \"retry\"",
            )],
        ),
    ]);
}

#[test]
fn event_kinds_are_case_insensitive_and_deduplicated() {
    let text = "\
observers:
  - name: kinds
    entity: Order
    events: [INSERT, Update, insert, custom]
    actions:
      - type: log
  - name: single
    entity: Order
    events: delete
    actions:
      - type: log
";
    let config = yaml_ok(text);
    assert_eq!(
        config.observers[0].events,
        [EventKind::Insert, EventKind::Update, EventKind::Custom]
    );
    assert_eq!(config.observers[1].events, [EventKind::Delete]);
}

/// One observer called `name`, with one log action.
fn named_observer_fixture(name: &str) -> String {
    format!(
        "\
observers:
  - name: {name}
    entity: Order
    events: [insert]
    actions:
      - type: log
"
    )
}

#[test]
fn observer_name_of_128_characters_is_accepted() {
    let longest = "n".repeat(128);
    let config = yaml_ok(&named_observer_fixture(&longest));
    assert_eq!(config.observers[0].name.as_str(), longest);
}

#[test]
fn bad_condition_shows_the_condition_error_and_a_caret() {
    let text = "\
observers:
  - name: conditional
    entity: Order
    events: [update]
    condition: \"data.total > && true\"
    actions:
      - type: log
";
    let error = only_error(text);
    assert_error(
        &error,
        "observers[0].condition",
        at(text, "\"data.total"),
        "invalid condition: ",
    );
    // The `&&` is the 14th character of the condition.
    assert!(error.message.contains(" at column 14"), "{error}");
    let lines: Vec<&str> = error.message.lines().collect();
    assert_eq!(lines.len(), 3, "{error}");
    assert_eq!(lines[1].trim_start(), "data.total > && true", "{error}");
    let indent = lines[1].len() - lines[1].trim_start().len();
    assert_eq!(lines[2], format!("{}^", " ".repeat(indent + 13)), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Durations and retry
// ---------------------------------------------------------------------------------------------

#[test]
fn duration_and_retry_errors() {
    check_error_cases(&[
        ErrorCase::yaml(
            "duration as a bare integer",
            webhook_fixture("        timeout: 5\n"),
            vec![(
                "observers[0].actions[0].timeout",
                After("timeout: "),
                "expected a duration with a unit such as \"5s\" or \"250ms\", found the bare number 5",
            )],
        ),
        ErrorCase::yaml(
            "duration that does not parse",
            webhook_fixture("        timeout: soon\n"),
            vec![(
                "observers[0].actions[0].timeout",
                At("soon"),
                "expected a duration such as \"5s\", \"250ms\" or \"1m 30s\", found \"soon\"",
            )],
        ),
        ErrorCase::yaml(
            "zero timeout",
            webhook_fixture("        timeout: 0s\n"),
            vec![(
                "observers[0].actions[0].timeout",
                At("0s"),
                "expected a timeout above 0 and at most 10m, found 0s",
            )],
        ),
        ErrorCase::yaml(
            "timeout over ten minutes",
            webhook_fixture("        timeout: 10m 1s\n"),
            vec![(
                "observers[0].actions[0].timeout",
                At("10m 1s"),
                "expected a timeout above 0 and at most 10m, found 10m 1s",
            )],
        ),
        ErrorCase::yaml(
            "retry durations",
            "\
observers:
  - name: retried
    entity: Order
    events: [insert]
    retry:
      initial_delay: 100
      max_delay: later
    actions:
      - type: log
",
            vec![
                (
                    "observers[0].retry.initial_delay",
                    At("100"),
                    "found the bare number 100",
                ),
                (
                    "observers[0].retry.max_delay",
                    At("later"),
                    "found \"later\"",
                ),
            ],
        ),
        ErrorCase::yaml(
            "initial_delay longer than max_delay",
            "\
observers:
  - name: flow
    entity: Order
    events: [insert]
    retry: {initial_delay: 1m, max_delay: 10s}
    actions:
      - type: log
  - name: block
    entity: Order
    events: [insert]
    retry:
      initial_delay: 45s
    actions:
      - type: log
",
            vec![
                // The error points at the retry mapping itself.
                (
                    "observers[0].retry",
                    At("{initial_delay"),
                    "initial_delay (1m) is longer than max_delay (10s)",
                ),
                (
                    "observers[1].retry",
                    At("initial_delay: 45s"),
                    "initial_delay (45s) is longer than max_delay (30s)",
                ),
            ],
        ),
        ErrorCase::yaml(
            "max_attempts out of range",
            "\
observers:
  - name: none
    entity: Order
    events: [insert]
    retry: {max_attempts: 0}
    actions:
      - type: log
  - name: too-many
    entity: Order
    events: [insert]
    retry: {max_attempts: 101}
    actions:
      - type: log
",
            vec![
                (
                    "observers[0].retry.max_attempts",
                    At("0}"),
                    "expected an integer from 1 to 100, found 0",
                ),
                (
                    "observers[1].retry.max_attempts",
                    At("101"),
                    "expected an integer from 1 to 100, found 101",
                ),
            ],
        ),
    ]);
}

#[test]
fn timeout_of_ten_minutes_is_accepted() {
    let config = yaml_ok(&webhook_fixture("        timeout: 10m\n"));
    assert_eq!(
        webhook(&config.observers[0], 0).timeout,
        Duration::from_mins(10)
    );
}

#[test]
fn max_attempts_bounds_are_accepted() {
    let text = "\
observers:
  - name: once
    entity: Order
    events: [insert]
    retry: {max_attempts: 1}
    actions:
      - type: log
  - name: hundred
    entity: Order
    events: [insert]
    retry: {max_attempts: 100, backoff: fixed, jitter: false}
    actions:
      - type: log
";
    let config = yaml_ok(text);
    assert_eq!(config.observers[0].retry.max_attempts, 1);
    assert_eq!(config.observers[1].retry.max_attempts, 100);
    assert_eq!(config.observers[1].retry.backoff, BackoffKind::Fixed);
    assert!(!config.observers[1].retry.jitter);
}

// ---------------------------------------------------------------------------------------------
// Webhook target
// ---------------------------------------------------------------------------------------------

fn url_fixture(url: &str) -> String {
    format!(
        "\
observers:
  - name: hook
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: '{url}'
"
    )
}

#[test]
fn webhook_target_errors() {
    check_error_cases(&[
        ErrorCase::yaml(
            "url not absolute",
            url_fixture("hooks.example.com/orders"),
            vec![(
                "observers[0].actions[0].url",
                At("'hooks"),
                "expected an absolute http:// or https:// URL, found \"hooks.example.com/orders\" (relative URL without a base)",
            )],
        ),
        ErrorCase::yaml(
            "url with ftp scheme",
            url_fixture("ftp://files.example.com/orders"),
            vec![(
                "observers[0].actions[0].url",
                At("'ftp"),
                "expected an http:// or https:// URL with a host, found \"ftp://files.example.com/orders\" (scheme \"ftp\")",
            )],
        ),
        ErrorCase::yaml(
            "url without host",
            url_fixture("http://"),
            vec![(
                "observers[0].actions[0].url",
                At("'http://'"),
                "expected an absolute http:// or https:// URL, found \"http://\" (empty host)",
            )],
        ),
        // A scheme that parses without a host is refused too.
        ErrorCase::yaml(
            "url with a scheme that has no host",
            url_fixture("mailto:ops@example.com"),
            vec![(
                "observers[0].actions[0].url",
                At("'mailto"),
                "with a host, found \"mailto:ops@example.com\" (scheme \"mailto\")",
            )],
        ),
        ErrorCase::yaml(
            "missing url",
            "\
observers:
  - name: nowhere
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        method: POST
",
            vec![(
                "observers[0].actions[0]",
                At("type: webhook"),
                "missing required key 'url' (or 'url_env')",
            )],
        ),
        ErrorCase::yaml(
            "url and url_env together",
            webhook_fixture("        url_env: HOOK_URL\n"),
            vec![(
                "observers[0].actions[0].url",
                At("https://hooks.example.com/orders"),
                "set either 'url' or 'url_env', not both",
            )],
        )
        .with_env(&[("HOOK_URL", "https://hooks.example.com/x")]),
        ErrorCase::yaml(
            "url_env missing when running",
            URL_ENV_FIXTURE,
            vec![(
                "observers[0].actions[0].url_env",
                At("HOOK_URL"),
                "environment variable HOOK_URL is not set",
            )],
        ),
    ]);
}

const URL_ENV_FIXTURE: &str = "\
observers:
  - name: from-env
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url_env: HOOK_URL
";

#[test]
fn url_env_missing_is_a_warning_when_validating() {
    let config = load_with(URL_ENV_FIXTURE, Format::Yaml, &[], MissingEnv::Warn)
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(config.warnings.len(), 1, "{}", list(&config.warnings));
    assert_error(
        &config.warnings[0],
        "observers[0].actions[0].url_env",
        at(URL_ENV_FIXTURE, "HOOK_URL"),
        "environment variable HOOK_URL is not set",
    );
    assert_eq!(
        webhook(&config.observers[0], 0).target,
        WebhookTarget::FromEnv {
            variable: "HOOK_URL".into(),
            url: Setting::MissingEnv("HOOK_URL".into()),
        }
    );
}

#[test]
fn url_env_resolved_from_the_environment() {
    let config = load_with(
        URL_ENV_FIXTURE,
        Format::Yaml,
        &[("HOOK_URL", " https://hooks.example.com/in ")],
        MissingEnv::Error,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config.warnings.is_empty(), "{}", list(&config.warnings));
    let WebhookTarget::FromEnv { variable, url } = &webhook(&config.observers[0], 0).target else {
        panic!("expected a target from the environment");
    };
    assert_eq!(variable, "HOOK_URL");
    assert_eq!(
        url.ready().expect("resolved").0.as_str(),
        "https://hooks.example.com/in"
    );
}

// ---------------------------------------------------------------------------------------------
// ${VAR} expansion and secrets
// ---------------------------------------------------------------------------------------------

#[test]
fn variables_are_expanded_in_url_header_and_signing_secret() {
    let text = "\
observers:
  - name: expanded
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: 'https://${HOOK_HOST}/orders'
        headers:
          Authorization: 'Bearer ${API_TOKEN}'
          X-Template: 'literal $${NOT_A_VAR} and $5'
          X-Team: billing
        signing_secret: '${SIGNING_KEY}'
";
    let config = load_with(
        text,
        Format::Yaml,
        &[
            ("HOOK_HOST", "hooks.example.com"),
            ("API_TOKEN", "tok123"),
            ("SIGNING_KEY", "key456"),
        ],
        MissingEnv::Error,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config.warnings.is_empty(), "{}", list(&config.warnings));
    let action = webhook(&config.observers[0], 0);
    let WebhookTarget::FromEnv { variable, url } = &action.target else {
        panic!(
            "a URL with ${{VAR}} is a secret target: {:?}",
            action.target
        );
    };
    assert_eq!(variable, "HOOK_HOST");
    assert_eq!(
        url.ready().expect("resolved").0.as_str(),
        "https://hooks.example.com/orders"
    );
    assert_eq!(action.headers.len(), 3);
    assert_eq!(action.headers[0].0, "Authorization");
    let HeaderValue::Secret(Setting::Ready(token)) = &action.headers[0].1 else {
        panic!(
            "expected a resolved secret header: {:?}",
            action.headers[0].1
        );
    };
    assert_eq!(token.expose(), "Bearer tok123");
    assert_eq!(
        action.headers[1],
        (
            "X-Template".to_owned(),
            HeaderValue::Literal("literal ${NOT_A_VAR} and $5".into())
        )
    );
    assert_eq!(
        action.headers[2],
        ("X-Team".to_owned(), HeaderValue::Literal("billing".into()))
    );
    let Some(Setting::Ready(secret)) = &action.signing_secret else {
        panic!("expected a resolved signing secret");
    };
    assert_eq!(secret.expose(), "key456");
}

#[test]
fn variable_expansion_and_secret_errors() {
    let unterminated = "unterminated '${' (write '$${' for a literal '${')";
    check_error_cases(&[
        ErrorCase::yaml(
            "missing variables in header and signing secret",
            MISSING_VARIABLES_FIXTURE,
            vec![
                (
                    "observers[0].actions[0].headers.Authorization",
                    At("'Bearer"),
                    "environment variable API_TOKEN is not set",
                ),
                (
                    "observers[0].actions[0].signing_secret",
                    At("'${SIGNING_KEY}'"),
                    "environment variable SIGNING_KEY is not set",
                ),
            ],
        ),
        ErrorCase::yaml(
            "unterminated variable references",
            "\
observers:
  - name: broken
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: 'https://${HOOK_HOST/orders'
        headers:
          Authorization: 'Bearer ${API_TOKEN'
        signing_secret: '${SIGNING_KEY'
",
            vec![
                ("observers[0].actions[0].url", At("'https"), unterminated),
                (
                    "observers[0].actions[0].headers.Authorization",
                    At("'Bearer"),
                    unterminated,
                ),
                (
                    "observers[0].actions[0].signing_secret",
                    At("'${SIGNING_KEY'"),
                    unterminated,
                ),
            ],
        )
        .with_env(&[("HOOK_HOST", "h"), ("API_TOKEN", "t"), ("SIGNING_KEY", "k")]),
        ErrorCase::yaml(
            "invalid variable name",
            url_fixture("https://${1HOST}/orders"),
            vec![(
                "observers[0].actions[0].url",
                At("'https"),
                "expected an environment variable name inside '${…}', found \"1HOST\"",
            )],
        ),
        ErrorCase::yaml(
            "signing_secret and signing_secret_env together",
            webhook_fixture("        signing_secret: '${KEY}'\n        signing_secret_env: KEY\n"),
            vec![(
                "observers[0].actions[0].signing_secret",
                At("'${KEY}'"),
                "set either 'signing_secret' or 'signing_secret_env', not both",
            )],
        )
        .with_env(&[("KEY", "k")]),
    ]);
}

const MISSING_VARIABLES_FIXTURE: &str = "\
observers:
  - name: expanded
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: https://hooks.example.com/orders
        headers:
          Authorization: 'Bearer ${API_TOKEN}'
        signing_secret: '${SIGNING_KEY}'
";

#[test]
fn missing_variables_in_header_and_signing_secret_are_warnings_when_validating() {
    let config = load_with(
        MISSING_VARIABLES_FIXTURE,
        Format::Yaml,
        &[],
        MissingEnv::Warn,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(config.warnings.len(), 2, "{}", list(&config.warnings));
    let action = webhook(&config.observers[0], 0);
    assert_eq!(
        action.headers[0].1,
        HeaderValue::Secret(Setting::MissingEnv("API_TOKEN".into()))
    );
    assert_eq!(
        action.signing_secret,
        Some(Setting::MissingEnv("SIGNING_KEY".into()))
    );
}

#[test]
fn signing_secret_in_clear_is_a_warning_that_does_not_echo_it() {
    let text = webhook_fixture("        signing_secret: written-in-the-file\n");
    let config = yaml_ok(&text);
    assert_eq!(config.warnings.len(), 1, "{}", list(&config.warnings));
    let warning = &config.warnings[0];
    assert_error(
        warning,
        "observers[0].actions[0].signing_secret",
        at(&text, "written-in-the-file"),
        "the secret is written in the file in clear; prefer 'signing_secret_env'",
    );
    assert!(!warning.to_string().contains("written-in-the-file"));
    assert!(!format!("{:?}", config.observers).contains("written-in-the-file"));
}

const SECRET_VALUES: [&str; 4] = [
    "s3cr3t-value",
    "t0ken-s3cr3t",
    "url-s3cr3t-token",
    "host-s3cr3t",
];

#[track_caller]
fn assert_no_secret(shown: &str) {
    for secret in SECRET_VALUES {
        assert!(
            !shown.contains(secret),
            "{secret:?} was printed in:\n{shown}"
        );
    }
}

#[test]
fn secrets_never_print() {
    let text = "\
observers:
  - name: secret-hooks
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url_env: HOOK_URL
        signing_secret_env: HOOK_SECRET
        headers:
          Authorization: 'Bearer ${API_TOKEN}'
      - type: webhook
        url: 'https://${HOOK_HOST}/orders'
        signing_secret: '${HOOK_SECRET}'
      - type: webhook
        url_env: UNSET_URL
";
    let vars = [
        (
            "HOOK_URL",
            "https://hooks.example.com/in?token=url-s3cr3t-token",
        ),
        ("HOOK_SECRET", "s3cr3t-value"),
        ("API_TOKEN", "t0ken-s3cr3t"),
        ("HOOK_HOST", "host-s3cr3t.example.com"),
    ];
    let config = load_with(text, Format::Yaml, &vars, MissingEnv::Warn)
        .unwrap_or_else(|errors| panic!("{errors}"));

    // The values were read …
    let first = webhook(&config.observers[0], 0);
    let Some(Setting::Ready(secret)) = &first.signing_secret else {
        panic!("signing secret not resolved");
    };
    assert_eq!(secret.expose(), "s3cr3t-value");
    let WebhookTarget::FromEnv { url, .. } = &first.target else {
        panic!("target not from the environment");
    };
    assert!(
        url.ready()
            .expect("resolved")
            .0
            .as_str()
            .contains("url-s3cr3t-token")
    );
    let second = webhook(&config.observers[0], 1);
    let WebhookTarget::FromEnv { url, .. } = &second.target else {
        panic!("target not from the environment");
    };
    assert!(
        url.ready()
            .expect("resolved")
            .0
            .as_str()
            .contains("host-s3cr3t")
    );

    // … but never show.
    assert_no_secret(&format!("{:?}", config.observers));
    assert_no_secret(&format!("{:#?}", config.observers));
    assert_no_secret(&format!("{config:?}"));
    assert_eq!(config.warnings.len(), 1, "{}", list(&config.warnings));
    for warning in &config.warnings {
        assert_no_secret(&warning.to_string());
        assert_no_secret(&format!("{warning:?}"));
    }

    // The same file while running, where the unset variable is an error.
    let errors = load_with(text, Format::Yaml, &vars, MissingEnv::Error).unwrap_err();
    assert_eq!(errors.errors.len(), 1, "{errors}");
    assert_error(
        &errors.errors[0],
        "observers[0].actions[2].url_env",
        at(text, "UNSET_URL"),
        "environment variable UNSET_URL is not set",
    );
    assert_no_secret(&errors.to_string());
    assert_no_secret(&format!("{errors:?}"));
}

#[test]
fn bad_urls_from_the_environment_are_not_echoed() {
    let text = "\
observers:
  - name: bad-env-urls
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url_env: FTP_URL
      - type: webhook
        url_env: RELATIVE_URL
      - type: webhook
        url: '${HOOK_HOST}/orders'
      - type: webhook
        url_env: EMPTY_HOST_URL
      - type: webhook
        url: https://hooks.example.com/orders
        headers:
          Authorization: 'Bearer ${API_TOKEN}'
";
    let vars = [
        ("FTP_URL", "ftp://user:s3cr3t-value@files.example.com/"),
        (
            "RELATIVE_URL",
            "hooks.example.com/in?token=url-s3cr3t-token",
        ),
        ("HOOK_HOST", "host-s3cr3t"),
        ("EMPTY_HOST_URL", "https://:s3cr3t-value@/x"),
        ("API_TOKEN", "t0ken-s3cr3t\nX-Injected: 1"),
    ];
    let errors = load_with(text, Format::Yaml, &vars, MissingEnv::Error)
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 5, "{}", list(&errors));
    assert_error(
        &errors[0],
        "observers[0].actions[0].url_env",
        at(text, "FTP_URL"),
        "expected an http:// or https:// URL with a host, found the value of FTP_URL",
    );
    assert_error(
        &errors[1],
        "observers[0].actions[1].url_env",
        at(text, "RELATIVE_URL"),
        "expected an absolute http:// or https:// URL, found the value of RELATIVE_URL (relative URL without a base)",
    );
    assert_error(
        &errors[2],
        "observers[0].actions[2].url",
        at(text, "'${HOOK_HOST}"),
        "found the value of HOOK_HOST",
    );
    assert_error(
        &errors[3],
        "observers[0].actions[3].url_env",
        at(text, "EMPTY_HOST_URL"),
        "found the value of EMPTY_HOST_URL",
    );
    assert_error(
        &errors[4],
        "observers[0].actions[4].headers.Authorization",
        at(text, "'Bearer"),
        "the value after ${…} expansion is not a valid HTTP header value",
    );
    for error in &errors {
        assert_no_secret(&error.to_string());
    }
}

#[test]
fn the_scheme_of_a_url_from_the_environment_is_not_echoed() {
    // A value without `//` parses with everything before the first ':' as its "scheme"
    // (e.g. a pasted `token:rest` or `host.example.com:8443/...`), which the error then quotes.
    let errors = load_with(
        URL_ENV_FIXTURE,
        Format::Yaml,
        &[("HOOK_URL", "s3cr3t-value:rest")],
        MissingEnv::Error,
    )
    .unwrap_err()
    .errors;
    assert_eq!(errors.len(), 1, "{}", list(&errors));
    assert_error(
        &errors[0],
        "observers[0].actions[0].url_env",
        at(URL_ENV_FIXTURE, "HOOK_URL"),
        "found the value of HOOK_URL",
    );
    assert_no_secret(&errors[0].to_string());
}

// ---------------------------------------------------------------------------------------------
// Headers, templates, choices
// ---------------------------------------------------------------------------------------------

#[test]
fn header_template_and_choice_errors() {
    check_error_cases(&[
        ErrorCase::yaml(
            "reserved headers",
            webhook_fixture(
                "        headers:\n          Idempotency-Key: fixed\n          x-fraiseql-signature-256: forged\n          X-Team: billing\n",
            ),
            vec![
                (
                    "observers[0].actions[0].headers.Idempotency-Key",
                    At("Idempotency-Key"),
                    "header \"Idempotency-Key\" is set by the service and cannot be configured",
                ),
                (
                    "observers[0].actions[0].headers.x-fraiseql-signature-256",
                    At("x-fraiseql-signature-256"),
                    "header \"x-fraiseql-signature-256\" is set by the service and cannot be configured",
                ),
            ],
        ),
        ErrorCase::yaml(
            "invalid header name",
            webhook_fixture("        headers:\n          Bad Header: x\n"),
            vec![(
                "observers[0].actions[0].headers.Bad Header",
                At("Bad Header"),
                "\"Bad Header\" is not a valid HTTP header name",
            )],
        ),
        ErrorCase::yaml(
            "invalid templates name the template line",
            "\
observers:
  - name: templated
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: https://hooks.example.com/orders
        body_template: \"{\\\"order\\\": {{ entity_id }}}\\n{{ oops(\"
      - type: log
        message: '{% if %}'
",
            vec![
                (
                    "observers[0].actions[0].body_template",
                    After("body_template: "),
                    "invalid template (line 2 of the template): syntax error",
                ),
                (
                    "observers[0].actions[1].message",
                    At("'{% if %}'"),
                    "invalid template (line 1 of the template): syntax error",
                ),
            ],
        ),
        ErrorCase::yaml(
            "invalid method",
            webhook_fixture("        method: FETCH\n"),
            vec![(
                "observers[0].actions[0].method",
                At("FETCH"),
                "expected one of POST, PUT, PATCH, DELETE, GET, found \"FETCH\"",
            )],
        ),
        ErrorCase::yaml(
            "invalid method suggests the near one",
            webhook_fixture("        method: POTS\n"),
            vec![(
                "observers[0].actions[0].method",
                At("POTS"),
                "did you mean 'POST'?",
            )],
        ),
        ErrorCase::yaml(
            "invalid body format",
            webhook_fixture("        body_format: xml\n"),
            vec![(
                "observers[0].actions[0].body_format",
                At("xml"),
                "expected one of json, text, found \"xml\"",
            )],
        ),
        ErrorCase::yaml(
            "invalid log levels",
            "\
observers:
  - name: logged
    entity: Order
    events: [insert]
    actions:
      - type: log
        level: verbose
      - type: log
        level: eror
",
            vec![
                (
                    "observers[0].actions[0].level",
                    At("verbose"),
                    "expected one of trace, debug, info, warn, error, found \"verbose\"",
                ),
                (
                    "observers[0].actions[1].level",
                    At("eror"),
                    "did you mean 'error'? expected one of trace, debug, info, warn, error, found \"eror\"",
                ),
            ],
        ),
    ]);
}

#[test]
fn invalid_block_scalar_template() {
    let text = "\
observers:
  - name: templated
    entity: Order
    events: [insert]
    actions:
      - type: webhook
        url: https://hooks.example.com/orders
        body_template: |
          {
            \"order\": {{ entity_id }},
            \"total\": {{ data.total | }}
          }
";
    let error = only_error(text);
    // A block scalar's position is where its content starts.
    assert_eq!(error.path, "observers[0].actions[0].body_template");
    let position = error.position.expect("position");
    assert!(
        position == at(text, "|\n") || position == at(text, "{\n"),
        "{error}"
    );
    assert!(
        error
            .message
            .contains("invalid template (line 3 of the template)"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Whole-file problems
// ---------------------------------------------------------------------------------------------

#[test]
fn whole_file_errors() {
    let mut cases = vec![
        ErrorCase::yaml(
            "root is a list",
            "- name: a\n- name: b\n",
            vec![("", Exactly(1, 1), "expected a mapping, found a list")],
        ),
        ErrorCase::yaml(
            "root is a string",
            "just some text\n",
            vec![(
                "",
                Exactly(1, 1),
                "expected a mapping, found the string \"just some text\"",
            )],
        ),
        ErrorCase::yaml(
            "observers is a mapping",
            "observers: {name: a}\n",
            vec![(
                "observers",
                At("{"),
                "expected a list of observers, found a mapping",
            )],
        ),
        ErrorCase::yaml(
            "yaml syntax error",
            "\
observers:
  - name: a
    entity: Order: Item
",
            vec![(
                "",
                At(": Item"),
                "syntax error: mapping values are not allowed",
            )],
        ),
        ErrorCase::toml(
            "toml syntax error",
            "\
[[observers]]
name = \"a\"
entity = Order
",
            vec![(
                "",
                At("Order"),
                "syntax error: string values must be quoted",
            )],
        ),
        ErrorCase::toml(
            "toml errors have positions",
            "\
[[observers]]
name = \"toml-hook\"
events = [\"insert\"]

[[observers.actions]]
type = \"webhook\"
url = \"https://hooks.example.com/orders\"
timeout = 5
",
            vec![
                (
                    "observers[0]",
                    At("[[observers]]"),
                    "missing required key 'entity'",
                ),
                (
                    "observers[0].actions[0].timeout",
                    At("5\n"),
                    "found the bare number 5",
                ),
            ],
        ),
    ];
    let empty_files = [
        ("empty file", ""),
        ("file with only a comment", "# nothing but a comment\n"),
        ("file with only blank lines", "\n\n"),
    ];
    cases.extend(empty_files.map(|(name, fixture)| {
        ErrorCase::yaml(
            name,
            fixture,
            vec![("", Exactly(1, 1), "the file is empty")],
        )
    }));
    check_error_cases(&cases);
}

#[test]
fn empty_observers_list_is_a_warning() {
    let text = "observers: []\n";
    let config = yaml_ok(text);
    assert!(config.observers.is_empty());
    assert_eq!(config.warnings.len(), 1);
    assert_error(
        &config.warnings[0],
        "observers",
        at(text, "[]"),
        "no observers are defined",
    );
}

#[test]
fn yaml_aliases_and_multiple_documents_are_refused() {
    let error = only_error("observers: &list []\nexecutor: *list\n");
    assert!(error.message.contains("aliases"), "{error}");
    let error = only_error("observers: []\n---\nobservers: []\n");
    assert!(error.message.contains("single YAML document"), "{error}");
}

#[test]
fn toml_twin_of_the_example_loads_to_the_same_observers() {
    let vars = [("ORDERS_HOOK_SECRET", "example-secret")];
    let yaml = load_with(
        &read_manifest_file("examples/observers.yaml"),
        Format::Yaml,
        &vars,
        MissingEnv::Error,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    let toml = load_with(
        &read_manifest_file("tests/fixtures/config/observers.toml"),
        Format::Toml,
        &vars,
        MissingEnv::Error,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));

    let names = |config: &ObserversConfig| -> Vec<String> {
        config
            .observers
            .iter()
            .map(|observer| observer.name.to_string())
            .collect()
    };
    assert_eq!(
        names(&yaml),
        ["order-paid", "order-created", "user-deleted"]
    );
    assert_eq!(names(&toml), names(&yaml));
    for (from_yaml, from_toml) in yaml.observers.iter().zip(&toml.observers) {
        let name = &from_yaml.name;
        assert_eq!(from_toml.events, from_yaml.events, "{name}");
        assert_eq!(from_toml.entity, from_yaml.entity, "{name}");
        assert_eq!(from_toml.description, from_yaml.description, "{name}");
        let action_types = |observer: &ObserverDefinition| -> Vec<&'static str> {
            observer
                .actions
                .iter()
                .map(|action| action.kind.type_name())
                .collect()
        };
        assert_eq!(action_types(from_toml), action_types(from_yaml), "{name}");
        assert_eq!(from_toml.actions, from_yaml.actions, "{name}");
        assert_eq!(from_toml.retry, from_yaml.retry, "{name}");
        assert_eq!(from_toml.on_failure, from_yaml.on_failure, "{name}");
        assert_eq!(
            from_toml.condition.as_ref().map(Condition::source),
            from_yaml.condition.as_ref().map(Condition::source),
            "{name}"
        );
    }
    assert_eq!(yaml.observers[0].events, [EventKind::Update]);
    assert_eq!(yaml.observers[1].events, [EventKind::Insert]);
    assert_eq!(yaml.observers[2].events, [EventKind::Delete]);
    assert_eq!(toml.executor, yaml.executor);
    assert!(toml.warnings.is_empty(), "{}", list(&toml.warnings));

    // The same file through `load_file`, which picks TOML from the extension.
    let options = LoadOptions {
        env: &|name: &str| (name == "ORDERS_HOOK_SECRET").then(|| "example-secret".to_owned()),
        missing_env: MissingEnv::Error,
    };
    let path = manifest_path("tests/fixtures/config/observers.toml");
    let from_file = load_file(&path, &options).unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(names(&from_file), names(&yaml));
    assert_eq!(from_file.origin, path.display().to_string());
}

#[test]
fn invalid_utf8_is_located() {
    // Line 2 is `  - name: ét` then the bad byte: 12 characters (13 bytes) before it.
    let bytes = b"observers:\n  - name: \xc3\xa9t\xff\n";
    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Error,
    };
    let errors = load_bytes(bytes, Format::Yaml, ORIGIN, &options)
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 1, "{}", list(&errors));
    assert_error(
        &errors[0],
        "",
        pos(2, 13),
        "expected UTF-8 text, found an invalid byte at offset 24",
    );
}

#[test]
fn files_over_four_mebibytes_are_refused() {
    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Error,
    };
    let mut bytes = b"observers: []\n".to_vec();
    bytes.resize(MAX_CONFIG_FILE_BYTES + 1, b'\n');
    let errors = load_bytes(&bytes, Format::Yaml, ORIGIN, &options)
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 1, "{}", list(&errors));
    let error = &errors[0];
    assert_eq!(error.position, None);
    assert_eq!(error.path, "");
    assert!(
        error.message.contains(&format!(
            "the file is {} bytes; observers files are limited to {MAX_CONFIG_FILE_BYTES} bytes",
            MAX_CONFIG_FILE_BYTES + 1
        )),
        "{error}"
    );

    // Exactly at the limit is still read.
    bytes.truncate(MAX_CONFIG_FILE_BYTES);
    let config = load_bytes(&bytes, Format::Yaml, ORIGIN, &options)
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config.observers.is_empty());
}

#[test]
fn unknown_extension() {
    assert_eq!(format_for(Path::new("a/observers.yaml")), Ok(Format::Yaml));
    assert_eq!(format_for(Path::new("observers.YML")), Ok(Format::Yaml));
    assert_eq!(format_for(Path::new("observers.Toml")), Ok(Format::Toml));
    let message = format_for(Path::new("observers.json")).unwrap_err();
    assert!(
        message
            .contains("expected a file ending in .yaml, .yml or .toml, found \"observers.json\""),
        "{message}"
    );
    assert!(format_for(Path::new("observers")).is_err());

    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Warn,
    };
    // The extension is checked before the file is read: this one does not exist.
    let errors = load_file(Path::new("no/such/observers.json"), &options)
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, "no/such/observers.json");
    assert_eq!(errors[0].position, None);
    assert_eq!(errors[0].path, "");
    assert!(
        errors[0]
            .message
            .contains("expected a file ending in .yaml, .yml or .toml"),
        "{}",
        errors[0]
    );

    let errors = load_file(Path::new("no/such/observers.yaml"), &options)
        .unwrap_err()
        .errors;
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.starts_with("cannot read the file: "),
        "{}",
        errors[0]
    );
}

// ---------------------------------------------------------------------------------------------
// All errors at once
// ---------------------------------------------------------------------------------------------

#[test]
fn every_problem_is_collected_and_sorted_by_line() {
    let text = "\
observers:
  - name: first
    entity: Order
    events: [insert, updat]
    actions:
      - type: webhook
        url: ftp://files.example.com/in
  - name: second one
    entity: Order
    event_type: delete
    actions:
      - type: log
        level: loud
  - name: third
    entity: User
    events: [update]
    on_failure: retry
    actions:
      - type: webhook
        url: https://hooks.example.com/users
        timeout: 0s
        headers:
          Idempotency-Key: fixed
  - name: first
    entity: User
    events: [update]
    actions:
      - type: fax
executor:
  max_concurrent_actions: 0
";
    let errors = yaml_errors(text);
    let expected = [
        (
            "observers[0].events[1]",
            at(text, "updat]"),
            "found \"updat\"",
        ),
        (
            "observers[0].actions[0].url",
            at(text, "ftp://"),
            "(scheme \"ftp\")",
        ),
        ("observers[1].name", at(text, "second one"), "found ' '"),
        (
            "observers[1].actions[0].level",
            at(text, "loud"),
            "found \"loud\"",
        ),
        (
            "observers[2].on_failure",
            at(text, "retry"),
            "found \"retry\"",
        ),
        (
            "observers[2].actions[0].timeout",
            at(text, "0s"),
            "expected a timeout above 0",
        ),
        (
            "observers[2].actions[0].headers.Idempotency-Key",
            at(text, "Idempotency-Key"),
            "is set by the service",
        ),
        (
            "observers[3].name",
            at_nth(text, "first", 1),
            "duplicate observer name 'first' (first defined at line 2)",
        ),
        (
            "observers[3].actions[0].type",
            at(text, "fax"),
            "unknown action type \"fax\"",
        ),
        (
            "executor.max_concurrent_actions",
            after(text, "max_concurrent_actions: "),
            "expected an integer from 1 to 100000, found 0",
        ),
    ];
    assert_eq!(errors.len(), expected.len(), "{}", list(&errors));
    for (error, (path, position, message)) in errors.iter().zip(expected) {
        assert_error(error, path, position, message);
    }
    let places: Vec<(usize, usize)> = errors
        .iter()
        .map(|error| {
            let position = error.position.expect("position");
            (position.line, position.column)
        })
        .collect();
    assert!(places.is_sorted(), "{places:?}");
}

// ---------------------------------------------------------------------------------------------
// Defaults and overrides
// ---------------------------------------------------------------------------------------------

#[test]
fn defaults() {
    let text = "\
observers:
  - name: defaults
    entity: ' Order '
    events: [insert]
    actions:
      - type: webhook
        url: https://hooks.example.com/orders
      - type: log
";
    let config = yaml_ok(text);
    assert!(config.warnings.is_empty(), "{}", list(&config.warnings));
    assert_eq!(config.origin, ORIGIN);
    assert_eq!(config.executor, ExecutorSettings::default());
    assert_eq!(config.executor.max_concurrent_actions, 256);
    assert_eq!(config.executor.max_concurrent_entities, 256);
    assert_eq!(DEFAULT_MAX_CONCURRENT_ACTIONS, 256);
    assert_eq!(DEFAULT_MAX_CONCURRENT_ENTITIES, 256);

    let observer = &config.observers[0];
    assert_eq!(observer.name.as_str(), "defaults");
    assert_eq!(observer.entity, "Order");
    assert_eq!(observer.description, None);
    assert!(observer.condition.is_none());
    assert_eq!(observer.on_failure, FailurePolicy::DeadLetter);
    assert_eq!(observer.retry, RetryPolicy::default());
    assert_eq!(
        observer.retry,
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            backoff: BackoffKind::Exponential,
            jitter: true,
        }
    );
    assert_eq!(DEFAULT_MAX_ATTEMPTS, 3);
    assert_eq!(DEFAULT_INITIAL_DELAY, Duration::from_millis(100));
    assert_eq!(DEFAULT_MAX_DELAY, Duration::from_secs(30));

    assert_eq!(observer.actions.len(), 2);
    assert_eq!(observer.actions[0].index, 0);
    assert_eq!(observer.actions[0].label, None);
    assert_eq!(observer.actions[0].kind.type_name(), "webhook");
    assert_eq!(
        *webhook(observer, 0),
        WebhookAction {
            target: WebhookTarget::Literal(
                url::Url::parse("https://hooks.example.com/orders").unwrap()
            ),
            method: HttpMethod::Post,
            headers: Vec::new(),
            body_template: None,
            body_format: BodyFormat::Json,
            signing_secret: None,
            timeout: Duration::from_secs(30),
            limits: EndpointLimits::default(),
            cache_ttl: None,
            allow_private_targets: false,
        }
    );
    assert_eq!(DEFAULT_ACTION_TIMEOUT, Duration::from_secs(30));
    assert_eq!(observer.actions[0].kind.timeout(), Duration::from_secs(30));

    assert_eq!(observer.actions[1].index, 1);
    assert_eq!(observer.actions[1].kind.type_name(), "log");
    let ActionKind::Log(log) = &observer.actions[1].kind else {
        panic!("expected a log action");
    };
    assert_eq!(log.level, LogLevel::Info);
    let rendered = config
        .templates
        .render(
            &log.message_template,
            serde_json::json!({
                "observer": "defaults",
                "event_type": "INSERT",
                "entity_type": "Order",
                "entity_id": 7,
            }),
        )
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(rendered, "observer defaults matched INSERT Order 7");
}

#[test]
fn settings_override_the_defaults() {
    let text = "\
executor:
  max_concurrent_actions: 8
  max_concurrent_entities: 2
  endpoint_queue_wait: 2s
  adaptive_concurrency: false
observers:
  - name: custom
    description: Everything set.
    entity: Order
    event_type: update
    condition: 'data.total > 100'
    retry:
      max_attempts: 7
      initial_delay: 250ms
      max_delay: 1m
      backoff: fixed
      jitter: false
    on_failure: LOG
    actions:
      - type: webhook
        name: notify billing
        url: http://127.0.0.1:8080/hook
        method: put
        body_format: text
        body_template: 'order {{ entity_id }}'
        timeout: 1m 30s
      - type: log
        level: WARN
        message: 'seen {{ entity_id }}'
";
    let config = yaml_ok(text);
    assert_eq!(
        config.executor,
        ExecutorSettings {
            max_concurrent_actions: 8,
            max_concurrent_entities: 2,
            endpoint_queue_wait: std::time::Duration::from_secs(2),
            adaptive_concurrency: false,
            private_targets_allowed: Vec::new(),
        }
    );
    let observer = &config.observers[0];
    assert_eq!(observer.description.as_deref(), Some("Everything set."));
    assert_eq!(observer.events, [EventKind::Update]);
    assert_eq!(
        observer.condition.as_ref().map(Condition::source),
        Some("data.total > 100")
    );
    assert_eq!(
        observer.retry,
        RetryPolicy {
            max_attempts: 7,
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_mins(1),
            backoff: BackoffKind::Fixed,
            jitter: false,
        }
    );
    assert_eq!(observer.on_failure, FailurePolicy::Log);
    assert_eq!(observer.actions[0].label.as_deref(), Some("notify billing"));
    let action = webhook(observer, 0);
    assert_eq!(action.method, HttpMethod::Put);
    assert_eq!(action.body_format, BodyFormat::Text);
    assert_eq!(action.timeout, Duration::from_secs(90));
    let template = action.body_template.as_deref().expect("a body template");
    assert_eq!(
        config
            .templates
            .render(template, serde_json::json!({"entity_id": 42}))
            .unwrap_or_else(|error| panic!("{error}")),
        "order 42"
    );
    let ActionKind::Log(log) = &observer.actions[1].kind else {
        panic!("expected a log action");
    };
    assert_eq!(log.level, LogLevel::Warn);
}

#[test]
fn executor_setting_errors() {
    check_error_cases(&[
        ErrorCase::yaml(
            "max_concurrent_entities out of range",
            "\
executor:
  max_concurrent_entities: 100001
observers: []
",
            vec![(
                "executor.max_concurrent_entities",
                At("100001"),
                "expected an integer from 1 to 100000, found 100001",
            )],
        ),
        ErrorCase::yaml(
            "every executor problem is collected",
            "\
executor:
  max_concurrent_actions: 0
  max_concurrent_entities: many
observers: []
",
            vec![
                (
                    "executor.max_concurrent_actions",
                    After("max_concurrent_actions: "),
                    "found 0",
                ),
                (
                    "executor.max_concurrent_entities",
                    At("many"),
                    "expected an integer from 1 to 100000, found the string \"many\"",
                ),
            ],
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------------------------

#[test]
fn display_is_file_line_column_path_message() {
    let text = "\
observers:
  - name: idle
    entity: Order
    events: [insert]
    actions: []
";
    let error = only_error(text);
    assert_eq!(
        error.to_string(),
        "observers.yaml:5:14: observers[0].actions: expected at least one action"
    );

    let without_path = ConfigError {
        file: "o.yaml".into(),
        position: Some(pos(1, 1)),
        path: String::new(),
        message: "the file is empty".into(),
    };
    assert_eq!(without_path.to_string(), "o.yaml:1:1: the file is empty");
    let without_position = ConfigError {
        file: "o.json".into(),
        position: None,
        path: String::new(),
        message: "bad extension".into(),
    };
    assert_eq!(without_position.to_string(), "o.json: bad extension");

    let all = ConfigErrors {
        errors: vec![error, without_path],
    };
    assert_eq!(
        all.to_string(),
        "2 errors in observers configuration:\n  \
         observers.yaml:5:14: observers[0].actions: expected at least one action\n  \
         o.yaml:1:1: the file is empty\n"
    );
}

// ---------------------------------------------------------------------------------------------
// The shipped example
// ---------------------------------------------------------------------------------------------

#[test]
fn example_loads_when_validating_with_one_warning() {
    let path = manifest_path("examples/observers.yaml");
    let text = read_manifest_file("examples/observers.yaml");
    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Warn,
    };
    let config = load_file(&path, &options).unwrap_or_else(|errors| panic!("{errors}"));
    let names: Vec<&str> = config
        .observers
        .iter()
        .map(|observer| observer.name.as_str())
        .collect();
    assert_eq!(names, ["order-paid", "order-created", "user-deleted"]);
    assert_eq!(config.warnings.len(), 1, "{}", list(&config.warnings));
    let warning = &config.warnings[0];
    assert_eq!(warning.file, path.display().to_string());
    assert_eq!(warning.path, "observers[0].actions[0].signing_secret_env");
    assert_eq!(warning.position, Some(after(&text, "signing_secret_env: ")));
    assert_eq!(
        warning.message,
        "environment variable ORDERS_HOOK_SECRET is not set (or is empty)"
    );
    assert_eq!(
        webhook(&config.observers[0], 0).signing_secret,
        Some(Setting::MissingEnv("ORDERS_HOOK_SECRET".into()))
    );
}

#[test]
fn example_fails_when_running_without_its_secret() {
    let path = manifest_path("examples/observers.yaml");
    let text = read_manifest_file("examples/observers.yaml");
    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Error,
    };
    let errors = load_file(&path, &options).unwrap_err().errors;
    assert_eq!(errors.len(), 1, "{}", list(&errors));
    assert_eq!(errors[0].file, path.display().to_string());
    assert_eq!(errors[0].path, "observers[0].actions[0].signing_secret_env");
    assert_eq!(
        errors[0].position,
        Some(after(&text, "signing_secret_env: "))
    );
    assert!(
        errors[0].message.contains("ORDERS_HOOK_SECRET"),
        "{}",
        errors[0]
    );
}

// ---------------------------------------------------------------------------------------------
// Delivery: mode, queue, priority; the jobs section
// ---------------------------------------------------------------------------------------------

#[test]
fn actions_default_to_inline_delivery_on_the_default_queue() {
    let config = yaml_ok(
        "observers:\n  - name: a\n    entity: Order\n    events: [insert]\n    actions: [{type: log}]\n",
    );
    let delivery = &config.observers[0].actions[0].delivery;
    assert_eq!(
        delivery.mode,
        fraiseql_observers::config::DeliveryMode::Inline
    );
    assert_eq!((delivery.queue.as_str(), delivery.priority), ("default", 5));
    assert_eq!(config.jobs.workers.get("default"), Some(&2));
    assert_eq!(
        config.jobs.visibility_timeout,
        std::time::Duration::from_secs(30)
    );
}

#[test]
fn async_delivery_names_its_queue_and_priority_and_the_queue_gets_a_worker() {
    let text = "jobs: {workers: {default: 3}, visibility_timeout: 10s, retention: 1d}\nobservers:\n  - name: a\n    entity: Order\n    events: [insert]\n    actions:\n      - {type: webhook, url: 'http://127.0.0.1:9/x', mode: async, queue: slow-mail, priority: 9}\n";
    let config = yaml_ok(text);
    let delivery = &config.observers[0].actions[0].delivery;
    assert_eq!(
        delivery.mode,
        fraiseql_observers::config::DeliveryMode::Async
    );
    assert_eq!(
        (delivery.queue.as_str(), delivery.priority),
        ("slow-mail", 9)
    );
    assert_eq!(config.jobs.workers.get("default"), Some(&3));
    assert_eq!(
        config.jobs.workers.get("slow-mail"),
        Some(&1),
        "a queue an action names gets a worker"
    );
    assert_eq!(
        config.jobs.visibility_timeout,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(config.jobs.retention, std::time::Duration::from_hours(24));
}

#[test]
fn delivery_setting_errors() {
    check_error_cases(&[ErrorCase::yaml(
        "bad delivery settings are each reported",
        "jobs: {workers: {default: -1}, visibility_timeout: 10ms}\nobservers:\n  - name: a\n    entity: Order\n    events: [insert]\n    actions:\n      - {type: log, mode: later, queue: 'no spaces', priority: 11}\n",
        vec![
            (
                "jobs.workers.default",
                After("default: "),
                "expected an integer from 0 to 256",
            ),
            (
                "jobs.visibility_timeout",
                After("visibility_timeout: "),
                "expected at least 1s",
            ),
            (
                "observers[0].actions[0].mode",
                After("mode: "),
                "expected one of inline, async",
            ),
            (
                "observers[0].actions[0].queue",
                After("queue: "),
                "expected a queue name",
            ),
            (
                "observers[0].actions[0].priority",
                After("priority: "),
                "expected an integer from 0 to 10",
            ),
        ],
    )]);
}

#[test]
fn webhook_endpoint_limits_are_read_and_checked() {
    let yaml = "observers:\n  - name: o\n    entity: Order\n    events: [insert]\n    actions:\n      - {type: webhook, url: 'https://x.example/h', rate_limit: {per_second: 50, burst: 100}, max_in_flight: 4}\n      - {type: webhook, url: 'https://x.example/h', rate_limit: {per_second: 5}}\n";
    let config = yaml_ok(yaml);
    let observer = &config.observers[0];
    assert_eq!(
        webhook(observer, 0).limits,
        EndpointLimits {
            rate: Some(RateLimit {
                per_second: 50,
                burst: 100
            }),
            max_in_flight: Some(4),
        }
    );
    assert_eq!(
        webhook(observer, 1).limits.rate,
        Some(RateLimit {
            per_second: 5,
            burst: 5
        }),
        "burst defaults to the rate"
    );

    let bad = "observers:\n  - name: o\n    entity: Order\n    events: [insert]\n    actions:\n      - {type: webhook, url: 'https://x.example/h', rate_limit: {burst: 3, per_secnd: 2}, max_in_flight: 0}\n";
    let errors = list(&yaml_errors(bad));
    assert!(errors.contains("rate_limit"), "{errors}");
    assert!(
        errors.contains("max_in_flight") && errors.contains("from 1 to 10000"),
        "{errors}"
    );
}
