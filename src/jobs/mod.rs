//! The durable job queue in PostgreSQL (`fraiseql_observers.jobs`): the store its workers
//! ([`crate::worker`]) and the checkpoint's enqueue go through.
//!
//! A job is one action of one event for one observer, run outside the change-log page: slow
//! actions, and retries that must wait longer than a page should. Its identity is the action's
//! idempotency key, so enqueueing the same work twice (a replayed event) is a no-op.
//!
//! Invariants:
//! - A job is claimed by one worker at a time (`FOR UPDATE SKIP LOCKED`), most important first
//!   (priority 10 → 0), then oldest `run_at`.
//! - Jobs of one observer's action for one entity run one at a time, in change order: a job with
//!   an ordering key (see [`ordering_key`]) is claimable only while no job with the same key and a
//!   smaller ordinal (change-log position) is waiting, pending or running. Completed, failed
//!   (dead-lettered) and cancelled jobs hold nothing back, so a poison event does not stall its
//!   entity; jobs without a key are not ordered.
//! - A job enqueued behind an unfinished job of its key is `waiting`: out of the ready index, so
//!   claims do not walk past it. The statement that finishes a job of the key promotes the next
//!   one to `pending` and notifies the workers (a trigger, migration 0018); the coordinator
//!   promotes, within a rescue interval, one whose predecessor finished while it was being
//!   enqueued. Waiting jobs count as pending in stats and gauges.
//! - A claimed job is held under a visibility timeout its worker keeps extending; if the worker
//!   dies, the job is pending again once the timeout passes (and the lost attempt is counted and
//!   recorded). A slow job whose worker is alive keeps its claim.
//! - A failed attempt reschedules the same row (growing `run_at`, attempt count, error history);
//!   a permanent failure or the last attempt marks it failed and parks a dead letter with the
//!   whole history, in one transaction.
//! - Only the worker holding the claim can complete, fail or release a job.
//! - A completed job leaves `jobs`: the completing statement deletes its row and records it,
//!   without its payload, in `jobs_completed` (migration 0020) until retention. The enqueue skips
//!   a job whose key is recorded there, and the insert trigger drops one whose key was completed
//!   while it was being enqueued, so a replayed event stays a no-op after its job completed.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

use crate::domain::EntityEvent;
use crate::error::ErrorCode;
pub use crate::outcome::{NewJob, ordering_key};
use crate::retry::AttemptError;

/// The channel the jobs table notifies on insert.
pub const JOBS_CHANNEL: &str = "fraiseql_observers_jobs";
/// Default time a claim lasts without a heartbeat.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_PRIORITY: i16 = 5;

/// One failed attempt, as kept in a job's history.
pub use crate::retry::FailedAttempt as JobAttemptError;

/// A claimed job.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: Uuid,
    pub queue: String,
    pub priority: i16,
    /// Attempts the queue made so far, this one included.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Attempts made in the page before the action was handed to the queue.
    pub inline_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub idempotency_key: String,
    pub event: EntityEvent,
    pub observer: String,
    pub action_index: usize,
    pub action_type: String,
    /// Every failed attempt so far, the page's first, oldest first.
    pub errors: Vec<JobAttemptError>,
}

impl Job {
    /// This attempt's number in the action's whole history (page and queue).
    #[must_use]
    pub fn attempt_number(&self) -> u32 {
        self.inline_attempts.saturating_add(self.attempts)
    }

    /// The action the job runs: its identity, as its idempotency key and dedup claim spell it.
    #[must_use]
    pub fn action_key(&self) -> crate::domain::ActionKey {
        crate::domain::ActionKey::new(self.event.id, self.observer.as_str(), self.action_index)
    }
}

/// What happened to a failed job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Pending again, not before `run_at`.
    Rescheduled { run_at: DateTime<Utc> },
    /// Failed for good; its dead letter's id.
    DeadLettered { dead_letter: Uuid },
    /// This worker no longer held the claim (it expired and another worker took the job).
    NotHeld,
}

/// Counts and durations of one queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueStats {
    pub queue: String,
    pub pending: i64,
    pub running: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Over completed jobs still retained: mean and percentiles of (finished − started), ms.
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Seconds the oldest pending job that is due has waited past its `run_at`.
    pub oldest_due_age_seconds: Option<f64>,
    /// Jobs completed in the last 24 hours (as long as retention keeps them).
    pub completed_last_day: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("stored job {id} is unreadable: {problem}")]
    Corrupt { id: Uuid, problem: String },
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The delay before attempt `attempts + 1`: `initial · 2^(attempts − 1)`, capped, plus up to
/// 100 % jitter, never beyond the cap.
#[must_use]
pub fn backoff_delay(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1_u32 << exponent).min(max);
    let jitter = base.mul_f64(rand::random::<f64>());
    base.saturating_add(jitter).min(max.max(base))
}

/// The claimed row's columns; the event comes as text so that one that does not decode fails
/// alone ([`PostgresJobQueue::fail_unreadable`]) instead of the whole claim.
const JOB_COLUMNS: &str = "id, queue, priority, attempts, max_attempts, backoff_initial_ms, backoff_max_ms, idempotency_key, event::text AS event, observer, action_index, action_type, errors, inline_attempts";

