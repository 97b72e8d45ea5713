//! The dead-letter queue in PostgreSQL (`fraiseql_observers.dead_letters`), shared by every node.
//!
//! Letters hold hostile data as often as not, so the store bounds what it writes and reads: an
//! event whose JSON is over [`FULL_EVENT_BYTES`] is stored without the `changes` map's values (they
//! repeat the images; the field names are kept and the values rebuilt from the images on read),
//! a listing abbreviates events over [`LISTED_EVENT_BYTES`] (`get` returns them whole), and a
//! stored event that no longer decodes is shown as such in its own letter instead of failing the
//! whole listing.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{DeadLetter, DeadLetterError, DeadLetterFilter, DeadLetterQueue, NewDeadLetter};
use crate::domain::{EntityEvent, EventKind, FieldChange};
use crate::error::ErrorCode;

/// Events whose JSON is larger than this are stored with only the names of their changed fields.
pub const FULL_EVENT_BYTES: usize = 1024 * 1024;

/// Events stored larger than this (as PostgreSQL stores them) are abbreviated in listings.
pub const LISTED_EVENT_BYTES: i32 = 256 * 1024;

/// The key under which a compacted event lists its changed fields (instead of `changes`).
const CHANGED_FIELDS: &str = "changed_fields";

/// The key under which an abbreviated or unreadable event says why its data is missing.
pub const EVENT_OMITTED: &str = "event_omitted";

/// Dead letters stored in the service's schema; survives restarts, visible to the CLI.
#[derive(Clone, Debug)]
pub struct PostgresDeadLetterQueue {
    pool: PgPool,
}

impl PostgresDeadLetterQueue {
    #[must_use]
    pub fn new(pool: PgPool) -> PostgresDeadLetterQueue {
        PostgresDeadLetterQueue { pool }
    }

    /// The pool the queue is stored through (the service's database).
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn storage(error: impl std::fmt::Display) -> DeadLetterError {
    DeadLetterError::Storage(error.to_string())
}

/// The columns a [`DeadLetter`] is read from, as a `SELECT` prefix.
macro_rules! select_letters {
    () => {
        "SELECT id, created_at, observer, action_index, action_type, error_code, error_message, attempts,
                event::text AS event, entity_type, event_id
           FROM fraiseql_observers.dead_letters"
    };
}

/// As [`select_letters`], with events stored larger than [`LISTED_EVENT_BYTES`] replaced by
/// their identity and a note of their size.
fn list_letters() -> String {
    format!(
        "SELECT id, created_at, observer, action_index, action_type, error_code, error_message, attempts,
                CASE WHEN pg_column_size(event) <= {LISTED_EVENT_BYTES} THEN event::text
                     ELSE (event - 'data' - 'before' - 'changes' - '{CHANGED_FIELDS}'
                           || jsonb_build_object(
                                  'data', jsonb_build_object('{EVENT_OMITTED}',
                                      format('%s bytes stored; dlq show prints it whole',
                                             pg_column_size(event))),
                                  'changes', '{{}}'::jsonb))::text
                END AS event, entity_type, event_id
           FROM fraiseql_observers.dead_letters"
    )
}

/// The event as stored: whole, or — over [`FULL_EVENT_BYTES`] — with `changes` reduced to the
/// changed fields' names (their old and new values are the images' values).
fn stored_event(event: &EntityEvent) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(event)?;
    let whole = serde_json::to_vec(&value).map_or(0, |bytes| bytes.len());
    if whole > FULL_EVENT_BYTES
        && let Some(object) = value.as_object_mut()
    {
        let names: Vec<serde_json::Value> = event
            .changes
            .keys()
            .cloned()
            .map(serde_json::Value::String)
            .collect();
        object.insert("changes".to_owned(), serde_json::json!({}));
        object.insert(CHANGED_FIELDS.to_owned(), serde_json::Value::Array(names));
    }
    Ok(value)
}

