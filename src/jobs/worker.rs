//! A job worker: claims a few jobs at a time from one queue, runs their actions concurrently (one
//! attempt each, under the action's timeout, heartbeating the claims), and records the outcomes —
//! the completions of a claim in one statement.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{FailOutcome, JOBS_CHANNEL, Job, JobError, PostgresJobQueue};
use crate::actions::{ActionContext, ActionRunner};
use crate::error::ErrorCode;
use crate::matcher::Matcher;
use crate::retry::AttemptError;

/// Jobs one worker claims at once by default.
pub const DEFAULT_CLAIM_BATCH: u32 = 16;

/// What happened to one claimed job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkOutcome {
    /// No job was ready.
    Idle,
    Completed(Uuid),
    /// Failed this attempt; pending again later.
    Rescheduled(Uuid),
    /// Failed for good; parked in the dead-letter queue.
    DeadLettered(Uuid),
    /// The claim was lost while running (it expired; another worker may run the job).
    Lost(Uuid),
    /// Claimed while the worker was stopping; given back without counting the attempt.
    Released(Uuid),
}

/// Runs the jobs of one queue.
#[derive(Clone, Debug)]
pub struct JobWorker {
    queue: PostgresJobQueue,
    queue_name: String,
    runner: ActionRunner,
    matcher: Arc<Matcher>,
    poll_interval: std::time::Duration,
    claim_batch: u32,
}

impl JobWorker {
    #[must_use]
    pub fn new(
        queue: PostgresJobQueue,
        queue_name: impl Into<String>,
        runner: ActionRunner,
        matcher: Arc<Matcher>,
        poll_interval: std::time::Duration,
    ) -> JobWorker {
        JobWorker {
            queue,
            queue_name: queue_name.into(),
            runner,
            matcher,
            poll_interval,
            claim_batch: DEFAULT_CLAIM_BATCH,
        }
    }

    /// Claims at most this many jobs at once (at least 1).
    #[must_use]
    pub fn with_claim_batch(mut self, claim_batch: u32) -> JobWorker {
        self.claim_batch = claim_batch.max(1);
        self
    }

    /// Claims and runs at most one job; with `stopping` cancelled, a claimed job is released
    /// instead of run.
    ///
    /// # Errors
    /// Job storage failed.
    pub async fn try_execute_one(
        &self,
        stopping: &CancellationToken,
    ) -> Result<WorkOutcome, JobError> {
        let outcomes = self.try_execute_batch(1, stopping).await?;
        Ok(outcomes.into_iter().next().unwrap_or(WorkOutcome::Idle))
    }

    /// Claims up to `limit` jobs and runs them concurrently; an empty result means the queue had
    /// nothing ready.
    ///
    /// # Errors
    /// Job storage failed.
    pub async fn try_execute_batch(
        &self,
        limit: u32,
        stopping: &CancellationToken,
    ) -> Result<Vec<WorkOutcome>, JobError> {
        let jobs = self.queue.claim(&self.queue_name, limit).await?;
        let (succeeded, mut outcomes) = self.execute_claimed(jobs, stopping).await?;
        let completed = self.queue.complete_many(&succeeded).await?;
        outcomes.extend(succeeded.into_iter().map(|id| {
            if completed.contains(&id) {
                WorkOutcome::Completed(id)
            } else {
                WorkOutcome::Lost(id)
            }
        }));
        Ok(outcomes)
    }

    /// Runs claimed jobs concurrently and records their failures; returns the ids that succeeded
    /// (still to be marked completed) and the other outcomes. When stopping, releases them instead.
    async fn execute_claimed(
        &self,
        jobs: Vec<Job>,
        stopping: &CancellationToken,
    ) -> Result<(Vec<Uuid>, Vec<WorkOutcome>), JobError> {
        if jobs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if stopping.is_cancelled() {
            let mut outcomes = Vec::with_capacity(jobs.len());
            for job in jobs {
                self.queue.release(job.id).await?;
                outcomes.push(WorkOutcome::Released(job.id));
            }
            return Ok((Vec::new(), outcomes));
        }
        let ids: Vec<Uuid> = jobs.iter().map(|job| job.id).collect();
        let mut attempts: FuturesUnordered<_> = jobs
            .iter()
            .map(|job| async move { (job, self.attempt(job).await) })
            .collect();
        let mut results = Vec::with_capacity(jobs.len());
        let heartbeat = self.keep_claims(&ids);
        tokio::pin!(heartbeat);
        loop {
            tokio::select! {
                next = attempts.next() => match next {
                    Some(result) => results.push(result),
                    None => break,
                },
                () = &mut heartbeat => {}
            }
        }
        let mut succeeded = Vec::with_capacity(results.len());
        let mut outcomes = Vec::new();
        for (job, result) in results {
            match result {
                Ok(()) => succeeded.push(job.id),
                Err(error) => outcomes.push(match self.queue.fail(job, &error).await? {
                    FailOutcome::Rescheduled { .. } => WorkOutcome::Rescheduled(job.id),
                    FailOutcome::DeadLettered { .. } => WorkOutcome::DeadLettered(job.id),
                    FailOutcome::NotHeld => WorkOutcome::Lost(job.id),
                }),
            }
        }
        Ok((succeeded, outcomes))
    }