/// Completes the held jobs of CTE `held` (id) — node `$2`'s — (CTE `done`: id, `ordering_key`)
/// and finds the job each completion makes next in line (CTE `after_done`: id, status, queue,
/// `run_at` of the first unfinished job of the completed job's ordering key): the head of a
/// completion statement, after [`HELD_UNLESS_LOCKED`] or [`HELD_WAITING`] and followed by
/// [`PROMOTE_AFTER_DONE`].
///
/// A completed job leaves the table: its row is deleted (no rewrite of the payload, no new index
/// entries) and a narrow record of it goes to `jobs_completed` (migration 0020), whose unique key
/// keeps a replayed enqueue a no-op. The rest of the statement still sees the deleted rows (one
/// snapshot), hence the `NOT IN (SELECT id FROM done)` wherever unfinished jobs are looked for.
const COMPLETE_HELD: &str = "done AS (
         DELETE FROM fraiseql_observers.jobs AS job
          USING held
          WHERE job.id = held.id AND job.status = 'running' AND job.locked_by = $2
      RETURNING job.id, job.idempotency_key, job.queue, job.priority, job.event_id, job.observer, job.action_index,
                job.action_type, job.ordering_key, job.ordinal, job.attempts, job.inline_attempts,
                job.errors, job.created_at, job.started_at),
     recorded AS (
         INSERT INTO fraiseql_observers.jobs_completed
                (id, idempotency_key, queue, priority, event_id, observer, action_index, action_type,
                 ordering_key, ordinal, attempts, inline_attempts, errors, created_at, started_at)
         SELECT id, idempotency_key, queue, priority, event_id, observer, action_index, action_type,
                ordering_key, ordinal, attempts, inline_attempts, errors, created_at, started_at
           FROM done
         ON CONFLICT (idempotency_key) DO NOTHING),
     after_done AS (
         SELECT next.id, next.status, next.queue, next.run_at
           FROM done
          CROSS JOIN LATERAL (
                SELECT candidate.id, candidate.status, candidate.queue, candidate.run_at
                  FROM fraiseql_observers.jobs AS candidate
                 WHERE candidate.ordering_key = done.ordering_key
                   AND candidate.status IN ('pending', 'running', 'waiting')
                   AND candidate.id NOT IN (SELECT id FROM done)
                 ORDER BY candidate.ordinal
                 LIMIT 1) AS next
          WHERE done.ordering_key IS NOT NULL)";

/// The jobs of `$1` (uuid[]) that node `$2` holds and that no other statement has locked (CTE
/// `held`), for a step that both completes and claims.
///
/// A claim that runs beside a completion can leave a lock on the jobs being completed: a claim
/// whose snapshot still saw them pending reaches them after the claim that took them committed,
/// locks their new (running) version to recheck it, finds it no longer pending and skips it, but
/// keeps the lock until it commits. A completion of those jobs that waited for that lock would
/// queue the worker's steps behind one another (each waiting for the previous one's commit), so
/// a step completes only the jobs it can lock at once; those left locked are still held (CTE
/// `deferred`, looked up only when some of `$1` were not locked) and go out with the worker's
/// next step.
const HELD_UNLESS_LOCKED: &str = "held AS (
         SELECT job.id FROM fraiseql_observers.jobs AS job
          WHERE job.id = ANY ($1::uuid[]) AND job.status = 'running' AND job.locked_by = $2
            FOR UPDATE SKIP LOCKED),
     deferred AS (
         SELECT job.id FROM fraiseql_observers.jobs AS job
          WHERE (SELECT count(*) FROM held) < cardinality($1::uuid[])
            AND job.id = ANY ($1::uuid[]) AND job.status = 'running' AND job.locked_by = $2
            AND job.id NOT IN (SELECT id FROM held))";

/// The jobs of `$1` (uuid[]) to complete, waiting for any lock on them (CTE `held`): for a
/// completion that must not leave one behind.
const HELD_WAITING: &str = "held AS (SELECT finished.id FROM unnest($1::uuid[]) AS finished(id))";

/// The tail of a completion statement: promotes to pending every waiting job that a completion
/// made next in line (`after_done`) and that the statement does not claim itself (CTE `picked`),
/// and notifies the workers when there was one (CTE `notified`, which the final SELECT must read
/// for the notification to be sent). Completions promote their successors here, in the
/// statement; the `jobs_promote_successor` trigger covers the other ways a job finishes (dead
/// letter, cancel) — a row trigger per completed job cost a PL/pgSQL call and a second update
/// statement per job.
const PROMOTE_AFTER_DONE: &str = "promoted AS (
         UPDATE fraiseql_observers.jobs AS job
            SET status = 'pending'
          WHERE job.id IN (SELECT id FROM after_done WHERE status = 'waiting')
            AND job.id NOT IN (SELECT id FROM picked)
            AND job.status = 'waiting'
      RETURNING job.id),
     notified AS (
         SELECT pg_notify('fraiseql_observers_jobs', '') WHERE EXISTS (SELECT FROM promoted))";

fn job_from_row(row: &sqlx::postgres::PgRow) -> Result<Job, JobError> {
    let id: Uuid = row.try_get("id")?;
    let corrupt = |problem: String| JobError::Corrupt { id, problem };
    let event: String = row.try_get("event")?;
    let errors: serde_json::Value = row.try_get("errors")?;
    let non_negative = |value: i64| u64::try_from(value).unwrap_or(0);
    Ok(Job {
        id,
        queue: row.try_get("queue")?,
        priority: row.try_get("priority")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        max_attempts: u32::try_from(row.try_get::<i32, _>("max_attempts")?).unwrap_or(1),
        inline_attempts: u32::try_from(row.try_get::<i32, _>("inline_attempts")?).unwrap_or(0),
        initial_delay: Duration::from_millis(non_negative(row.try_get("backoff_initial_ms")?)),
        max_delay: Duration::from_millis(non_negative(row.try_get("backoff_max_ms")?)),
        idempotency_key: row.try_get("idempotency_key")?,
        event: serde_json::from_str(&event).map_err(|error| corrupt(format!("event: {error}")))?,
        observer: row.try_get("observer")?,
        action_index: usize::try_from(row.try_get::<i32, _>("action_index")?).unwrap_or(0),
        action_type: row.try_get("action_type")?,
        errors: serde_json::from_value(errors)
            .map_err(|error| corrupt(format!("errors: {error}")))?,
    })
}

