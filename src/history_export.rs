//! The history copied to Elasticsearch/OpenSearch (`history: {backend: search, url_env: …}`).
//!
//! PostgreSQL stays the history's first store: a page's rows are written with its checkpoint, as
//! with the default backend, so delivery never waits on the search backend and the crash
//! guarantee carries over. One exporter per cluster (a session advisory lock per index prefix)
//! reads the rows after its cursor in batches (`batch_size`, bounding what it holds in memory)
//! and sends them as `_bulk` requests to daily indices (`<prefix>-YYYY.MM.DD`, by the day the
//! event was processed), each document with the history id as its `_id`: a batch sent again
//! after a restart replaces its documents instead of doubling them. The cursor
//! (`fraiseql_observers.history_export`) moves only after the backend acknowledged the batch.
//!
//! While the backend is slow or down, nothing more is read: the rows wait in PostgreSQL (the
//! `history_export_waiting` gauge) and are sent when it answers again, oldest first. A document
//! the backend refuses on its own (a 4xx item other than 429) is dropped: counted in
//! `history_export_documents{result="dropped"}` and logged with its history id and the
//! backend's reason. Rows PostgreSQL's retention drops before they were sent are not exported.
//!
//! History ids are handed out before their transactions commit, so a batch can see id 12 before
//! id 11 is visible. An id below the highest read that was missing is asked for again on every
//! read for [`MISSING_ROW_WAIT`] (a page's transaction is one statement: a longer wait means it
//! rolled back), and the cursor stays below it meanwhile.
//!
//! The index template (applied when the exporter starts) carries the audit trail's mapping: ids
//! and names as keywords, timestamps as dates, the error messages as text, the event's `data` and
//! `changes` (read from the change-log row, up to [`MAX_DOCUMENT_DATA_BYTES`]) stored but not
//! indexed. Indices whose day ended longer ago than `retention` are deleted hourly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Setting, WebhookTarget};
use crate::history::HistoryEntry;
use crate::metrics::Metrics;
pub use crate::observers::history::{
    DEFAULT_BATCH_SIZE, DEFAULT_INDEX_PREFIX, DEFAULT_RETENTION, DEFAULT_TIMEOUT, SearchHistory,
};

/// How long a missing history id is waited for (see the module documentation).
pub const MISSING_ROW_WAIT: Duration = Duration::from_mins(2);
/// Largest change-log row whose `data` and `changes` go into a document (bytes of JSON); a larger
/// one is named in `data_omitted`.
pub const MAX_DOCUMENT_DATA_BYTES: u32 = 1024 * 1024;
/// Most missing ids waited for at once; past it the oldest are given up.
const MAX_MISSING: usize = 100_000;
/// How often an idle exporter reads again.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Longest wait between tries while the backend fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a node that does not hold the export lock tries to take it.
const LOCK_RETRY: Duration = Duration::from_secs(5);
/// How often old indices are looked for.
const RETENTION_EVERY: Duration = Duration::from_hours(1);
/// Largest `_bulk` body; a batch larger than this goes as several requests.
const MAX_BULK_BYTES: usize = 16 * 1024 * 1024;
/// Largest answer read from the backend.
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportSetupError {
    #[error("history.{0}: the environment variable {1} is not set")]
    MissingEnv(&'static str, String),
    #[error("history: the HTTP client could not be built: {0}")]
    Client(String),
}

/// Copies the history to the search backend; see the module documentation.
pub struct HistoryExporter {
    pool: PgPool,
    settings: SearchHistory,
    url: url::Url,
    credentials: Option<(String, String)>,
    /// How messages name the backend: the variable its URL came from, or its origin.
    label: String,
    http: reqwest::Client,
    metrics: Option<Arc<Metrics>>,
}

/// Names only the backend's label: the URL and credentials may carry secrets.
impl std::fmt::Debug for HistoryExporter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HistoryExporter")
            .field("backend", &self.label)
            .field("index_prefix", &self.settings.index_prefix)
            .finish_non_exhaustive()
    }
}

/// A failure of one step of the export; the step is tried again after a wait.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("history storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("change-log storage failed: {0}")]
    ChangeLog(#[from] crate::change_log::ChangeLogError),
    #[error("{0}")]
    Backend(String),
}

/// What one batch's `_bulk` requests did.
#[derive(Debug, Default)]
struct BatchResult {
    indexed: usize,
    dropped: usize,
}