    /// Extends the claims every third of the visibility timeout while the attempts run. Never
    /// finishes on its own; a claim lost meanwhile shows up as `Lost` when completing.
    async fn keep_claims(&self, ids: &[Uuid]) {
        let every = self.queue.visibility_timeout() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.queue.heartbeat_many(ids).await {
                Ok(held) if held.len() < ids.len() => {
                    tracing::warn!(
                        lost = ids.len() - held.len(),
                        "job claims expired while running"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "heartbeat failed; retrying"),
            }
        }
    }

    /// One attempt of the job's action.
    async fn attempt(&self, job: &Job) -> Result<(), AttemptError> {
        let observer = self
            .matcher
            .observers()
            .iter()
            .find(|observer| observer.name.as_str() == job.observer)
            .ok_or_else(|| {
                AttemptError::new(
                    ErrorCode::ConfigInvalid,
                    format!("observer {:?} is no longer configured", job.observer),
                )
            })?;
        let action = observer
            .actions
            .iter()
            .find(|action| action.index == job.action_index)
            .ok_or_else(|| {
                AttemptError::new(
                    ErrorCode::ConfigInvalid,
                    format!(
                        "observer {} has no action {} any more",
                        observer.name, job.action_index
                    ),
                )
            })?;
        let envelope = job.event.envelope(observer.name.as_str());
        let context = ActionContext {
            event: &job.event,
            observer: &observer.name,
            action_index: action.index,
            envelope: &envelope,
        };
        let timeout = action.kind.timeout();
        match tokio::time::timeout(timeout, self.runner.attempt(action, &context)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(AttemptError::new(
                ErrorCode::ActionTimeout,
                format!("no answer within {}", humantime::format_duration(timeout)),
            )),
        }
    }

    /// Works until `shutdown` is cancelled: runs ready jobs back to back, rescues expired claims,
    /// waits for a notification or the poll interval when the queue is empty. Jobs in progress are
    /// finished (within their action timeouts) before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut notifications = match PgListener::connect_with(self.queue.pool()).await {
            Ok(mut listener) => listener.listen(JOBS_CHANNEL).await.ok().map(|()| listener),
            Err(error) => {
                tracing::warn!(%error, "job notifications unavailable; polling only");
                None
            }
        };
        // Jobs that succeeded but are not marked completed yet: marked with the next claim, in
        // the same transaction, so a busy worker commits once per batch.
        let mut done: Vec<Uuid> = Vec::new();
        while !shutdown.is_cancelled() {
            match self
                .queue
                .complete_and_claim(&done, &self.queue_name, self.claim_batch)
                .await
            {
                Ok((_, jobs)) => {
                    done.clear();
                    if !jobs.is_empty() {
                        match self.execute_claimed(jobs, &shutdown).await {
                            Ok((succeeded, _)) => done = succeeded,
                            Err(error) => {
                                tracing::warn!(%error, queue = %self.queue_name, "recording job outcomes failed; their claims will expire and they run again");
                            }
                        }
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, queue = %self.queue_name, "job step failed; retrying");
                }
            }
            if let Err(error) = self.queue.rescue_expired().await {
                tracing::warn!(%error, "rescuing expired jobs failed");
            }
            let woken = async {
                match notifications.as_mut() {
                    Some(listener) => {
                        if listener.recv().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = woken => {}
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
        if let Err(error) = self.queue.complete_many(&done).await {
            tracing::warn!(%error, "marking the last jobs completed failed; they will run again");
        }
    }
}
