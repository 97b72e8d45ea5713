//! A job worker: claims jobs of one queue a batch at a time, runs their actions concurrently (one
//! attempt each, under the action's timeout, heartbeating the claims), and records the outcomes.
//!
//! The running loop keeps up to `claim_batch` attempts in flight and at most twice as many claimed
//! jobs ready behind them. The next claim is sent while jobs run and carries the completions
//! gathered so far, so one statement (one commit) both completes the last jobs and claims the next
//! ones, and the database round trip overlaps the work instead of following it. When the jobs of a
//! batch finish before the step that asked for more returns (short actions), another step goes out
//! beside it (up to three in flight), so that the database works on one while another's answer
//! comes back and a third commits. A job a concurrent step has locked is completed by the next step
//! instead of waiting for that lock ([`Step::deferred`]). When the queue had nothing more to give,
//! each completion is sent as soon as there is one: it may make the next job of its entity
//! (ordering key) claimable, and that claim is made in the same statement.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::actions::{ActionContext, ActionRunner};
use crate::error::ErrorCode;
use crate::jobs::{FailOutcome, JOBS_CHANNEL, Job, JobError, PostgresJobQueue, Step};
use crate::matcher::Matcher;
use crate::retry::AttemptError;

/// Jobs one worker claims at once by default.
/// Most stranded waiting jobs a worker on its own promotes each time its queue is empty.
const STRANDED_PER_SWEEP: i32 = 10_000;

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
    /// Its target's circuit is open, its endpoint had no free slot within the queue wait, or
    /// another node holds its deduplication claim: given back, due when it can take calls again
    /// (when that claim ends), attempt not counted.
    Postponed(Uuid),
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
    metrics: Option<Arc<crate::metrics::Metrics>>,
    dedup: Option<crate::dedup::Deduplication>,
    /// Rescues expired claims when idle (a worker on its own); a node's workers leave it to the
    /// coordinator.
    rescues_expired: bool,
    /// This node's id, when job outcomes are appended to the history (`None`: history off).
    history_node: Option<String>,
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
            metrics: None,
            dedup: None,
            rescues_expired: true,
            history_node: None,
        }
    }

    /// Appends each job's outcome (succeeded, failed and rescheduled, dead-lettered) to its
    /// event's history as a `job` row, recorded as run on `node_id`.
    #[must_use]
    pub fn with_history(mut self, node_id: impl Into<String>) -> JobWorker {
        self.history_node = Some(node_id.into());
        self
    }

    /// [`with_history`](Self::with_history) when `node_id` is given; unchanged otherwise.
    #[must_use]
    pub fn with_history_of(self, node_id: Option<&str>) -> JobWorker {
        match node_id {
            Some(node_id) => self.with_history(node_id),
            None => self,
        }
    }

    /// Appends a job outcome row (best effort: a failure is logged; the job's outcome stands).
    /// Written after the outcome, outside the job's completion: a job run again after a crash
    /// adds a second row.
    async fn record_history(
        &self,
        job: &Job,
        outcome: crate::history::HistoryOutcome,
        error: Option<(ErrorCode, String)>,
        took: std::time::Duration,
    ) {
        let Some(node_id) = &self.history_node else {
            return;
        };
        let (error_code, error_message) = match error {
            Some((code, message)) => (
                Some(code.as_str().to_owned()),
                Some(crate::history::error_text(&message)),
            ),
            None => (None, None),
        };
        let action = crate::history::HistoryAction {
            observer: job.observer.clone(),
            action_index: job.action_index,
            action_type: job.action_type.clone(),
            outcome,
            attempts: job.attempt_number(),
            latency_ms: took.as_secs_f64() * 1000.0,
            error_code,
            error_message,
            dead_letter_id: None,
            queue: Some(job.queue.clone()),
            job_id: Some(job.id),
        };
        let record = crate::history::HistoryRecord::for_job(&job.event, action, took, node_id);
        match crate::history::insert_on(self.queue.pool(), &[record]).await {
            Ok(_) => {
                if let Some(metrics) = &self.metrics {
                    metrics.record_history_rows("job", 1);
                }
            }
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "job outcome not recorded in the history");
                if let Some(metrics) = &self.metrics {
                    metrics.history_write_failures.inc();
                }
            }
        }
    }

    /// Leaves the rescue of expired claims and the promotion of stranded waiting jobs to someone
    /// else (a node's coordinator, [`crate::coordinator`] in the node layer) instead of running
    /// them whenever idle.
    #[must_use]
    pub fn without_rescue(mut self) -> JobWorker {
        self.rescues_expired = false;
        self
    }

    /// Claims each job's side effect across nodes before running it: a job whose action another
    /// node completed is completed without running, one being run elsewhere is rescheduled.
    #[must_use]
    pub fn with_deduplication(mut self, dedup: crate::dedup::Deduplication) -> JobWorker {
        self.dedup = Some(dedup);
        self
    }

    /// Counts every attempt in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> JobWorker {
        self.metrics = Some(metrics);
        self
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
        let mut attempts: FuturesUnordered<_> =
            jobs.into_iter().map(|job| self.run_one(job)).collect();
        let mut results = Vec::with_capacity(ids.len());
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
        for (id, result) in results {
            match result? {
                None => succeeded.push(id),
                Some(outcome) => outcomes.push(outcome),
            }
        }
        Ok((succeeded, outcomes))
    }

    /// One attempt of a claimed job; a failure is recorded at once (rescheduled or dead-lettered).
    /// `None`: it succeeded and is still to be marked completed.
    async fn run_one(&self, job: Job) -> (Uuid, Result<Option<WorkOutcome>, JobError>) {
        let started = std::time::Instant::now();
        let attempt = self.deduplicated_attempt(&job).await;
        let took = started.elapsed();
        let attempt_busy =
            matches!(&attempt, Err(error) if error.code == ErrorCode::InProgressElsewhere);
        let attempt_error = attempt
            .as_ref()
            .err()
            .map(|error| (error.code, error.message.clone()));
        let result = match attempt {
            Ok(()) => Ok(None),
            Err(error) if error.code.call_not_made() => self
                .queue
                .postpone(
                    job.id,
                    error
                        .retry_after
                        .unwrap_or(if error.code == ErrorCode::CircuitOpen {
                            CIRCUIT_RECHECK
                        } else {
                            BUSY_RECHECK
                        }),
                    error.circuit.as_deref(),
                )
                .await
                .map(|_| Some(WorkOutcome::Postponed(job.id))),
            // Another node holds the action's claim: nothing was attempted here. Due again when
            // that claim ends (a killed node's claim ends within one claim lease), not after a
            // backoff, and without spending an attempt.
            Err(error)
                if error.code == ErrorCode::InProgressElsewhere
                    && let Some(claim_left) = error.retry_after =>
            {
                self.queue
                    .postpone(job.id, claim_left.max(CLAIM_RECHECK_FLOOR), None)
                    .await
                    .map(|_| Some(WorkOutcome::Postponed(job.id)))
            }
            Err(error) => self.queue.fail(&job, &error).await.map(|outcome| {
                Some(match outcome {
                    FailOutcome::Rescheduled { .. } => WorkOutcome::Rescheduled(job.id),
                    FailOutcome::DeadLettered { dead_letter } => {
                        tracing::warn!(
                            event = %job.event.id,
                            observer = %job.observer,
                            action_index = job.action_index,
                            action_type = %job.action_type,
                            job = %job.id,
                            code = %error.code,
                            attempts = job.attempt_number(),
                            dead_letter = %dead_letter,
                            error = %error.message,
                            "action failed for good; parked in the dead-letter queue"
                        );
                        WorkOutcome::DeadLettered(job.id)
                    }
                    FailOutcome::NotHeld => WorkOutcome::Lost(job.id),
                })
            }),
        };
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(None) => "succeeded",
                Ok(Some(WorkOutcome::Rescheduled(_))) => "rescheduled",
                Ok(Some(WorkOutcome::DeadLettered(_))) => "dead_lettered",
                Ok(Some(WorkOutcome::Postponed(_))) if attempt_busy => "busy_elsewhere",
                Ok(Some(WorkOutcome::Postponed(_))) => "circuit_open",
                _ => "lost",
            };
            metrics.record_job(&job.action_type, outcome, took);
        }
        let history_outcome = match &result {
            Ok(None) => Some(crate::history::HistoryOutcome::Succeeded),
            Ok(Some(WorkOutcome::Rescheduled(_))) => Some(crate::history::HistoryOutcome::Failed),
            Ok(Some(WorkOutcome::DeadLettered(_))) => {
                Some(crate::history::HistoryOutcome::DeadLettered)
            }
            _ => None,
        };
        if let Some(outcome) = history_outcome {
            self.record_history(&job, outcome, attempt_error, took)
                .await;
        }
        (job.id, result)
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

    /// One attempt, under a deduplication claim when there is a store.
    async fn deduplicated_attempt(&self, job: &Job) -> Result<(), AttemptError> {
        let Some(dedup) = &self.dedup else {
            return self.attempt(job).await;
        };
        let key = job.action_key().to_string();
        match dedup.gate(&key).await {
            crate::dedup::Gate::Run(token) => {
                // Renewed while the attempt runs, so a claim left by a killed node ends soon.
                let result = dedup.hold(&key, token.as_deref(), self.attempt(job)).await;
                dedup.settle(&key, token.as_deref(), result.is_ok()).await;
                result
            }
            crate::dedup::Gate::Done => Ok(()),
            crate::dedup::Gate::Busy { expires_in } => {
                let mut busy = AttemptError::new(
                    ErrorCode::InProgressElsewhere,
                    "another node is running this action right now",
                );
                busy.retry_after = Some(expires_in);
                Err(busy)
            }
            crate::dedup::Gate::Deferred(reason) => {
                Err(AttemptError::new(ErrorCode::InProgressElsewhere, reason))
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
            lease: None,
        };
        let timeout = action.kind.timeout();
        // The wait for a slot at an HTTP endpoint is not part of the timeout.
        let deadline = self.runner.attempt_deadline(action);
        match tokio::time::timeout(deadline, self.runner.attempt(action, &context)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(AttemptError::new(
                ErrorCode::ActionTimeout,
                format!("no answer within {}", humantime::format_duration(timeout)),
            )),
        }
    }

    /// Works until `shutdown` is cancelled: runs ready jobs back to back, rescues expired claims,
    /// waits for a notification or the poll interval when the queue is empty. On shutdown, jobs
    /// claimed but not started are released and jobs in progress are finished (within their
    /// action timeouts) and recorded before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut notifications = self.listen_for_jobs().await;
        let limit = usize::try_from(self.claim_batch).unwrap_or(usize::MAX);
        let mut ready: VecDeque<Job> = VecDeque::new();
        let mut running = FuturesUnordered::new();
        // Every job this worker holds (ready, running, or succeeded but not yet completed): the
        // claims the heartbeat extends.
        let mut held: HashSet<Uuid> = HashSet::new();
        // Succeeded, to be marked completed with the next claim.
        let mut done: Vec<Uuid> = Vec::new();
        // Complete-and-claim steps in flight (at most `CLAIMS_IN_FLIGHT`) and the jobs they ask for.
        let mut claims: FuturesUnordered<BoxFuture<'_, ClaimResult>> = FuturesUnordered::new();
        let mut requested = 0;
        let mut heartbeat: Option<BoxFuture<'_, ()>> = None;
        let mut pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut heartbeat_every = tokio::time::interval(self.queue.visibility_timeout() / 3);
        heartbeat_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drained = false;
        let mut stopping = false;
        loop {
            if shutdown.is_cancelled() {
                stopping = true;
                // Unstarted jobs go back, those of a claim that answered after the stop too.
                if !ready.is_empty() {
                    self.release_unstarted(ready.drain(..), &mut held).await;
                }
            }
            while running.len() < limit {
                let Some(job) = ready.pop_front() else { break };
                running.push(self.run_one(job));
            }
            if stopping && running.is_empty() && claims.is_empty() {
                break;
            }
            if pause.is_none()
                && !stopping
                && let Some(asked) = step_size(
                    limit,
                    (running.len(), ready.len()),
                    requested,
                    claims.len(),
                    drained,
                    !done.is_empty(),
                )
            {
                requested += asked;
                claims.push(self.claim(std::mem::take(&mut done), asked));
            }
            if drained
                && running.is_empty()
                && ready.is_empty()
                && claims.is_empty()
                && pause.is_none()
                && !stopping
            {
                self.wait_for_work(notifications.as_mut(), &shutdown).await;
                drained = false;
                continue;
            }
            tokio::select! {
                Some((id, result)) = running.next(), if !running.is_empty() => match result {
                    Ok(None) => done.push(id),
                    Ok(Some(_)) => { held.remove(&id); }
                    Err(error) => {
                        held.remove(&id);
                        tracing::warn!(%error, job = %id, "recording a failed attempt failed; the claim will expire and the job runs again");
                    }
                },
                Some((sent, asked, result)) = claims.next(), if !claims.is_empty() => {
                    requested -= asked;
                    match result {
                        Ok(Step { completed, deferred, claimed }) => {
                            let lost = sent.len().saturating_sub(completed.len() + deferred.len());
                            if lost > 0 {
                                tracing::warn!(lost, queue = %self.queue_name, "job claims expired before completion; those jobs may run again");
                            }
                            // A deferred job is still held (a concurrent step had it locked): the next step completes it.
                            for id in sent.iter().filter(|id| !deferred.contains(id)) { held.remove(id); }
                            done.extend(deferred);
                            drained = claimed.len() < asked;
                            held.extend(claimed.iter().map(|job| job.id));
                            ready.extend(claimed);
                        }
                        Err(error) => {
                            tracing::warn!(%error, queue = %self.queue_name, "job step failed; retrying");
                            done.extend(sent);
                            pause = Some(Box::pin(tokio::time::sleep(STEP_RETRY_DELAY)));
                        }
                    }
                }
                () = async { match pause.as_mut() { Some(sleep) => sleep.await, None => std::future::pending().await } } => pause = None,
                _ = heartbeat_every.tick() => {
                    if heartbeat.is_none() && !held.is_empty() {
                        heartbeat = Some(self.extend_claims(held.iter().copied().collect()));
                    }
                }
                () = async { match heartbeat.as_mut() { Some(future) => future.await, None => std::future::pending().await } } => heartbeat = None,
                () = shutdown.cancelled(), if !stopping => {}
            }
        }
        if let Err(error) = self.queue.complete_many(&done).await {
            tracing::warn!(%error, "marking the last jobs completed failed; they will run again");
        }
    }

    /// A connection listening for new jobs; `None` (poll only) when it cannot be had.
    async fn listen_for_jobs(&self) -> Option<PgListener> {
        match PgListener::connect_with(self.queue.pool()).await {
            Ok(mut listener) => listener.listen(JOBS_CHANNEL).await.ok().map(|()| listener),
            Err(error) => {
                tracing::warn!(%error, "job notifications unavailable; polling only");
                None
            }
        }
    }

    /// Gives back jobs claimed but not started (the worker is stopping).
    async fn release_unstarted(&self, jobs: impl Iterator<Item = Job>, held: &mut HashSet<Uuid>) {
        for job in jobs {
            held.remove(&job.id);
            if let Err(error) = self.queue.release(job.id).await {
                tracing::warn!(%error, job = %job.id, "releasing an unstarted job failed; its claim will expire");
            }
        }
    }

    /// The queue is empty: rescues expired claims and promotes stranded waiting jobs (unless left
    /// to the coordinator), then waits for a notification, the poll interval or shutdown.
    ///
    /// A waiting job is stranded when the statements that finished the jobs ahead of it could
    /// not see each other (two jobs of one key with the same ordinal — the same change enqueued
    /// by two replay runs — completed at once, or a successor enqueued while its predecessor
    /// finished); a worker on its own has no coordinator to promote it.
    async fn wait_for_work(
        &self,
        notifications: Option<&mut PgListener>,
        shutdown: &CancellationToken,
    ) {
        if self.rescues_expired {
            if let Err(error) = self.queue.rescue_expired().await {
                tracing::warn!(%error, "rescuing expired jobs failed");
            }
            if let Err(error) =
                crate::jobs::promote_stranded_on(self.queue.pool(), STRANDED_PER_SWEEP).await
            {
                tracing::warn!(%error, "promoting stranded waiting jobs failed");
            }
        }
        let woken = async {
            match notifications {
                Some(listener) => {
                    if listener.recv().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = woken => {}
            () = tokio::time::sleep(self.poll_interval) => {}
        }
    }

    /// Sends `done` for completion and claims up to `limit` jobs; gives back what it sent and
    /// asked for, so a failed step loses no completion.
    fn claim(&self, done: Vec<Uuid>, limit: usize) -> BoxFuture<'_, ClaimResult> {
        Box::pin(async move {
            let result = self
                .queue
                .complete_and_claim(
                    &done,
                    &self.queue_name,
                    u32::try_from(limit).unwrap_or(u32::MAX),
                )
                .await;
            (done, limit, result)
        })
    }

    fn extend_claims(&self, ids: Vec<Uuid>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self.queue.heartbeat_many(&ids).await {
                Ok(still) if still.len() < ids.len() => tracing::warn!(
                    lost = ids.len() - still.len(),
                    "job claims expired while held"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "heartbeat failed; retrying"),
            }
        })
    }
}

