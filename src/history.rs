//! The audit trail in PostgreSQL: the only code with SQL for `fraiseql_observers.history`.
//!
//! Every processed event gets one row (`record_kind = 'event'`): its identity, where it sits in the
//! change log, what matched, what each action did, and where it ran (node, partition, epoch). A
//! later outcome of one of its queued actions (the job succeeded, or was dead-lettered) appends one
//! more row (`record_kind = 'job'`) for the same event: rows are never updated.
//!
//! The event rows of a page are written by the checkpoint store in the statement (or the
//! transaction) that moves the partition's checkpoint, and only when its compare-and-swap
//! succeeds: no extra round trip or WAL flush per event, and exactly one event row per committed
//! page — a page read again after a crash was not committed, so it had written none. This module
//! renders the rows ([`HistoryRecord`], bound column by column as [`HistoryColumns`]) and owns the
//! SQL fragment that inserts them ([`insert_sql`]); the checkpoint store only binds and runs it.
//!
//! The event's data and changes are not copied: `change_log_id` refers to the change-log row that
//! holds them (size: a copy would double every event's bytes in the WAL and on disk).
//!
//! The table is partitioned by day; [`maintain_partitions_on`] creates days ahead and drops those
//! past the retention, in the coordinator's fenced transaction. [`search`] reads it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::outcome::{ActionReport, ActionStatus, EventSummary};

/// How long history is kept by default.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_hours(24 * 30);
/// Day partitions created ahead of today.
pub const PARTITIONS_AHEAD_DAYS: i32 = 7;
/// Longest error message kept per action (bytes, cut on a character boundary).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 2048;
/// Most rows one search returns.
pub const MAX_SEARCH_LIMIT: i64 = 1000;

/// Where a page ran: the node, the partition and the lease epoch it held.
#[derive(Clone, Debug)]
pub struct HistoryContext {
    pub node_id: String,
    pub partition: i32,
    pub epoch: i64,
}

/// How one action ended, as history names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryOutcome {
    Succeeded,
    Failed,
    DeadLettered,
    Queued,
    /// Another node holds the action's claim (deduplication): not run here.
    SkippedDuplicate,
    /// Completed before (the ledger or the dedup store says so): not run again.
    AlreadyCompleted,
}

impl HistoryOutcome {
    /// Every outcome, in a fixed order.
    pub const ALL: [HistoryOutcome; 6] = [
        HistoryOutcome::Succeeded,
        HistoryOutcome::Failed,
        HistoryOutcome::DeadLettered,
        HistoryOutcome::Queued,
        HistoryOutcome::SkippedDuplicate,
        HistoryOutcome::AlreadyCompleted,
    ];

    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryOutcome::Succeeded => "succeeded",
            HistoryOutcome::Failed => "failed",
            HistoryOutcome::DeadLettered => "dead_lettered",
            HistoryOutcome::Queued => "queued",
            HistoryOutcome::SkippedDuplicate => "skipped_duplicate",
            HistoryOutcome::AlreadyCompleted => "already_completed",
        }
    }

    /// Parses a stored name.
    ///
    /// # Errors
    /// The text names no outcome; the error lists the accepted ones.
    pub fn parse(text: &str) -> Result<HistoryOutcome, String> {
        HistoryOutcome::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown outcome {text:?}: expected one of {}",
                    HistoryOutcome::ALL.map(HistoryOutcome::as_str).join(", ")
                )
            })
    }

    fn of(status: &ActionStatus) -> HistoryOutcome {
        match status {
            ActionStatus::Succeeded { .. } => HistoryOutcome::Succeeded,
            ActionStatus::AlreadyCompleted => HistoryOutcome::AlreadyCompleted,
            ActionStatus::Enqueued { .. } => HistoryOutcome::Queued,
            ActionStatus::Failed {
                code: ErrorCode::InProgressElsewhere,
                ..
            } => HistoryOutcome::SkippedDuplicate,
            ActionStatus::Failed {
                dead_letter: Some(_),
                ..
            } => HistoryOutcome::DeadLettered,
            ActionStatus::Failed { .. } => HistoryOutcome::Failed,
        }
    }
}