/// What one complete-and-claim step did ([`PostgresJobQueue::complete_and_claim`]).
#[derive(Debug, Default)]
pub struct Step {
    /// The jobs completed.
    pub completed: Vec<Uuid>,
    /// Jobs given for completion that this node still holds but that another statement had
    /// locked: not completed yet, to be given again.
    pub deferred: Vec<Uuid>,
    /// The jobs claimed.
    pub claimed: Vec<Job>,
}

/// The job queue of one node (`node_id` names its claims).
#[derive(Clone, Debug)]
pub struct PostgresJobQueue {
    pool: PgPool,
    node_id: String,
    visibility_timeout: Duration,
}

impl PostgresJobQueue {
    #[must_use]
    pub fn new(
        pool: PgPool,
        node_id: impl Into<String>,
        visibility_timeout: Duration,
    ) -> PostgresJobQueue {
        PostgresJobQueue {
            pool,
            node_id: node_id.into(),
            visibility_timeout,
        }
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    #[must_use]
    pub fn visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// Enqueues one job; `None` when a job with the same idempotency key exists already (or
    /// completed, and retention still keeps its record).
    ///
    /// # Errors
    /// Storage failed.
    pub async fn enqueue(&self, job: &NewJob) -> Result<Option<Uuid>, JobError> {
        let mut connection = self.pool.acquire().await?;
        let ids = enqueue_batch(&mut *connection, std::slice::from_ref(job)).await?;
        Ok(ids.into_iter().next())
    }

    /// Claims up to `limit` ready jobs of `queue`.
    ///
    /// # Errors
    /// Storage failed, or a claimed row does not decode.
    pub async fn claim(&self, queue: &str, limit: u32) -> Result<Vec<Job>, JobError> {
        Ok(self.complete_and_claim(&[], queue, limit).await?.claimed)
    }

    /// Completes the held jobs `done` and claims up to `limit` more in one statement (one round
    /// trip, one commit). Jobs of `done` that another statement has locked are left held and
    /// named in [`Step::deferred`], to be completed by a later step: a claim running beside it can
    /// keep a lock on them until it commits.
    ///
    /// # Errors
    /// Storage failed, or a claimed row does not decode.
    pub async fn complete_and_claim(
        &self,
        done: &[Uuid],
        queue: &str,
        limit: u32,
    ) -> Result<Step, JobError> {
        // The updates see the same snapshot and touch disjoint rows (running; pending or waiting
        // and picked; waiting and not picked). The outer join yields one row even when nothing
        // was claimed, carrying the completions. A job waits while an earlier job of its ordering
        // key is unfinished; one this statement completes (`done`, as actually updated) no longer
        // counts, and the job that completion makes next in line (`after_done`: the first
        // unfinished job of its key after it, if that one is waiting) is claimed straight from
        // `waiting`, before the ready jobs — so the next job of an entity goes out in the same
        // round trip that completes the one before it. A successor not claimed here (another
        // queue, not due, no room) is promoted to pending (`promoted`) and the workers notified.
        //
        // The limit is written into the statement, not bound: with `LIMIT $n` the planner costs a
        // generic plan for an unknown limit (a tenth of the ready jobs), finds it dearer than a
        // plan for the actual one, and so plans the statement afresh at every call — two thirds
        // of the server's work per claim. A literal limit gives one prepared statement per limit
        // (a worker asks for 1 up to its claim batch), whose generic plan the server keeps after
        // its first few executions.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH {HELD_UNLESS_LOCKED},
             {COMPLETE_HELD},
             successors AS (
                 SELECT id FROM after_done
                  WHERE status = 'waiting' AND queue = $3 AND run_at <= now()),
             next_in_line AS (
                 SELECT candidate.id FROM fraiseql_observers.jobs AS candidate
                  WHERE candidate.id IN (SELECT id FROM successors) AND candidate.status = 'waiting'
                  LIMIT {limit}
                  FOR UPDATE SKIP LOCKED),
             ready AS (
                 SELECT candidate.id FROM fraiseql_observers.jobs AS candidate
                  WHERE candidate.queue = $3 AND candidate.status = 'pending'
                    AND candidate.run_at <= now()
                    AND NOT EXISTS (
                        SELECT FROM fraiseql_observers.jobs AS earlier
                         WHERE earlier.ordering_key = candidate.ordering_key
                           AND earlier.ordinal < candidate.ordinal
                           AND earlier.status IN ('pending', 'running', 'waiting')
                           AND earlier.id NOT IN (SELECT id FROM done))
                  ORDER BY candidate.priority DESC, candidate.run_at
                  LIMIT {limit}
                  FOR UPDATE SKIP LOCKED),
             picked AS (
                 SELECT id FROM (SELECT id, 0 AS rank FROM next_in_line
                                 UNION ALL
                                 SELECT id, 1 FROM ready) AS both_kinds
                  ORDER BY rank
                  LIMIT {limit}),
             claimed AS (
                 UPDATE fraiseql_observers.jobs AS job
                    SET status = 'running', attempts = job.attempts + 1, locked_by = $2,
                        locked_until = now() + make_interval(secs => $4), started_at = now()
                  WHERE job.id IN (SELECT id FROM picked)
              RETURNING {JOB_COLUMNS}),
             {PROMOTE_AFTER_DONE}
             SELECT (SELECT coalesce(array_agg(id), '{{}}') FROM done) AS completed,
                    (SELECT coalesce(array_agg(id), '{{}}') FROM deferred) AS deferred,
                    (SELECT count(*) FROM notified) AS notified, claimed.*
               FROM (VALUES (1)) AS one (n) LEFT JOIN claimed ON true"
        )))
        .bind(done)
        .bind(&self.node_id)
        .bind(queue)
        .bind(self.visibility_timeout.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let (completed, deferred): (Vec<Uuid>, Vec<Uuid>) = match rows.first() {
            Some(row) => (row.try_get("completed")?, row.try_get("deferred")?),
            None => (Vec::new(), Vec::new()),
        };
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
                match job_from_row(row) {
                    Ok(job) => jobs.push(job),
                    Err(JobError::Corrupt { id, problem }) => {
                        self.fail_unreadable(id, &problem).await?;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        jobs.sort_by_key(|job| std::cmp::Reverse(job.priority));
        Ok(Step {
            completed,
            deferred,
            claimed: jobs,
        })
    }

    async fn complete_on(
        &self,
        connection: &mut sqlx::PgConnection,
        ids: &[Uuid],
    ) -> Result<Vec<Uuid>, JobError> {
        let (completed, _notified): (Vec<Uuid>, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "WITH {HELD_WAITING},
                 {COMPLETE_HELD},
                 picked (id) AS (SELECT NULL::uuid WHERE false),
                 {PROMOTE_AFTER_DONE}
                 SELECT ARRAY(SELECT id FROM done), (SELECT count(*) FROM notified)"
            )))
            .bind(ids)
            .bind(&self.node_id)
            .fetch_one(&mut *connection)
            .await?;
        Ok(completed)
    }

    /// Extends the claim; `false` when this node no longer holds it.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn heartbeat(&self, id: Uuid) -> Result<bool, JobError> {
        Ok(!self.heartbeat_many(&[id]).await?.is_empty())
    }

    /// Marks a held job completed; `false` when this node no longer holds it.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn complete(&self, id: Uuid) -> Result<bool, JobError> {
        Ok(!self.complete_many(&[id]).await?.is_empty())
    }

    /// Marks held jobs completed in one statement; returns the ids this node still held.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn complete_many(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, JobError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.pool.acquire().await?;
        self.complete_on(&mut connection, ids).await
    }

    /// Extends the claims of several jobs; returns the ids this node still holds.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn heartbeat_many(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, JobError> {
        Ok(sqlx::query_scalar(
            "UPDATE fraiseql_observers.jobs AS job SET locked_until = now() + make_interval(secs => $3)
               FROM unnest($1::uuid[]) AS held(id)
              WHERE job.id = held.id AND job.status = 'running' AND job.locked_by = $2
          RETURNING job.id",
        )
        .bind(ids)
        .bind(&self.node_id)
        .bind(self.visibility_timeout.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Fails for good a claimed job whose stored row does not decode (its event nests too deep
    /// for the parser, say), with a dead letter naming the problem, so that it neither fails the
    /// rest of its claim nor comes back at every rescue. The letter's event is a stand-in
    /// ([`crate::dlq::placeholder_event`]): it is never sent anywhere.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn fail_unreadable(&self, id: Uuid, problem: &str) -> Result<(), JobError> {
        tracing::warn!(job = %id, %problem, "a claimed job's stored row does not decode; dead-lettered");
        let entry = JobAttemptError {
            attempt: 0,
            code: ErrorCode::MalformedEvent,
            message: format!("the stored job does not decode: {problem}"),
            at: Utc::now(),
        };
        let entry_json = serde_json::to_value(std::slice::from_ref(&entry)).unwrap_or_default();
        let mut transaction = self.pool.begin().await?;
        let failed: Option<(Option<Uuid>, String, i32, String, i32)> = sqlx::query_as(
            "WITH failed AS (
                 UPDATE fraiseql_observers.jobs
                    SET status = 'failed', finished_at = now(), errors = errors || $3,
                        locked_by = NULL, locked_until = NULL
                  WHERE id = $1 AND status = 'running' AND locked_by = $2
              RETURNING event_id, observer, action_index, action_type, inline_attempts + attempts AS attempts, ordering_key),
             woken AS (SELECT pg_notify($4, '') FROM failed WHERE ordering_key IS NOT NULL)
             SELECT event_id, observer, action_index, action_type, attempts
               FROM failed LEFT JOIN (SELECT count(*) FROM woken) AS notified ON true",
        )
        .bind(id)
        .bind(&self.node_id)
        .bind(&entry_json)
        .bind(JOBS_CHANNEL)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some((event_id, observer, action_index, action_type, attempts)) = failed else {
            transaction.rollback().await?;
            return Ok(());
        };
        let letter = crate::dlq::NewDeadLetter {
            event: crate::dlq::placeholder_event(event_id, None, &entry.message),
            observer,
            action_index: usize::try_from(action_index).unwrap_or(0),
            action_type,
            error_code: ErrorCode::MalformedEvent,
            error_message: entry.message,
            attempts: u32::try_from(attempts).unwrap_or(0),
        };
        crate::dlq::insert_dead_letter(&mut *transaction, &letter).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Records a failed attempt: reschedules the same row with backoff, or — permanent error or
    /// attempts used up — marks it failed and parks a dead letter with the whole history.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn fail(&self, job: &Job, error: &AttemptError) -> Result<FailOutcome, JobError> {
        let entry = JobAttemptError::now(job.attempt_number(), error);
        let entry_json = serde_json::to_value(std::slice::from_ref(&entry)).unwrap_or_default();
        let final_failure = !error.code.is_transient() || job.attempts >= job.max_attempts;
        let mut transaction = self.pool.begin().await?;
        if !final_failure {
            let delay = error.retry_after.map_or_else(
                || backoff_delay(job.attempts, job.initial_delay, job.max_delay),
                |asked| asked.min(job.max_delay.max(job.initial_delay)),
            );
            let run_at: Option<DateTime<Utc>> = sqlx::query_scalar(
                "UPDATE fraiseql_observers.jobs
                    SET status = 'pending', run_at = now() + make_interval(secs => $3),
                        errors = errors || $4, locked_by = NULL, locked_until = NULL, parked_on = $5
                  WHERE id = $1 AND status = 'running' AND locked_by = $2
              RETURNING run_at",
            )
            .bind(job.id)
            .bind(&self.node_id)
            .bind(delay.as_secs_f64())
            .bind(&entry_json)
            .bind(error.circuit.as_deref())
            .fetch_optional(&mut *transaction)
            .await?;
            transaction.commit().await?;
            return Ok(
                run_at.map_or(FailOutcome::NotHeld, |run_at| FailOutcome::Rescheduled {
                    run_at,
                }),
            );
        }
        // Failed for good, it no longer holds back the later jobs of its ordering key, and no
        // insert will wake the workers for them: notify (at commit).
        let (held, _woken): (i64, i64) = sqlx::query_as(
            "WITH failed AS (
                 UPDATE fraiseql_observers.jobs
                    SET status = 'failed', finished_at = now(), errors = errors || $3, locked_by = NULL, locked_until = NULL
                  WHERE id = $1 AND status = 'running' AND locked_by = $2
              RETURNING ordering_key),
             woken AS (SELECT pg_notify($4, '') FROM failed WHERE ordering_key IS NOT NULL)
             SELECT (SELECT count(*) FROM failed), (SELECT count(*) FROM woken)",
        )
        .bind(job.id)
        .bind(&self.node_id)
        .bind(&entry_json)
        .bind(JOBS_CHANNEL)
        .fetch_one(&mut *transaction)
        .await?;
        if held == 0 {
            transaction.rollback().await?;
            return Ok(FailOutcome::NotHeld);
        }
        let mut history: Vec<JobAttemptError> = job.errors.clone();
        history.push(entry);
        let message = crate::retry::history_text(&history);
        let letter = crate::dlq::NewDeadLetter {
            event: job.event.clone(),
            observer: job.observer.clone(),
            action_index: job.action_index,
            action_type: job.action_type.clone(),
            error_code: error.code,
            error_message: message,
            attempts: job.attempt_number(),
        };
        let dead_letter = crate::dlq::insert_dead_letter(&mut *transaction, &letter).await?;
        transaction.commit().await?;
        Ok(FailOutcome::DeadLettered { dead_letter })
    }

    /// Gives a held job back without counting the attempt (a draining worker that did not start it).
    ///
    /// # Errors
    /// Storage failed.
    pub async fn release(&self, id: Uuid) -> Result<bool, JobError> {
        let result = sqlx::query(
            "UPDATE fraiseql_observers.jobs
                SET status = 'pending', attempts = greatest(attempts - 1, 0), locked_by = NULL, locked_until = NULL
              WHERE id = $1 AND status = 'running' AND locked_by = $2",
        )
        .bind(id)
        .bind(&self.node_id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives a held job back due `after` from now without counting the attempt (its target's
    /// circuit is open, or its endpoint busy: nothing was sent). `parked_on`: the open circuit
    /// (see [`wake_parked`](Self::wake_parked)).
    ///
    /// # Errors
    /// Storage failed.
    pub async fn postpone(
        &self,
        id: Uuid,
        after: Duration,
        parked_on: Option<&str>,
    ) -> Result<bool, JobError> {
        let result = sqlx::query(
            "UPDATE fraiseql_observers.jobs
                SET status = 'pending', attempts = greatest(attempts - 1, 0), locked_by = NULL, locked_until = NULL,
                    run_at = now() + make_interval(secs => $3), parked_on = $4
              WHERE id = $1 AND status = 'running' AND locked_by = $2",
        )
        .bind(id)
        .bind(&self.node_id)
        .bind(after.as_secs_f64())
        .bind(parked_on)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Makes up to `limit` pending jobs parked on `circuit` (their endpoint's circuit was open)
    /// due now, no longer parked, and notifies the workers; how many. Cluster-wide: the jobs of
    /// every node's queues.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn wake_parked(&self, circuit: &str, limit: i64) -> Result<u64, JobError> {
        let (woken, _notified): (i64, i64) = sqlx::query_as(
            "WITH parked AS (
                 SELECT id FROM fraiseql_observers.jobs
                  WHERE status = 'pending' AND parked_on = $1
                  LIMIT $2 FOR UPDATE SKIP LOCKED),
             woken AS (
                 UPDATE fraiseql_observers.jobs AS job
                    SET run_at = least(job.run_at, now()), parked_on = NULL
                   FROM parked WHERE job.id = parked.id
                 RETURNING 1),
             notified AS (SELECT pg_notify($3, '') WHERE EXISTS (SELECT 1 FROM woken))
             SELECT (SELECT count(*) FROM woken), (SELECT count(*) FROM notified)",
        )
        .bind(circuit)
        .bind(limit)
        .bind(JOBS_CHANNEL)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(woken).unwrap_or_default())
    }

    /// Cancels a job that has not started; `false` when it is running or finished.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn cancel(&self, id: Uuid) -> Result<bool, JobError> {
        // Like a dead-lettered job, a cancelled one lets the next job of its key run: notify.
        let (cancelled, _woken): (i64, i64) = sqlx::query_as(
            "WITH cancelled AS (
                 UPDATE fraiseql_observers.jobs SET status = 'cancelled', finished_at = now()
                  WHERE id = $1 AND status IN ('pending', 'waiting')
              RETURNING ordering_key),
             woken AS (SELECT pg_notify($2, '') FROM cancelled WHERE ordering_key IS NOT NULL)
             SELECT (SELECT count(*) FROM cancelled), (SELECT count(*) FROM woken)",
        )
        .bind(id)
        .bind(JOBS_CHANNEL)
        .fetch_one(&self.pool)
        .await?;
        Ok(cancelled == 1)
    }

    /// Makes jobs whose claim expired (their worker died or hung) pending again, recording the
    /// lost attempt; how many.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn rescue_expired(&self) -> Result<u64, JobError> {
        rescue_expired_on(&self.pool).await
    }

    /// Per-queue counts and durations.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn stats(&self) -> Result<Vec<QueueStats>, JobError> {
        let rows = sqlx::query(
            "SELECT queue,
                    count(*) FILTER (WHERE status IN ('pending', 'waiting')) AS pending,
                    count(*) FILTER (WHERE status = 'running')   AS running,
                    count(*) FILTER (WHERE status = 'completed') AS completed,
                    count(*) FILTER (WHERE status = 'failed')    AS failed,
                    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                    avg(extract(epoch FROM finished_at - started_at)::float8 * 1000)
                        FILTER (WHERE status = 'completed') AS mean_ms,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)::float8 * 1000)
                        FILTER (WHERE status = 'completed') AS p50_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)::float8 * 1000)
                        FILTER (WHERE status = 'completed') AS p99_ms,
                    extract(epoch FROM now() - min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now()))::float8
                        AS oldest_due_age_seconds,
                    count(*) FILTER (WHERE status = 'completed' AND finished_at > now() - interval '24 hours')
                        AS completed_last_day
               FROM (SELECT queue, status, run_at, started_at, finished_at FROM fraiseql_observers.jobs
                     UNION ALL
                     SELECT queue, 'completed', NULL, started_at, finished_at
                       FROM fraiseql_observers.jobs_completed) AS every_job
              GROUP BY queue ORDER BY queue",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(QueueStats {
                    queue: row.try_get("queue")?,
                    pending: row.try_get("pending")?,
                    running: row.try_get("running")?,
                    completed: row.try_get("completed")?,
                    failed: row.try_get("failed")?,
                    cancelled: row.try_get("cancelled")?,
                    mean_ms: row.try_get("mean_ms")?,
                    p50_ms: row.try_get("p50_ms")?,
                    p99_ms: row.try_get("p99_ms")?,
                    oldest_due_age_seconds: row.try_get("oldest_due_age_seconds")?,
                    completed_last_day: row.try_get("completed_last_day")?,
                })
            })
            .collect()
    }

    /// Deletes the records of completed jobs and the cancelled jobs finished longer than
    /// `older_than` ago; failed jobs are never pruned. How many.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn prune_finished(&self, older_than: Duration) -> Result<u64, JobError> {
        prune_finished_on(&self.pool, older_than).await
    }
}