/// The stored event back: the `changes` of a compacted one rebuilt from its images.
fn read_event(text: &str) -> Result<EntityEvent, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    let changed_fields = value
        .as_object_mut()
        .and_then(|object| object.remove(CHANGED_FIELDS));
    let mut event: EntityEvent = serde_json::from_value(value)?;
    if let Some(serde_json::Value::Array(names)) = changed_fields {
        let field = |image: Option<&serde_json::Value>, name: &str| {
            image
                .and_then(|image| image.get(name))
                .cloned()
                .unwrap_or(serde_json::Value::Null)
        };
        for name in names.iter().filter_map(serde_json::Value::as_str) {
            let change = FieldChange {
                old: field(event.before.as_ref(), name),
                new: field(Some(&event.data), name),
            };
            event.changes.insert(name.to_owned(), change);
        }
    }
    Ok(event)
}

fn unreadable_event(row: &sqlx::postgres::PgRow, problem: &str) -> EntityEvent {
    let entity_type: Option<String> = row.try_get("entity_type").ok().flatten();
    let event_id: Option<Uuid> = row.try_get("event_id").ok().flatten();
    placeholder_event(event_id, entity_type, problem)
}

/// Stands in for a stored event that no longer decodes (written by an older version, or edited
/// by hand): its identity as far as it is known and the reason under [`EVENT_OMITTED`], so that
/// a letter holding it can be listed, shown and purged — and is never sent anywhere
/// ([`super::DeadLetter::event_is_unreadable`]).
#[must_use]
pub fn placeholder_event(
    event_id: Option<Uuid>,
    entity_type: Option<String>,
    problem: &str,
) -> EntityEvent {
    EntityEvent {
        id: event_id.unwrap_or_default(),
        kind: EventKind::Custom,
        entity_type: entity_type.unwrap_or_else(|| "(unknown)".to_owned()),
        entity_id: "(unreadable)".to_owned(),
        data: serde_json::json!({ EVENT_OMITTED: format!("the stored event does not decode: {problem}") }),
        before: None,
        changes: std::collections::BTreeMap::new(),
        tenant_id: None,
        actor: None,
        timestamp: DateTime::<Utc>::UNIX_EPOCH,
        position: None,
        trace_id: None,
        replay: None,
    }
}

fn push_filter(builder: &mut QueryBuilder<Postgres>, filter: &DeadLetterFilter) {
    push_conditions(builder, filter);
    push_order_and_limit(builder, filter.limit);
}

/// `WHERE` with every condition of `filter` (its limit aside).
fn push_conditions(builder: &mut QueryBuilder<Postgres>, filter: &DeadLetterFilter) {
    builder.push(" WHERE true");
    if let Some(observer) = &filter.observer {
        builder.push(" AND observer = ").push_bind(observer.clone());
    }
    if let Some(action_type) = &filter.action_type {
        builder
            .push(" AND action_type = ")
            .push_bind(action_type.clone());
    }
    if let Some(code) = filter.error_code {
        builder.push(" AND error_code = ").push_bind(code.as_str());
    }
    if let Some(entity_type) = &filter.entity_type {
        builder
            .push(" AND entity_type = ")
            .push_bind(entity_type.clone());
    }
    if let Some(text) = &filter.error_contains {
        builder
            .push(" AND strpos(lower(error_message), lower(")
            .push_bind(text.clone())
            .push(")) > 0");
    }
    if let Some(moment) = filter.created_after {
        builder.push(" AND created_at >= ").push_bind(moment);
    }
    if let Some(moment) = filter.created_before {
        builder.push(" AND created_at < ").push_bind(moment);
    }
}

