//! The `log` action: one structured log line per matched event. The message is rendered from
//! event data; the text log format escapes its control characters (`escape::EscapedLogFields`),
//! so the data cannot end the line and forge another.

use super::{ActionContext, ActionSuccess, template_failed};
use crate::config::{LogAction, LogLevel};
use crate::retry::AttemptError;
use crate::template::Templates;

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