/// Promotes up to `limit` waiting jobs that nothing is ahead of any more (their predecessor finished
/// while they were being enqueued), on `executor`; how many. See migration 0018.
///
/// # Errors
/// Storage failed.
pub async fn promote_stranded_on<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    limit: i32,
) -> Result<u64, JobError> {
    let promoted: i64 = sqlx::query_scalar("SELECT fraiseql_observers.promote_stranded_jobs($1)")
        .bind(limit)
        .fetch_one(executor)
        .await?;
    Ok(promoted.unsigned_abs())
}

/// Puts running jobs whose claim expired (their worker stopped without finishing) back to
/// pending, the lost attempt recorded in their history, on `executor` (the coordinator's fenced
/// transaction, or a pool). Returns how many.
///
/// # Errors
/// Storage failed.
pub async fn rescue_expired_on<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
) -> Result<u64, JobError> {
    let result = sqlx::query(
        "UPDATE fraiseql_observers.jobs
            SET status = 'pending', run_at = now(), locked_by = NULL, locked_until = NULL,
                errors = errors || jsonb_build_array(jsonb_build_object(
                    'attempt', inline_attempts + attempts, 'code', 'OB012',
                    'message', 'claim by ' || locked_by || ' expired (worker stopped without finishing)',
                    'at', to_jsonb(now())))
          WHERE status = 'running' AND locked_until < now()",
    )
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// Puts running jobs back to pending whose claimer is not among `live_workers` and that were
/// claimed more than `claimed_before` ago (so a node that has just started and not yet written
/// its membership row is not taken for gone), recording the lost attempt, on `executor`.
/// Returns how many. The coordinator runs it with the live nodes' ids, so the jobs of a killed
/// node run again as soon as the cluster knows it is gone, not after their visibility timeout.
///
/// # Errors
/// Storage failed.
pub async fn rescue_orphaned_on<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    live_workers: &[String],
    claimed_before: Duration,
) -> Result<u64, JobError> {
    let result = sqlx::query(
        "UPDATE fraiseql_observers.jobs
            SET status = 'pending', run_at = now(), locked_by = NULL, locked_until = NULL,
                errors = errors || jsonb_build_array(jsonb_build_object(
                    'attempt', inline_attempts + attempts, 'code', 'OB012',
                    'message', 'claim by ' || locked_by || ' lost: that node left the cluster',
                    'at', to_jsonb(now())))
          WHERE status = 'running' AND NOT (locked_by = ANY ($1))
            AND started_at < now() - make_interval(secs => $2)",
    )
    .bind(live_workers)
    .bind(claimed_before.as_secs_f64())
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// Deletes the records of completed jobs and the cancelled jobs finished longer than
/// `older_than` ago, on `executor` (with them goes the idempotency key that made a replayed
/// enqueue a no-op); failed jobs are kept (their dead letters refer to them). Completed rows
/// still in `jobs` (written before migration 0020) are pruned alike. Returns how many.
///
/// # Errors
/// Storage failed.
pub async fn prune_finished_on<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    older_than: Duration,
) -> Result<u64, JobError> {
    let pruned: i64 = sqlx::query_scalar(
        "WITH finished_jobs AS (
             DELETE FROM fraiseql_observers.jobs
              WHERE status IN ('completed', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
          RETURNING 1),
         completed AS (
             DELETE FROM fraiseql_observers.jobs_completed
              WHERE finished_at < now() - make_interval(secs => $1)
          RETURNING 1)
         SELECT (SELECT count(*) FROM finished_jobs) + (SELECT count(*) FROM completed)",
    )
    .bind(older_than.as_secs_f64())
    .fetch_one(executor)
    .await?;
    Ok(pruned.unsigned_abs())
}

