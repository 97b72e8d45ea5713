//! Backfill: delivering the rows a table held before capture was attached to it.
//!
//! Capture only sees changes made after `core.observer_track_table`; the rows already there are
//! never delivered. A backfill walks the table in primary-key order, in batches of one short
//! transaction each, and writes for every row whose entity has no change in the log yet a
//! synthetic INSERT change-log row — the one capture would write for that row inserted now
//! ([`crate::change_log::write_synthetic_inserts`] holds the SQL and the reasoning on order and
//! duplicates). The nodes then deliver those rows like any other change.
//!
//! This module owns `fraiseql_observers.backfill_runs`: one row per table with the last primary
//! key done and the counts, updated in each batch's transaction, so an interrupted backfill
//! resumes exactly after its last committed batch, and two backfills of one table started
//! together take turns batch by batch instead of writing a row twice (each batch reads the
//! position under the run row's lock).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::change_log::{self, ChangeLogError, TrackedTable, TrackedTableError};
use crate::error::ErrorCode;

/// Rows per batch unless `--batch-size` says otherwise.
pub const DEFAULT_BATCH_SIZE: u32 = 1_000;

/// The largest batch accepted: a batch is one transaction holding its rows' share locks, which
/// must stay short.
pub const MAX_BATCH_SIZE: u32 = 10_000;

/// For the batch's transaction: wait at most 5 s for a row lock a writer holds, then give up and
/// retry; and no JIT compilation, which a batch's cost estimate can trigger and which costs more
/// than the batch (measured: 300 ms of JIT for a 20 ms batch of 1,000 rows).
const SET_BATCH_SETTINGS: &str =
    "SELECT set_config('lock_timeout', '5s', true), set_config('jit', 'off', true)";

/// Attempts of one batch lost to a deadlock or lock timeout before the backfill fails.
const BATCH_ATTEMPTS: u32 = 5;

/// How a backfill runs.
#[derive(Clone, Debug)]
pub struct BackfillSettings {
    /// Rows per batch (1..=[`MAX_BATCH_SIZE`]).
    pub batch_size: u32,
    /// At most this many rows scanned per second; `None`: as fast as the database goes.
    pub rows_per_second: Option<u32>,
    /// Start over from the first row even when an earlier backfill of the table finished.
    pub restart: bool,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        BackfillSettings {
            batch_size: DEFAULT_BATCH_SIZE,
            rows_per_second: None,
            restart: false,
        }
    }
}

/// Why a backfill failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Table(#[from] TrackedTableError),
    #[error("--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {0}")]
    BatchSize(u32),
    #[error("--rate must be at least 1 row per second")]
    Rate,
    #[error("backfill of {table} failed: {source}")]
    Storage {
        table: String,
        #[source]
        source: ChangeLogError,
    },
    #[error(
        "backfill of {table} interrupted after {rows_scanned} rows ({rows_written} written); run it again to resume"
    )]
    Interrupted {
        table: String,
        rows_scanned: u64,
        rows_written: u64,
    },
}

impl BackfillError {
    /// The error code (and so the exit status) of this failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            BackfillError::Table(TrackedTableError::Database { .. })
            | BackfillError::Storage { .. } => ErrorCode::StorageUnavailable,
            BackfillError::Table(_) | BackfillError::BatchSize(_) | BackfillError::Rate => {
                ErrorCode::ConfigInvalid
            }
            BackfillError::Interrupted { .. } => ErrorCode::ShuttingDown,
        }
    }
}

/// Where a backfill stands, after each batch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackfillProgress {
    /// Rows in the table when the run started (the progress bar's length; rows inserted since
    /// then may take the count past it).
    pub total_rows: u64,
    /// Rows covered so far, earlier interrupted runs included.
    pub rows_scanned: u64,
    /// Synthetic INSERT rows written so far, earlier interrupted runs included.
    pub rows_written: u64,
}

/// What a backfill did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackfillSummary {
    pub table: String,
    pub entity_type: String,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    /// The table was already backfilled and `restart` was not asked: nothing was done.
    pub already_complete: bool,
    /// Rows covered by this run.
    pub rows_scanned: u64,
    /// Synthetic INSERT rows this run wrote.
    pub rows_written: u64,
    /// Rows this run covered that were not written: their entity already had a change in the log.
    pub rows_skipped: u64,
    /// Since the first run of this backfill (totals over interrupted runs).
    pub total_rows_scanned: u64,
    pub total_rows_written: u64,
    pub elapsed_seconds: f64,
    /// Rows covered per second by this run.
    pub rows_per_second: f64,
}

/// What a backfill would do now.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackfillPreview {
    pub table: String,
    pub entity_type: String,
    pub id_column: String,
    pub key_columns: Vec<String>,
    /// Rows in the table.
    pub rows: u64,
    /// Rows that would get a synthetic INSERT (the others' entities have changes in the log).
    pub rows_to_write: u64,
    /// The first few synthetic entries, in key order.
    pub sample: Vec<serde_json::Value>,
    /// An earlier run of this table: whether it finished, and where it stopped.
    pub previous_run: Option<PreviousRun>,
}

