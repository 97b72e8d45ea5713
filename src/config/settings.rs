//! Decoding the settings every observer or action shares, with the primitives of `decode.rs`:
//! the file-wide `executor:` and `jobs:`, an observer's `condition:` and `retry:`, and an
//! action's `name:` label and delivery (`mode`, `queue`, `priority`).

use super::decode::{Decoder, Fields, child};
use super::model::{
    BackoffKind, Delivery, DeliveryMode, ExecutorSettings, JobSettings, RetryPolicy,
};
use super::tree::{Node, NodeValue};
use crate::condition::Condition;

const MAX_ATTEMPTS_LIMIT: u32 = 100;

impl Decoder<'_> {
    /// The `jobs:` settings (workers per queue, visibility timeout, retention).
    pub(crate) fn jobs(&mut self, node: &Node, path: &str) -> Option<JobSettings> {
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

    /// The `executor:` settings (node-wide concurrency bounds).
    pub(crate) fn executor(&mut self, node: &Node, path: &str) -> Option<ExecutorSettings> {
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

    /// An observer's `condition:` expression, compiled.
    pub(crate) fn condition(&mut self, node: &Node, path: &str) -> Option<Condition> {
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

    /// An observer's `retry:` policy.
    pub(crate) fn retry(&mut self, node: &Node, path: &str) -> Option<RetryPolicy> {
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

    /// `mode`, `queue`, `priority` of an action (keys already checked against the allowed set).
    pub(crate) fn delivery(
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

    /// An action's optional `name:` label.
    pub(crate) fn label(&mut self, fields: &Fields<'_>, path: &str) -> Option<String> {
        fields
            .get("name")
            .and_then(|node| self.non_empty_string(node, &child(path, "name")))
            .map(str::to_owned)
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|line| format!("{prefix}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
