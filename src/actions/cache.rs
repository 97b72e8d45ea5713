//! The `cache` action: Redis keys removed per matched event.
//!
//! Exact keys are removed with one `UNLINK`; each pattern is swept with `SCAN MATCH … COUNT` and
//! `UNLINK` of every batch found (never `KEYS`, which blocks Redis while it walks the keyspace).
//! Values inserted into a pattern have their glob characters escaped (see
//! [`crate::template`]), so an entity id cannot widen what is removed. The success detail says how
//! many keys were removed. The connection is the node's shared one (`REDIS_URL`); an unreachable
//! Redis is transient, a command Redis refuses is permanent. Removing keys is idempotent, so no key
//! is needed by the protocol.

use redis::RedisError;

use super::{ActionContext, ActionSuccess, template_failed};
use crate::config::CacheAction;
use crate::error::ErrorCode;
use crate::redis_client::SharedConnection;
use crate::retry::AttemptError;
use crate::template::Templates;

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: u32 = 500;

fn redis_failed(error: &RedisError) -> AttemptError {
    let code = if error.is_timeout() {
        ErrorCode::ActionTimeout
    } else if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
    {
        ErrorCode::ConnectionFailed
    } else {
        ErrorCode::RemoteRejected
    };
    AttemptError::new(code, format!("redis: {error}"))
}

fn render_all(
    templates: &Templates,
    names: &[String],
    context: &ActionContext<'_>,
) -> Result<Vec<String>, AttemptError> {
    names
        .iter()
        .map(|name| {
            let rendered = templates
                .render(name, context.envelope)
                .map_err(|error| template_failed(name, &error))?;
            if rendered.is_empty() {
                return Err(AttemptError::new(
                    ErrorCode::TemplateFailed,
                    format!("template {name} rendered an empty key"),
                ));
            }
            Ok(rendered)
        })
        .collect()
}

/// Removes every key matching `pattern`, a batch at a time; returns how many were removed.
async fn sweep(connection: &mut SharedConnection, pattern: &str) -> Result<u64, RedisError> {
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(connection)
            .await?;
        if !keys.is_empty() {
            let unlinked: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(connection)
                .await?;
            removed += unlinked;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

pub(super) async fn attempt(
    connection: Option<&SharedConnection>,
    templates: &Templates,
    action: &CacheAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let Some(connection) = connection else {
        return Err(AttemptError::new(
            ErrorCode::ConfigInvalid,
            "cache actions need Redis: set REDIS_URL (or --redis-url) on the node",
        ));
    };
    let keys = render_all(templates, &action.keys, context)?;
    let patterns = render_all(templates, &action.patterns, context)?;
    let mut connection = connection.clone();
    let mut removed: u64 = 0;
    if !keys.is_empty() {
        let unlinked: u64 = redis::cmd("UNLINK")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_failed(&error))?;
        removed += unlinked;
    }
    for pattern in &patterns {
        removed += sweep(&mut connection, pattern)
            .await
            .map_err(|error| redis_failed(&error))?;
    }
    Ok(ActionSuccess {
        detail: format!(
            "removed {removed} key{} ({} exact, {} pattern{})",
            if removed == 1 { "" } else { "s" },
            keys.len(),
            patterns.len(),
            if patterns.len() == 1 { "" } else { "s" }
        ),
    })
}
