//! The `search` action: the entity's document kept in step in an Elasticsearch/OpenSearch index.
//!
//! An INSERT, UPDATE or custom event puts the event's `data` as the document
//! (`PUT /{index}/_doc/{entity id}`, a full replace, so a repeat is harmless); a DELETE removes it
//! (`DELETE /{index}/_doc/{entity id}`, where 404 — already gone — counts as success). The index
//! name is a template, checked against the engines' naming rules once rendered; the entity id is
//! sent as one percent-encoded path segment. A 4xx is permanent with the engine's error `type:
//! reason` (OB008), as is a redirect (3xx, not followed); 429, including a read-only block when
//! disk is full (OB007, honouring `Retry-After`), and 5xx (OB006) are transient. Errors never show
//! the cluster URL (it may carry credentials) or the credentials.
//!
//! With `bulk`, the operations of concurrent events go to the cluster together: one writer per
//! cluster (and credentials) collects what arrives within `max_wait`, up to `max_documents`, and
//! sends one `POST /_bulk`; each event's outcome is its own item's status, classified as above.
//! An operation whose attempt gave up (timed out) before its request left is dropped, so a
//! retry cannot be overtaken by a stale copy of itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::webhook::{body_excerpt, retry_after, transport_error};
use super::{
    ActionConfig, ActionContext, ActionRunner, ActionSuccess, Http, Secrets, redirect_reason,
    render, secret_value, target_label, target_url,
};
use crate::domain::EventKind;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::{BasicCredentials, Decoder, Fields, Node, NodeValue, WebhookTarget, child};

/// The entity's document indexed, updated or deleted per matched event in an
/// Elasticsearch/OpenSearch index.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchAction {
    /// The cluster's base URL (`url`, or `url_env`).
    pub target: WebhookTarget,
    /// Name of the index-name template.
    pub index_template: String,
    /// HTTP basic auth.
    pub credentials: Option<BasicCredentials>,
    pub timeout: Duration,
    /// `Some`: operations of concurrent events go to the cluster together, as `_bulk` requests.
    pub bulk: Option<SearchBulk>,
}

/// How a search action batches its operations into `_bulk` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchBulk {
    /// Most operations per request.
    pub max_documents: usize,
    /// Longest an operation waits for others to join its request.
    pub max_wait: Duration,
}

impl Default for SearchBulk {
    fn default() -> Self {
        SearchBulk {
            max_documents: 500,
            max_wait: Duration::from_millis(5),
        }
    }
}