/// Oldest first, at most `limit`.
fn push_order_and_limit(builder: &mut QueryBuilder<Postgres>, limit: Option<usize>) {
    builder.push(" ORDER BY created_at, id");
    if let Some(limit) = limit {
        builder
            .push(" LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

/// Stores `letter` on `executor` — the pool, or a transaction that must park it atomically with
/// another write (a job failing for good) — and returns its id.
pub(crate) async fn insert_dead_letter<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    letter: &NewDeadLetter,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let event =
        stored_event(&letter.event).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query(
        "INSERT INTO fraiseql_observers.dead_letters
             (id, observer, action_index, action_type, error_code, error_message, attempts, event, entity_type, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(&letter.observer)
    .bind(i32::try_from(letter.action_index).unwrap_or(i32::MAX))
    .bind(&letter.action_type)
    .bind(letter.error_code.as_str())
    .bind(crate::escape::storable(&letter.error_message).as_ref())
    .bind(i32::try_from(letter.attempts).unwrap_or(i32::MAX))
    .bind(event)
    .bind(&letter.event.entity_type)
    .bind(letter.event.id)
    .execute(executor)
    .await?;
    Ok(id)
}

fn letter_from_row(row: &sqlx::postgres::PgRow) -> Result<DeadLetter, DeadLetterError> {
    let code: String = row.try_get("error_code").map_err(storage)?;
    let error_code: ErrorCode = serde_json::from_value(serde_json::Value::String(code.clone()))
        .map_err(|_| storage(format!("unknown error code {code:?} in dead_letters")))?;
    let event_text: String = row.try_get("event").map_err(storage)?;
    let event = read_event(&event_text).unwrap_or_else(|error| {
        let problem = error.to_string();
        tracing::warn!(%problem, "a dead letter's stored event does not decode");
        unreadable_event(row, &problem)
    });
    let action_index: i32 = row.try_get("action_index").map_err(storage)?;
    let attempts: i32 = row.try_get("attempts").map_err(storage)?;
    Ok(DeadLetter {
        id: row.try_get("id").map_err(storage)?,
        created_at: row
            .try_get::<DateTime<Utc>, _>("created_at")
            .map_err(storage)?,
        letter: NewDeadLetter {
            event,
            observer: row.try_get("observer").map_err(storage)?,
            action_index: usize::try_from(action_index).map_err(storage)?,
            action_type: row.try_get("action_type").map_err(storage)?,
            error_code,
            error_message: row.try_get("error_message").map_err(storage)?,
            attempts: u32::try_from(attempts).map_err(storage)?,
        },
    })
}

#[async_trait]
impl DeadLetterQueue for PostgresDeadLetterQueue {
    async fn push(&self, letter: NewDeadLetter) -> Result<Uuid, DeadLetterError> {
        insert_dead_letter(&self.pool, &letter)
            .await
            .map_err(storage)
    }

    async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let mut builder = QueryBuilder::new(list_letters());
        push_filter(&mut builder, filter);
        let rows = builder
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        rows.iter().map(letter_from_row).collect()
    }

    async fn get(&self, id: Uuid) -> Result<Option<DeadLetter>, DeadLetterError> {
        let row = sqlx::query(concat!(select_letters!(), " WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage)?;
        row.as_ref().map(letter_from_row).transpose()
    }

    async fn remove(&self, id: Uuid) -> Result<bool, DeadLetterError> {
        let result = sqlx::query("DELETE FROM fraiseql_observers.dead_letters WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(storage)?;
        Ok(result.rows_affected() > 0)
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, DeadLetterError> {
        let mut builder = QueryBuilder::new(
            "DELETE FROM fraiseql_observers.dead_letters WHERE id IN (SELECT id FROM fraiseql_observers.dead_letters",
        );
        push_filter(&mut builder, filter);
        builder.push(")");
        let result = builder.build().execute(&self.pool).await.map_err(storage)?;
        Ok(result.rows_affected())
    }

    async fn count(&self) -> Result<u64, DeadLetterError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

/// Dead letters, counted up to `cap` (a bounded read, for gauges and status).
///
/// # Errors
/// Storage failed.
pub async fn count_dead_letters_up_to<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    cap: i64,
) -> Result<i64, DeadLetterError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM fraiseql_observers.dead_letters LIMIT $1) AS letters",
    )
    .bind(cap)
    .fetch_one(executor)
    .await
    .map_err(storage)
}

/// Dead letters one retention statement deletes at most.
pub const DEAD_LETTER_PRUNE_BATCH: u64 = 5_000;

/// Deletes at most [`DEAD_LETTER_PRUNE_BATCH`] dead letters created more than `older_than` ago
/// (oldest first), on `executor` (the coordinator's fenced transaction); how many. Fewer than a
/// batch: nothing older is left.
///
/// # Errors
/// Storage failed.
pub async fn prune_dead_letters_batch<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    older_than: std::time::Duration,
) -> Result<u64, DeadLetterError> {
    Ok(sqlx::query(
        "DELETE FROM fraiseql_observers.dead_letters
          WHERE id = ANY (ARRAY(
                SELECT id FROM fraiseql_observers.dead_letters
                 WHERE created_at < now() - make_interval(secs => $1)
                 ORDER BY created_at, id
                 LIMIT $2))",
    )
    .bind(older_than.as_secs_f64())
    .bind(i64::try_from(DEAD_LETTER_PRUNE_BATCH).unwrap_or(i64::MAX))
    .execute(executor)
    .await
    .map_err(storage)?
    .rows_affected())
}

/// Where a walk through the letters in their order (`created_at`, then `id`) stands: the last
/// letter it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LetterCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl LetterCursor {
    /// The cursor just past `letter`.
    #[must_use]
    pub fn after(letter: &DeadLetter) -> LetterCursor {
        LetterCursor {
            created_at: letter.created_at,
            id: letter.id,
        }
    }
}

/// Takes the next `limit` letters matching `filter` past `after`, oldest first, whole (events
/// are not abbreviated), each locked until `transaction` ends; letters another transaction
/// holds are passed over, so two operators retrying the same letters cannot both take one.
///
/// # Errors
/// Storage failed.
pub async fn take_letters(
    transaction: &mut sqlx::PgConnection,
    filter: &DeadLetterFilter,
    after: Option<LetterCursor>,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let mut builder = QueryBuilder::new(select_letters!());
    push_conditions(&mut builder, filter);
    if let Some(cursor) = after {
        builder
            .push(" AND (created_at, id) > (")
            .push_bind(cursor.created_at)
            .push(", ")
            .push_bind(cursor.id)
            .push(")");
    }
    push_order_and_limit(&mut builder, Some(limit));
    builder.push(" FOR UPDATE SKIP LOCKED");
    let rows = builder
        .build()
        .fetch_all(&mut *transaction)
        .await
        .map_err(storage)?;
    rows.iter().map(letter_from_row).collect()
}

/// Deletes the letters `ids` on `executor` (the transaction that settled them); how many.
///
/// # Errors
/// Storage failed.
pub async fn delete_letters<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    ids: &[Uuid],
) -> Result<u64, DeadLetterError> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(
        sqlx::query("DELETE FROM fraiseql_observers.dead_letters WHERE id = ANY($1)")
            .bind(ids)
            .execute(executor)
            .await
            .map_err(storage)?
            .rows_affected(),
    )
}