/// One action's part in a history row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryAction {
    pub observer: String,
    pub action_index: usize,
    #[serde(rename = "type")]
    pub action_type: String,
    pub outcome: HistoryOutcome,
    pub attempts: u32,
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Already redacted by the action runner (no secret reaches a report), cut to
    /// [`MAX_ERROR_MESSAGE_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The dead letter the action was parked as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_id: Option<Uuid>,
    /// The job queue the action was handed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The queued job's id (a job-outcome row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
}

impl HistoryAction {
    /// The history form of one action report.
    #[must_use]
    pub fn from_report(report: &ActionReport) -> HistoryAction {
        let (error_code, error_message, dead_letter_id, queue) = match &report.status {
            ActionStatus::Failed {
                code,
                message,
                dead_letter,
            } => (
                Some(code.as_str().to_owned()),
                Some(error_text(message)),
                *dead_letter,
                None,
            ),
            ActionStatus::Enqueued { queue } => (None, None, None, Some(queue.clone())),
            ActionStatus::Succeeded { .. } | ActionStatus::AlreadyCompleted => {
                (None, None, None, None)
            }
        };
        HistoryAction {
            observer: report.observer.clone(),
            action_index: report.action_index,
            action_type: report.action_type.to_owned(),
            outcome: HistoryOutcome::of(&report.status),
            attempts: report.attempts,
            latency_ms: report.duration.as_secs_f64() * 1000.0,
            error_code,
            error_message,
            dead_letter_id,
            queue,
            job_id: None,
        }
    }
}

/// An error message as history stores it: NUL replaced (no PostgreSQL text or jsonb holds one,
/// and receivers' answers may contain it) and cut to [`MAX_ERROR_MESSAGE_BYTES`] on a character
/// boundary.
#[must_use]
pub fn error_text(message: &str) -> String {
    truncate(&crate::escape::storable(message), MAX_ERROR_MESSAGE_BYTES)
}

fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// One history row, rendered: the checkpoint store binds a page's rows column by column
/// ([`HistoryColumns`]).
#[derive(Clone, Debug)]
pub struct HistoryRecord {
    /// The partition whose checkpoint the row is written with (the row is written only if that
    /// checkpoint moves); `None` for a job-outcome row.
    pub partition: Option<i32>,
    pub record_kind: &'static str,
    pub event_id: Uuid,
    pub entity_type: String,
    pub entity_id: String,
    pub event_kind: String,
    /// The change-log row (`pk_entity_change_log`) holding the event's data and changes.
    pub change_log_id: Option<i64>,
    pub tenant_id: Option<String>,
    pub actor_type: Option<String>,
    pub actor_id: Option<String>,
    pub event_at: DateTime<Utc>,
    pub matched_observers: Vec<String>,
    pub unmatched_observers: Vec<String>,
    pub outcomes: Vec<&'static str>,
    pub actions: Vec<HistoryAction>,
    pub errors: Option<String>,
    pub node_id: String,
    /// The lease epoch of the page; `None` for a job-outcome row.
    pub epoch: Option<i64>,
    pub processing_ms: f64,
}

impl HistoryRecord {
    /// The event row of `event`, as its page ran it.
    #[must_use]
    pub fn for_event(
        event: &EntityEvent,
        summary: &EventSummary,
        context: &HistoryContext,
    ) -> HistoryRecord {
        let actions: Vec<HistoryAction> = summary
            .actions
            .iter()
            .map(HistoryAction::from_report)
            .collect();
        HistoryRecord::with_actions(
            event,
            "event",
            actions,
            summary.matched_observers.clone(),
            summary.unmatched_observers.clone(),
            summary.duration,
            context,
        )
    }