/// How many jobs the next complete-and-claim step asks for, if one is to go out now: the worker
/// holds `running` and `ready` jobs, has `requested` more asked for by `in_flight` steps, and may
/// hold `CLAIMS_IN_FLIGHT` times `limit`. With no step in flight, one goes out when nothing is
/// ready and there is room (as the queue had jobs to give), or to send completions once the
/// queue was drained — one may release the next job of its entity, which must not wait for the
/// slowest job still running. Another goes out beside those in flight only for a whole batch
/// and with nothing running: the jobs of the earlier ones ran already (short actions), and the
/// database, not the actions, is what the worker waits for.
fn step_size(
    limit: usize,
    (running, ready): (usize, usize),
    requested: usize,
    in_flight: usize,
    drained: bool,
    has_completions: bool,
) -> Option<usize> {
    let room = (CLAIMS_IN_FLIGHT * limit)
        .saturating_sub(running + ready + requested)
        .min(limit);
    let send = if in_flight == 0 {
        (!drained && ready == 0 && room > 0) || (drained && has_completions)
    } else {
        in_flight < CLAIMS_IN_FLIGHT && !drained && running == 0 && ready == 0 && room == limit
    };
    send.then_some(room.max(1))
}

/// Completions sent, jobs asked for, and the outcome of one complete-and-claim step.
type ClaimResult = (Vec<Uuid>, usize, Result<Step, JobError>);