/// Enqueues jobs on `executor` — a pool connection, or the transaction that also saves a
/// checkpoint, so that a crash cannot separate the two. Jobs whose idempotency key exists already
/// (a job of the queue, or the record of a completed one) are skipped; returns the ids of those
/// enqueued now. A job whose key's earlier job completes while this statement runs is dropped
/// by the insert trigger (migration 0020) after the ids are returned: a count from them can be
/// one high in that race, the queue cannot.
///
/// # Errors
/// Storage failed.
pub async fn enqueue_batch<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    jobs: &[NewJob],
) -> Result<Vec<Uuid>, JobError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(jobs.len());
    let mut queues = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    let mut initial = Vec::with_capacity(jobs.len());
    let mut maximum = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut event_ids = Vec::with_capacity(jobs.len());
    let mut observers = Vec::with_capacity(jobs.len());
    let mut indexes = Vec::with_capacity(jobs.len());
    let mut types = Vec::with_capacity(jobs.len());
    let mut events = Vec::with_capacity(jobs.len());
    let mut ordering_keys = Vec::with_capacity(jobs.len());
    let mut ordinals = Vec::with_capacity(jobs.len());
    let mut parked_on = Vec::with_capacity(jobs.len());
    let mut histories = Vec::with_capacity(jobs.len());
    let mut inline_attempts = Vec::with_capacity(jobs.len());
    let now = Utc::now();
    for job in jobs {
        ids.push(Uuid::now_v7());
        queues.push(job.queue.clone());
        priorities.push(job.priority.clamp(0, 10));
        run_ats.push(job.run_at.unwrap_or(now));
        max_attempts.push(i32::try_from(job.max_attempts.max(1)).unwrap_or(i32::MAX));
        initial.push(millis(job.initial_delay));
        maximum.push(millis(job.max_delay.max(job.initial_delay)));
        keys.push(job.idempotency_key());
        event_ids.push(job.event.id);
        observers.push(job.observer.clone());
        indexes.push(i32::try_from(job.action_index).unwrap_or(i32::MAX));
        types.push(job.action_type.clone());
        events.push(serde_json::to_value(&job.event).unwrap_or_default());
        ordering_keys.push(job.ordering_key());
        ordinals.push(job.ordinal());
        parked_on.push(job.parked_on.clone());
        histories.push(serde_json::to_value(&job.history).unwrap_or_default());
        inline_attempts
            .push(i32::try_from(attempts_before_queue(&job.history)).unwrap_or(i32::MAX));
    }
    // Planned at each call (an unnamed statement): a generic plan cached while
    // `jobs_completed` was empty or small runs the key check as a sequential scan of it, and
    // keeps it until the next ANALYZE however large the table grows meanwhile.
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO fraiseql_observers.jobs
             (id, queue, priority, run_at, max_attempts, backoff_initial_ms, backoff_max_ms,
              idempotency_key, event_id, observer, action_index, action_type, event, ordering_key, ordinal,
              parked_on, errors, inline_attempts, status)
         SELECT new.*,
                CASE WHEN new.ordering_key IS NOT NULL
                          AND (row_number() OVER (PARTITION BY new.ordering_key ORDER BY new.ordinal) > 1
                               OR EXISTS (SELECT FROM fraiseql_observers.jobs AS earlier
                                           WHERE earlier.ordering_key = new.ordering_key
                                             AND earlier.ordinal < new.ordinal
                                             AND earlier.status IN ('pending', 'running', 'waiting')))
                     THEN 'waiting' ELSE 'pending' END
           FROM unnest($1::uuid[], $2::text[], $3::smallint[], $4::timestamptz[], $5::int[], $6::bigint[],
                       $7::bigint[], $8::text[], $9::uuid[], $10::text[], $11::int[], $12::text[], $13::jsonb[],
                       $14::text[], $15::bigint[], $16::text[], $17::jsonb[], $18::int[])
                AS new (id, queue, priority, run_at, max_attempts, backoff_initial_ms, backoff_max_ms,
                        idempotency_key, event_id, observer, action_index, action_type, event, ordering_key,
                        ordinal, parked_on, errors, inline_attempts)
          WHERE NOT EXISTS (SELECT FROM fraiseql_observers.jobs_completed AS completed
                             WHERE completed.idempotency_key = new.idempotency_key)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(ids)
    .bind(queues)
    .bind(priorities)
    .bind(run_ats)
    .bind(max_attempts)
    .bind(initial)
    .bind(maximum)
    .bind(keys)
    .bind(event_ids)
    .bind(observers)
    .bind(indexes)
    .bind(types)
    .bind(events)
    .bind(ordering_keys)
    .bind(ordinals)
    .bind(parked_on)
    .bind(histories)
    .bind(inline_attempts)
    .persistent(false)
    .fetch_all(executor)
    .await?;
    Ok(inserted)
}