    /// A job-outcome row: `action` is the outcome of a queued action of `event`.
    #[must_use]
    pub fn for_job(
        event: &EntityEvent,
        action: HistoryAction,
        took: Duration,
        node_id: &str,
    ) -> HistoryRecord {
        let observers = vec![action.observer.clone()];
        let mut record = HistoryRecord::with_actions(
            event,
            "job",
            vec![action],
            observers,
            Vec::new(),
            took,
            &HistoryContext {
                node_id: node_id.to_owned(),
                partition: 0,
                epoch: 0,
            },
        );
        record.partition = None;
        record.epoch = None;
        record
    }

    fn with_actions(
        event: &EntityEvent,
        record_kind: &'static str,
        actions: Vec<HistoryAction>,
        matched_observers: Vec<String>,
        unmatched_observers: Vec<String>,
        took: Duration,
        context: &HistoryContext,
    ) -> HistoryRecord {
        let mut outcomes: Vec<&'static str> = Vec::new();
        for action in &actions {
            if !outcomes.contains(&action.outcome.as_str()) {
                outcomes.push(action.outcome.as_str());
            }
        }
        let errors: Vec<&str> = actions
            .iter()
            .filter_map(|action| action.error_message.as_deref())
            .collect();
        let errors = (!errors.is_empty()).then(|| errors.join("\n"));
        HistoryRecord {
            partition: Some(context.partition),
            record_kind,
            event_id: event.id,
            entity_type: event.entity_type.clone(),
            entity_id: event.entity_id.clone(),
            event_kind: event.kind.as_str().to_ascii_lowercase(),
            change_log_id: event.position,
            tenant_id: event.tenant_id.clone(),
            actor_type: event.actor.as_ref().and_then(|actor| actor.kind.clone()),
            actor_id: event.actor.as_ref().and_then(|actor| actor.id.clone()),
            event_at: event.timestamp,
            matched_observers,
            unmatched_observers,
            outcomes,
            actions,
            errors,
            node_id: context.node_id.clone(),
            epoch: Some(context.epoch),
            processing_ms: took.as_secs_f64() * 1000.0,
        }
    }
}

/// An `INSERT` of history rows from the columns of [`HistoryColumns`], bound as 19 array
/// parameters from `$first` on (in [`bind_history_columns!`]'s order) and selected from a row
/// source aliased `history_row`: the caller appends a `JOIN` or `WHERE` on
/// `history_row.partition` (the checkpoint store joins the partitions whose compare-and-swap
/// succeeded).
///
/// Typed arrays rather than one JSON document: PostgreSQL decodes binary arrays with no parsing,
/// and only each row's `actions` is JSON to parse (a page's rows as one document cost ≈ 10 µs of
/// parsing per row).
#[must_use]
pub(crate) fn insert_sql(first: usize) -> String {
    let parameter = |offset: usize, array_type: &str| format!("${}::{array_type}", first + offset);
    let arrays = [
        "int[]",
        "text[]",
        "uuid[]",
        "text[]",
        "text[]",
        "text[]",
        "bigint[]",
        "text[]",
        "text[]",
        "text[]",
        "timestamptz[]",
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "bigint[]",
        "float8[]",
    ]
    .iter()
    .enumerate()
    .map(|(offset, array_type)| parameter(offset, array_type))
    .collect::<Vec<_>>()
    .join(", ");
    format!(
        "INSERT INTO fraiseql_observers.history
             (record_kind, event_id, entity_type, entity_id, event_kind, change_log_id,
              tenant_id, actor_type, actor_id, event_at, matched_observers,
              unmatched_observers, outcomes, actions, errors, node_id, partition, epoch,
              processing_ms)
         SELECT history_row.record_kind, history_row.event_id, history_row.entity_type,
                history_row.entity_id, history_row.event_kind, history_row.change_log_id,
                history_row.tenant_id, history_row.actor_type, history_row.actor_id,
                history_row.event_at, history_row.matched_observers::text[],
                history_row.unmatched_observers::text[], history_row.outcomes::text[],
                history_row.actions::jsonb, history_row.errors, history_row.node_id,
                history_row.partition, history_row.epoch, history_row.processing_ms
           FROM unnest({arrays})
                AS history_row(partition, record_kind, event_id, entity_type, entity_id,
                               event_kind, change_log_id, tenant_id, actor_type, actor_id,
                               event_at, matched_observers, unmatched_observers, outcomes,
                               actions, errors, node_id, epoch, processing_ms)"
    )
}