/// The run row of a table, as `--dry-run` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PreviousRun {
    pub finished: bool,
    pub rows_scanned: u64,
    pub rows_written: u64,
}

fn check_settings(settings: &BackfillSettings) -> Result<(), BackfillError> {
    if !(1..=MAX_BATCH_SIZE).contains(&settings.batch_size) {
        return Err(BackfillError::BatchSize(settings.batch_size));
    }
    if settings.rows_per_second == Some(0) {
        return Err(BackfillError::Rate);
    }
    Ok(())
}

/// What a backfill of `table_name` would write, without writing: counts and up to `sample_size`
/// entries.
///
/// # Errors
/// The table cannot be backfilled (missing, untracked, no primary key) or the database failed.
pub async fn preview(
    pool: &PgPool,
    table_name: &str,
    sample_size: u32,
) -> Result<BackfillPreview, BackfillError> {
    let table = change_log::tracked_table(pool, table_name).await?;
    let storage = |source| BackfillError::Storage {
        table: table.name.clone(),
        source,
    };
    let (rows, rows_to_write, sample) =
        change_log::preview_synthetic_inserts(pool, &table, sample_size)
            .await
            .map_err(storage)?;
    let previous: Option<(bool, i64, i64)> = sqlx::query_as(
        "SELECT finished_at IS NOT NULL, rows_scanned, rows_written
           FROM fraiseql_observers.backfill_runs WHERE table_name = $1",
    )
    .bind(&table.name)
    .fetch_optional(pool)
    .await
    .map_err(|error| storage(error.into()))?;
    Ok(BackfillPreview {
        entity_type: table.entity_type.clone(),
        id_column: table.id_column.clone(),
        key_columns: table
            .key_columns
            .iter()
            .map(|(column, _)| column.clone())
            .collect(),
        rows,
        rows_to_write,
        sample,
        previous_run: previous.map(|(finished, scanned, written)| PreviousRun {
            finished,
            rows_scanned: u64::try_from(scanned).unwrap_or(0),
            rows_written: u64::try_from(written).unwrap_or(0),
        }),
        table: table.name,
    })
}

/// The run row as a batch reads it under lock.
struct RunPosition {
    last_key: Option<Vec<String>>,
    finished: bool,
    rows_scanned: u64,
    rows_written: u64,
}

/// Backfills `table_name`: batches until the table has no row after the position, or `cancel`
/// fires (between batches: what was committed stays, the next run resumes after it).
/// `on_progress` is called after every batch.
///
/// # Errors
/// Bad settings, a table that cannot be backfilled, the database failed (a batch lost to lock
/// conflicts [`BATCH_ATTEMPTS`] times included), or the run was cancelled.
pub async fn run(
    pool: &PgPool,
    table_name: &str,
    settings: &BackfillSettings,
    cancel: &CancellationToken,
    mut on_progress: impl FnMut(&BackfillProgress),
) -> Result<BackfillSummary, BackfillError> {
    check_settings(settings)?;
    let table = change_log::tracked_table(pool, table_name).await?;
    let storage = |source: ChangeLogError| BackfillError::Storage {
        table: table.name.clone(),
        source,
    };
    let started = Instant::now();
    let (resumed, already_complete) = start_run(pool, &table, settings.restart)
        .await
        .map_err(|error| storage(error.into()))?;
    let total_rows = change_log::count_rows(pool, &table)
        .await
        .map_err(storage)?;
    let mut summary = BackfillSummary {
        table: table.name.clone(),
        entity_type: table.entity_type.clone(),
        resumed,
        already_complete,
        rows_scanned: 0,
        rows_written: 0,
        rows_skipped: 0,
        total_rows_scanned: 0,
        total_rows_written: 0,
        elapsed_seconds: 0.0,
        rows_per_second: 0.0,
    };
    while !summary.already_complete {
        if cancel.is_cancelled() {
            return Err(BackfillError::Interrupted {
                table: table.name.clone(),
                rows_scanned: summary.total_rows_scanned,
                rows_written: summary.total_rows_written,
            });
        }
        let (batch, position) = batch_with_retries(pool, &table, settings.batch_size)
            .await
            .map_err(storage)?;
        summary.rows_scanned += batch.scanned;
        summary.rows_written += batch.written;
        summary.total_rows_scanned = position.rows_scanned + batch.scanned;
        summary.total_rows_written = position.rows_written + batch.written;
        on_progress(&BackfillProgress {
            total_rows: total_rows.max(summary.total_rows_scanned),
            rows_scanned: summary.total_rows_scanned,
            rows_written: summary.total_rows_written,
        });
        if batch.last_key.is_none() || position.finished {
            break;
        }
        if let Some(rate) = settings.rows_per_second {
            let due = Duration::from_secs_f64(f64_from(summary.rows_scanned) / f64::from(rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => {}
                }
            }
        }
    }
    summary.rows_skipped = summary.rows_scanned - summary.rows_written;
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    if summary.elapsed_seconds > 0.0 {
        summary.rows_per_second = f64_from(summary.rows_scanned) / summary.elapsed_seconds;
    }
    if summary.already_complete {
        let (scanned, written): (i64, i64) = sqlx::query_as(
            "SELECT rows_scanned, rows_written FROM fraiseql_observers.backfill_runs
              WHERE table_name = $1",
        )
        .bind(&table.name)
        .fetch_one(pool)
        .await
        .map_err(|error| storage(error.into()))?;
        summary.total_rows_scanned = u64::try_from(scanned).unwrap_or(0);
        summary.total_rows_written = u64::try_from(written).unwrap_or(0);
    }
    Ok(summary)
}