impl ActionConfig for SearchAction {
    const KEYS: &[&str] = &[
        "url",
        "url_env",
        "index",
        "username",
        "username_env",
        "password",
        "password_env",
        "timeout",
        "bulk",
    ];

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<SearchAction> {
        let target = decoder.url_target(fields, path, "url");
        let index = decoder
            .required(
                fields,
                "index",
                path,
                "the index name template, e.g. orders",
            )
            .and_then(|_| decoder.template_field(fields, "index", path, "txt"));
        let credentials = decoder.basic_credentials(fields, path);
        let timeout = decoder.action_timeout(fields, path);
        let bulk = match fields.get("bulk") {
            None => Ok(None),
            Some(node) => search_bulk(decoder, node, &child(path, "bulk")),
        };
        Some(SearchAction {
            target: target?,
            index_template: index?,
            credentials: credentials.ok()?,
            timeout: timeout?,
            bulk: bulk.ok()?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn secrets_from_env(&self) -> usize {
        usize::from(self.target.is_from_env()) + 2 * usize::from(self.credentials.is_some())
    }

    fn needs(&self) -> Option<String> {
        match &self.target {
            WebhookTarget::Literal(url) => Some(url.as_str().trim_end_matches('/').to_owned()),
            WebhookTarget::FromEnv { variable, .. } => Some(format!("the cluster at {variable}")),
            WebhookTarget::Template(template) => Some(format!("the cluster of {}", template.name)),
        }
    }
}

/// `bulk: true | false | {max_documents, max_wait}`; `Err` when invalid (reported).
fn search_bulk(
    decoder: &mut Decoder<'_>,
    node: &Node,
    path: &str,
) -> Result<Option<SearchBulk>, ()> {
    if let NodeValue::Bool(enabled) = node.value {
        return Ok(enabled.then(SearchBulk::default));
    }
    let fields = decoder
        .fields(node, path, &["max_documents", "max_wait"])
        .ok_or(())?;
    let mut bulk = SearchBulk::default();
    if let Some(max) = fields.get("max_documents") {
        bulk.max_documents = decoder
            .integer_in(max, &child(path, "max_documents"), 1, 10_000)
            .and_then(|max| usize::try_from(max).ok())
            .ok_or(())?;
    }
    if let Some(wait) = fields.get("max_wait") {
        let wait_path = child(path, "max_wait");
        let wait = decoder.duration(wait, &wait_path).ok_or(())?;
        if wait > Duration::from_secs(1) {
            decoder.error(
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

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &SearchAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(
        &runner.http,
        &runner.templates,
        action,
        context,
        &runner.search_bulk,
    )
    .await
}

/// Longest index name the engines accept, in bytes.
const MAX_INDEX_NAME_BYTES: usize = 255;

/// An engine's error answer: `{"error": {"type": …, "reason": …}, "status": …}`.
#[derive(Deserialize)]
struct EngineError {
    error: EngineErrorBody,
}

#[derive(Deserialize)]
struct EngineErrorBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct EngineAnswer {
    result: Option<String>,
}

/// Checks a rendered index name against Elasticsearch/OpenSearch rules.
fn check_index(template: &str, index: &str) -> Result<(), AttemptError> {
    let problem = if index.is_empty() {
        Some("is empty")
    } else if index.len() > MAX_INDEX_NAME_BYTES {
        Some("is longer than 255 bytes")
    } else if index == "." || index == ".." {
        Some("is . or ..")
    } else if index.starts_with(['-', '_', '+']) {
        Some("starts with -, _ or +")
    } else if index.chars().any(|character| {
        character.is_uppercase() || " \"*\\<|,>/?#:".contains(character) || character.is_control()
    }) {
        Some("has upper-case letters or one of the characters space \" * \\ < | , > / ? # :")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!("template {template} rendered the index name {index:?}, which {problem}"),
        )),
    }
}

/// One operation waiting for a `_bulk` request.
struct BulkOperation {
    /// The NDJSON lines: the action line, and the document for an index.
    lines: String,
    deleting: bool,
    label: String,
    reply: tokio::sync::oneshot::Sender<Result<ActionSuccess, AttemptError>>,
}

/// The node's `_bulk` writers, one per cluster URL, credentials and batching settings.
#[derive(Clone, Default)]
pub struct BulkWriters {
    writers: Arc<Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<BulkOperation>>>>,
}

/// Counts the writers only: their keys hold cluster URLs and user names.
impl std::fmt::Debug for BulkWriters {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let writers = self
            .writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        formatter
            .debug_struct("BulkWriters")
            .field("writers", &writers)
            .finish()
    }
}

/// What a `_bulk` request needs besides its operations.
struct BulkTarget {
    url: url::Url,
    credentials: Option<(String, String)>,
    settings: SearchBulk,
    timeout: std::time::Duration,
    /// What the request's errors must not show.
    secrets: Secrets,
}

impl BulkWriters {
    fn sender(
        &self,
        http: &reqwest::Client,
        target: BulkTarget,
    ) -> tokio::sync::mpsc::UnboundedSender<BulkOperation> {
        let key = format!(
            "{}|{}|{}|{:?}|{:?}",
            target.url,
            target
                .credentials
                .as_ref()
                .map_or("", |(user, _)| user.as_str()),
            target.settings.max_documents,
            target.settings.max_wait,
            target.timeout
        );
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(sender) = writers.get(&key).filter(|sender| !sender.is_closed()) {
            return sender.clone();
        }
        let (sender, operations) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_bulk(http.clone(), target, operations));
        writers.insert(key, sender.clone());
        sender
    }
}

/// Sends what arrives as `_bulk` requests, one at a time, until every sender is gone.
async fn write_bulk(
    http: reqwest::Client,
    target: BulkTarget,
    mut operations: tokio::sync::mpsc::UnboundedReceiver<BulkOperation>,
) {
    while let Some(first) = operations.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + target.settings.max_wait;
        while batch.len() < target.settings.max_documents {
            match tokio::time::timeout_at(deadline, operations.recv()).await {
                Ok(Some(operation)) => batch.push(operation),
                Ok(None) | Err(_) => break,
            }
        }
        // An attempt that gave up is retried on its own; its stale copy must not be sent.
        batch.retain(|operation| !operation.reply.is_closed());
        if !batch.is_empty() {
            send_bulk(&http, &target, batch).await;
        }
    }
}

#[derive(Deserialize)]
struct BulkAnswer {
    items: Vec<HashMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    result: Option<String>,
    error: Option<EngineErrorBody>,
}

async fn send_bulk(http: &reqwest::Client, target: &BulkTarget, batch: Vec<BulkOperation>) {
    let count = batch.len();
    let body: String = batch
        .iter()
        .map(|operation| operation.lines.as_str())
        .collect();
    let mut request = http
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .timeout(target.timeout);
    if let Some((username, password)) = &target.credentials {
        request = request.basic_auth(username, Some(password));
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            let failure = transport_error(error, target.timeout, &target.secrets);
            for operation in batch {
                let _ = operation.reply.send(Err(failure.clone()));
            }
            return;
        }
    };
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    if let Some(code) = ErrorCode::from_http_status(status) {
        let reason = match redirect_reason(status, response.headers()) {
            Some(reason) => reason,
            None => engine_reason(&body_excerpt(response).await),
        };
        for operation in batch {
            let mut error = AttemptError::new(
                code,
                target.secrets.redact(&format!(
                    "{} (in a _bulk request of {count}): HTTP {status}: {reason}",
                    operation.label
                )),
            );
            error.retry_after = wait;
            let _ = operation.reply.send(Err(error));
        }
        return;
    }
    // The whole answer: one item per operation (bounded by max_documents).
    let answer = match response.bytes().await {
        Ok(answer) => answer,
        Err(error) => {
            let failure = transport_error(error, target.timeout, &target.secrets);
            for operation in batch {
                let _ = operation.reply.send(Err(failure.clone()));
            }
            return;
        }
    };
    let items = match serde_json::from_slice::<BulkAnswer>(&answer) {
        Ok(answer) if answer.items.len() == count => answer.items,
        _ => {
            let excerpt: String = String::from_utf8_lossy(&answer).chars().take(512).collect();
            for operation in batch {
                let _ = operation.reply.send(Err(AttemptError::new(
                    ErrorCode::RemoteUnavailable,
                    format!(
                        "{}: the _bulk answer does not list one item per operation ({count}): {}",
                        operation.label,
                        excerpt.trim()
                    ),
                )));
            }
            return;
        }
    };
    for (operation, item) in batch.into_iter().zip(items) {
        let Some(item) = item.into_values().next() else {
            continue;
        };
        let outcome = item_outcome(&operation, item, count);
        let _ = operation.reply.send(outcome);
    }
}