/// The attempts made before an action reached the queue: the highest attempt number its history
/// records (a history carried over from a dead letter may hold fewer entries than attempts).
fn attempts_before_queue(history: &[JobAttemptError]) -> usize {
    history
        .iter()
        .map(|attempt| usize::try_from(attempt.attempt).unwrap_or(usize::MAX))
        .max()
        .unwrap_or(0)
        .max(history.len())
}

/// What [`requeue_batch`] did with the jobs it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Requeued {
    /// Jobs that had failed for good, pending again with a new attempt budget.
    pub requeued: u64,
    /// Jobs the queue had no row for (their action never reached it, or its row was pruned).
    /// The rest were pending, running, completed or cancelled already, and are left as they are.
    pub enqueued: u64,
}

/// Gives `jobs` to the queue again, on `transaction`: a job whose idempotency key names a row
/// that failed for good is made pending again in place — its attempt history kept, counted as
/// earlier attempts, its queue, priority and retry budget taken from `jobs` (the observers file
/// as it is now) — and a job with no row is enqueued; a row in any other state is left alone
/// (the action is delivered, or will be). The workers are woken at commit.
///
/// # Errors
/// Storage failed.
pub async fn requeue_batch(
    transaction: &mut sqlx::PgConnection,
    jobs: &[NewJob],
) -> Result<Requeued, JobError> {
    let mut seen = HashSet::with_capacity(jobs.len());
    let jobs: Vec<&NewJob> = jobs
        .iter()
        .filter(|job| seen.insert(job.idempotency_key()))
        .collect();
    if jobs.is_empty() {
        return Ok(Requeued::default());
    }
    let keys: Vec<String> = jobs.iter().map(|job| job.idempotency_key()).collect();
    let queues: Vec<String> = jobs.iter().map(|job| job.queue.clone()).collect();
    let priorities: Vec<i16> = jobs.iter().map(|job| job.priority.clamp(0, 10)).collect();
    let max_attempts: Vec<i32> = jobs
        .iter()
        .map(|job| i32::try_from(job.max_attempts.max(1)).unwrap_or(i32::MAX))
        .collect();
    let initial: Vec<i64> = jobs.iter().map(|job| millis(job.initial_delay)).collect();
    let maximum: Vec<i64> = jobs
        .iter()
        .map(|job| millis(job.max_delay.max(job.initial_delay)))
        .collect();
    let requeued_keys: Vec<String> = sqlx::query_scalar(
        "WITH asked AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::int[], $5::bigint[], $6::bigint[])
                 AS asked(key, queue, priority, max_attempts, initial_ms, max_ms)),
         requeued AS (
             UPDATE fraiseql_observers.jobs AS job
                SET status = 'pending', run_at = now(), finished_at = NULL, locked_by = NULL,
                    locked_until = NULL, parked_on = NULL,
                    inline_attempts = job.inline_attempts + job.attempts, attempts = 0,
                    queue = asked.queue, priority = asked.priority, max_attempts = asked.max_attempts,
                    backoff_initial_ms = asked.initial_ms, backoff_max_ms = asked.max_ms
               FROM asked
              WHERE job.idempotency_key = asked.key AND job.status = 'failed'
          RETURNING job.idempotency_key),
         woken AS (SELECT pg_notify($7, '') WHERE EXISTS (SELECT 1 FROM requeued))
         SELECT idempotency_key FROM requeued, (SELECT count(*) FROM woken) AS notified",
    )
    .bind(&keys)
    .bind(queues)
    .bind(priorities)
    .bind(max_attempts)
    .bind(initial)
    .bind(maximum)
    .bind(JOBS_CHANNEL)
    .fetch_all(&mut *transaction)
    .await?;
    let existing: HashSet<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM fraiseql_observers.jobs WHERE idempotency_key = ANY($1)
         UNION ALL
         SELECT idempotency_key FROM fraiseql_observers.jobs_completed WHERE idempotency_key = ANY($1)",
    )
    .bind(&keys)
    .fetch_all(&mut *transaction)
    .await?
    .into_iter()
    .collect();
    let fresh: Vec<NewJob> = jobs
        .iter()
        .filter(|job| !existing.contains(&job.idempotency_key()))
        .map(|job| (*job).clone())
        .collect();
    let enqueued = enqueue_batch(&mut *transaction, &fresh).await?;
    Ok(Requeued {
        requeued: requeued_keys.len() as u64,
        enqueued: enqueued.len() as u64,
    })
}