impl HistoryExporter {
    /// An exporter of the history in `pool` to the backend of `settings`.
    ///
    /// # Errors
    /// The URL or credentials come from unset variables, or the HTTP client failed to build.
    pub fn new(
        pool: PgPool,
        settings: SearchHistory,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<HistoryExporter, ExportSetupError> {
        let (url, label) = match &settings.target {
            WebhookTarget::Literal(url) => (url.clone(), url.origin().ascii_serialization()),
            WebhookTarget::FromEnv { variable, url } => match url {
                Setting::Ready(url) => (url.0.clone(), format!("the cluster at {variable}")),
                Setting::MissingEnv(variable) => {
                    return Err(ExportSetupError::MissingEnv("url_env", variable.clone()));
                }
            },
            WebhookTarget::Template(template) => {
                return Err(ExportSetupError::Client(format!(
                    "the URL is the template {}, which the history export cannot render",
                    template.name
                )));
            }
        };
        let credentials = match &settings.credentials {
            None => None,
            Some(credentials) => {
                let username = credentials.username.ready().map_err(|variable| {
                    ExportSetupError::MissingEnv("username_env", variable.to_owned())
                })?;
                let password = credentials.password.ready().map_err(|variable| {
                    ExportSetupError::MissingEnv("password_env", variable.to_owned())
                })?;
                Some((username.expose().to_owned(), password.expose().to_owned()))
            }
        };
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| ExportSetupError::Client(error.without_url().to_string()))?;
        Ok(HistoryExporter {
            pool,
            settings,
            url,
            credentials,
            label,
            http,
            metrics,
        })
    }