/// How many letters match `filter` (its limit aside).
///
/// # Errors
/// Storage failed.
pub async fn count_matching(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<u64, DeadLetterError> {
    let mut builder = QueryBuilder::new("SELECT count(*) FROM fraiseql_observers.dead_letters");
    push_conditions(&mut builder, filter);
    let count: i64 = builder
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(storage)?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Most groups [`letter_groups`] returns: the largest ones.
pub const MAX_LETTER_GROUPS: i64 = 200;

/// Letters that failed the same way: one observer's action, one error code.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LetterGroup {
    pub observer: String,
    pub action_index: usize,
    pub action_type: String,
    pub error_code: String,
    pub count: u64,
    pub oldest: DateTime<Utc>,
    pub newest: DateTime<Utc>,
    /// The newest letter's last error line (storable text from a receiver: escape it to print).
    pub last_error: String,
}

/// The letters matching `filter` counted per observer action and error code, largest groups
/// first (at most [`MAX_LETTER_GROUPS`]), each with its newest letter's last error.
///
/// # Errors
/// Storage failed.
pub async fn letter_groups(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<Vec<LetterGroup>, DeadLetterError> {
    let mut builder =
        QueryBuilder::new("WITH matching AS (SELECT * FROM fraiseql_observers.dead_letters");
    push_conditions(&mut builder, filter);
    builder.push(
        "), groups AS (
             SELECT observer, action_index, action_type, error_code, count(*) AS letters,
                    min(created_at) AS oldest, max(created_at) AS newest
               FROM matching GROUP BY observer, action_index, action_type, error_code
              ORDER BY letters DESC, observer, action_index, error_code
              LIMIT ",
    );
    builder.push_bind(MAX_LETTER_GROUPS);
    builder.push(
        ")
         SELECT groups.*, newest_letter.error_message
           FROM groups
           LEFT JOIN LATERAL (
                SELECT error_message FROM matching
                 WHERE matching.observer = groups.observer
                   AND matching.action_index = groups.action_index
                   AND matching.action_type = groups.action_type
                   AND matching.error_code = groups.error_code
                 ORDER BY created_at DESC, id DESC LIMIT 1) AS newest_letter ON true
          ORDER BY letters DESC, observer, action_index, error_code",
    );
    let rows = builder.build().fetch_all(pool).await.map_err(storage)?;
    rows.iter()
        .map(|row| {
            let action_index: i32 = row.try_get("action_index").map_err(storage)?;
            let count: i64 = row.try_get("letters").map_err(storage)?;
            let message: Option<String> = row.try_get("error_message").map_err(storage)?;
            Ok(LetterGroup {
                observer: row.try_get("observer").map_err(storage)?,
                action_index: usize::try_from(action_index).map_err(storage)?,
                action_type: row.try_get("action_type").map_err(storage)?,
                error_code: row.try_get("error_code").map_err(storage)?,
                count: u64::try_from(count).map_err(storage)?,
                oldest: row.try_get("oldest").map_err(storage)?,
                newest: row.try_get("newest").map_err(storage)?,
                last_error: last_error_line(message.as_deref().unwrap_or_default()).to_owned(),
            })
        })
        .collect()
}

/// The last attempt's error in a letter's message: a message of several attempts holds one
/// line per attempt (`attempt N (time): CODE message`); a single error is the message itself.
#[must_use]
pub fn last_error_line(message: &str) -> &str {
    if !message.starts_with("attempt ") {
        return message;
    }
    let last = message
        .rfind("\nattempt ")
        .map_or(message, |start| &message[start + 1..]);
    let Some((_, text)) = last.split_once("): ") else {
        return last;
    };
    match text.split_once(' ') {
        Some((code, rest)) if code.starts_with("OB") && code.len() == 5 => rest,
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::last_error_line as last_error;

    #[test]
    fn a_listing_shows_the_error_that_ended_the_history() {
        let history = "attempt 1 (2026-12-04T10:00:00+00:00): OB006 HTTP 503: busy\n\
                       attempt 2 (2026-12-04T10:00:01+00:00): OB008 HTTP 404: no such hook";
        assert_eq!(last_error(history), "HTTP 404: no such hook");
        assert_eq!(last_error("HTTP 500: boom"), "HTTP 500: boom");
        assert_eq!(last_error("HTTP 500: two\nlines"), "HTTP 500: two\nlines");
        assert_eq!(
            last_error("attempt without a time"),
            "attempt without a time"
        );
    }
}