/// A job whose action another node holds is due again when that claim ends, but never sooner
/// than this (a claim about to end is not polled in a tight loop).
const CLAIM_RECHECK_FLOOR: Duration = Duration::from_millis(100);
/// When an open circuit gives no time to wait, look again after this.
const CIRCUIT_RECHECK: Duration = Duration::from_secs(5);
/// When a busy endpoint (no slot within the queue wait) gives no time to wait, try after this.
const BUSY_RECHECK: Duration = Duration::from_secs(1);

/// Complete-and-claim steps one worker has in flight at most: three, so that the database works
/// on one while another's answer is on its way back and a third waits for its commit to reach
/// the disk (with short jobs, two in flight left the worker waiting on that flush; four gave no
/// more — `benches/jobs.rs`, batched, one worker).
const CLAIMS_IN_FLIGHT: usize = 3;

/// Wait after a failed complete-and-claim step before the next.
const STEP_RETRY_DELAY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_step_goes_out_only_for_a_whole_batch_beside_those_in_flight() {
        let limit = 16;
        // Nothing held, nothing asked for: one step for a batch.
        assert_eq!(step_size(limit, (0, 0), 0, 0, false, false), Some(16));
        // A batch running, the next asked for while it runs.
        assert_eq!(step_size(limit, (16, 0), 0, 0, false, false), Some(16));
        // That step in flight and the batch still running: no second step.
        assert_eq!(step_size(limit, (16, 0), 16, 1, false, false), None);
        assert_eq!(step_size(limit, (5, 0), 16, 1, false, true), None);
        // The batch finished before the step returned: a second one beside it, and a third.
        assert_eq!(step_size(limit, (0, 0), 16, 1, false, true), Some(16));
        assert_eq!(step_size(limit, (0, 0), 32, 2, false, true), Some(16));
        // Not while part of a batch runs, and never a fourth.
        assert_eq!(step_size(limit, (1, 0), 32, 2, false, true), None);
        assert_eq!(step_size(limit, (0, 0), 48, 3, false, true), None);
        // Jobs ready to start: no step until they have.
        assert_eq!(step_size(limit, (16, 4), 0, 0, false, false), None);
    }

    #[test]
    fn once_drained_completions_go_out_as_they_come_one_step_at_a_time() {
        let limit = 16;
        assert_eq!(step_size(limit, (3, 0), 0, 0, true, true), Some(16));
        assert_eq!(step_size(limit, (3, 0), 0, 0, true, false), None);
        assert_eq!(step_size(limit, (3, 0), 16, 1, true, true), None);
        // One job per claim: at least one job is asked for.
        assert_eq!(step_size(1, (1, 0), 0, 0, false, false), Some(1));
        assert_eq!(step_size(1, (0, 0), 1, 1, false, true), Some(1));
    }
}