/// History rows column by column, as [`insert_sql`] takes them: the text-array columns as
/// array literals and `actions` as JSON text, one element per row.
#[derive(Debug, Default)]
pub(crate) struct HistoryColumns<'rows> {
    pub partition: Vec<Option<i32>>,
    pub record_kind: Vec<&'static str>,
    pub event_id: Vec<Uuid>,
    pub entity_type: Vec<&'rows str>,
    pub entity_id: Vec<&'rows str>,
    pub event_kind: Vec<&'rows str>,
    pub change_log_id: Vec<Option<i64>>,
    pub tenant_id: Vec<Option<&'rows str>>,
    pub actor_type: Vec<Option<&'rows str>>,
    pub actor_id: Vec<Option<&'rows str>>,
    pub event_at: Vec<DateTime<Utc>>,
    pub matched_observers: Vec<String>,
    pub unmatched_observers: Vec<String>,
    pub outcomes: Vec<String>,
    pub actions: Vec<String>,
    pub errors: Vec<Option<&'rows str>>,
    pub node_id: Vec<&'rows str>,
    pub epoch: Vec<Option<i64>>,
    pub processing_ms: Vec<f64>,
}

impl<'rows> HistoryColumns<'rows> {
    /// The columns of `records`.
    ///
    /// # Errors
    /// A row's actions did not serialize (they always do: plain strings and numbers).
    pub(crate) fn of(
        records: impl IntoIterator<Item = &'rows HistoryRecord>,
    ) -> Result<HistoryColumns<'rows>, serde_json::Error> {
        let mut columns = HistoryColumns::default();
        for record in records {
            columns.partition.push(record.partition);
            columns.record_kind.push(record.record_kind);
            columns.event_id.push(record.event_id);
            columns.entity_type.push(&record.entity_type);
            columns.entity_id.push(&record.entity_id);
            columns.event_kind.push(&record.event_kind);
            columns.change_log_id.push(record.change_log_id);
            columns.tenant_id.push(record.tenant_id.as_deref());
            columns.actor_type.push(record.actor_type.as_deref());
            columns.actor_id.push(record.actor_id.as_deref());
            columns.event_at.push(record.event_at);
            columns
                .matched_observers
                .push(array_literal(&record.matched_observers));
            columns
                .unmatched_observers
                .push(array_literal(&record.unmatched_observers));
            columns.outcomes.push(array_literal(&record.outcomes));
            columns
                .actions
                .push(serde_json::to_string(&record.actions)?);
            columns.errors.push(record.errors.as_deref());
            columns.node_id.push(&record.node_id);
            columns.epoch.push(record.epoch);
            columns.processing_ms.push(record.processing_ms);
        }
        Ok(columns)
    }
}

/// Binds a [`HistoryColumns`] (moved) to a query, in [`insert_sql`]'s parameter order.
macro_rules! bind_history_columns {
    ($query:expr, $columns:expr) => {{
        let columns = $columns;
        $query
            .bind(columns.partition)
            .bind(columns.record_kind)
            .bind(columns.event_id)
            .bind(columns.entity_type)
            .bind(columns.entity_id)
            .bind(columns.event_kind)
            .bind(columns.change_log_id)
            .bind(columns.tenant_id)
            .bind(columns.actor_type)
            .bind(columns.actor_id)
            .bind(columns.event_at)
            .bind(columns.matched_observers)
            .bind(columns.unmatched_observers)
            .bind(columns.outcomes)
            .bind(columns.actions)
            .bind(columns.errors)
            .bind(columns.node_id)
            .bind(columns.epoch)
            .bind(columns.processing_ms)
    }};
}
pub(crate) use bind_history_columns;

