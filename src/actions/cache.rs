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

use super::{ActionConfig, ActionContext, ActionRunner, ActionSuccess, template_failed};
use crate::error::ErrorCode;
use crate::redis_client::SharedConnection;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::{
    DEFAULT_REDIS_PREFIX, Decoder, Fields, Node, NodeValue, REDIS_PREFIX_ENV, ServiceKeyspace,
    child,
};

/// Redis keys removed per matched event (the node's Redis, `REDIS_URL`).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheAction {
    /// Names of exact-key templates: each rendered key is removed with `UNLINK`.
    pub keys: Vec<String>,
    /// Names of `SCAN MATCH` pattern templates (values inserted with glob characters escaped):
    /// every key matching a rendered pattern is removed.
    pub patterns: Vec<String>,
    pub timeout: Duration,
}

impl ActionConfig for CacheAction {
    const KEYS: &[&str] = &["keys", "patterns", "timeout"];
    const NEEDS_REDIS: bool = true;

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<CacheAction> {
        let keys = decoder.template_list(fields, "keys", path, "txt");
        let patterns = decoder.template_list(fields, "patterns", path, "glob");
        let timeout = decoder.action_timeout(fields, path);
        let (keys, patterns) = (keys?, patterns?);
        confine_cache_keys(decoder, fields, path);
        if keys.is_empty() && patterns.is_empty() {
            decoder.error(
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

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn needs(&self) -> Option<String> {
        Some("Redis (REDIS_URL)".to_owned())
    }
}

/// Refuses exact keys and patterns that reach the service's own Redis keys (see
/// [`ServiceKeyspace`]), under the prefix the environment gives the node.
fn confine_cache_keys(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) {
    let prefix = decoder
        .env(REDIS_PREFIX_ENV)
        .unwrap_or_else(|| DEFAULT_REDIS_PREFIX.to_owned());
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
                decoder.error(item.position, &item_path, problem);
            }
        }
    }
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &CacheAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(
        runner.redis.as_ref(),
        &runner.service_keys,
        &runner.templates,
        action,
        context,
    )
    .await
}

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
