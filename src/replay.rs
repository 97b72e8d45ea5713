//! Replay: delivering again changes already in the change log.
//!
//! A run selects changes by entity type and id and by the time they were written, up to the
//! log's last position when the run starts (changes written while it runs are not part of it),
//! and optionally one observer. It walks them in log order, in batches; each change is decoded
//! as the listener decodes it, matched against the observers (conditions evaluated), and every
//! action of every matching observer becomes a job in the durable queue — never an inline call —
//! at a bounded rate of changes per second. The workers of the running nodes deliver them.
//!
//! A replayed event is a new event ([`EntityEvent::replayed`]): its id is derived from the
//! original's and the run's, so the ledger, dedup claims and the job queue treat it apart from
//! the original and from other runs, and its idempotency key is the original's with
//! `:replay:<run id>` after it, which a receiver can tell from the original.
//!
//! This module owns `fraiseql_observers.replay_runs`: one row per run with its selection, the
//! last position done and the counts, advanced in each batch's transaction together with the
//! batch's jobs, so an interrupted run resumes exactly after its last committed batch. Two
//! processes resuming one run at once enqueue nothing twice (a job's key names the run), though
//! the counts may then say more than was enqueued.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::change_log::{self, ChangeLogError, ChangeSelection, RawRow};
use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::jobs::JobError;
use crate::listener::{DEFAULT_MAX_ROW_BYTES, ROW_EXCERPT_CHARS, decode_row_text};
use crate::matcher::Matcher;
use crate::outcome::NewJob;

/// Changes per second unless `--rate` says otherwise.
pub const DEFAULT_RATE: u32 = 500;

/// Changes per batch (one transaction each) at most; a slower rate makes batches smaller.
pub const MAX_BATCH: u32 = 500;

/// What to replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayRequest {
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only this observer's actions (`None`: every matching observer's).
    pub observer: Option<String>,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no observer named {0:?} in the observers file")]
    UnknownObserver(String),
    #[error("--rate must be at least 1 change per second")]
    Rate,
    #[error("no replay run {0} (`replay status` lists the runs)")]
    UnknownRun(Uuid),
    #[error("replay run {0} has already completed; start a new run to replay again")]
    Completed(Uuid),
    #[error("replay failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("replay failed reading the change log: {0}")]
    ChangeLog(#[from] ChangeLogError),
    #[error("replay failed enqueuing jobs: {0}")]
    Jobs(#[from] JobError),
    #[error(
        "replay {run} interrupted after {changes_done} of {total_changes} changes ({jobs_enqueued} jobs enqueued); resume with `fraiseql-observers replay --resume {run}`"
    )]
    Interrupted {
        run: Uuid,
        changes_done: u64,
        total_changes: u64,
        jobs_enqueued: u64,
    },
}

impl ReplayError {
    /// The error code (and so the exit status) of this failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplayError::UnknownObserver(_)
            | ReplayError::Rate
            | ReplayError::UnknownRun(_)
            | ReplayError::Completed(_) => ErrorCode::ConfigInvalid,
            ReplayError::Storage(_) | ReplayError::ChangeLog(_) | ReplayError::Jobs(_) => {
                ErrorCode::StorageUnavailable
            }
            ReplayError::Interrupted { .. } => ErrorCode::ShuttingDown,
        }
    }
}

/// One replay run, as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayRun {
    pub id: Uuid,
    /// `running`, `interrupted` or `completed`.
    pub status: String,
    pub selection: ChangeSelection,
    pub observer: Option<String>,
    /// Changes per second at most.
    pub rate: u32,
    /// Changes the selection held when the run started.
    pub total_changes: u64,
    pub changes_done: u64,
    /// Changes that did not decode (as the listener would have dead-lettered them): not replayed.
    pub changes_skipped: u64,
    pub jobs_enqueued: u64,
    pub last_position: i64,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ReplayRun {
    /// Changes per second since the run started (over its whole life, pauses included).
    #[must_use]
    pub fn changes_per_second(&self) -> f64 {
        let seconds = (self.updated_at - self.started_at).as_seconds_f64();
        if seconds > 0.0 {
            f64_from(self.changes_done) / seconds
        } else {
            0.0
        }
    }
}

