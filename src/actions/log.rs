//! The `log` action: one structured log line per matched event. The message is rendered from
//! event data; the text log format escapes its control characters (`escape::EscapedLogFields`),
//! so the data cannot end the line and forge another.

use super::{ActionConfig, ActionContext, ActionRunner, ActionSuccess, template_failed};
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::{DEFAULT_ACTION_TIMEOUT, Decoder, Fields, child};

/// Log levels a `log` action may write at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// A structured log line per matched event.
#[derive(Clone, Debug, PartialEq)]
pub struct LogAction {
    pub level: LogLevel,
    /// Name of the message template.
    pub message_template: String,
}

const DEFAULT_LOG_MESSAGE: &str =
    "observer {{ observer }} matched {{ event_type }} {{ entity_type }} {{ entity_id }}";

impl ActionConfig for LogAction {
    const KEYS: &[&str] = &["level", "message"];

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<LogAction> {
        let level = match fields.get("level") {
            None => Some(LogLevel::Info),
            Some(node) => decoder.choice(
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
            Some(node) => (decoder.string(node, &message_path)?, node.position),
        };
        let message_template = decoder.template(
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

    fn timeout(&self) -> Duration {
        DEFAULT_ACTION_TIMEOUT
    }
}

/// One attempt of `action` with the runner's clients.
#[allow(clippy::unused_async, reason = "the catalog awaits every type's `run`")]
pub(super) async fn run(
    runner: &ActionRunner,
    action: &LogAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(&runner.templates, action, context)
}

pub(super) fn attempt(
    templates: &Templates,
    action: &LogAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let message = templates
        .render(&action.message_template, context.envelope)
        .map_err(|error| template_failed(&action.message_template, &error))?;
    let event_id = context.event.id.to_string();
    let observer = context.observer.as_str();
    let entity_type = context.event.entity_type.as_str();
    let entity_id = context.event.entity_id.as_str();
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(target: "fraiseql_observers::observer_log", $level, event_id, observer, entity_type, entity_id, "{message}")
        };
    }
    match action.level {
        LogLevel::Trace => emit!(tracing::Level::TRACE),
        LogLevel::Debug => emit!(tracing::Level::DEBUG),
        LogLevel::Info => emit!(tracing::Level::INFO),
        LogLevel::Warn => emit!(tracing::Level::WARN),
        LogLevel::Error => emit!(tracing::Level::ERROR),
    }
    Ok(ActionSuccess { detail: message })
}