/// A PostgreSQL array literal of `items`, every element quoted (so `NULL`, commas, braces and
/// blanks stay text), `"` and `\` escaped.
fn array_literal<Item: AsRef<str>>(items: &[Item]) -> String {
    let mut literal = String::with_capacity(
        2 + items
            .iter()
            .map(|item| item.as_ref().len() + 3)
            .sum::<usize>(),
    );
    literal.push('{');
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            literal.push(',');
        }
        literal.push('"');
        for character in item.as_ref().chars() {
            if matches!(character, '"' | '\\') {
                literal.push('\\');
            }
            literal.push(character);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
}

/// Writes history rows on `executor` (a transaction of the caller's, or a pool).
///
/// # Errors
/// Storage failed.
pub async fn insert_on<'connection>(
    executor: impl sqlx::Executor<'connection, Database = sqlx::Postgres>,
    records: &[HistoryRecord],
) -> Result<u64, sqlx::Error> {
    static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1));
    if records.is_empty() {
        return Ok(0);
    }
    let columns = HistoryColumns::of(records).map_err(|error| sqlx::Error::Encode(error.into()))?;
    Ok(
        bind_history_columns!(sqlx::query(sqlx::AssertSqlSafe(INSERT.as_str())), columns)
            .execute(executor)
            .await?
            .rows_affected(),
    )
}

/// What one partition-maintenance run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionMaintenance {
    pub created: i32,
    pub dropped: i32,
}

/// Creates the day partitions up to [`PARTITIONS_AHEAD_DAYS`] ahead and drops those whose day
/// ended more than `retention` ago, on `connection` (the coordinator's fenced transaction). A
/// dropped partition takes a short lock on the table (`lock_timeout` bounds the wait: a busy
/// table makes the run fail and the next run try again).
///
/// # Errors
/// Storage failed, or the lock was not granted in time.
pub async fn maintain_partitions_on(
    connection: &mut sqlx::PgConnection,
    retention: Duration,
) -> Result<PartitionMaintenance, sqlx::Error> {
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *connection)
        .await?;
    let created: i32 =
        sqlx::query_scalar("SELECT fraiseql_observers.ensure_history_partitions($1)")
            .bind(PARTITIONS_AHEAD_DAYS)
            .fetch_one(&mut *connection)
            .await?;
    let dropped: i32 = sqlx::query_scalar(
        "SELECT fraiseql_observers.drop_history_partitions(make_interval(secs => $1))",
    )
    .bind(retention.as_secs_f64())
    .fetch_one(&mut *connection)
    .await?;
    Ok(PartitionMaintenance { created, dropped })
}

/// The day partitions of the history table, oldest first (`history_pYYYYMMDD`).
///
/// # Errors
/// Storage failed.
pub async fn day_partitions(pool: &sqlx::PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'fraiseql_observers.history'::regclass
            AND c.relname ~ '^history_p[0-9]{8}$'
          ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await
}

/// What to search for; every filter given must hold.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub event_id: Option<Uuid>,
    /// `insert`, `update`, `delete` or `custom`.
    pub event_kind: Option<String>,
    /// An observer among the row's matched observers.
    pub observer: Option<String>,
    pub outcome: Option<HistoryOutcome>,
    /// Processed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Processed before.
    pub until: Option<DateTime<Utc>>,
    /// Words that must all appear in the row's error messages.
    pub text: Option<String>,
    /// Only rows older than this cursor (a previous page's [`HistoryPage::next_cursor`]).
    pub after: Option<i64>,
    /// Most rows (1..=[`MAX_SEARCH_LIMIT`]).
    pub limit: i64,
}

