//! Requeue: dead letters handed back to the job queue, many at a time.
//!
//! `dlq retry` without a letter id walks the letters a filter selects, oldest first, in batches.
//! Each batch is one transaction: its letters are locked (`FOR UPDATE SKIP LOCKED`, so two
//! operators cannot both take one), each becomes its action's job again — the job that failed
//! for good made pending in place with its attempt history kept, or, for an action that never
//! reached the queue (it failed inline) or whose job row was pruned, a new job carrying the
//! letter's history — and the letters are deleted. A crash between batches loses nothing and
//! doubles nothing: a committed batch's letters are jobs, an uncommitted one's are still letters.
//!
//! The job keeps the original idempotency key (`<event id>:<observer>:<action index>`): the
//! action never succeeded, so a receiver that did act on an attempt whose answer was lost sees
//! the same key again. The queue's workers deliver the jobs under the observer's retry policy as
//! the observers file states it now; a job that fails for good again becomes a new letter with
//! every attempt, old and new. A requeued job keeps its place in its entity's order: later jobs
//! of the same entity still pending wait for it.
//!
//! A letter whose event does not decode, or whose observer or action is no longer in the
//! observers file, is kept and reported. This module owns no table: the letters are the
//! dead-letter queue's, the jobs the job queue's.

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dlq::{self, DeadLetter, DeadLetterError, DeadLetterFilter, LetterCursor};
use crate::jobs::{self, JobError};
use crate::observers::ObserverDefinition;
use crate::outcome::NewJob;

/// Letters per batch (one transaction each).
pub const BATCH: usize = 500;

/// Kept letters a report names one by one; the rest are counted.
pub const MAX_NAMED_KEPT: usize = 20;

/// Why requeueing stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error(transparent)]
    Letters(#[from] DeadLetterError),
    #[error(transparent)]
    Jobs(#[from] JobError),
    #[error("dead-letter storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error(
        "dlq retry interrupted after {letters} of {matching} letters ({handed_back} handed back to the job queue); the rest are still dead letters: run it again to go on"
    )]
    Interrupted {
        letters: u64,
        matching: u64,
        handed_back: u64,
    },
}

impl RequeueError {
    /// The error code (and so the exit status) of this failure.
    #[must_use]
    pub fn code(&self) -> crate::error::ErrorCode {
        match self {
            RequeueError::Interrupted { .. } => crate::error::ErrorCode::ShuttingDown,
            RequeueError::Letters(_) | RequeueError::Jobs(_) | RequeueError::Storage(_) => {
                crate::error::ErrorCode::StorageUnavailable
            }
        }
    }
}

/// A letter left in the queue, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeptLetter {
    pub id: Uuid,
    pub reason: String,
}

/// What a requeue did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequeueReport {
    /// Letters matching the filter when the walk started.
    pub matching: u64,
    /// Letters looked at.
    pub letters: u64,
    /// Letters whose failed job is pending again.
    pub requeued: u64,
    /// Letters that became new jobs.
    pub enqueued: u64,
    /// Letters whose job was pending, running, completed or cancelled already: deleted, the job
    /// left as it was.
    pub already_queued_or_done: u64,
    /// Letters left in the queue.
    pub kept: u64,
    /// The first [`MAX_NAMED_KEPT`] of them, with the reason.
    pub kept_letters: Vec<KeptLetter>,
    /// Whether the walk was interrupted before it reached the end.
    pub interrupted: bool,
}

impl RequeueReport {
    fn keep(&mut self, id: Uuid, reason: String) {
        self.kept += 1;
        if self.kept_letters.len() < MAX_NAMED_KEPT {
            self.kept_letters.push(KeptLetter { id, reason });
        }
    }
}

/// The job that delivers `letter` again under `observers`, or why there is none.
///
/// # Errors
/// The letter's event does not decode, or its observer or action is not in `observers`.
pub fn job_for_letter(
    observers: &[ObserverDefinition],
    letter: &DeadLetter,
) -> Result<NewJob, String> {
    if letter.event_is_unreadable() {
        return Err("its stored event does not decode".to_owned());
    }
    let stored = &letter.letter;
    let observer = observers
        .iter()
        .find(|observer| observer.name.as_str() == stored.observer)
        .ok_or_else(|| {
            format!(
                "observer {:?} is not in the observers file",
                stored.observer
            )
        })?;
    let action = observer
        .actions
        .iter()
        .find(|action| action.index == stored.action_index)
        .ok_or_else(|| {
            format!(
                "observer {:?} has no action {}",
                stored.observer, stored.action_index
            )
        })?;
    if action.kind.type_name() != stored.action_type {
        return Err(format!(
            "action {} of observer {:?} is a {} now, the letter's was a {}",
            stored.action_index,
            stored.observer,
            action.kind.type_name(),
            stored.action_type
        ));
    }
    let mut job = observer.job_for(&stored.event, action, observer.retry.max_attempts);
    job.history = crate::retry::history_from_text(
        &stored.error_message,
        stored.attempts,
        stored.error_code,
        letter.created_at,
    );
    Ok(job)
}

/// Hands the letters `filter` selects (at most its limit) back to the job queue, batch by batch,
/// calling `on_progress` after each; stops between batches when `cancel` fires.
///
/// # Errors
/// The database failed; batches committed before stay done.
pub async fn requeue_letters(
    pool: &PgPool,
    observers: &[ObserverDefinition],
    filter: &DeadLetterFilter,
    cancel: &CancellationToken,
    mut on_progress: impl FnMut(&RequeueReport),
) -> Result<RequeueReport, RequeueError> {
    let matching = dlq::count_matching(pool, filter).await?;
    let mut report = RequeueReport {
        matching: filter
            .limit
            .map_or(matching, |limit| matching.min(limit as u64)),
        ..RequeueReport::default()
    };
    let mut remaining = filter.limit.unwrap_or(usize::MAX);
    let mut cursor: Option<LetterCursor> = None;
    while remaining > 0 {
        if cancel.is_cancelled() {
            report.interrupted = true;
            break;
        }
        let mut transaction = pool.begin().await?;
        let letters =
            dlq::take_letters(&mut transaction, filter, cursor, remaining.min(BATCH)).await?;
        let Some(last) = letters.last() else {
            break;
        };
        cursor = Some(LetterCursor::after(last));
        remaining = remaining.saturating_sub(letters.len());
        let mut settled = Vec::with_capacity(letters.len());
        let mut jobs = Vec::with_capacity(letters.len());
        for letter in &letters {
            match job_for_letter(observers, letter) {
                Ok(job) => {
                    settled.push(letter.id);
                    jobs.push(job);
                }
                Err(reason) => report.keep(letter.id, reason),
            }
        }
        let outcome = jobs::requeue_batch(&mut transaction, &jobs).await?;
        dlq::delete_letters(&mut *transaction, &settled).await?;
        transaction.commit().await?;
        report.letters += letters.len() as u64;
        report.requeued += outcome.requeued;
        report.enqueued += outcome.enqueued;
        // Letters of one action twice in a batch count once in the queue's answer.
        report.already_queued_or_done +=
            (settled.len() as u64).saturating_sub(outcome.requeued + outcome.enqueued);
        on_progress(&report);
    }
    tracing::info!(
        letters = report.letters,
        requeued = report.requeued,
        enqueued = report.enqueued,
        already_queued_or_done = report.already_queued_or_done,
        kept = report.kept,
        interrupted = report.interrupted,
        "dead letters handed back to the job queue"
    );
    Ok(report)
}