/// One `_bulk` item's outcome, classified like a single request's.
fn item_outcome(
    operation: &BulkOperation,
    item: BulkItem,
    count: usize,
) -> Result<ActionSuccess, AttemptError> {
    let status = item.status;
    match failure_code(status, operation.deleting) {
        None => Ok(ActionSuccess {
            detail: format!(
                "{}: HTTP {status} {} (in a _bulk request of {count})",
                operation.label,
                item.result.as_deref().unwrap_or("ok")
            ),
        }),
        Some(code) => {
            let reason = match item.error {
                Some(EngineErrorBody {
                    kind: Some(kind),
                    reason: Some(reason),
                }) => format!("{kind}: {reason}"),
                _ => "no reason given".to_owned(),
            };
            Err(AttemptError::new(
                code,
                format!(
                    "{} (in a _bulk request of {count}): HTTP {status}: {reason}",
                    operation.label
                ),
            ))
        }
    }
}

/// What a status means for an operation: `None` done (for a delete, 404 too: already gone), else
/// the failure's code.
fn failure_code(status: u16, deleting: bool) -> Option<ErrorCode> {
    match ErrorCode::from_http_status(status) {
        Some(ErrorCode::RemoteRejected) if deleting && status == 404 => None,
        other => other,
    }
}

/// The cluster's basic-auth user and password, when it has them.
fn credentials(action: &SearchAction) -> Result<Option<(&str, &str)>, AttemptError> {
    action
        .credentials
        .as_ref()
        .map(|credentials| {
            Ok((
                secret_value(&credentials.username, "the search username")?,
                secret_value(&credentials.password, "the search password")?,
            ))
        })
        .transpose()
}

/// What errors of a request to `request` on the cluster at `cluster` must not show: the cluster
/// URL's token-carrying parts (not the index and id appended to it, which messages name), the
/// request URL as a whole, and the credentials.
fn secrets(
    action: &SearchAction,
    cluster: &url::Url,
    request: &url::Url,
    credentials: Option<(&str, &str)>,
) -> Secrets {
    let mut secrets = Secrets::of_url(
        cluster,
        matches!(action.target, WebhookTarget::FromEnv { .. }),
    );
    secrets.add(request.as_str());
    if let Some((username, password)) = credentials {
        secrets.add(username);
        secrets.add(password);
    }
    secrets
}

/// The cluster's URL with `segments` appended (each percent-encoded as one segment).
fn cluster_url(mut base: url::Url, segments: &[&str]) -> Result<url::Url, AttemptError> {
    base.path_segments_mut()
        .map_err(|()| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                "the search cluster URL cannot take a path",
            )
        })?
        .pop_if_empty()
        .extend(segments);
    Ok(base)
}

