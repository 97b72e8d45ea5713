//! Decoding a positioned tree into the typed model, collecting every problem on the way.

use std::collections::HashMap;
use std::time::Duration;

use super::keyspace::{DEFAULT_REDIS_PREFIX, REDIS_PREFIX_ENV, ServiceKeyspace};
use super::model::{
    ActionDefinition, ActionKind, BackoffKind, BasicCredentials, BodyFormat, CacheAction,
    DEFAULT_ACTION_TIMEOUT, DatabaseAction, DatabaseParam, Delivery, DeliveryMode, EmailAction,
    EmailRecipients, EndpointLimits, ExecutorSettings, FailurePolicy, FunctionName, HeaderValue,
    HttpMethod, JobSettings, LogAction, LogLevel, Mailbox, ObserverDefinition, ObserverName,
    RateLimit, RetryPolicy, SearchAction, SearchBulk, Secret, SecretUrl, Setting, SlackAction,
    SmsAction, SmtpSecurity, SqlType, WebhookAction, WebhookTarget,
};
use super::tree::{Node, NodeValue, Position};
use super::{ConfigError, ConfigErrors, LoadOptions, MissingEnv, ObserversConfig};
use crate::condition::Condition;
use crate::domain::EventKind;
use crate::template::Templates;

/// Headers the service sets itself; a file may not override them.
const RESERVED_HEADERS: [&str; 4] = [
    "idempotency-key",
    "x-fraiseql-event-id",
    "x-fraiseql-signature-256",
    "content-length",
];
/// The keys each action type takes besides `type`, `name`, `mode`, `queue` and `priority`, in
/// the order of [`ActionKind::TYPE_NAMES`].
const ACTION_KEYS: &[(&str, &[&str])] = &[
    (
        "webhook",
        &[
            "url",
            "url_env",
            "method",
            "headers",
            "body_template",
            "body_format",
            "signing_secret",
            "signing_secret_env",
            "timeout",
            "rate_limit",
            "max_in_flight",
            "cache",
        ],
    ),
    ("log", &["level", "message"]),
    ("database", &["function", "params", "timeout"]),
    ("cache", &["keys", "patterns", "timeout"]),
    (
        "slack",
        &[
            "webhook_url",
            "webhook_url_env",
            "text",
            "blocks",
            "channel",
            "timeout",
        ],
    ),
    (
        "sms",
        &[
            "base_url",
            "account_sid",
            "account_sid_env",
            "auth_token",
            "auth_token_env",
            "to",
            "from",
            "body",
            "timeout",
        ],
    ),
    (
        "email",
        &[
            "host",
            "port",
            "security",
            "username",
            "username_env",
            "password",
            "password_env",
            "from",
            "to",
            "to_template",
            "to_list",
            "cc",
            "reply_to",
            "subject",
            "text",
            "html",
            "timeout",
        ],
    ),
    (
        "search",
        &[
            "url",
            "url_env",
            "index",
            "username",
            "username_env",
            "password",
            "password_env",
            "timeout",
            "bulk",
        ],
    ),
];
const MAX_ACTION_TIMEOUT: Duration = Duration::from_mins(10);
const MAX_ATTEMPTS_LIMIT: u32 = 100;
const DEFAULT_LOG_MESSAGE: &str =
    "observer {{ observer }} matched {{ event_type }} {{ entity_type }} {{ entity_id }}";

pub(super) fn decode(
    root: &Node,
    origin: &str,
    options: &LoadOptions<'_>,
) -> Result<ObserversConfig, ConfigErrors> {
    let mut decoder = Decoder {
        origin,
        options,
        errors: Vec::new(),
        warnings: Vec::new(),
        templates: Templates::new(),
    };
    let (observers, executor, jobs) = decoder.root(root);
    let by_place = |error: &ConfigError| {
        error
            .position
            .map(|position| (position.line, position.column))
    };
    decoder.errors.sort_by_key(by_place);
    decoder.warnings.sort_by_key(by_place);
    if !decoder.errors.is_empty() {
        return Err(ConfigErrors {
            errors: decoder.errors,
        });
    }
    Ok(ObserversConfig {
        origin: origin.to_owned(),
        observers,
        executor,
        jobs,
        templates: decoder.templates,
        warnings: decoder.warnings,
    })
}

struct Decoder<'load> {
    origin: &'load str,
    options: &'load LoadOptions<'load>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    templates: Templates,
}

/// The entries of a mapping whose keys were checked against the allowed set.
struct Fields<'node> {
    position: Position,
    entries: Vec<(&'node str, &'node Node)>,
}

impl<'node> Fields<'node> {
    fn get(&self, key: &str) -> Option<&'node Node> {
        self.entries
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, node)| *node)
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (left_index, left_char) in left.chars().enumerate() {
        let mut current = vec![left_index + 1];
        for (right_index, right_char) in right.iter().enumerate() {
            let substitution = previous[right_index] + usize::from(left_char != *right_char);
            current.push(
                substitution
                    .min(previous[right_index + 1] + 1)
                    .min(current[right_index] + 1),
            );
        }
        previous = current;
    }
    previous[right.len()]
}