/// Which of `keys` (see [`ordering_key`]) have a job still waiting, pending or running — the work a later
/// event of the same entity must not overtake. Empty `keys` ask nothing.
///
/// # Errors
/// Storage failed.
pub async fn unfinished_ordering_keys<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    keys: &[String],
) -> Result<HashSet<String>, JobError> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let unfinished: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT ordering_key FROM fraiseql_observers.jobs
          WHERE ordering_key = ANY($1) AND status IN ('pending', 'running', 'waiting')",
    )
    .bind(keys)
    .fetch_all(executor)
    .await?;
    Ok(unfinished.into_iter().collect())
}

/// Pending, running and failed jobs per queue and status: `(queue, status, count)`. Waiting jobs
/// (held back by an earlier job of their entity) count as pending: they are work not yet started.
///
/// # Errors
/// Storage failed.
pub async fn depths<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
) -> Result<Vec<(String, String, i64)>, JobError> {
    Ok(sqlx::query_as(
        "SELECT queue, state, count(*)
           FROM (SELECT queue, CASE status WHEN 'waiting' THEN 'pending' ELSE status END AS state
                   FROM fraiseql_observers.jobs
                  WHERE status IN ('waiting', 'pending', 'running', 'failed')) AS unfinished
          GROUP BY queue, state ORDER BY queue, state",
    )
    .fetch_all(executor)
    .await?)
}