/// `type: reason` of an engine's error answer, else the answer itself.
fn engine_reason(excerpt: &str) -> String {
    match serde_json::from_str::<EngineError>(excerpt) {
        Ok(EngineError {
            error:
                EngineErrorBody {
                    kind: Some(kind),
                    reason: Some(reason),
                },
        }) => format!("{kind}: {reason}"),
        _ => excerpt.trim().to_owned(),
    }
}

/// The operation as `_bulk` lines, handed to the cluster's writer; its item's outcome.
async fn attempt_bulk(
    http: &reqwest::Client,
    writers: &BulkWriters,
    base: url::Url,
    settings: SearchBulk,
    action: &SearchAction,
    context: &ActionContext<'_>,
    index: &str,
) -> Result<ActionSuccess, AttemptError> {
    let entity_id = context.event.entity_id.as_str();
    let deleting = context.event.kind == EventKind::Delete;
    let operation = if deleting { "delete" } else { "index" };
    let meta = serde_json::json!({ operation: {"_index": index, "_id": entity_id} });
    let mut lines = format!("{meta}\n");
    if !deleting {
        lines.push_str(
            &serde_json::to_string(&context.event.data).map_err(|error| {
                AttemptError::new(
                    ErrorCode::MalformedEvent,
                    format!("the document does not serialize: {error}"),
                )
            })?,
        );
        lines.push('\n');
    }
    let credentials = credentials(action)?;
    let url = cluster_url(base.clone(), &["_bulk"])?;
    let secrets = secrets(action, &base, &url, credentials);
    let sender = writers.sender(
        http,
        BulkTarget {
            url,
            credentials: credentials
                .map(|(username, password)| (username.to_owned(), password.to_owned())),
            settings,
            timeout: action.timeout,
            secrets,
        },
    );
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = sender.send(BulkOperation {
        lines,
        deleting,
        label: format!("{operation} {index}/{entity_id}"),
        reply,
    });
    if sent.is_err() {
        return Err(AttemptError::new(
            ErrorCode::ShuttingDown,
            "the _bulk writer stopped",
        ));
    }
    answer.await.unwrap_or_else(|_| {
        Err(AttemptError::new(
            ErrorCode::ShuttingDown,
            "the _bulk writer stopped",
        ))
    })
}

pub(super) async fn attempt(
    http: &Http,
    templates: &Templates,
    action: &SearchAction,
    context: &ActionContext<'_>,
    writers: &BulkWriters,
) -> Result<ActionSuccess, AttemptError> {
    let cluster = target_url(&action.target, "the search cluster URL")?;
    let index = render(templates, &action.index_template, context)?;
    let index = index.trim();
    check_index(&action.index_template, index)?;
    if let Some(settings) = action.bulk {
        // One `_bulk` request at a time per writer: outside the per-call limiter.
        return attempt_bulk(
            &http.client,
            writers,
            cluster,
            settings,
            action,
            context,
            index,
        )
        .await;
    }
    let entity_id = context.event.entity_id.as_str();
    let url = cluster_url(cluster.clone(), &[index, "_doc", entity_id])?;
    let credentials = credentials(action)?;
    let secrets = secrets(action, &cluster, &url, credentials);
    let deleting = context.event.kind == EventKind::Delete;
    let mut request = if deleting {
        http.client.delete(url.clone())
    } else {
        http.client.put(url.clone()).json(&context.event.data)
    };
    if let Some((username, password)) = credentials {
        request = request.basic_auth(username, Some(password));
    }
    let label = target_label(&action.target);
    let response = http
        .send(
            context,
            &url,
            label.as_deref(),
            request,
            action.timeout,
            &secrets,
        )
        .await?;
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let redirect = redirect_reason(status, response.headers());
    let excerpt = body_excerpt(response).await;
    let operation = if deleting { "delete" } else { "index" };
    let Some(code) = failure_code(status, deleting) else {
        let result = serde_json::from_str::<EngineAnswer>(&excerpt)
            .ok()
            .and_then(|answer| answer.result)
            .unwrap_or_else(|| "ok".to_owned());
        return Ok(ActionSuccess {
            detail: format!("{operation} {index}/{entity_id}: HTTP {status} {result}"),
        });
    };
    let reason = redirect.unwrap_or_else(|| engine_reason(&excerpt));
    let mut error = AttemptError::new(
        code,
        secrets.redact(&format!(
            "{operation} {index}/{entity_id}: HTTP {status}: {reason}"
        )),
    );
    error.retry_after = wait;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_follow_the_engines_rules() {
        for good in ["orders", "orders-acme", "orders.2026", "o_1"] {
            assert!(check_index("t", good).is_ok(), "{good}");
        }
        for bad in [
            "", "Orders", "_orders", "-x", "a b", "a/b", "a,b", "..", "a:b", "a#b",
        ] {
            assert!(check_index("t", bad).is_err(), "{bad:?}");
        }
    }
}
