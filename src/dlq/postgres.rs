//! The dead-letter queue in PostgreSQL (`fraiseql_observers.dead_letters`), shared by every node.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{DeadLetter, DeadLetterError, DeadLetterFilter, DeadLetterQueue, NewDeadLetter};
use crate::error::ErrorCode;

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
        "SELECT id, created_at, observer, action_index, action_type, error_code, error_message, attempts, event
           FROM fraiseql_observers.dead_letters"
    };
}

fn push_filter(builder: &mut QueryBuilder<Postgres>, filter: &DeadLetterFilter) {
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
    if let Some(moment) = filter.created_before {
        builder.push(" AND created_at < ").push_bind(moment);
    }
    builder.push(" ORDER BY created_at, id");
    if let Some(limit) = filter.limit {
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
    let event = serde_json::to_value(&letter.event)
        .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
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
    .bind(&letter.error_message)
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
    let event: serde_json::Value = row.try_get("event").map_err(storage)?;
    let action_index: i32 = row.try_get("action_index").map_err(storage)?;
    let attempts: i32 = row.try_get("attempts").map_err(storage)?;
    Ok(DeadLetter {
        id: row.try_get("id").map_err(storage)?,
        created_at: row
            .try_get::<DateTime<Utc>, _>("created_at")
            .map_err(storage)?,
        letter: NewDeadLetter {
            event: serde_json::from_value(event)
                .map_err(|error| storage(format!("stored event: {error}")))?,
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
        let mut builder = QueryBuilder::new(select_letters!());
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