/// Per queue with pending jobs, the seconds the oldest due one has waited since it became due
/// (0 while every pending job is still scheduled for later); a read for gauges.
///
/// # Errors
/// Storage failed.
pub async fn oldest_due_ages<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
) -> Result<Vec<(String, f64)>, JobError> {
    Ok(sqlx::query_as(
        "SELECT queue,
                COALESCE(extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now())), 0)::float8
           FROM fraiseql_observers.jobs
          WHERE status = 'pending'
          GROUP BY queue ORDER BY queue",
    )
    .fetch_all(executor)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_notify_on_the_workers_channel() {
        assert!(PROMOTE_AFTER_DONE.contains(&format!("pg_notify('{JOBS_CHANNEL}'")));
    }

    #[test]
    fn ordering_keys_cannot_collide_through_separators_in_ids() {
        assert_eq!(
            ordering_key("orders", 0, "Order", "42"),
            r#"["orders",0,"Order","42"]"#
        );
        assert_ne!(
            ordering_key("orders", 0, "Order:1", "2"),
            ordering_key("orders", 0, "Order", "1:2")
        );
        assert_ne!(
            ordering_key("orders", 0, "Order", r#"1","x"#),
            ordering_key("orders", 0, "Order", "1")
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_within_the_cap() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempts in 1..=8 {
            let base = Duration::from_millis(100 * (1 << (attempts - 1))).min(max);
            for _ in 0..20 {
                let delay = backoff_delay(attempts, initial, max);
                assert!(
                    delay >= base
                        && delay <= max.max(base)
                        && delay < base * 2 + Duration::from_nanos(1),
                    "{attempts}: {delay:?}"
                );
            }
        }
    }
}