/// One change of a preview's sample and the actions a replay would enqueue for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SampleChange {
    pub position: i64,
    pub event_id: Uuid,
    pub event: &'static str,
    pub entity_type: String,
    pub entity_id: String,
    /// `observer#index (type)` of each action.
    pub actions: Vec<String>,
}

/// What a replay would do now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayPreview {
    /// Changes the selection holds.
    pub changes: u64,
    /// Of those, changes at least one observer (the one asked for, if any) matches.
    pub matching_changes: u64,
    /// Jobs a replay would enqueue.
    pub jobs: u64,
    /// Changes that do not decode (not replayed).
    pub undecodable: u64,
    /// The first matching changes.
    pub sample: Vec<SampleChange>,
}

/// The observers of `matcher` (only `observer`, when named) that match `event`, with their
/// actions.
fn matching<'matcher>(
    matcher: &'matcher Matcher,
    observer: Option<&'matcher str>,
    event: &'matcher EntityEvent,
) -> impl Iterator<Item = &'matcher crate::observers::ObserverDefinition> {
    matcher
        .matching(event)
        .filter(move |candidate| observer.is_none_or(|name| candidate.name.as_str() == name))
}

fn check_observer(matcher: &Matcher, observer: Option<&str>) -> Result<(), ReplayError> {
    match observer {
        Some(name)
            if !matcher
                .observers()
                .iter()
                .any(|candidate| candidate.name.as_str() == name) =>
        {
            Err(ReplayError::UnknownObserver(name.to_owned()))
        }
        _ => Ok(()),
    }
}

/// A row as the listener reads it: its event, or `None` when it does not decode.
fn decode(raw: &RawRow) -> Option<EntityEvent> {
    decode_row_text(raw.position, raw.size, &raw.text, DEFAULT_MAX_ROW_BYTES).ok()
}

/// The change at `position` of the change log, decoded as the listener decodes it, if it is a
/// change of `entity_type` `entity_id` (for `debug-event`); `None` when the row is gone (past
/// retention) or does not decode.
///
/// # Errors
/// The database failed.
pub async fn change_at(
    pool: &PgPool,
    entity_type: &str,
    entity_id: &str,
    position: i64,
) -> Result<Option<EntityEvent>, ChangeLogError> {
    let selection = ChangeSelection {
        entity_type: Some(entity_type.to_owned()),
        entity_id: Some(entity_id.to_owned()),
        since: None,
        until: None,
        upto: position,
    };
    let rows = change_log::read_selected(
        pool,
        &selection,
        position - 1,
        1,
        (DEFAULT_MAX_ROW_BYTES, ROW_EXCERPT_CHARS),
    )
    .await?;
    Ok(rows
        .iter()
        .find(|row| row.position == position)
        .and_then(decode))
}

fn selection_of(request: &ReplayRequest, upto: i64) -> ChangeSelection {
    ChangeSelection {
        entity_type: request.entity_type.clone(),
        entity_id: request.entity_id.clone(),
        since: request.since,
        until: request.until,
        upto,
    }
}

/// What replaying `request` would enqueue, without enqueuing: counts over the whole selection
/// and the first `sample_size` matching changes.
///
/// # Errors
/// An unknown observer, or the database failed.
pub async fn preview(
    pool: &PgPool,
    matcher: &Matcher,
    request: &ReplayRequest,
    sample_size: usize,
) -> Result<ReplayPreview, ReplayError> {
    check_observer(matcher, request.observer.as_deref())?;
    let selection = selection_of(request, change_log::last_position(pool).await?);
    let mut preview = ReplayPreview {
        changes: 0,
        matching_changes: 0,
        jobs: 0,
        undecodable: 0,
        sample: Vec::new(),
    };
    let mut after = 0;
    loop {
        let rows = change_log::read_selected(
            pool,
            &selection,
            after,
            MAX_BATCH,
            (DEFAULT_MAX_ROW_BYTES, ROW_EXCERPT_CHARS),
        )
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.position;
        for raw in &rows {
            preview.changes += 1;
            let Some(event) = decode(raw) else {
                preview.undecodable += 1;
                continue;
            };
            let actions: Vec<String> = matching(matcher, request.observer.as_deref(), &event)
                .flat_map(|observer| {
                    observer.actions.iter().map(|action| {
                        format!(
                            "{}#{} ({})",
                            observer.name,
                            action.index,
                            action.kind.type_name()
                        )
                    })
                })
                .collect();
            if actions.is_empty() {
                continue;
            }
            preview.matching_changes += 1;
            preview.jobs += u64::try_from(actions.len()).unwrap_or(0);
            if preview.sample.len() < sample_size {
                preview.sample.push(SampleChange {
                    position: raw.position,
                    event_id: event.id,
                    event: event.kind.as_str(),
                    entity_type: event.entity_type.clone(),
                    entity_id: event.entity_id.clone(),
                    actions,
                });
            }
        }
    }
    Ok(preview)
}