/// Creates the table's run row, or finds it: `(resumed, already_complete)`. With `restart`, a
/// run row is reset to the start.
async fn start_run(
    pool: &PgPool,
    table: &TrackedTable,
    restart: bool,
) -> Result<(bool, bool), sqlx::Error> {
    if restart {
        sqlx::query(
            "INSERT INTO fraiseql_observers.backfill_runs (table_name, entity_type) VALUES ($1, $2)
             ON CONFLICT (table_name) DO UPDATE
                SET entity_type = excluded.entity_type, started_at = now(), updated_at = now(),
                    finished_at = NULL, last_key = NULL, rows_scanned = 0, rows_written = 0",
        )
        .bind(&table.name)
        .bind(&table.entity_type)
        .execute(pool)
        .await?;
        return Ok((false, false));
    }
    let inserted = sqlx::query(
        "INSERT INTO fraiseql_observers.backfill_runs (table_name, entity_type) VALUES ($1, $2)
         ON CONFLICT (table_name) DO NOTHING",
    )
    .bind(&table.name)
    .bind(&table.entity_type)
    .execute(pool)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok((false, false));
    }
    let finished: bool = sqlx::query_scalar(
        "SELECT finished_at IS NOT NULL FROM fraiseql_observers.backfill_runs WHERE table_name = $1",
    )
    .bind(&table.name)
    .fetch_one(pool)
    .await?;
    Ok((!finished, finished))
}

/// Whether `error` is a lock conflict worth another attempt: deadlock, lock timeout,
/// serialization failure.
fn is_lock_conflict(error: &ChangeLogError) -> bool {
    let ChangeLogError::Read(sqlx::Error::Database(database)) = error else {
        return false;
    };
    matches!(
        database.code().as_deref(),
        Some("40P01" | "55P03" | "40001")
    )
}

async fn batch_with_retries(
    pool: &PgPool,
    table: &TrackedTable,
    batch_size: u32,
) -> Result<(change_log::SyntheticBatch, RunPosition), ChangeLogError> {
    let mut attempt = 1;
    loop {
        match one_batch(pool, table, batch_size).await {
            Err(error) if attempt < BATCH_ATTEMPTS && is_lock_conflict(&error) => {
                tracing::warn!(table = %table.name, attempt, error = %error, "backfill batch lost a lock conflict; retrying");
                // Back off a little so the writer we collided with can finish.
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One batch in one transaction: the position read under the run row's lock, the synthetic
/// rows, the new position.
async fn one_batch(
    pool: &PgPool,
    table: &TrackedTable,
    batch_size: u32,
) -> Result<(change_log::SyntheticBatch, RunPosition), ChangeLogError> {
    let mut transaction = pool.begin().await?;
    sqlx::query(SET_BATCH_SETTINGS)
        .execute(&mut *transaction)
        .await?;
    let (last_key, finished, rows_scanned, rows_written): (Option<Vec<String>>, bool, i64, i64) =
        sqlx::query_as(
            "SELECT last_key, finished_at IS NOT NULL, rows_scanned, rows_written
               FROM fraiseql_observers.backfill_runs WHERE table_name = $1 FOR UPDATE",
        )
        .bind(&table.name)
        .fetch_one(&mut *transaction)
        .await?;
    let position = RunPosition {
        last_key,
        finished,
        rows_scanned: u64::try_from(rows_scanned).unwrap_or(0),
        rows_written: u64::try_from(rows_written).unwrap_or(0),
    };
    if position.finished {
        // Another backfill of the table finished it while this one waited.
        transaction.rollback().await?;
        return Ok((change_log::SyntheticBatch::default(), position));
    }
    let batch = change_log::write_synthetic_inserts(
        &mut transaction,
        table,
        position.last_key.as_deref(),
        batch_size,
    )
    .await?;
    sqlx::query(
        "UPDATE fraiseql_observers.backfill_runs
            SET last_key = coalesce($2, last_key),
                rows_scanned = rows_scanned + $3,
                rows_written = rows_written + $4,
                updated_at = now(),
                finished_at = CASE WHEN $2::text[] IS NULL THEN now() END
          WHERE table_name = $1",
    )
    .bind(&table.name)
    .bind(batch.last_key.as_deref())
    .bind(i64::try_from(batch.scanned).unwrap_or(i64::MAX))
    .bind(i64::try_from(batch.written).unwrap_or(i64::MAX))
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok((batch, position))
}

/// A count as a float, for rates.
#[allow(clippy::cast_precision_loss)] // a rate needs no exactness beyond 2^52 rows
fn f64_from(count: u64) -> f64 {
    count as f64
}