/// One row found.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    pub history_id: i64,
    pub processed_at: DateTime<Utc>,
    pub record_kind: String,
    pub event_id: Uuid,
    pub entity_type: String,
    pub entity_id: String,
    pub event_kind: String,
    pub change_log_id: Option<i64>,
    pub tenant_id: Option<String>,
    pub actor_type: Option<String>,
    pub actor_id: Option<String>,
    pub event_at: Option<DateTime<Utc>>,
    pub matched_observers: Vec<String>,
    pub unmatched_observers: Vec<String>,
    pub outcomes: Vec<String>,
    pub actions: serde_json::Value,
    pub node_id: Option<String>,
    pub partition: Option<i32>,
    pub epoch: Option<i64>,
    pub processing_ms: Option<f64>,
}

/// A page of search results, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Pass as [`HistoryQuery::after`] for the next page; `None`: this was the last.
    pub next_cursor: Option<i64>,
}

/// Rows with errors a full-text search walks newest first before it asks the GIN index for the
/// rest (see [`search`]).
pub const TEXT_SEARCH_WALK: i64 = 5_000;

/// The columns a [`HistoryEntry`] is read from.
const ENTRY_COLUMNS: &str =
    "history_id, processed_at, record_kind, event_id, entity_type, entity_id,
        event_kind, change_log_id, tenant_id, actor_type, actor_id, event_at,
        matched_observers, unmatched_observers, outcomes, actions, node_id, partition,
        epoch, processing_ms";

/// Every filter of a [`HistoryQuery`] but the text, its values bound from `$1` to `$9` (`$9`:
/// only rows older than this id).
const FILTERS: &str = "($1::text IS NULL OR entity_type = $1)
            AND ($2::text IS NULL OR entity_id = $2)
            AND ($3::uuid IS NULL OR event_id = $3)
            AND ($4::text IS NULL OR event_kind = $4)
            AND ($5::text IS NULL OR matched_observers @> ARRAY[$5::text])
            AND ($6::text IS NULL OR outcomes @> ARRAY[$6::text])
            AND ($7::timestamptz IS NULL OR processed_at >= $7)
            AND ($8::timestamptz IS NULL OR processed_at < $8)
            AND ($9::bigint IS NULL OR history_id < $9)";

/// A statement with [`FILTERS`]' parameters bound from `query` (`before` as `$9`).
fn bind_filters<'query>(
    statement: sqlx::query::Query<'query, sqlx::Postgres, sqlx::postgres::PgArguments>,
    query: &'query HistoryQuery,
    before: Option<i64>,
) -> sqlx::query::Query<'query, sqlx::Postgres, sqlx::postgres::PgArguments> {
    statement
        .bind(query.entity_type.as_deref())
        .bind(query.entity_id.as_deref())
        .bind(query.event_id)
        .bind(query.event_kind.as_deref().map(str::to_ascii_lowercase))
        .bind(query.observer.as_deref())
        .bind(query.outcome.map(HistoryOutcome::as_str))
        .bind(query.since)
        .bind(query.until)
        .bind(before)
}