const RUN_COLUMNS: &str = "id, status, selection, observer, rate, total_changes, changes_done, \
     changes_skipped, jobs_enqueued, last_position, started_at, updated_at, finished_at";

type RunRow = (
    Uuid,
    String,
    serde_json::Value,
    Option<String>,
    i32,
    i64,
    i64,
    i64,
    i64,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

fn run_from_row(row: RunRow) -> Result<ReplayRun, ReplayError> {
    let (
        id,
        status,
        selection,
        observer,
        rate,
        total_changes,
        changes_done,
        changes_skipped,
        jobs_enqueued,
        last_position,
        started_at,
        updated_at,
        finished_at,
    ) = row;
    let count = |value: i64| u64::try_from(value).unwrap_or(0);
    Ok(ReplayRun {
        id,
        status,
        selection: serde_json::from_value(selection).map_err(|error| {
            ReplayError::Storage(sqlx::Error::Decode(
                format!("replay run {id}: selection: {error}").into(),
            ))
        })?,
        observer,
        rate: u32::try_from(rate).unwrap_or(1).max(1),
        total_changes: count(total_changes),
        changes_done: count(changes_done),
        changes_skipped: count(changes_skipped),
        jobs_enqueued: count(jobs_enqueued),
        last_position,
        started_at,
        updated_at,
        finished_at,
    })
}

/// Starts a run of `request` at `rate` changes per second: records it (its selection ends at
/// the log's last position now) and returns it, nothing enqueued yet.
///
/// # Errors
/// An unknown observer, a rate of 0, or the database failed.
pub async fn start(
    pool: &PgPool,
    matcher: &Matcher,
    request: &ReplayRequest,
    rate: u32,
) -> Result<ReplayRun, ReplayError> {
    check_observer(matcher, request.observer.as_deref())?;
    if rate == 0 {
        return Err(ReplayError::Rate);
    }
    let selection = selection_of(request, change_log::last_position(pool).await?);
    let total = change_log::count_selected(pool, &selection, 0).await?;
    let row: RunRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO fraiseql_observers.replay_runs (id, selection, observer, rate, total_changes)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING {RUN_COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(serde_json::to_value(&selection).unwrap_or_default())
    .bind(request.observer.as_deref())
    .bind(i32::try_from(rate).unwrap_or(i32::MAX))
    .bind(i64::try_from(total).unwrap_or(i64::MAX))
    .fetch_one(pool)
    .await?;
    run_from_row(row)
}

/// Takes up run `id` again (interrupted, or still marked running after its process died).
///
/// # Errors
/// No such run, the run completed, or the database failed.
pub async fn resume(pool: &PgPool, id: Uuid) -> Result<ReplayRun, ReplayError> {
    let row: Option<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE fraiseql_observers.replay_runs SET status = 'running', updated_at = now()
          WHERE id = $1 AND status <> 'completed'
         RETURNING {RUN_COLUMNS}"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        return run_from_row(row);
    }
    match runs(pool, Some(id), 1).await?.first() {
        Some(_) => Err(ReplayError::Completed(id)),
        None => Err(ReplayError::UnknownRun(id)),
    }
}

/// Runs, newest first (`id`: only that one), at most `limit`.
///
/// # Errors
/// The database failed.
pub async fn runs(
    pool: &PgPool,
    id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ReplayRun>, ReplayError> {
    let rows: Vec<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM fraiseql_observers.replay_runs
          WHERE $1::uuid IS NULL OR id = $1
          ORDER BY started_at DESC, id DESC LIMIT $2"
    )))
    .bind(id)
    .bind(limit.max(1))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(run_from_row).collect()
}

