//! A job worker: claims one job at a time from one queue, runs its action (one attempt, under the
//! action's timeout, heartbeating the claim), and records the outcome.

use std::sync::Arc;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{FailOutcome, JOBS_CHANNEL, Job, JobError, PostgresJobQueue};
use crate::actions::{ActionContext, ActionRunner};
use crate::error::ErrorCode;
use crate::matcher::Matcher;
use crate::retry::AttemptError;

/// What one step of a worker did.
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
        }
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
        let Some(job) = self
            .queue
            .claim(&self.queue_name, 1)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(WorkOutcome::Idle);
        };
        if stopping.is_cancelled() {
            self.queue.release(job.id).await?;
            return Ok(WorkOutcome::Released(job.id));
        }
        let id = job.id;
        let result = tokio::select! {
            result = self.attempt(&job) => result,
            () = self.keep_claim(id) => return Ok(WorkOutcome::Lost(id)),
        };
        match result {
            Ok(()) => Ok(if self.queue.complete(id).await? {
                WorkOutcome::Completed(id)
            } else {
                WorkOutcome::Lost(id)
            }),
            Err(error) => Ok(match self.queue.fail(&job, &error).await? {
                FailOutcome::Rescheduled { .. } => WorkOutcome::Rescheduled(id),
                FailOutcome::DeadLettered { .. } => WorkOutcome::DeadLettered(id),
                FailOutcome::NotHeld => WorkOutcome::Lost(id),
            }),
        }
    }

    /// Extends the claim every third of the visibility timeout; returns when the claim is lost.
    async fn keep_claim(&self, id: Uuid) {
        let every = self.queue.visibility_timeout() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.queue.heartbeat(id).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => tracing::warn!(%error, job = %id, "heartbeat failed; retrying"),
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
    /// waits for a notification or the poll interval when the queue is empty. The job in progress
    /// is finished (within its action timeout) before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut notifications = match PgListener::connect_with(self.queue.pool()).await {
            Ok(mut listener) => listener.listen(JOBS_CHANNEL).await.ok().map(|()| listener),
            Err(error) => {
                tracing::warn!(%error, "job notifications unavailable; polling only");
                None
            }
        };
        while !shutdown.is_cancelled() {
            match self.try_execute_one(&shutdown).await {
                Ok(WorkOutcome::Idle) => {}
                Ok(_) => continue,
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
    }
}