fn did_you_mean(found: &str, allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|candidate| {
            (
                edit_distance(&found.to_ascii_lowercase(), &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!("did you mean '{candidate}'? "))
        .unwrap_or_default()
}

/// Result of expanding `${VAR}` references in a string.
struct Expanded {
    text: String,
    variables: Vec<String>,
    missing: Vec<String>,
}

impl Decoder<'_> {
    fn error(&mut self, position: Position, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.origin.to_owned(),
            position: Some(position),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn warning(&mut self, position: Position, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.origin.to_owned(),
            position: Some(position),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn expected(&mut self, node: &Node, path: &str, what: &str) {
        let found = match &node.value {
            NodeValue::String(text) if text.chars().count() <= 60 => format!("the string {text:?}"),
            NodeValue::Integer(number) => format!("the integer {number}"),
            NodeValue::Bool(flag) => format!("the boolean {flag}"),
            other => other.kind_name().to_owned(),
        };
        self.error(
            node.position,
            path,
            format!("expected {what}, found {found}"),
        );
    }

    fn fields<'node>(
        &mut self,
        node: &'node Node,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'node>> {
        let NodeValue::Map(entries) = &node.value else {
            self.expected(node, path, "a mapping");
            return None;
        };
        let mut fields = Fields {
            position: node.position,
            entries: Vec::with_capacity(entries.len()),
        };
        for (key, value) in entries {
            let NodeValue::String(name) = &key.value else {
                self.expected(key, path, "a text key");
                continue;
            };
            if !allowed.contains(&name.as_str()) {
                let hint = did_you_mean(name, allowed);
                self.error(
                    key.position,
                    &child(path, name),
                    format!(
                        "unknown key '{name}'; {hint}expected one of: {}",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            if fields.get(name).is_some() {
                self.error(
                    key.position,
                    &child(path, name),
                    format!("duplicate key '{name}'"),
                );
                continue;
            }
            fields.entries.push((name.as_str(), value));
        }
        Some(fields)
    }

    fn required<'node>(
        &mut self,
        fields: &Fields<'node>,
        key: &str,
        path: &str,
        what: &str,
    ) -> Option<&'node Node> {
        let found = fields.get(key);
        if found.is_none() {
            self.error(
                fields.position,
                path,
                format!("missing required key '{key}' ({what})"),
            );
        }
        found
    }

    fn string<'node>(&mut self, node: &'node Node, path: &str) -> Option<&'node str> {
        if let NodeValue::String(text) = &node.value {
            Some(text)
        } else {
            self.expected(node, path, "a string");
            None
        }
    }

    fn non_empty_string<'node>(&mut self, node: &'node Node, path: &str) -> Option<&'node str> {
        let text = self.string(node, path)?;
        if text.trim().is_empty() {
            self.error(node.position, path, "expected a non-empty string");
            return None;
        }
        Some(text)
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        if let NodeValue::Bool(flag) = node.value {
            Some(flag)
        } else {
            self.expected(node, path, "true or false");
            None
        }
    }

    fn integer_in(&mut self, node: &Node, path: &str, minimum: i64, maximum: i64) -> Option<i64> {
        let NodeValue::Integer(number) = node.value else {
            self.expected(
                node,
                path,
                &format!("an integer from {minimum} to {maximum}"),
            );
            return None;
        };
        if !(minimum..=maximum).contains(&number) {
            self.error(
                node.position,
                path,
                format!("expected an integer from {minimum} to {maximum}, found {number}"),
            );
            return None;
        }
        Some(number)
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let text = match &node.value {
            NodeValue::String(text) => text,
            NodeValue::Integer(number) => {
                self.error(
                    node.position,
                    path,
                    format!("expected a duration with a unit such as \"5s\" or \"250ms\", found the bare number {number}"),
                );
                return None;
            }
            _ => {
                self.expected(node, path, "a duration such as \"5s\" or \"250ms\"");
                return None;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.error(
                    node.position,
                    path,
                    format!("expected a duration such as \"5s\", \"250ms\" or \"1m 30s\", found {text:?} ({error})"),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, node: &Node, path: &str, choices: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expectation = format!("one of {}", names.join(", "));
        let NodeValue::String(text) = &node.value else {
            self.expected(node, path, &expectation);
            return None;
        };
        let found = choices
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(text))
            .map(|(_, value)| *value);
        if found.is_none() {
            let hint = did_you_mean(&text.to_ascii_lowercase(), &names);
            self.error(
                node.position,
                path,
                format!("{hint}expected {expectation}, found {text:?}"),
            );
        }
        found
    }

    /// Expands `${VAR}` references; `$${` stands for a literal `${`.
    fn expand(&mut self, text: &str, position: Position, path: &str) -> Option<Expanded> {
        let mut expanded = Expanded {
            text: String::with_capacity(text.len()),
            variables: Vec::new(),
            missing: Vec::new(),
        };
        let mut rest = text;
        while let Some(start) = rest.find('$') {
            expanded.text.push_str(&rest[..start]);
            let after = &rest[start..];
            if let Some(stripped) = after.strip_prefix("$${") {
                expanded.text.push_str("${");
                rest = stripped;
            } else if let Some(reference) = after.strip_prefix("${") {
                let Some(end) = reference.find('}') else {
                    self.error(
                        position,
                        path,
                        "unterminated '${' (write '$${' for a literal '${')",
                    );
                    return None;
                };
                let variable = &reference[..end];
                let valid_name = variable
                    .chars()
                    .next()
                    .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
                    && variable
                        .chars()
                        .all(|character| character.is_ascii_alphanumeric() || character == '_');
                if !valid_name {
                    self.error(position, path, format!("expected an environment variable name inside '${{…}}', found {variable:?}"));
                    return None;
                }
                match (self.options.env)(variable).filter(|value| !value.is_empty()) {
                    Some(value) => expanded.text.push_str(&value),
                    None => expanded.missing.push(variable.to_owned()),
                }
                expanded.variables.push(variable.to_owned());
                rest = &reference[end + 1..];
            } else {
                expanded.text.push('$');
                rest = &after[1..];
            }
        }
        expanded.text.push_str(rest);
        Some(expanded)
    }

    fn report_missing_env(&mut self, variables: &[String], position: Position, path: &str) {
        for variable in variables {
            let message = format!("environment variable {variable} is not set (or is empty)");
            match self.options.missing_env {
                MissingEnv::Error => self.error(position, path, message),
                MissingEnv::Warn => self.warning(position, path, message),
            }
        }
    }

    /// Reads a secret from `key` (a string that may hold `${VAR}`) or `key_env` (a variable name).
    fn secret(&mut self, fields: &Fields<'_>, key: &str, path: &str) -> Option<Setting<Secret>> {
        let env_key = format!("{key}_env");
        match (fields.get(key), fields.get(&env_key)) {
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, key),
                    format!("set either '{key}' or '{env_key}', not both"),
                );
                None
            }
            (Some(node), None) => {
                let key_path = child(path, key);
                let text = self.non_empty_string(node, &key_path)?;
                let expanded = self.expand(text, node.position, &key_path)?;
                if expanded.variables.is_empty() {
                    self.warning(
                        node.position,
                        &key_path,
                        format!("the secret is written in the file in clear; prefer '{env_key}'"),
                    );
                }
                if expanded.missing.is_empty() {
                    Some(Setting::Ready(Secret::new(expanded.text)))
                } else {
                    self.report_missing_env(&expanded.missing, node.position, &key_path);
                    Some(Setting::MissingEnv(expanded.missing.join(", ")))
                }
            }
            (None, Some(node)) => {
                let key_path = child(path, &env_key);
                let variable = self.non_empty_string(node, &key_path)?;
                Some(
                    self.env_variable(variable, node.position, &key_path)
                        .map_or_else(
                            || Setting::MissingEnv(variable.to_owned()),
                            |value| Setting::Ready(Secret::new(value)),
                        ),
                )
            }
            (None, None) => None,
        }
    }

    fn env_variable(&mut self, variable: &str, position: Position, path: &str) -> Option<String> {
        let value = (self.options.env)(variable).filter(|value| !value.is_empty());
        if value.is_none() {
            self.report_missing_env(&[variable.to_owned()], position, path);
        }
        value
    }

    fn template(
        &mut self,
        name: String,
        source: &str,
        position: Position,
        path: &str,
    ) -> Option<String> {
        match self.templates.add(name.clone(), source.to_owned()) {
            Ok(()) => Some(name),
            Err(error) => {
                let line = error
                    .line
                    .map(|line| format!(" (line {line} of the template)"))
                    .unwrap_or_default();
                self.error(
                    position,
                    path,
                    format!("invalid template{line}: {}", error.message),
                );
                None
            }
        }
    }

    fn root(&mut self, root: &Node) -> (Vec<ObserverDefinition>, ExecutorSettings, JobSettings) {
        let empty_map = matches!(&root.value, NodeValue::Map(entries) if entries.is_empty());
        if root.value == NodeValue::Null || empty_map {
            self.error(
                root.position,
                "",
                "the file is empty; expected a mapping with an 'observers' list",
            );
            return (
                Vec::new(),
                ExecutorSettings::default(),
                JobSettings::default(),
            );
        }
        let Some(fields) = self.fields(root, "", &["observers", "executor", "jobs"]) else {
            return (
                Vec::new(),
                ExecutorSettings::default(),
                JobSettings::default(),
            );
        };
        let executor = fields
            .get("executor")
            .and_then(|node| self.executor(node, "executor"))
            .unwrap_or_default();
        let mut jobs = fields
            .get("jobs")
            .and_then(|node| self.jobs(node, "jobs"))
            .unwrap_or_default();
        let Some(list_node) = self.required(&fields, "observers", "", "a list of observers") else {
            return (Vec::new(), executor, jobs);
        };
        let NodeValue::List(items) = &list_node.value else {
            self.expected(list_node, "observers", "a list of observers");
            return (Vec::new(), executor, jobs);
        };
        if items.is_empty() {
            self.warning(
                list_node.position,
                "observers",
                "no observers are defined; nothing will be done",
            );
        }
        let mut first_seen: HashMap<String, Position> = HashMap::new();
        let mut observers = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let path = format!("observers[{index}]");
            if let Some((name, position)) = declared_name(item) {
                if let Some(first) = first_seen.get(name) {
                    self.error(
                        position,
                        &child(&path, "name"),
                        format!(
                            "duplicate observer name '{name}' (first defined at line {})",
                            first.line
                        ),
                    );
                } else {
                    first_seen.insert(name.to_owned(), position);
                }
            }
            if let Some(observer) = self.observer(item, &path) {
                observers.push(observer);
            }
        }
        let cache_action = observers
            .iter()
            .flat_map(|observer| &observer.actions)
            .any(|action| matches!(action.kind, ActionKind::Cache(_)));
        if cache_action && (self.options.env)("REDIS_URL").is_none_or(|url| url.is_empty()) {
            // A warning either way: `run --redis-url` can provide it without the variable.
            self.warning(
                list_node.position,
                "observers",
                "cache actions remove keys through the node's Redis: REDIS_URL is not set here, so run the node with REDIS_URL or --redis-url",
            );
        }
        for action in observers.iter().flat_map(|observer| &observer.actions) {
            jobs.workers
                .entry(action.delivery.queue.clone())
                .or_insert(1);
        }
        (observers, executor, jobs)
    }

    fn jobs(&mut self, node: &Node, path: &str) -> Option<JobSettings> {
        let fields = self.fields(node, path, &["workers", "visibility_timeout", "retention"])?;
        let mut settings = JobSettings::default();
        let mut valid = true;
        if let Some(workers) = fields.get("workers") {
            let workers_path = child(path, "workers");
            let NodeValue::Map(entries) = &workers.value else {
                self.expected(
                    workers,
                    &workers_path,
                    "a mapping of queue names to worker counts",
                );
                return None;
            };
            for (key, value) in entries {
                let Some(queue) = self.non_empty_string(key, &workers_path) else {
                    valid = false;
                    continue;
                };
                match self
                    .integer_in(value, &child(&workers_path, queue), 0, 256)
                    .and_then(|count| usize::try_from(count).ok())
                {
                    Some(count) => {
                        settings.workers.insert(queue.to_owned(), count);
                    }
                    None => valid = false,
                }
            }
        }
        for (key, slot) in [
            ("visibility_timeout", &mut settings.visibility_timeout),
            ("retention", &mut settings.retention),
        ] {
            if let Some(value) = fields.get(key) {
                match self.duration(value, &child(path, key)) {
                    Some(duration) if duration >= std::time::Duration::from_secs(1) => {
                        *slot = duration;
                    }
                    Some(_) => {
                        self.error(value.position, &child(path, key), "expected at least 1s");
                        valid = false;
                    }
                    None => valid = false,
                }
            }
        }
        valid.then_some(settings)
    }

    fn executor(&mut self, node: &Node, path: &str) -> Option<ExecutorSettings> {
        let fields = self.fields(
            node,
            path,
            &[
                "max_concurrent_actions",
                "max_concurrent_entities",
                "endpoint_queue_wait",
                "adaptive_concurrency",
            ],
        )?;
        let mut settings = ExecutorSettings::default();
        let mut valid = true;
        if let Some(value) = fields.get("endpoint_queue_wait") {
            match self.duration(value, &child(path, "endpoint_queue_wait")) {
                Some(wait) => settings.endpoint_queue_wait = wait,
                None => valid = false,
            }
        }
        if let Some(value) = fields.get("adaptive_concurrency") {
            match self.boolean(value, &child(path, "adaptive_concurrency")) {
                Some(adaptive) => settings.adaptive_concurrency = adaptive,
                None => valid = false,
            }
        }
        for (key, slot) in [
            (
                "max_concurrent_actions",
                &mut settings.max_concurrent_actions,
            ),
            (
                "max_concurrent_entities",
                &mut settings.max_concurrent_entities,
            ),
        ] {
            if let Some(value) = fields.get(key) {
                match self
                    .integer_in(value, &child(path, key), 1, 100_000)
                    .and_then(|value| usize::try_from(value).ok())
                {
                    Some(value) => *slot = value,
                    None => valid = false,
                }
            }
        }
        valid.then_some(settings)
    }

    fn events(&mut self, fields: &Fields<'_>, path: &str) -> Option<Vec<EventKind>> {
        let kinds = ["insert", "update", "delete", "custom"];
        let parse_one = |decoder: &mut Self, node: &Node, path: &str| -> Option<EventKind> {
            let text = decoder.string(node, path)?;
            match EventKind::parse(text) {
                Ok(kind) => Some(kind),
                Err(found) => {
                    let hint = did_you_mean(&found.to_ascii_lowercase(), &kinds);
                    decoder.error(
                        node.position,
                        path,
                        format!(
                            "{hint}expected one of insert, update, delete, custom, found {found:?}"
                        ),
                    );
                    None
                }
            }
        };
        match (fields.get("events"), fields.get("event_type")) {
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, "events"),
                    "set either 'events' or 'event_type', not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    fields.position,
                    path,
                    "missing required key 'events' (e.g. [insert, update]) or 'event_type'",
                );
                None
            }
            (None, Some(node)) => {
                parse_one(self, node, &child(path, "event_type")).map(|kind| vec![kind])
            }
            (Some(node), None) => {
                let events_path = child(path, "events");
                let items: Vec<&Node> = match &node.value {
                    NodeValue::List(items) => items.iter().collect(),
                    NodeValue::String(_) => vec![node],
                    _ => {
                        self.expected(
                            node,
                            &events_path,
                            "a list of event kinds such as [insert, update]",
                        );
                        return None;
                    }
                };
                if items.is_empty() {
                    self.error(
                        node.position,
                        &events_path,
                        "expected at least one event kind",
                    );
                    return None;
                }
                let mut kinds_found = Vec::with_capacity(items.len());
                let mut all_valid = true;
                for (index, item) in items.into_iter().enumerate() {
                    match parse_one(self, item, &format!("{events_path}[{index}]")) {
                        Some(kind) if !kinds_found.contains(&kind) => kinds_found.push(kind),
                        Some(_) => {}
                        None => all_valid = false,
                    }
                }
                all_valid.then_some(kinds_found)
            }
        }
    }

    fn observer(&mut self, node: &Node, path: &str) -> Option<ObserverDefinition> {
        let fields = self.fields(
            node,
            path,
            &[
                "name",
                "description",
                "entity",
                "events",
                "event_type",
                "condition",
                "actions",
                "retry",
                "on_failure",
            ],
        )?;
        let name = self
            .required(&fields, "name", path, "a unique observer name")
            .and_then(|node| {
                let name_path = child(path, "name");
                let text = self.string(node, &name_path)?;
                ObserverName::parse(text)
                    .map_err(|message| self.error(node.position, &name_path, message))
                    .ok()
            });
        let description = fields
            .get("description")
            .and_then(|node| self.string(node, &child(path, "description")))
            .map(str::to_owned);
        let entity = self
            .required(
                &fields,
                "entity",
                path,
                "the entity type it watches, e.g. Order",
            )
            .and_then(|node| self.non_empty_string(node, &child(path, "entity")))
            .map(|text| text.trim().to_owned());
        let events = self.events(&fields, path);
        let condition = match fields.get("condition") {
            None => Some(None),
            Some(node) => self.condition(node, &child(path, "condition")).map(Some),
        };
        let actions = self.actions(&fields, path);
        let retry = match fields.get("retry") {
            None => Some(RetryPolicy::default()),
            Some(node) => self.retry(node, &child(path, "retry")),
        };
        let on_failure = match fields.get("on_failure") {
            None => Some(FailurePolicy::DeadLetter),
            Some(node) => self.choice(
                node,
                &child(path, "on_failure"),
                &[
                    ("dlq", FailurePolicy::DeadLetter),
                    ("log", FailurePolicy::Log),
                ],
            ),
        };
        Some(ObserverDefinition {
            name: name?,
            description,
            entity: entity?,
            events: events?,
            condition: condition?,
            actions: actions?,
            retry: retry?,
            on_failure: on_failure?,
        })
    }

    fn condition(&mut self, node: &Node, path: &str) -> Option<Condition> {
        let source = self.non_empty_string(node, path)?;
        match Condition::parse(source) {
            Ok(condition) => Some(condition),
            Err(error) => {
                self.error(
                    node.position,
                    path,
                    format!(
                        "invalid condition: {error}\n{}",
                        indent(&error.caret(), "      ")
                    ),
                );
                None
            }
        }
    }

    fn retry(&mut self, node: &Node, path: &str) -> Option<RetryPolicy> {
        let fields = self.fields(
            node,
            path,
            &[
                "max_attempts",
                "initial_delay",
                "max_delay",
                "backoff",
                "jitter",
            ],
        )?;
        let mut policy = RetryPolicy::default();
        let mut valid = true;
        if let Some(value) = fields.get("max_attempts") {
            match self.integer_in(
                value,
                &child(path, "max_attempts"),
                1,
                i64::from(MAX_ATTEMPTS_LIMIT),
            ) {
                Some(count) => policy.max_attempts = u32::try_from(count).unwrap_or(1),
                None => valid = false,
            }
        }
        for (key, slot) in [
            ("initial_delay", &mut policy.initial_delay),
            ("max_delay", &mut policy.max_delay),
        ] {
            if let Some(value) = fields.get(key) {
                match self.duration(value, &child(path, key)) {
                    Some(duration) => *slot = duration,
                    None => valid = false,
                }
            }
        }
        if let Some(value) = fields.get("backoff") {
            match self.choice(
                value,
                &child(path, "backoff"),
                &[
                    ("exponential", BackoffKind::Exponential),
                    ("fixed", BackoffKind::Fixed),
                ],
            ) {
                Some(kind) => policy.backoff = kind,
                None => valid = false,
            }
        }
        if let Some(value) = fields.get("jitter") {
            match self.boolean(value, &child(path, "jitter")) {
                Some(flag) => policy.jitter = flag,
                None => valid = false,
            }
        }
        if valid && policy.initial_delay > policy.max_delay {
            self.error(
                fields.position,
                path,
                format!(
                    "initial_delay ({}) is longer than max_delay ({})",
                    humantime::format_duration(policy.initial_delay),
                    humantime::format_duration(policy.max_delay)
                ),
            );
            valid = false;
        }
        valid.then_some(policy)
    }

    fn actions(&mut self, fields: &Fields<'_>, path: &str) -> Option<Vec<ActionDefinition>> {
        let node = self.required(fields, "actions", path, "a list of actions")?;
        let actions_path = child(path, "actions");
        let NodeValue::List(items) = &node.value else {
            self.expected(node, &actions_path, "a list of actions");
            return None;
        };
        if items.is_empty() {
            self.error(node.position, &actions_path, "expected at least one action");
            return None;
        }
        let mut actions = Vec::with_capacity(items.len());
        let mut all_valid = true;
        for (index, item) in items.iter().enumerate() {
            match self.action(item, &format!("{actions_path}[{index}]"), index) {
                Some(action) => actions.push(action),
                None => all_valid = false,
            }
        }
        all_valid.then_some(actions)
    }

    fn action(&mut self, node: &Node, path: &str, index: usize) -> Option<ActionDefinition> {
        const TYPES: &[&str] = ActionKind::TYPE_NAMES;
        let NodeValue::Map(entries) = &node.value else {
            self.expected(node, path, "an action mapping with a 'type'");
            return None;
        };
        let type_node = entries.iter().find_map(|(key, value)| {
            matches!(&key.value, NodeValue::String(name) if name == "type").then_some(value)
        });
        let Some(type_node) = type_node else {
            self.error(
                node.position,
                path,
                format!("missing required key 'type' (one of: {})", TYPES.join(", ")),
            );
            return None;
        };
        let type_path = child(path, "type");
        let type_name = self.string(type_node, &type_path)?;
        let Some((_, own_keys)) = ACTION_KEYS.iter().find(|(name, _)| *name == type_name) else {
            let hint = did_you_mean(type_name, TYPES);
            self.error(
                type_node.position,
                &type_path,
                format!(
                    "unknown action type {type_name:?}; {hint}expected one of: {}",
                    TYPES.join(", ")
                ),
            );
            return None;
        };
        let allowed: Vec<&str> = ["type", "name"]
            .into_iter()
            .chain(own_keys.iter().copied())
            .chain(["mode", "queue", "priority"])
            .collect();
        let fields = self.fields(node, path, &allowed)?;
        let label = self.label(&fields, path);
        let kind = match type_name {
            "webhook" => self.webhook(&fields, path).map(ActionKind::Webhook),
            "log" => self.log(&fields, path).map(ActionKind::Log),
            "database" => self.database(&fields, path).map(ActionKind::Database),
            "cache" => self.cache(&fields, path).map(ActionKind::Cache),
            "slack" => self.slack(&fields, path).map(ActionKind::Slack),
            "sms" => self.sms(&fields, path).map(ActionKind::Sms),
            "email" => self.email(&fields, path).map(ActionKind::Email),
            "search" => self.search(&fields, path).map(ActionKind::Search),
            other => {
                self.error(
                    type_node.position,
                    &type_path,
                    format!("action type {other:?} has no decoder (a defect)"),
                );
                None
            }
        };
        let default_mode = kind
            .as_ref()
            .map_or(DeliveryMode::Inline, ActionKind::default_delivery_mode);
        let delivery = self.delivery(node, path, default_mode);
        Some(ActionDefinition {
            index,
            label,
            kind: kind?,
            delivery: delivery?,
        })
    }

    /// `mode`, `queue`, `priority` of an action (keys already checked against the allowed set).
    fn delivery(
        &mut self,
        node: &Node,
        path: &str,
        default_mode: DeliveryMode,
    ) -> Option<Delivery> {
        let NodeValue::Map(entries) = &node.value else {
            return None;
        };
        let get = |name: &str| {
            entries
                .iter()
                .find(|(key, _)| matches!(&key.value, NodeValue::String(text) if text == name))
                .map(|(_, value)| value)
        };
        let mut delivery = Delivery {
            mode: default_mode,
            ..Delivery::default()
        };
        let mut valid = true;
        if let Some(value) = get("mode") {
            match self.choice(
                value,
                &child(path, "mode"),
                &[
                    ("inline", DeliveryMode::Inline),
                    ("async", DeliveryMode::Async),
                ],
            ) {
                Some(mode) => delivery.mode = mode,
                None => valid = false,
            }
        }
        if let Some(value) = get("queue") {
            let queue_path = child(path, "queue");
            match self.non_empty_string(value, &queue_path) {
                Some(queue)
                    if queue.len() <= 64
                        && queue.chars().all(|character| {
                            character.is_ascii_alphanumeric() || "_-.".contains(character)
                        }) =>
                {
                    queue.clone_into(&mut delivery.queue);
                }
                Some(queue) => {
                    self.error(value.position, &queue_path, format!("expected a queue name of at most 64 letters, digits, '_', '-', '.', found {queue:?}"));
                    valid = false;
                }
                None => valid = false,
            }
        }
        if let Some(value) = get("priority") {
            match self
                .integer_in(value, &child(path, "priority"), 0, 10)
                .and_then(|priority| i16::try_from(priority).ok())
            {
                Some(priority) => delivery.priority = priority,
                None => valid = false,
            }
        }
        valid.then_some(delivery)
    }

    fn label(&mut self, fields: &Fields<'_>, path: &str) -> Option<String> {
        fields
            .get("name")
            .and_then(|node| self.non_empty_string(node, &child(path, "name")))
            .map(str::to_owned)
    }

    fn webhook(&mut self, fields: &Fields<'_>, path: &str) -> Option<WebhookAction> {
        let target = self.webhook_target(fields, path);
        let method = match fields.get("method") {
            None => Some(HttpMethod::Post),
            Some(node) => self.choice(
                node,
                &child(path, "method"),
                &[
                    ("POST", HttpMethod::Post),
                    ("PUT", HttpMethod::Put),
                    ("PATCH", HttpMethod::Patch),
                    ("DELETE", HttpMethod::Delete),
                    ("GET", HttpMethod::Get),
                ],
            ),
        };
        let headers = match fields.get("headers") {
            None => Some(Vec::new()),
            Some(node) => self.headers(node, &child(path, "headers")),
        };
        let body_format = match fields.get("body_format") {
            None => Some(BodyFormat::Json),
            Some(node) => self.choice(
                node,
                &child(path, "body_format"),
                &[("json", BodyFormat::Json), ("text", BodyFormat::Text)],
            ),
        };
        let body_template = match (fields.get("body_template"), body_format) {
            (None, _) => Some(None),
            (Some(node), Some(format)) => {
                let template_path = child(path, "body_template");
                self.string(node, &template_path).and_then(|source| {
                    let suffix = if format == BodyFormat::Json {
                        "json"
                    } else {
                        "txt"
                    };
                    self.template(
                        format!("{template_path}.{suffix}"),
                        source,
                        node.position,
                        &template_path,
                    )
                    .map(Some)
                })
            }
            (Some(_), None) => None,
        };
        let signing_secret = self.secret(fields, "signing_secret", path);
        let signing_valid = fields.get("signing_secret").is_none()
            && fields.get("signing_secret_env").is_none()
            || signing_secret.is_some();
        let timeout = match fields.get("timeout") {
            None => Some(DEFAULT_ACTION_TIMEOUT),
            Some(node) => self.timeout(node, &child(path, "timeout")),
        };
        let rate = match fields.get("rate_limit") {
            None => Some(None),
            Some(node) => self.rate_limit(node, &child(path, "rate_limit")).map(Some),
        };
        let max_in_flight = match fields.get("max_in_flight") {
            None => Some(None),
            Some(node) => self
                .integer_in(node, &child(path, "max_in_flight"), 1, 10_000)
                .and_then(|limit| u32::try_from(limit).ok())
                .map(Some),
        };
        let cache_ttl = match fields.get("cache") {
            None => Some(None),
            Some(node) => self.cache_ttl(node, &child(path, "cache")).map(Some),
        };
        if !signing_valid {
            return None;
        }
        Some(WebhookAction {
            target: target?,
            method: method?,
            headers: headers?,
            body_template: body_template?,
            body_format: body_format?,
            signing_secret,
            timeout: timeout?,
            limits: EndpointLimits {
                rate: rate?,
                max_in_flight: max_in_flight?,
            },
            cache_ttl: cache_ttl?,
        })
    }

    /// `cache: {ttl: 30s}`.
    fn cache_ttl(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let fields = self.fields(node, path, &["ttl"])?;
        let Some(ttl) = fields.get("ttl") else {
            self.error(node.position, path, "'ttl' is required");
            return None;
        };
        let ttl_path = child(path, "ttl");
        let duration = self.duration(ttl, &ttl_path)?;
        if duration.is_zero() {
            self.error(ttl.position, &ttl_path, "expected a time to live above 0");
            return None;
        }
        Some(duration)
    }

    /// `rate_limit: {per_second: N, burst: M}` (burst defaults to N).
    fn rate_limit(&mut self, node: &Node, path: &str) -> Option<RateLimit> {
        let fields = self.fields(node, path, &["per_second", "burst"])?;
        let Some(per_second_node) = fields.get("per_second") else {
            self.error(node.position, path, "'per_second' is required");
            return None;
        };
        let per_second = self
            .integer_in(per_second_node, &child(path, "per_second"), 1, 100_000)
            .and_then(|rate| u32::try_from(rate).ok())?;
        let burst = match fields.get("burst") {
            None => per_second,
            Some(burst) => self
                .integer_in(burst, &child(path, "burst"), 1, 1_000_000)
                .and_then(|burst| u32::try_from(burst).ok())?,
        };
        Some(RateLimit { per_second, burst })
    }

    fn timeout(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let duration = self.duration(node, path)?;
        if duration.is_zero() || duration > MAX_ACTION_TIMEOUT {
            self.error(
                node.position,
                path,
                format!(
                    "expected a timeout above 0 and at most {}, found {}",
                    humantime::format_duration(MAX_ACTION_TIMEOUT),
                    humantime::format_duration(duration)
                ),
            );
            return None;
        }
        Some(duration)
    }

    fn webhook_target(&mut self, fields: &Fields<'_>, path: &str) -> Option<WebhookTarget> {
        self.url_target(fields, path, "url")
    }

    /// An http(s) URL from `key` (literal, or with `${VAR}`) or `<key>_env` (a variable name).
    fn url_target(&mut self, fields: &Fields<'_>, path: &str, key: &str) -> Option<WebhookTarget> {
        let env_key = format!("{key}_env");
        match (fields.get(key), fields.get(&env_key)) {
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, key),
                    format!("set either '{key}' or '{env_key}', not both"),
                );
                None
            }
            (None, None) => {
                self.error(
                    fields.position,
                    path,
                    format!("missing required key '{key}' (or '{env_key}')"),
                );
                None
            }
            (Some(node), None) => {
                let url_path = child(path, key);
                let text = self.non_empty_string(node, &url_path)?;
                let expanded = self.expand(text.trim(), node.position, &url_path)?;
                if expanded.variables.is_empty() {
                    return self
                        .http_url(&expanded.text, node.position, &url_path, None)
                        .map(WebhookTarget::Literal);
                }
                let variable = expanded.variables.join(", ");
                if !expanded.missing.is_empty() {
                    self.report_missing_env(&expanded.missing, node.position, &url_path);
                    return Some(WebhookTarget::FromEnv {
                        url: Setting::MissingEnv(expanded.missing.join(", ")),
                        variable,
                    });
                }
                let url =
                    self.http_url(&expanded.text, node.position, &url_path, Some(&variable))?;
                Some(WebhookTarget::FromEnv {
                    variable,
                    url: Setting::Ready(SecretUrl(url)),
                })
            }
            (None, Some(node)) => {
                let env_path = child(path, &env_key);
                let variable = self.non_empty_string(node, &env_path)?.to_owned();
                let Some(value) = self.env_variable(&variable, node.position, &env_path) else {
                    return Some(WebhookTarget::FromEnv {
                        url: Setting::MissingEnv(variable.clone()),
                        variable,
                    });
                };
                let url = self.http_url(value.trim(), node.position, &env_path, Some(&variable))?;
                Some(WebhookTarget::FromEnv {
                    variable,
                    url: Setting::Ready(SecretUrl(url)),
                })
            }
        }
    }

    /// Parses an absolute http(s) URL; `secret_source` names the variable it came from, so the
    /// value itself is never echoed.
    fn http_url(
        &mut self,
        text: &str,
        position: Position,
        path: &str,
        secret_source: Option<&str>,
    ) -> Option<url::Url> {
        let shown = secret_source.map_or_else(
            || format!("{text:?}"),
            |variable| format!("the value of {variable}"),
        );
        match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(url)
            }
            Ok(url) => {
                let scheme = if secret_source.is_some() {
                    String::new()
                } else {
                    format!(" (scheme {:?})", url.scheme())
                };
                self.error(
                    position,
                    path,
                    format!(
                        "expected an http:// or https:// URL with a host, found {shown}{scheme}"
                    ),
                );
                None
            }
            Err(error) => {
                self.error(
                    position,
                    path,
                    format!(
                        "expected an absolute http:// or https:// URL, found {shown} ({error})"
                    ),
                );
                None
            }
        }
    }

    fn headers(&mut self, node: &Node, path: &str) -> Option<Vec<(String, HeaderValue)>> {
        let NodeValue::Map(entries) = &node.value else {
            self.expected(node, path, "a mapping of header names to values");
            return None;
        };
        let mut headers = Vec::with_capacity(entries.len());
        let mut all_valid = true;
        for (key, value) in entries {
            let Some(name) = self.string(key, path) else {
                all_valid = false;
                continue;
            };
            let header_path = child(path, name);
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.error(
                    key.position,
                    &header_path,
                    format!("{name:?} is not a valid HTTP header name"),
                );
                all_valid = false;
                continue;
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.error(
                    key.position,
                    &header_path,
                    format!("header {name:?} is set by the service and cannot be configured"),
                );
                all_valid = false;
                continue;
            }
            let raw = match &value.value {
                NodeValue::String(text) => text.clone(),
                NodeValue::Integer(number) => number.to_string(),
                NodeValue::Bool(flag) => flag.to_string(),
                _ => {
                    self.expected(value, &header_path, "a header value string");
                    all_valid = false;
                    continue;
                }
            };
            let Some(expanded) = self.expand(&raw, value.position, &header_path) else {
                all_valid = false;
                continue;
            };
            if !expanded.missing.is_empty() {
                self.report_missing_env(&expanded.missing, value.position, &header_path);
                headers.push((
                    name.to_owned(),
                    HeaderValue::Secret(Setting::MissingEnv(expanded.missing.join(", "))),
                ));
                continue;
            }
            if reqwest::header::HeaderValue::from_str(&expanded.text).is_err() {
                let shown = if expanded.variables.is_empty() {
                    format!("{raw:?}")
                } else {
                    "the value after ${…} expansion".into()
                };
                self.error(
                    value.position,
                    &header_path,
                    format!(
                        "{shown} is not a valid HTTP header value (control characters or non-ASCII)"
                    ),
                );
                all_valid = false;
                continue;
            }
            let header_value = if expanded.variables.is_empty() {
                HeaderValue::Literal(expanded.text)
            } else {
                HeaderValue::Secret(Setting::Ready(Secret::new(expanded.text)))
            };
            headers.push((name.to_owned(), header_value));
        }
        all_valid.then_some(headers)
    }

    /// The action's `timeout`, or the default.
    fn action_timeout(&mut self, fields: &Fields<'_>, path: &str) -> Option<Duration> {
        match fields.get("timeout") {
            None => Some(DEFAULT_ACTION_TIMEOUT),
            Some(node) => self.timeout(node, &child(path, "timeout")),
        }
    }

    fn database(&mut self, fields: &Fields<'_>, path: &str) -> Option<DatabaseAction> {
        let function = self
            .required(
                fields,
                "function",
                path,
                "a schema-qualified PostgreSQL function, e.g. app.on_order_paid",
            )
            .and_then(|node| {
                let function_path = child(path, "function");
                let text = self.non_empty_string(node, &function_path)?;
                FunctionName::parse(text.trim())
                    .map_err(|message| self.error(node.position, &function_path, message))
                    .ok()
            });
        let params = match fields.get("params") {
            None => Some(Vec::new()),
            Some(node) => self.database_params(node, &child(path, "params")),
        };
        let timeout = self.action_timeout(fields, path);
        Some(DatabaseAction {
            function: function?,
            params: params?,
            timeout: timeout?,
        })
    }

    /// A required or optional text template at `key`; `suffix` chooses its escaping (`json`
    /// inserts values as JSON, `txt` as text).
    fn template_field(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        suffix: &str,
    ) -> Option<String> {
        let node = fields.get(key)?;
        let template_path = child(path, key);
        let source = self.string(node, &template_path)?;
        self.template(
            format!("{template_path}.{suffix}"),
            source,
            node.position,
            &template_path,
        )
    }

    fn sms(&mut self, fields: &Fields<'_>, path: &str) -> Option<SmsAction> {
        let base_url = match fields.get("base_url") {
            None => url::Url::parse(super::model::DEFAULT_SMS_BASE_URL).ok(),
            Some(node) => {
                let url_path = child(path, "base_url");
                self.non_empty_string(node, &url_path)
                    .and_then(|text| self.http_url(text.trim(), node.position, &url_path, None))
            }
        };
        let account_sid = self.required_secret(fields, "account_sid", path, "the account SID");
        let auth_token = self.required_secret(fields, "auth_token", path, "the auth token");
        let mut template = |key: &str, what: &str| {
            self.required(fields, key, path, what)
                .and_then(|_| self.template_field(fields, key, path, "txt"))
        };
        let to = template(
            "to",
            "the recipient's number template, e.g. \"{{ data.phone }}\"",
        );
        let from = template("from", "the sender number or messaging service");
        let body = template("body", "the message text template");
        let timeout = self.action_timeout(fields, path);
        Some(SmsAction {
            base_url: base_url?,
            account_sid: account_sid?,
            auth_token: auth_token?,
            to_template: to?,
            from_template: from?,
            body_template: body?,
            timeout: timeout?,
        })
    }

    /// `host`, `port` (defaulting by `security`) and `security` of an SMTP server.
    fn smtp_endpoint(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
    ) -> Option<(String, u16, SmtpSecurity)> {
        let host = self
            .required(fields, "host", path, "the SMTP server's host name")
            .and_then(|node| {
                let host_path = child(path, "host");
                let host = self.non_empty_string(node, &host_path)?.trim();
                let valid = host.len() <= 253
                    && host.chars().all(|character| {
                        character.is_ascii_alphanumeric() || "-._:[]".contains(character)
                    });
                if !valid {
                    self.error(
                        node.position,
                        &host_path,
                        format!("expected a host name or IP address, found {host:?}"),
                    );
                    return None;
                }
                Some(host.to_owned())
            });
        let security = match fields.get("security") {
            None => Some(SmtpSecurity::StartTls),
            Some(node) => self.choice(
                node,
                &child(path, "security"),
                &[
                    ("starttls", SmtpSecurity::StartTls),
                    ("tls", SmtpSecurity::Tls),
                    ("plain", SmtpSecurity::Plain),
                ],
            ),
        };
        let port = match fields.get("port") {
            None => security.map(SmtpSecurity::default_port),
            Some(node) => self
                .integer_in(node, &child(path, "port"), 1, 65_535)
                .and_then(|port| u16::try_from(port).ok()),
        };
        Some((host?, port?, security?))
    }

    /// `username_env` and `password_env`: both, or neither for a server without AUTH (`Err`
    /// when they are invalid, already reported).
    fn basic_credentials(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
    ) -> Result<Option<BasicCredentials>, ()> {
        let username = self.secret(fields, "username", path);
        let password = self.secret(fields, "password", path);
        let username_given =
            fields.get("username").is_some() || fields.get("username_env").is_some();
        let password_given =
            fields.get("password").is_some() || fields.get("password_env").is_some();
        match (username, password) {
            (Some(username), Some(password)) => Ok(Some(BasicCredentials { username, password })),
            (None, None) if !username_given && !password_given => Ok(None),
            _ if username_given != password_given => {
                self.error(
                    fields.position,
                    path,
                    "set both 'username_env' and 'password_env' (or neither, for a server without authentication)",
                );
                Err(())
            }
            _ => Err(()),
        }
    }

    fn search(&mut self, fields: &Fields<'_>, path: &str) -> Option<SearchAction> {
        let target = self.url_target(fields, path, "url");
        let index = self
            .required(
                fields,
                "index",
                path,
                "the index name template, e.g. orders",
            )
            .and_then(|_| self.template_field(fields, "index", path, "txt"));
        let credentials = self.basic_credentials(fields, path);
        let timeout = self.action_timeout(fields, path);
        let bulk = match fields.get("bulk") {
            None => Ok(None),
            Some(node) => self.search_bulk(node, &child(path, "bulk")),
        };
        Some(SearchAction {
            target: target?,
            index_template: index?,
            credentials: credentials.ok()?,
            timeout: timeout?,
            bulk: bulk.ok()?,
        })
    }

    /// `bulk: true | false | {max_documents, max_wait}`; `Err` when invalid (reported).
    fn search_bulk(&mut self, node: &Node, path: &str) -> Result<Option<SearchBulk>, ()> {
        if let NodeValue::Bool(enabled) = node.value {
            return Ok(enabled.then(SearchBulk::default));
        }
        let fields = self
            .fields(node, path, &["max_documents", "max_wait"])
            .ok_or(())?;
        let mut bulk = SearchBulk::default();
        if let Some(max) = fields.get("max_documents") {
            bulk.max_documents = self
                .integer_in(max, &child(path, "max_documents"), 1, 10_000)
                .and_then(|max| usize::try_from(max).ok())
                .ok_or(())?;
        }
        if let Some(wait) = fields.get("max_wait") {
            let wait_path = child(path, "max_wait");
            let wait = self.duration(wait, &wait_path).ok_or(())?;
            if wait > Duration::from_secs(1) {
                self.error(
                    node.position,
                    &wait_path,
                    "at most 1s: every operation of a request waits this long at worst",
                );
                return Err(());
            }
            bulk.max_wait = wait;
        }
        Ok(Some(bulk))
    }

    fn email(&mut self, fields: &Fields<'_>, path: &str) -> Option<EmailAction> {
        let endpoint = self.smtp_endpoint(fields, path);
        let credentials = self.basic_credentials(fields, path);
        let from = self
            .required(fields, "from", path, "the sender address")
            .and_then(|node| self.mailbox(node, &child(path, "from")));
        let to = match (fields.get("to"), fields.get("to_template")) {
            (Some(node), None) => self
                .mailboxes(node, &child(path, "to"))
                .map(EmailRecipients::Literal),
            (None, Some(_)) => {
                let list = match fields.get("to_list") {
                    None => Some(false),
                    Some(node) => self.boolean(node, &child(path, "to_list")),
                };
                let name = self.template_field(fields, "to_template", path, "txt");
                Some(EmailRecipients::Template {
                    name: name?,
                    list: list?,
                })
            }
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, "to"),
                    "set either 'to' (addresses) or 'to_template', not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    fields.position,
                    path,
                    "missing required key 'to' (a list of addresses) or 'to_template'",
                );
                None
            }
        };
        if let (Some(_), Some(node)) = (fields.get("to"), fields.get("to_list")) {
            self.error(
                node.position,
                &child(path, "to_list"),
                "'to_list' applies to 'to_template'; a literal 'to' lists its addresses itself",
            );
        }
        let cc = match fields.get("cc") {
            None => Some(Vec::new()),
            Some(node) => self.mailboxes(node, &child(path, "cc")),
        };
        let reply_to = match fields.get("reply_to") {
            None => Some(None),
            Some(node) => self.mailbox(node, &child(path, "reply_to")).map(Some),
        };
        let subject = self
            .required(fields, "subject", path, "the subject template")
            .and_then(|_| self.template_field(fields, "subject", path, "txt"));
        let text = match fields.get("text") {
            None => Some(None),
            Some(_) => self.template_field(fields, "text", path, "txt").map(Some),
        };
        let html = match fields.get("html") {
            None => Some(None),
            Some(_) => self.template_field(fields, "html", path, "html").map(Some),
        };
        if fields.get("text").is_none() && fields.get("html").is_none() {
            self.error(
                fields.position,
                path,
                "missing required key 'text' or 'html' (the body template; both make a multipart/alternative message)",
            );
            return None;
        }
        let timeout = self.action_timeout(fields, path);
        let (host, port, security) = endpoint?;
        Some(EmailAction {
            host,
            port,
            security,
            credentials: credentials.ok()?,
            from: from?,
            to: to?,
            cc: cc?,
            reply_to: reply_to?,
            subject_template: subject?,
            text_template: text?,
            html_template: html?,
            timeout: timeout?,
        })
    }

    /// An email address, optionally with a display name: `Orders <orders@example.com>`.
    fn mailbox(&mut self, node: &Node, path: &str) -> Option<Mailbox> {
        let text = self.non_empty_string(node, path)?;
        match text.trim().parse::<Mailbox>() {
            Ok(mailbox) => Some(mailbox),
            Err(error) => {
                self.error(
                    node.position,
                    path,
                    format!(
                        "expected an email address such as \"Orders <orders@example.com>\", found {text:?} ({error})"
                    ),
                );
                None
            }
        }
    }

    /// One address or a list of them.
    fn mailboxes(&mut self, node: &Node, path: &str) -> Option<Vec<Mailbox>> {
        let items: Vec<(String, &Node)> = match &node.value {
            NodeValue::String(_) => vec![(path.to_owned(), node)],
            NodeValue::List(items) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(index, item)| (format!("{path}[{index}]"), item))
                .collect(),
            _ => {
                self.expected(node, path, "an email address or a non-empty list of them");
                return None;
            }
        };
        let mut mailboxes = Vec::with_capacity(items.len());
        let mut all_valid = true;
        for (item_path, item) in items {
            match self.mailbox(item, &item_path) {
                Some(mailbox) => mailboxes.push(mailbox),
                None => all_valid = false,
            }
        }
        all_valid.then_some(mailboxes)
    }

    /// A secret that must be given, as `<key>_env` (or `key`).
    fn required_secret(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        what: &str,
    ) -> Option<Setting<Secret>> {
        if fields.get(key).is_none() && fields.get(&format!("{key}_env")).is_none() {
            self.error(
                fields.position,
                path,
                format!("missing required key '{key}_env' ({what}, from the environment)"),
            );
            return None;
        }
        self.secret(fields, key, path)
    }

    fn slack(&mut self, fields: &Fields<'_>, path: &str) -> Option<SlackAction> {
        let target = self.url_target(fields, path, "webhook_url");
        let text = self
            .required(fields, "text", path, "the message text template")
            .and_then(|_| self.template_field(fields, "text", path, "txt"));
        let blocks = match fields.get("blocks") {
            None => Some(None),
            Some(_) => self
                .template_field(fields, "blocks", path, "json")
                .map(Some),
        };
        let channel = match fields.get("channel") {
            None => Some(None),
            Some(node) => self
                .non_empty_string(node, &child(path, "channel"))
                .map(|channel| Some(channel.trim().to_owned())),
        };
        let timeout = self.action_timeout(fields, path);
        Some(SlackAction {
            target: target?,
            text_template: text?,
            blocks_template: blocks?,
            channel: channel?,
            timeout: timeout?,
        })
    }

    fn cache(&mut self, fields: &Fields<'_>, path: &str) -> Option<CacheAction> {
        let keys = self.template_list(fields, "keys", path, "txt");
        let patterns = self.template_list(fields, "patterns", path, "glob");
        let timeout = self.action_timeout(fields, path);
        let (keys, patterns) = (keys?, patterns?);
        self.confine_cache_keys(fields, path);
        if keys.is_empty() && patterns.is_empty() {
            self.error(
                fields.position,
                path,
                "expected 'keys' (exact keys) or 'patterns' (SCAN MATCH patterns), or both",
            );
            return None;
        }
        Some(CacheAction {
            keys,
            patterns,
            timeout: timeout?,
        })
    }

    /// Refuses exact keys and patterns that reach the service's own Redis keys (see
    /// [`ServiceKeyspace`]), under the prefix the environment gives the node.
    fn confine_cache_keys(&mut self, fields: &Fields<'_>, path: &str) {
        let prefix =
            (self.options.env)(REDIS_PREFIX_ENV).unwrap_or_else(|| DEFAULT_REDIS_PREFIX.to_owned());
        let keyspace = ServiceKeyspace::new(&prefix);
        for (key, is_pattern) in [("keys", false), ("patterns", true)] {
            let Some(node) = fields.get(key) else {
                continue;
            };
            let list_path = child(path, key);
            let items: Vec<(String, &Node)> = match &node.value {
                NodeValue::List(items) => items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| (format!("{list_path}[{index}]"), item))
                    .collect(),
                _ => vec![(list_path, node)],
            };
            for (item_path, item) in items {
                let NodeValue::String(source) = &item.value else {
                    continue;
                };
                let problem = if is_pattern {
                    keyspace.pattern_template_problem(source)
                } else {
                    keyspace.key_template_problem(source)
                };
                if let Some(problem) = problem {
                    self.error(item.position, &item_path, problem);
                }
            }
        }
    }

    /// An optional list of templates at `key` (a single string counts as a list of one).
    fn template_list(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        suffix: &str,
    ) -> Option<Vec<String>> {
        const MAX_TEMPLATES: usize = 100;
        let Some(node) = fields.get(key) else {
            return Some(Vec::new());
        };
        let list_path = child(path, key);
        let items: Vec<(String, &Node)> = match &node.value {
            NodeValue::String(_) => vec![(list_path.clone(), node)],
            NodeValue::List(items) if items.len() <= MAX_TEMPLATES => items
                .iter()
                .enumerate()
                .map(|(index, item)| (format!("{list_path}[{index}]"), item))
                .collect(),
            _ => {
                self.expected(
                    node,
                    &list_path,
                    &format!("a template string or a list of at most {MAX_TEMPLATES}"),
                );
                return None;
            }
        };
        let mut templates = Vec::with_capacity(items.len());
        let mut all_valid = true;
        for (item_path, item) in items {
            let template = self.non_empty_string(item, &item_path).and_then(|source| {
                self.template(
                    format!("{item_path}.{suffix}"),
                    source,
                    item.position,
                    &item_path,
                )
            });
            match template {
                Some(template) => templates.push(template),
                None => all_valid = false,
            }
        }
        all_valid.then_some(templates)
    }

    /// `params: ["{{ entity_id }}", {value: "{{ data.total }}", type: numeric}]`.
    fn database_params(&mut self, node: &Node, path: &str) -> Option<Vec<DatabaseParam>> {
        const MAX_PARAMS: usize = 100;
        let NodeValue::List(items) = &node.value else {
            self.expected(node, path, "a list of parameter templates");
            return None;
        };
        if items.len() > MAX_PARAMS {
            self.error(
                node.position,
                path,
                format!(
                    "expected at most {MAX_PARAMS} parameters, found {}",
                    items.len()
                ),
            );
            return None;
        }
        let mut params = Vec::with_capacity(items.len());
        let mut all_valid = true;
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            let (source_node, sql_type) = match &item.value {
                NodeValue::String(_) => (item, Some(SqlType::text())),
                NodeValue::Map(_) => {
                    let Some(param_fields) = self.fields(item, &item_path, &["value", "type"])
                    else {
                        all_valid = false;
                        continue;
                    };
                    let sql_type = match param_fields.get("type") {
                        None => Some(SqlType::text()),
                        Some(type_node) => {
                            let type_path = child(&item_path, "type");
                            self.non_empty_string(type_node, &type_path)
                                .and_then(|text| {
                                    SqlType::parse(text.trim())
                                        .map_err(|message| {
                                            self.error(type_node.position, &type_path, message);
                                        })
                                        .ok()
                                })
                        }
                    };
                    let Some(value) = self.required(
                        &param_fields,
                        "value",
                        &item_path,
                        "the parameter's template",
                    ) else {
                        all_valid = false;
                        continue;
                    };
                    (value, sql_type)
                }
                _ => {
                    self.expected(
                        item,
                        &item_path,
                        "a template string or a mapping with 'value' and 'type'",
                    );
                    all_valid = false;
                    continue;
                }
            };
            let Some(sql_type) = sql_type else {
                all_valid = false;
                continue;
            };
            let value_path = if std::ptr::eq(source_node, item) {
                item_path.clone()
            } else {
                child(&item_path, "value")
            };
            let Some(source) = self.string(source_node, &value_path) else {
                all_valid = false;
                continue;
            };
            let suffix = if sql_type.is_json() { "json" } else { "txt" };
            match self.template(
                format!("{value_path}.{suffix}"),
                source,
                source_node.position,
                &value_path,
            ) {
                Some(template) => params.push(DatabaseParam { template, sql_type }),
                None => all_valid = false,
            }
        }
        all_valid.then_some(params)
    }

    fn log(&mut self, fields: &Fields<'_>, path: &str) -> Option<LogAction> {
        let level = match fields.get("level") {
            None => Some(LogLevel::Info),
            Some(node) => self.choice(
                node,
                &child(path, "level"),
                &[
                    ("trace", LogLevel::Trace),
                    ("debug", LogLevel::Debug),
                    ("info", LogLevel::Info),
                    ("warn", LogLevel::Warn),
                    ("error", LogLevel::Error),
                ],
            ),
        };
        let message_path = child(path, "message");
        let (source, position) = match fields.get("message") {
            None => (DEFAULT_LOG_MESSAGE, fields.position),
            Some(node) => (self.string(node, &message_path)?, node.position),
        };
        let message_template = self.template(
            format!("{message_path}.txt"),
            source,
            position,
            &message_path,
        );
        Some(LogAction {
            level: level?,
            message_template: message_template?,
        })
    }
}

/// The `name:` string of an observer mapping, read before (and whatever the outcome of) decoding it.
fn declared_name(node: &Node) -> Option<(&str, Position)> {
    let NodeValue::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find_map(|(key, value)| match (&key.value, &value.value) {
            (NodeValue::String(key), NodeValue::String(name)) if key == "name" => {
                Some((name.as_str(), value.position))
            }
            _ => None,
        })
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|line| format!("{prefix}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_type_has_its_keys() {
        let decoded: Vec<&str> = ACTION_KEYS.iter().map(|(name, _)| *name).collect();
        assert_eq!(decoded, ActionKind::TYPE_NAMES);
    }
}