/// The jobs replaying `event` in run `run` takes: one per action of each matching observer,
/// with the observer's whole retry budget.
fn jobs_for(
    matcher: &Matcher,
    observer: Option<&str>,
    event: &EntityEvent,
    run: Uuid,
) -> Vec<NewJob> {
    let replayed = event.replayed(run);
    matching(matcher, observer, event)
        .flat_map(|definition| {
            definition
                .actions
                .iter()
                .map(|action| definition.job_for(&replayed, action, definition.retry.max_attempts))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Enqueues `run`'s changes after its last position, batch by batch at its rate, calling
/// `on_progress` after each batch, until the selection is done (the run is then `completed`) or
/// `cancel` fires (`interrupted`: resume it with [`resume`]).
///
/// # Errors
/// The database failed (the run stays `running`; resume it), or the run was interrupted.
pub async fn run(
    pool: &PgPool,
    matcher: &Matcher,
    mut run: ReplayRun,
    cancel: &CancellationToken,
    mut on_progress: impl FnMut(&ReplayRun),
) -> Result<ReplayRun, ReplayError> {
    let started = Instant::now();
    let batch = run.rate.clamp(1, MAX_BATCH);
    let mut done_here = 0_u64;
    loop {
        if cancel.is_cancelled() {
            sqlx::query(
                "UPDATE fraiseql_observers.replay_runs SET status = 'interrupted', updated_at = now()
                  WHERE id = $1 AND status = 'running'",
            )
            .bind(run.id)
            .execute(pool)
            .await?;
            return Err(ReplayError::Interrupted {
                run: run.id,
                changes_done: run.changes_done,
                total_changes: run.total_changes,
                jobs_enqueued: run.jobs_enqueued,
            });
        }
        let rows = change_log::read_selected(
            pool,
            &run.selection,
            run.last_position,
            batch,
            (DEFAULT_MAX_ROW_BYTES, ROW_EXCERPT_CHARS),
        )
        .await?;
        let Some(last) = rows.last().map(|raw| raw.position) else {
            let row: RunRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE fraiseql_observers.replay_runs
                    SET status = 'completed', updated_at = now(), finished_at = now()
                  WHERE id = $1
                 RETURNING {RUN_COLUMNS}"
            )))
            .bind(run.id)
            .fetch_one(pool)
            .await?;
            run = run_from_row(row)?;
            on_progress(&run);
            return Ok(run);
        };
        let mut jobs = Vec::new();
        let mut skipped = 0_i64;
        for raw in &rows {
            match decode(raw) {
                Some(event) => {
                    jobs.extend(jobs_for(matcher, run.observer.as_deref(), &event, run.id));
                }
                None => skipped += 1,
            }
        }
        let mut transaction = pool.begin().await?;
        let enqueued = crate::jobs::enqueue_batch(&mut *transaction, &jobs).await?;
        let row: RunRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE fraiseql_observers.replay_runs
                SET last_position = $2, changes_done = changes_done + $3,
                    changes_skipped = changes_skipped + $4, jobs_enqueued = jobs_enqueued + $5,
                    updated_at = now()
              WHERE id = $1
             RETURNING {RUN_COLUMNS}"
        )))
        .bind(run.id)
        .bind(last)
        .bind(i64::try_from(rows.len()).unwrap_or(i64::MAX))
        .bind(skipped)
        .bind(i64::try_from(enqueued.len()).unwrap_or(i64::MAX))
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        run = run_from_row(row)?;
        done_here += u64::try_from(rows.len()).unwrap_or(0);
        on_progress(&run);
        let due = Duration::from_secs_f64(f64_from(done_here) / f64::from(run.rate.max(1)));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => {}
            }
        }
    }
}

/// A count as a float, for rates.
#[allow(clippy::cast_precision_loss)] // a rate needs no exactness beyond 2^52 changes
fn f64_from(count: u64) -> f64 {
    count as f64
}
