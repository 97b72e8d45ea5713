//! The `cache` action: Redis keys removed per matched event.
//!
//! Exact keys are removed with one `UNLINK`; each pattern is swept with `SCAN MATCH … COUNT` and
//! `UNLINK` of every batch found (never `KEYS`, which blocks Redis while it walks the keyspace).
//! Values inserted into a pattern have their glob characters escaped (see
//! [`crate::template`]), so an entity id cannot widen what is removed. Keys under the node's own
//! Redis prefix (deduplication claims, breakers, limits, cached results: see
//! [`ServiceKeyspace`]) are never removed, whether a rendered key or a sweep names them. The
//! success detail says how many keys were removed, and how many of the service's own were left
//! alone. The connection is the node's shared one (`REDIS_URL`); an unreachable Redis is
//! transient, a command Redis refuses is permanent. Removing keys is idempotent, so no key is
//! needed by the protocol.

use redis::RedisError;

use super::{ActionContext, ActionSuccess, template_failed};
use crate::config::{CacheAction, ServiceKeyspace};
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

/// What a sweep or an action did: keys removed, and keys of the service's own left alone.
#[derive(Clone, Copy, Debug, Default)]
struct Removal {
    removed: u64,
    skipped: u64,
}

/// Removes every key matching `pattern` that is not the service's own, a batch at a time.
async fn sweep(
    connection: &mut SharedConnection,
    service_keys: &ServiceKeyspace,
    pattern: &str,
) -> Result<Removal, RedisError> {
    let mut cursor: u64 = 0;
    let mut removal = Removal::default();
    loop {
        let (next, mut keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(connection)
            .await?;
        let found = keys.len();
        keys.retain(|key| !service_keys.owns(key));
        removal.skipped += (found - keys.len()) as u64;
        if !keys.is_empty() {
            let unlinked: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(connection)
                .await?;
            removal.removed += unlinked;
        }
        if next == 0 {
            return Ok(removal);
        }
        cursor = next;
    }
}

pub(super) async fn attempt(
    connection: Option<&SharedConnection>,
    service_keys: &ServiceKeyspace,
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
    let removable: Vec<&String> = keys
        .iter()
        .filter(|key| !service_keys.owns(key.as_bytes()))
        .collect();
    let mut total = Removal {
        removed: 0,
        skipped: (keys.len() - removable.len()) as u64,
    };
    if !removable.is_empty() {
        let unlinked: u64 = redis::cmd("UNLINK")
            .arg(&removable)
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_failed(&error))?;
        total.removed += unlinked;
    }
    for pattern in &patterns {
        let removal = sweep(&mut connection, service_keys, pattern)
            .await
            .map_err(|error| redis_failed(&error))?;
        total.removed += removal.removed;
        total.skipped += removal.skipped;
    }
    if total.skipped > 0 {
        tracing::debug!(
            skipped = total.skipped,
            "cache action left keys under the service's own Redis prefix alone"
        );
    }
    let left_alone = match total.skipped {
        0 => String::new(),
        skipped => format!("; left {skipped} of the service's own keys alone"),
    };
    let detail = format!(
        "removed {} key{} ({} exact, {} pattern{}){left_alone}",
        total.removed,
        if total.removed == 1 { "" } else { "s" },
        keys.len(),
        patterns.len(),
        if patterns.len() == 1 { "" } else { "s" }
    );
    Ok(ActionSuccess { detail })
}