/// Searches the history, newest first.
///
/// A full-text search (`text`) first walks the newest [`TEXT_SEARCH_WALK`] rows with errors
/// that match the other filters and keeps those whose errors hold the words: words common enough
/// to fill a page are found there at once, where the GIN index would fetch every match (the
/// planner cannot tell common words from rare ones when they are asked for together). Only when
/// the walk ends before the page is full does it ask the GIN index, for rows older than the walk
/// reached: rare words, which that index finds cheaply.
///
/// # Errors
/// Storage failed (the table is missing when the migrations were not applied).
pub async fn search(pool: &sqlx::PgPool, query: &HistoryQuery) -> Result<HistoryPage, sqlx::Error> {
    let limit = query.limit.clamp(1, MAX_SEARCH_LIMIT);
    let rows: Vec<sqlx::postgres::PgRow> = match &query.text {
        None => {
            bind_filters(
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {ENTRY_COLUMNS} FROM fraiseql_observers.history
                      WHERE {FILTERS}
                      ORDER BY history_id DESC
                      LIMIT $10"
                ))),
                query,
                query.after,
            )
            .bind(limit + 1)
            .fetch_all(pool)
            .await?
        }
        Some(text) => {
            let ids = text_search_ids(pool, query, text, limit + 1).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENTRY_COLUMNS} FROM fraiseql_observers.history
                  WHERE history_id = ANY($1)
                  ORDER BY history_id DESC"
            )))
            .bind(ids)
            .fetch_all(pool)
            .await?
        }
    };
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    let entries: Vec<HistoryEntry> = rows
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|row| entry_from_row(&row))
        .collect::<Result<_, _>>()?;
    let next_cursor = if more {
        entries.last().map(|entry| entry.history_id)
    } else {
        None
    };
    Ok(HistoryPage {
        entries,
        next_cursor,
    })
}

/// The ids of the newest `wanted` rows matching `query` whose errors hold the words of `text`:
/// a bounded walk of the newest rows with errors, then the GIN index for older ones.
async fn text_search_ids(
    pool: &sqlx::PgPool,
    query: &HistoryQuery,
    text: &str,
    wanted: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    let (walked, oldest_walked, mut found): (i64, Option<i64>, Vec<i64>) = bind_filters(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH walked AS MATERIALIZED (
                 SELECT history_id, errors FROM fraiseql_observers.history
                  WHERE errors IS NOT NULL AND {FILTERS}
                  ORDER BY history_id DESC
                  LIMIT $10)
             SELECT (SELECT count(*) FROM walked),
                    (SELECT min(history_id) FROM walked),
                    ARRAY(SELECT history_id FROM walked
                           WHERE to_tsvector('simple', errors) @@ plainto_tsquery('simple', $11)
                           ORDER BY history_id DESC
                           LIMIT $12)"
        ))),
        query,
        query.after,
    )
    .bind(TEXT_SEARCH_WALK)
    .bind(text)
    .bind(wanted)
    .map(|row: sqlx::postgres::PgRow| {
        use sqlx::Row as _;
        (row.get(0), row.get(1), row.get(2))
    })
    .fetch_one(pool)
    .await?;
    let remaining = wanted - i64::try_from(found.len()).unwrap_or(i64::MAX);
    if remaining > 0 && walked >= TEXT_SEARCH_WALK {
        let older: Vec<i64> = bind_filters(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT history_id FROM fraiseql_observers.history
                  WHERE errors IS NOT NULL AND {FILTERS}
                    AND to_tsvector('simple', coalesce(errors, '')) @@ plainto_tsquery('simple', $10)
                  ORDER BY history_id DESC
                  LIMIT $11"
            ))),
            query,
            oldest_walked,
        )
        .bind(text)
        .bind(remaining)
        .map(|row: sqlx::postgres::PgRow| {
            use sqlx::Row as _;
            row.get::<i64, _>(0)
        })
        .fetch_all(pool)
        .await?;
        found.extend(older);
    }
    Ok(found)
}

/// First key of the search-export lock (`pg_try_advisory_lock(EXPORT_NAMESPACE,
/// hashtext(target))`): one exporter per target in the cluster. Next to the partition leases'
/// and the coordinator's namespaces (`membership`: `0x4651_4F42` and `+ 1`).
pub const EXPORT_NAMESPACE: i32 = 0x4651_4F44;

/// Takes the export lock of `target` on `connection` (a session lock, held until the connection
/// closes); whether it was granted.
///
/// # Errors
/// Storage failed.
pub async fn try_lock_export(
    connection: &mut sqlx::PgConnection,
    target: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(EXPORT_NAMESPACE)
        .bind(target)
        .fetch_one(connection)
        .await
}

