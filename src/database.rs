//! The service's database connection itself, apart from any table: reachability, a connection
//! for a series of store calls, and a bounded read-only transaction (a statement timeout the
//! server enforces). Stores own their tables; this owns nothing but the session.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Transaction};

/// The database could not be reached or answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("database unreachable: {0}")]
pub struct DatabaseError(#[from] sqlx::Error);

/// Whether the database answers.
///
/// # Errors
/// It does not.
pub async fn ping(pool: &PgPool) -> Result<(), DatabaseError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A connection of the pool, for several store calls in a row.
///
/// # Errors
/// No connection could be had.
pub async fn connection(pool: &PgPool) -> Result<PoolConnection<Postgres>, DatabaseError> {
    Ok(pool.acquire().await?)
}

/// A transaction whose every statement the server cancels after `timeout`; end it with
/// [`end_read`] (nothing it did is kept).
///
/// # Errors
/// The database could not be reached.
pub async fn bounded_read(
    pool: &PgPool,
    timeout: Duration,
) -> Result<Transaction<'static, Postgres>, DatabaseError> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(timeout.as_millis().to_string())
        .execute(&mut *transaction)
        .await?;
    Ok(transaction)
}

/// Ends a [`bounded_read`] transaction, keeping nothing.
///
/// # Errors
/// The database could not be reached.
pub async fn end_read(transaction: Transaction<'static, Postgres>) -> Result<(), DatabaseError> {
    transaction.rollback().await?;
    Ok(())
}