    /// Exports while this node holds the export lock (taking it when it is free) until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::default();
        while !stop.is_cancelled() {
            let wait = match self.lead(&stop, &mut backoff).await {
                Ok(true) => Duration::ZERO,
                Ok(false) => LOCK_RETRY,
                Err(error) => {
                    tracing::warn!(%error, backend = %self.label, "history export: storage failed; trying again");
                    backoff.next()
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Takes the export lock and exports until `stop`; `Ok(false)` when another node holds it.
    async fn lead(
        &self,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<bool, ExportError> {
        // A connection of its own: the session lock lives as long as it does.
        let mut connection = self.pool.acquire().await?.detach();
        if !crate::history::try_lock_export(&mut connection, &self.settings.index_prefix).await? {
            return Ok(false);
        }
        tracing::info!(backend = %self.label, prefix = %self.settings.index_prefix, "history export: this node exports the history");
        while !stop.is_cancelled() {
            match self.put_template().await {
                Ok(()) => break,
                Err(error) => {
                    self.failed(&error, backoff, stop).await;
                }
            }
        }
        let mut cursor = Cursor::new(
            crate::history::export_cursor(&self.pool, &self.settings.index_prefix)
                .await?
                .unwrap_or(0),
        );
        let mut retention_due = Instant::now();
        while !stop.is_cancelled() {
            if Instant::now() >= retention_due {
                match self.apply_retention().await {
                    Ok(deleted) if !deleted.is_empty() => {
                        tracing::info!(indices = ?deleted, "history export: deleted indices past the retention");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "history export: old indices could not be deleted; trying again in an hour");
                    }
                }
                retention_due = Instant::now() + RETENTION_EVERY;
            }
            let rows = crate::history::export_rows(
                &self.pool,
                cursor.read_upto,
                &cursor.missing_ids(),
                i64::try_from(self.settings.batch_size).unwrap_or(i64::MAX),
            )
            .await?;
            if let Some(metrics) = &self.metrics {
                let last = crate::history::last_history_id(&self.pool).await?;
                metrics.history_export.waiting.set(cursor.waiting(last));
            }
            let fresh = rows
                .iter()
                .filter(|row| row.history_id > cursor.read_upto)
                .count();
            if !rows.is_empty() {
                match self.send(&rows).await {
                    Ok(result) => {
                        self.counted(&result);
                        backoff.reset();
                    }
                    Err(error) => {
                        self.failed(&error, backoff, stop).await;
                        continue;
                    }
                }
            }
            let saved = cursor.settled();
            cursor.advance(&rows, Instant::now());
            if cursor.settled() != saved {
                crate::history::save_export_cursor(
                    &self.pool,
                    &self.settings.index_prefix,
                    cursor.settled(),
                )
                .await?;
            }
            if fresh < self.settings.batch_size {
                // The lock lives with its connection: a lost connection means another node may
                // export now, so this one stops and tries to take the lock again.
                sqlx::Connection::ping(&mut connection).await?;
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
        drop(connection);
        Ok(true)
    }

    /// Counts and logs a failed step, and waits before the next try.
    async fn failed(&self, error: &ExportError, backoff: &mut Backoff, stop: &CancellationToken) {
        if let Some(metrics) = &self.metrics {
            metrics.history_export.failures.inc();
        }
        let wait = backoff.next();
        tracing::warn!(%error, backend = %self.label, retry_in = ?wait, "history export: the search backend failed; the rows wait in PostgreSQL");
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    fn counted(&self, result: &BatchResult) {
        if let Some(metrics) = &self.metrics {
            metrics
                .history_export
                .record_documents("indexed", result.indexed);
            metrics
                .history_export
                .record_documents("dropped", result.dropped);
        }
    }

    fn endpoint(&self, path: &str) -> url::Url {
        let mut url = self.url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}/{path}"));
        url.set_query(None);
        url
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.endpoint(path));
        match &self.credentials {
            Some((username, password)) => request.basic_auth(username, Some(password)),
            None => request,
        }
    }

    /// Sends `request`, and reads the answer (bounded) when it is a success.
    async fn call(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, ExportError> {
        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|error| ExportError::Backend(format!("{what}: {}", error.without_url())))?;
        let status = response.status();
        let answer = read_bounded(response).await.map_err(|error| {
            ExportError::Backend(format!("{what}: reading the answer: {error}"))
        })?;
        if what == "_bulk"
            && let Some(metrics) = &self.metrics
        {
            metrics
                .history_export
                .bulk_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if status.is_success() {
            Ok(answer)
        } else {
            let excerpt: String = String::from_utf8_lossy(&answer).chars().take(300).collect();
            Err(ExportError::Backend(format!(
                "{what}: HTTP {}: {}",
                status.as_u16(),
                excerpt.trim()
            )))
        }
    }

    /// Applies the index template of the prefix's indices.
    async fn put_template(&self) -> Result<(), ExportError> {
        let prefix = &self.settings.index_prefix;
        let request = self
            .request(reqwest::Method::PUT, &format!("_index_template/{prefix}"))
            .json(&index_template(prefix));
        self.call("the index template", request).await.map(drop)
    }

    /// Deletes the prefix's daily indices whose day ended longer ago than the retention; the
    /// names deleted.
    async fn apply_retention(&self) -> Result<Vec<String>, ExportError> {
        #[derive(Deserialize)]
        struct Index {
            index: String,
        }
        let prefix = &self.settings.index_prefix;
        let answer = self
            .call(
                "listing the indices",
                self.request(reqwest::Method::GET, &format!("_cat/indices/{prefix}-*"))
                    .query(&[("format", "json"), ("h", "index")]),
            )
            .await?;
        let indices: Vec<Index> = serde_json::from_slice(&answer).map_err(|error| {
            ExportError::Backend(format!("listing the indices: unexpected answer: {error}"))
        })?;
        let mut deleted = Vec::new();
        for index in indices {
            if expired(&index.index, prefix, self.settings.retention, Utc::now()) {
                self.call(
                    "deleting an index",
                    self.request(reqwest::Method::DELETE, &index.index),
                )
                .await?;
                deleted.push(index.index);
            }
        }
        Ok(deleted)
    }

    /// Sends `rows` as documents; a failure of the whole request (or of an item the backend
    /// may take later: 429, 5xx) fails the batch, to be sent again.
    async fn send(&self, rows: &[HistoryEntry]) -> Result<BatchResult, ExportError> {
        let positions: Vec<i64> = rows.iter().filter_map(|row| row.change_log_id).collect();
        let changes =
            crate::change_log::rows_at(&self.pool, &positions, (MAX_DOCUMENT_DATA_BYTES, 256))
                .await?;
        let changes: BTreeMap<i64, crate::change_log::RawRow> =
            changes.into_iter().map(|row| (row.position, row)).collect();
        let mut result = BatchResult::default();
        let mut body = String::new();
        let mut ids = Vec::new();
        for row in rows {
            let document = document(row, row.change_log_id.and_then(|id| changes.get(&id)));
            let index = index_name(&self.settings.index_prefix, row.processed_at);
            let line = json!({"index": {"_index": index, "_id": row.history_id.to_string()}});
            body.push_str(&line.to_string());
            body.push('\n');
            body.push_str(&document.to_string());
            body.push('\n');
            ids.push(row.history_id);
            if body.len() >= MAX_BULK_BYTES {
                let sent = self.bulk(std::mem::take(&mut body), &ids).await?;
                result.indexed += sent.indexed;
                result.dropped += sent.dropped;
                ids.clear();
            }
        }
        if !ids.is_empty() {
            let sent = self.bulk(body, &ids).await?;
            result.indexed += sent.indexed;
            result.dropped += sent.dropped;
        }
        Ok(result)
    }

    async fn bulk(&self, body: String, ids: &[i64]) -> Result<BatchResult, ExportError> {
        #[derive(Deserialize)]
        struct Answer {
            items: Vec<BTreeMap<String, Item>>,
        }
        #[derive(Deserialize)]
        struct Item {
            status: u16,
            error: Option<Value>,
        }
        let request = self
            .request(reqwest::Method::POST, "_bulk")
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let answer = self.call("_bulk", request).await?;
        let answer: Answer = serde_json::from_slice(&answer)
            .ok()
            .filter(|answer: &Answer| answer.items.len() == ids.len())
            .ok_or_else(|| {
                ExportError::Backend(format!(
                    "_bulk: the answer does not list one item per document ({})",
                    ids.len()
                ))
            })?;
        let mut result = BatchResult::default();
        for (id, item) in ids.iter().zip(answer.items) {
            let Some(item) = item.into_values().next() else {
                continue;
            };
            match item.status {
                200..=299 => result.indexed += 1,
                429 | 500.. => {
                    return Err(ExportError::Backend(format!(
                        "_bulk: history row {id}: HTTP {} ({}); the batch is sent again",
                        item.status,
                        engine_reason(item.error.as_ref())
                    )));
                }
                status => {
                    result.dropped += 1;
                    tracing::warn!(
                        history_id = id,
                        status,
                        reason = %engine_reason(item.error.as_ref()),
                        "history export: the search backend refused a document; dropped (the row stays in PostgreSQL)"
                    );
                }
            }
        }
        Ok(result)
    }
}

/// The engine's `type: reason` of a refused item, cut to 300 characters.
fn engine_reason(error: Option<&Value>) -> String {
    let Some(error) = error else {
        return "no reason given".to_owned();
    };
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
    let reason = error
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    format!("{kind}: {reason}").chars().take(300).collect()
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut answer = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| error.without_url().to_string())?
    {
        if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        answer.extend_from_slice(&chunk);
    }
    Ok(answer)
}

/// The daily index of a row processed at `processed_at`.
#[must_use]
pub fn index_name(prefix: &str, processed_at: DateTime<Utc>) -> String {
    format!("{prefix}-{}", processed_at.format("%Y.%m.%d"))
}

/// Whether `index` is a daily index of `prefix` whose day ended longer ago than `retention`.
fn expired(index: &str, prefix: &str, retention: Duration, now: DateTime<Utc>) -> bool {
    let Some(day) = index
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|day| NaiveDate::parse_from_str(day, "%Y.%m.%d").ok())
    else {
        return false;
    };
    let Some(end) = day
        .succ_opt()
        .and_then(|next| next.and_hms_opt(0, 0, 0))
        .map(|end| end.and_utc())
    else {
        return false;
    };
    chrono::Duration::from_std(retention).is_ok_and(|retention| end <= now - retention)
}

/// The index template of `prefix`'s indices: the audit trail's mapping.
#[must_use]
pub fn index_template(prefix: &str) -> Value {
    let keyword = json!({"type": "keyword"});
    let date = json!({"type": "date"});
    json!({
        "index_patterns": [format!("{prefix}-*")],
        "template": {
            "mappings": {
                "dynamic": false,
                "properties": {
                    "history_id": {"type": "long"},
                    "record_kind": keyword,
                    "event_id": keyword,
                    "entity_type": keyword,
                    "entity_id": keyword,
                    "event_type": keyword,
                    "change_log_id": {"type": "long"},
                    "tenant_id": keyword,
                    "user_id": keyword,
                    "actor_type": keyword,
                    "timestamp": date,
                    "processed_at": date,
                    "matching_observers": keyword,
                    "unmatched_observers": keyword,
                    "outcomes": keyword,
                    "successful_actions": {"type": "integer"},
                    "failed_actions": {"type": "integer"},
                    "processing_duration_ms": {"type": "double"},
                    "processing_errors": {"type": "text"},
                    "actions": {
                        "properties": {
                            "observer": keyword,
                            "type": keyword,
                            "outcome": keyword,
                            "attempts": {"type": "integer"},
                            "latency_ms": {"type": "double"},
                            "error_code": keyword,
                            "error_message": {"type": "text"},
                            "job_id": keyword,
                            "dead_letter_id": keyword
                        }
                    },
                    "node_id": keyword,
                    "partition": {"type": "integer"},
                    "epoch": {"type": "long"},
                    "data": {"type": "object", "enabled": false},
                    "changes": {"type": "object", "enabled": false},
                    "data_omitted": keyword
                }
            }
        }
    })
}

/// The document of one history row; `change` is its change-log row, when it still exists.
#[must_use]
pub fn document(row: &HistoryEntry, change: Option<&crate::change_log::RawRow>) -> Value {
    let actions = row.actions.as_array().map_or(&[][..], Vec::as_slice);
    let count = |outcome: &str| {
        actions
            .iter()
            .filter(|action| action.get("outcome").and_then(Value::as_str) == Some(outcome))
            .count()
    };
    let errors: Vec<&str> = actions
        .iter()
        .filter_map(|action| action.get("error_message").and_then(Value::as_str))
        .collect();
    let mut document = json!({
        "history_id": row.history_id,
        "record_kind": row.record_kind,
        "event_id": row.event_id,
        "entity_type": row.entity_type,
        "entity_id": row.entity_id,
        "event_type": row.event_kind,
        "change_log_id": row.change_log_id,
        "tenant_id": row.tenant_id,
        "user_id": row.actor_id,
        "actor_type": row.actor_type,
        "timestamp": row.event_at,
        "processed_at": row.processed_at,
        "matching_observers": row.matched_observers,
        "unmatched_observers": row.unmatched_observers,
        "outcomes": row.outcomes,
        "successful_actions": count("succeeded"),
        "failed_actions": count("failed") + count("dead_lettered"),
        "processing_duration_ms": row.processing_ms,
        "processing_errors": (!errors.is_empty()).then(|| errors.join("\n")),
        "actions": row.actions,
        "node_id": row.node_id,
        "partition": row.partition,
        "epoch": row.epoch,
    });
    let (data, omitted) = event_images(row, change);
    if let Some(map) = document.as_object_mut() {
        if let Some((data, changes)) = data {
            map.insert("data".to_owned(), data);
            map.insert("changes".to_owned(), changes);
        }
        if let Some(omitted) = omitted {
            map.insert("data_omitted".to_owned(), Value::String(omitted));
        }
    }
    document
}

/// The event's `data` and `changes` from its change-log row, or why they are left out.
fn event_images(
    row: &HistoryEntry,
    change: Option<&crate::change_log::RawRow>,
) -> (Option<(Value, Value)>, Option<String>) {
    if row.change_log_id.is_none() {
        return (None, Some("no change-log row".to_owned()));
    }
    let Some(change) = change else {
        return (None, Some("change-log row gone (retention)".to_owned()));
    };
    if change.size > u64::from(MAX_DOCUMENT_DATA_BYTES) {
        return (
            None,
            Some(format!(
                "change-log row of {} bytes, above {MAX_DOCUMENT_DATA_BYTES}",
                change.size
            )),
        );
    }
    let event = crate::listener::decode_row_text(
        change.position,
        change.size,
        &change.text,
        MAX_DOCUMENT_DATA_BYTES,
    )
    .ok();
    match event {
        Some(event) => (
            Some((
                event.data,
                serde_json::to_value(&event.changes).unwrap_or(Value::Null),
            )),
            None,
        ),
        None => (None, Some("change-log row does not decode".to_owned())),
    }
}

/// The export position: every row up to [`Cursor::settled`] is exported; ids up to `read_upto`
/// were read but for `missing` ones, waited for until their deadline.
#[derive(Debug)]
struct Cursor {
    read_upto: i64,
    /// Missing id → when it was first seen missing.
    missing: BTreeMap<i64, Instant>,
}

impl Cursor {
    fn new(settled: i64) -> Cursor {
        Cursor {
            read_upto: settled,
            missing: BTreeMap::new(),
        }
    }

    fn missing_ids(&self) -> Vec<i64> {
        self.missing.keys().copied().collect()
    }

    /// Every id up to this one is exported (or given up).
    fn settled(&self) -> i64 {
        self.missing
            .keys()
            .next()
            .map_or(self.read_upto, |first| first - 1)
    }

    /// Rows above the cursor, as far as the sequence `last` says (holes included).
    fn waiting(&self, last: i64) -> i64 {
        (last - self.read_upto).max(0) + i64::try_from(self.missing.len()).unwrap_or(i64::MAX)
    }

    /// Takes in the ids of rows just exported (`rows`, in id order) at `now`.
    fn advance(&mut self, rows: &[HistoryEntry], now: Instant) {
        let mut previous = self.read_upto;
        for row in rows {
            let id = row.history_id;
            if self.missing.remove(&id).is_some() {
                continue;
            }
            if id <= self.read_upto {
                continue;
            }
            for hole in previous + 1..id {
                if self.missing.len() >= MAX_MISSING {
                    break;
                }
                self.missing.insert(hole, now);
            }
            previous = id;
        }
        self.read_upto = self.read_upto.max(previous);
        self.missing
            .retain(|_, since| now.duration_since(*since) < MISSING_ROW_WAIT);
    }
}

/// Waits between tries: 1 s, doubling to [`MAX_BACKOFF`].
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = Duration::from_secs(1) * 2_u32.saturating_pow(self.failures.min(5));
        self.failures = self.failures.saturating_add(1);
        wait.min(MAX_BACKOFF)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(history_id: i64) -> HistoryEntry {
        HistoryEntry {
            history_id,
            processed_at: Utc::now(),
            record_kind: "event".to_owned(),
            event_id: uuid::Uuid::nil(),
            entity_type: "Order".to_owned(),
            entity_id: "1".to_owned(),
            event_kind: "insert".to_owned(),
            change_log_id: None,
            tenant_id: None,
            actor_type: None,
            actor_id: None,
            event_at: None,
            matched_observers: Vec::new(),
            unmatched_observers: Vec::new(),
            outcomes: Vec::new(),
            actions: json!([]),
            node_id: None,
            partition: None,
            epoch: None,
            processing_ms: None,
        }
    }

    #[test]
    fn the_cursor_waits_below_a_missing_id_and_moves_once_it_arrives_or_expires() {
        let start = Instant::now();
        let mut cursor = Cursor::new(10);
        cursor.advance(&[entry(11), entry(14), entry(15)], start);
        assert_eq!(cursor.read_upto, 15);
        assert_eq!(cursor.missing_ids(), vec![12, 13]);
        assert_eq!(cursor.settled(), 11);
        // 12 commits later; 13 never does (rolled back).
        cursor.advance(&[entry(12), entry(16)], start + Duration::from_secs(1));
        assert_eq!(cursor.missing_ids(), vec![13]);
        assert_eq!(cursor.settled(), 12);
        cursor.advance(&[], start + MISSING_ROW_WAIT);
        assert_eq!(cursor.settled(), 16);
        assert_eq!(cursor.waiting(20), 4);
    }

    #[test]
    fn daily_indices_expire_when_their_whole_day_is_past_the_retention() {
        let now = DateTime::parse_from_rfc3339("2026-12-06T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let day = Duration::from_hours(24);
        assert!(expired("h-2026.12.04", "h", day, now));
        assert!(!expired("h-2026.12.05", "h", day, now));
        assert!(!expired("h-2026.12.04", "other", day, now));
        assert!(!expired("h-backup", "h", day, now));
        assert_eq!(
            index_name("h", now),
            "h-2026.12.06",
            "indices are named by the UTC day"
        );
    }

    #[test]
    fn documents_count_outcomes_and_join_error_messages() {
        let mut row = entry(7);
        row.actions = json!([
            {"observer": "a", "outcome": "succeeded"},
            {"observer": "b", "outcome": "dead_lettered", "error_message": "HTTP 410: Gone"},
            {"observer": "c", "outcome": "failed", "error_message": "timed out"}
        ]);
        let document = document(&row, None);
        assert_eq!(document["successful_actions"], 1);
        assert_eq!(document["failed_actions"], 2);
        assert_eq!(document["processing_errors"], "HTTP 410: Gone\ntimed out");
        assert_eq!(document["data_omitted"], "no change-log row");
        assert!(document.get("data").is_none());
    }
}