/// The export cursor of `target`: every row up to it has been exported; `None` before the first.
///
/// # Errors
/// Storage failed.
pub async fn export_cursor(pool: &sqlx::PgPool, target: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT cursor FROM fraiseql_observers.history_export WHERE target = $1")
        .bind(target)
        .fetch_optional(pool)
        .await
}

/// Records that every row up to `cursor` has been exported to `target`.
///
/// # Errors
/// Storage failed.
pub async fn save_export_cursor(
    pool: &sqlx::PgPool,
    target: &str,
    cursor: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO fraiseql_observers.history_export (target, cursor) VALUES ($1, $2)
         ON CONFLICT (target) DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
    )
    .bind(target)
    .bind(cursor)
    .execute(pool)
    .await?;
    Ok(())
}

/// The last history id handed out (rows above an export cursor, holes included, are at most
/// this minus the cursor).
///
/// # Errors
/// Storage failed.
pub async fn last_history_id(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END
           FROM fraiseql_observers.history_id_seq",
    )
    .fetch_one(pool)
    .await
}

/// The rows to export next, oldest first: up to `limit` rows after `after`, and the rows of
/// `missing` (ids at or below `after` not seen before: their transactions had not committed) that
/// exist now.
///
/// # Errors
/// Storage failed.
pub async fn export_rows(
    pool: &sqlx::PgPool,
    after: i64,
    missing: &[i64],
    limit: i64,
) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "(SELECT {ENTRY_COLUMNS} FROM fraiseql_observers.history
           WHERE history_id = ANY($3) AND history_id <= $1)
         UNION ALL
         (SELECT {ENTRY_COLUMNS} FROM fraiseql_observers.history
           WHERE history_id > $1
           ORDER BY history_id
           LIMIT $2)
         ORDER BY history_id"
    )))
    .bind(after)
    .bind(limit.max(1))
    .bind(missing)
    .fetch_all(pool)
    .await?;
    rows.iter().map(entry_from_row).collect()
}

fn entry_from_row(row: &sqlx::postgres::PgRow) -> Result<HistoryEntry, sqlx::Error> {
    use sqlx::Row as _;
    Ok(HistoryEntry {
        history_id: row.try_get("history_id")?,
        processed_at: row.try_get("processed_at")?,
        record_kind: row.try_get("record_kind")?,
        event_id: row.try_get("event_id")?,
        entity_type: row.try_get("entity_type")?,
        entity_id: row.try_get("entity_id")?,
        event_kind: row.try_get("event_kind")?,
        change_log_id: row.try_get("change_log_id")?,
        tenant_id: row.try_get("tenant_id")?,
        actor_type: row.try_get("actor_type")?,
        actor_id: row.try_get("actor_id")?,
        event_at: row.try_get("event_at")?,
        matched_observers: row.try_get("matched_observers")?,
        unmatched_observers: row.try_get("unmatched_observers")?,
        outcomes: row.try_get("outcomes")?,
        actions: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("actions")?
            .0,
        node_id: row.try_get("node_id")?,
        partition: row.try_get("partition")?,
        epoch: row.try_get("epoch")?,
        processing_ms: row.try_get("processing_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_parse_their_own_names_and_refuse_others_naming_the_choices() {
        for outcome in HistoryOutcome::ALL {
            assert_eq!(HistoryOutcome::parse(outcome.as_str()), Ok(outcome));
        }
        let error = HistoryOutcome::parse("ok").unwrap_err();
        assert!(
            error.contains("\"ok\"") && error.contains("dead_lettered"),
            "{error}"
        );
    }

    #[test]
    fn long_error_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let cut = truncate(&message, MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(cut.len(), MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(error_text("bad\0request"), "bad\u{fffd}request");
    }
}
