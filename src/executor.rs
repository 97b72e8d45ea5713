//! Running matched actions: concurrently across actions and entities, in order within an entity,
//! each attempt under its timeout and a node-wide concurrency bound, failures retried and then
//! dead-lettered.
//!
//! Invariants:
//! - All actions of one event start together; one slow action never delays another
//!   (an event takes as long as its slowest action, not the sum).
//! - Within [`Executor::execute_batch`], events of the same entity (type + id) are executed one
//!   after another in batch order; different entities run concurrently, at most
//!   `max_concurrent_entities` at once.
//! - With job routing, an action never overtakes an earlier change of its entity that waits in
//!   the job queue: when the queue holds an unfinished job of the same observer, action and
//!   entity (as the caller found before the page), or an earlier event of the page was handed to
//!   the queue, the action is handed to the queue too, behind it, instead of running inline.
//! - At most `max_concurrent_actions` attempts are in flight in the node; a permit is held only
//!   during an attempt, never while waiting to retry.
//! - An action that fails for good is reported in the summary and, per its observer's
//!   `on_failure`, parked in the dead-letter queue or logged — never silently dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Semaphore;

use crate::actions::{ActionContext, ActionDefinition, ActionRunner};
use crate::checkpoint::{ActionKey, PendingCompletions};
use crate::config::{DeliveryMode, ExecutorSettings, FailurePolicy};
use crate::dedup::{Deduplication, Gate};
use crate::dlq::{DeadLetterQueue, NewDeadLetter};
use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::matcher::Matcher;
use crate::observers::ObserverDefinition;
use crate::outcome::{NewJob, ordering_key};
use crate::retry::{AttemptError, FailedAttempt, run_with_retry};

pub use crate::outcome::{ActionReport, ActionStatus, EventSummary};

/// Runs the actions of matched observers.
#[derive(Debug, Clone)]
pub struct Executor {
    matcher: Arc<Matcher>,
    runner: ActionRunner,
    dead_letters: Arc<dyn DeadLetterQueue>,
    action_permits: Arc<Semaphore>,
    max_concurrent_entities: usize,
    /// Where settled actions are noted as soon as they settle, for the completed-actions ledger.
    settled_sink: Option<Arc<PendingCompletions>>,
    /// With a job queue: `mode: async` actions become jobs, and inline retries are kept short.
    job_routing: bool,
    /// Cross-node claims on side effects.
    dedup: Option<Deduplication>,
    /// In a cluster: attempts are made only while this node's leases are confirmed.
    lease: Option<crate::lease::LeaseValidity>,
}

/// What one entity's actions must not overtake while a page runs: the ordering keys that had
/// unfinished jobs when the page started, and those of this entity the page itself handed to the
/// queue (or could not settle) for an earlier event.
#[derive(Debug)]
struct QueuedAhead<'page> {
    unfinished_jobs: &'page HashSet<String>,
    in_page: HashSet<String>,
}

impl QueuedAhead<'_> {
    fn holds_back(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
    ) -> bool {
        if self.unfinished_jobs.is_empty() && self.in_page.is_empty() {
            return false;
        }
        let key = ordering_key(
            observer.name.as_str(),
            action.index,
            &event.entity_type,
            &event.entity_id,
        );
        self.in_page.contains(&key) || self.unfinished_jobs.contains(&key)
    }

    /// After one event of the entity: its actions that went to the queue hold back the same
    /// actions of the entity's later events in the page. So do actions that did not settle: the
    /// page is read again and they run again, so what follows them must not be done before.
    fn note_page_hand_overs(&mut self, event: &EntityEvent, summary: &EventSummary) {
        for report in &summary.actions {
            if report.job.is_some() || !report.settled {
                self.in_page.insert(ordering_key(
                    &report.observer,
                    report.action_index,
                    &event.entity_type,
                    &event.entity_id,
                ));
            }
        }
    }
}

/// In-page retries when a job queue can take over: at most this many attempts…
pub const INLINE_ATTEMPTS_WITH_QUEUE: u32 = 3;
/// …with delays of at most this, so that one failing target does not hold a page.
pub const INLINE_MAX_DELAY_WITH_QUEUE: Duration = Duration::from_secs(1);

impl Executor {
    #[must_use]
    pub fn new(
        matcher: Arc<Matcher>,
        runner: ActionRunner,
        dead_letters: Arc<dyn DeadLetterQueue>,
        settings: &ExecutorSettings,
    ) -> Executor {
        Executor {
            matcher,
            runner,
            dead_letters,
            action_permits: Arc::new(Semaphore::new(settings.max_concurrent_actions)),
            max_concurrent_entities: settings.max_concurrent_entities.max(1),
            settled_sink: None,
            job_routing: false,
            dedup: None,
            lease: None,
        }
    }

    /// Claims every inline side effect across nodes before running it (see [`crate::dedup`]).
    #[must_use]
    pub fn with_deduplication(mut self, dedup: Deduplication) -> Executor {
        self.dedup = Some(dedup);
        self
    }

    /// Makes every attempt only while `lease` holds: a node paused or cut off past its lease
    /// leaves the rest of its page to the partition's next leader (the attempt fails with
    /// [`ErrorCode::FencedOut`], unsettled: no job, no dead letter, the checkpoint stays).
    #[must_use]
    pub fn with_lease(mut self, lease: crate::lease::LeaseValidity) -> Executor {
        self.lease = Some(lease);
        self
    }

    /// Routes `mode: async` actions, and inline actions whose transient failures outlast a short
    /// in-page retry, to the job queue (as [`ActionStatus::Enqueued`] reports carrying the job).
    /// Without it, every action runs inline under its full retry policy.
    #[must_use]
    pub fn with_job_routing(mut self) -> Executor {
        self.job_routing = true;
        self
    }

    /// The report of an action that was not attempted here.
    fn unattempted(
        key: ActionKey,
        action: &ActionDefinition,
        status: ActionStatus,
        job: Option<NewJob>,
        started: Instant,
    ) -> ActionReport {
        // Done before, or handed to the job queue: settled. A deferred failure is not.
        let settled = !matches!(status, ActionStatus::Failed { .. });
        ActionReport {
            observer: key.observer,
            action_index: action.index,
            action_type: action.kind.type_name(),
            status,
            attempts: 0,
            duration: started.elapsed(),
            settled,
            job,
        }
    }

    fn already_completed(
        key: ActionKey,
        action: &ActionDefinition,
        started: Instant,
    ) -> ActionReport {
        Self::unattempted(key, action, ActionStatus::AlreadyCompleted, None, started)
    }

    /// The action cannot run now (claimed elsewhere, or deduplication deferred): with a job
    /// queue it becomes a job (whose worker checks the claim again), due when the holder's claim
    /// ends (`not_before`) — a claim left by a killed node ends within one claim lease, so the
    /// entity's later changes, queued behind this job, wait no longer than that; without a job
    /// queue it stays unsettled, so the page is read again later.
    #[allow(
        clippy::too_many_arguments,
        reason = "the report of one unattempted action needs all of them"
    )]
    fn later(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        key: ActionKey,
        reason: String,
        not_before: Option<Duration>,
        started: Instant,
    ) -> ActionReport {
        if self.job_routing {
            let mut report = Self::enqueued(event, observer, action, key, started);
            if let (Some(job), Some(wait)) = (report.job.as_mut(), not_before) {
                job.run_at = chrono::Duration::from_std(wait)
                    .ok()
                    .map(|wait| chrono::Utc::now() + wait);
            }
            return report;
        }
        let status = ActionStatus::Failed {
            code: ErrorCode::InProgressElsewhere,
            message: reason,
            dead_letter: None,
        };
        Self::unattempted(key, action, status, None, started)
    }

    /// Handed to the job queue with the observer's whole retry budget, before any attempt here.
    fn enqueued(
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        key: ActionKey,
        started: Instant,
    ) -> ActionReport {
        let status = ActionStatus::Enqueued {
            queue: action.delivery.queue.clone(),
        };
        let job = observer.job_for(event, action, observer.retry.max_attempts);
        Self::unattempted(key, action, status, Some(job), started)
    }

    /// Notes every settled action in `sink` as soon as it settles.
    #[must_use]
    pub fn with_settled_sink(mut self, sink: Arc<PendingCompletions>) -> Executor {
        self.settled_sink = Some(sink);
        self
    }

    #[must_use]
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// The dead-letter queue failures are parked in.
    #[must_use]
    pub fn dead_letters(&self) -> &Arc<dyn DeadLetterQueue> {
        &self.dead_letters
    }

    /// Executes a batch: per-entity order, entities concurrently. Summaries come back in batch order.
    pub async fn execute_batch(&self, events: &[EntityEvent]) -> Vec<EventSummary> {
        self.execute_batch_skipping(events, &HashSet::new()).await
    }

    /// Like [`execute_batch`](Self::execute_batch), but the actions in `completed` are not run
    /// again; they are reported as [`ActionStatus::AlreadyCompleted`].
    pub async fn execute_batch_skipping(
        &self,
        events: &[EntityEvent],
        completed: &HashSet<ActionKey>,
    ) -> Vec<EventSummary> {
        self.execute_page(events, completed, &HashSet::new()).await
    }

    /// The ordering keys ([`crate::jobs::ordering_key`]) the actions of `events` could have, for
    /// asking the job queue which of them have unfinished jobs before the page runs; each key once.
    /// Empty without job routing (actions never wait in a queue then). A superset: observers are
    /// taken by entity and kind, before their conditions.
    #[must_use]
    pub fn ordering_keys(&self, events: &[EntityEvent]) -> Vec<String> {
        if !self.job_routing {
            return Vec::new();
        }
        let mut keys = HashSet::new();
        for event in events {
            for observer in self.matcher.candidates(&event.entity_type, event.kind) {
                for action in &observer.actions {
                    keys.insert(ordering_key(
                        observer.name.as_str(),
                        action.index,
                        &event.entity_type,
                        &event.entity_id,
                    ));
                }
            }
        }
        keys.into_iter().collect()
    }

    /// Executes a change-log page like [`execute_batch_skipping`](Self::execute_batch_skipping),
    /// keeping per-entity order with the job queue: with job routing, an action whose ordering key
    /// is in `unfinished_jobs` (the keys [`ordering_keys`](Self::ordering_keys) named that have a
    /// pending or running job) is handed to the queue behind that job rather than run, and so is
    /// every later action of the same key in the page once one was handed over (or could not
    /// settle).
    pub async fn execute_page(
        &self,
        events: &[EntityEvent],
        completed: &HashSet<ActionKey>,
        unfinished_jobs: &HashSet<String>,
    ) -> Vec<EventSummary> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of_entity: HashMap<(&str, &str), usize> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            let key = (event.entity_type.as_str(), event.entity_id.as_str());
            let group = *group_of_entity.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(position);
        }

        let mut summaries: Vec<Option<EventSummary>> = vec![None; events.len()];
        let mut running = futures::stream::iter(groups.into_iter().map(|group| async move {
            let mut done = Vec::with_capacity(group.len());
            // One entity: what its later events must queue behind.
            let mut ahead = QueuedAhead {
                unfinished_jobs,
                in_page: HashSet::new(),
            };
            for position in group {
                let event = &events[position];
                let summary = self.execute_event_behind(event, completed, &ahead).await;
                if self.job_routing {
                    ahead.note_page_hand_overs(event, &summary);
                }
                done.push((position, summary));
            }
            done
        }))
        .buffer_unordered(self.max_concurrent_entities);
        while let Some(done) = running.next().await {
            for (position, summary) in done {
                summaries[position] = Some(summary);
            }
        }
        summaries.into_iter().flatten().collect()
    }

    /// Executes every action of every observer that matches `event`, all at once.
    pub async fn execute_event(&self, event: &EntityEvent) -> EventSummary {
        let nothing_queued = HashSet::new();
        let ahead = QueuedAhead {
            unfinished_jobs: &nothing_queued,
            in_page: HashSet::new(),
        };
        self.execute_event_behind(event, &HashSet::new(), &ahead)
            .await
    }

    #[tracing::instrument(skip_all, fields(event_id = %event.id, entity_type = %event.entity_type, entity_id = %event.entity_id, kind = %event.kind))]
    async fn execute_event_behind(
        &self,
        event: &EntityEvent,
        completed: &HashSet<ActionKey>,
        ahead: &QueuedAhead<'_>,
    ) -> EventSummary {
        let started = Instant::now();
        let matched: Vec<&ObserverDefinition> = self.matcher.matching(event).collect();

        let mut running: FuturesUnordered<_> = matched
            .iter()
            .enumerate()
            .flat_map(|(observer_position, observer)| {
                observer.actions.iter().map(move |action| async move {
                    // A view of the event (two references): built where it is used.
                    let envelope = event.envelope(observer.name.as_str());
                    let report = self
                        .execute_action(event, observer, action, &envelope, completed, ahead)
                        .await;
                    (observer_position, report)
                })
            })
            .collect();
        let mut actions = Vec::with_capacity(running.len());
        while let Some(report) = running.next().await {
            actions.push(report);
        }
        actions
            .sort_by_key(|(observer_position, report)| (*observer_position, report.action_index));
        EventSummary {
            event_id: event.id,
            matched_observers: matched
                .iter()
                .map(|observer| observer.name.to_string())
                .collect(),
            unmatched_observers: self
                .matcher
                .candidates(&event.entity_type, event.kind)
                .filter(|candidate| {
                    !matched
                        .iter()
                        .any(|observer| std::ptr::eq(*observer, *candidate))
                })
                .map(|observer| observer.name.to_string())
                .collect(),
            actions: actions.into_iter().map(|(_, report)| report).collect(),
            duration: started.elapsed(),
        }
    }

    /// Passes the dedup gate: `Ok` with the claim's token (none without a store, or with the
    /// store down and the policy running the action anyway), or the report of an action that is
    /// not run now (done elsewhere, or held by another node's claim).
    async fn claim(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        key: &ActionKey,
        dedup_key: &str,
        started: Instant,
    ) -> Result<Option<String>, Box<ActionReport>> {
        let Some(dedup) = &self.dedup else {
            return Ok(None);
        };
        match dedup.gate(dedup_key).await {
            Gate::Run(token) => Ok(token),
            Gate::Done => {
                // Done by another node: record it here too, so a replay skips it cheaply.
                if let Some(sink) = &self.settled_sink {
                    sink.push(key.clone());
                }
                Err(Box::new(Self::already_completed(
                    key.clone(),
                    action,
                    started,
                )))
            }
            Gate::Busy { expires_in } => {
                let reason = format!(
                    "another node is running this action right now (its claim ends within {} ms)",
                    expires_in.as_millis()
                );
                Err(Box::new(self.later(
                    event,
                    observer,
                    action,
                    key.clone(),
                    reason,
                    Some(expires_in),
                    started,
                )))
            }
            Gate::Deferred(reason) => Err(Box::new(self.later(
                event,
                observer,
                action,
                key.clone(),
                reason,
                None,
                started,
            ))),
        }
    }

    /// The inline attempts under the claim `token`: renewed while they run, and only then;
    /// completed on success, released otherwise.
    async fn attempt_claimed(
        &self,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        context: &ActionContext<'_>,
        dedup_key: &str,
        token: Option<&str>,
    ) -> crate::retry::RetryOutcome<crate::actions::ActionSuccess> {
        let Some(dedup) = &self.dedup else {
            return self.attempt_inline(observer, action, context).await;
        };
        let outcome = dedup
            .hold(
                dedup_key,
                token,
                self.attempt_inline(observer, action, context),
            )
            .await;
        dedup.settle(dedup_key, token, outcome.result.is_ok()).await;
        outcome
    }

    async fn execute_action(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        envelope: &crate::domain::Envelope<'_>,
        completed: &HashSet<ActionKey>,
        ahead: &QueuedAhead<'_>,
    ) -> ActionReport {
        let started = Instant::now();
        let key = ActionKey::new(event.id, observer.name.as_str(), action.index);
        if completed.contains(&key) {
            return Self::already_completed(key, action, started);
        }
        if self.goes_to_queue_first(event, observer, action, ahead) {
            return Self::enqueued(event, observer, action, key, started);
        }
        // The claim key is the action's identity, never a time bucket.
        let dedup_key = key.to_string();
        let token = match self
            .claim(event, observer, action, &key, &dedup_key, started)
            .await
        {
            Ok(token) => token,
            Err(report) => return *report,
        };
        let context = ActionContext {
            event,
            observer: &observer.name,
            action_index: action.index,
            envelope,
            lease: self.lease.as_ref(),
        };
        let outcome = self
            .attempt_claimed(observer, action, &context, &dedup_key, token.as_deref())
            .await;

        // A call refused by an open circuit or a busy endpoint was not made: it spends no attempt.
        let refused = matches!(&outcome.result, Err(error) if error.code.call_not_made());
        let spent = outcome.attempts - u32::from(refused);
        let remaining_attempts = observer.retry.max_attempts.saturating_sub(spent);
        // The attempts made (a refusal is not one), for the job's or the dead letter's history.
        let made: Vec<FailedAttempt> = outcome
            .failures
            .into_iter()
            .filter(|failure| !failure.code.call_not_made())
            .collect();
        let mut job = None;
        let status = match outcome.result {
            Ok(success) => ActionStatus::Succeeded {
                detail: success.detail,
            },
            // Not ours to finish: the partition's next leader delivers it.
            Err(error) if error.code == ErrorCode::FencedOut => ActionStatus::Failed {
                code: error.code,
                message: error.message,
                dead_letter: None,
            },
            Err(error)
                if self.job_routing && error.code.is_transient() && remaining_attempts > 0 =>
            {
                tracing::info!(observer = %observer.name, action_index = action.index, code = %error.code, attempts = spent, "handing over to the job queue");
                let mut handed =
                    Self::handed_over(event, observer, action, remaining_attempts, &error, refused);
                handed.history = made;
                job = Some(handed);
                ActionStatus::Enqueued {
                    queue: action.delivery.queue.clone(),
                }
            }
            Err(error) => {
                self.handle_failure(event, observer, action, (&error, outcome.attempts), &made)
                    .await
            }
        };
        let settled = status.settles(observer.on_failure);
        // A handed-over action is recorded only with its job, in the checkpoint transaction.
        if settled
            && job.is_none()
            && let Some(sink) = &self.settled_sink
        {
            sink.push(key);
        }
        ActionReport {
            observer: observer.name.to_string(),
            action_index: action.index,
            action_type: action.kind.type_name(),
            status,
            attempts: outcome.attempts,
            duration: started.elapsed(),
            settled,
            job,
        }
    }

    /// The job a transiently failed action is handed over as: due when the circuit lets calls
    /// through again (`refused`; parked on that circuit, so it runs as soon as the endpoint
    /// answers), or not before the target's `Retry-After` (up to the policy's
    /// `max_delay`, as between job attempts).
    fn handed_over(
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        remaining_attempts: u32,
        error: &AttemptError,
        refused: bool,
    ) -> NewJob {
        let mut handed = observer.job_for(event, action, remaining_attempts);
        let not_before = if refused {
            error.retry_after
        } else {
            let retry = &observer.retry;
            error
                .retry_after
                .map(|asked| asked.min(retry.max_delay.max(retry.initial_delay)))
        };
        if refused {
            handed.parked_on.clone_from(&error.circuit);
        }
        handed.run_at = not_before.and_then(|wait| {
            chrono::Duration::from_std(wait)
                .ok()
                .map(|wait| chrono::Utc::now() + wait)
        });
        handed
    }

    /// With job routing, whether `action` is handed to the queue without an attempt here: it is
    /// `mode: async`, or an earlier change of its entity waits in the queue (it must not overtake it).
    fn goes_to_queue_first(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        ahead: &QueuedAhead<'_>,
    ) -> bool {
        if !self.job_routing {
            return false;
        }
        if action.delivery.mode == DeliveryMode::Async {
            return true;
        }
        let held_back = ahead.holds_back(event, observer, action);
        if held_back {
            tracing::debug!(observer = %observer.name, action_index = action.index, "an earlier change of this entity waits in the job queue; queued behind it");
        }
        held_back
    }

    /// Runs `action` in the page under its observer's retry policy — kept short when a job queue
    /// can take over — each attempt under a node-wide permit and the action's timeout (for an
    /// HTTP action, the wait for a slot at its endpoint comes on top: see
    /// [`ActionRunner::attempt_deadline`]).
    async fn attempt_inline(
        &self,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        context: &ActionContext<'_>,
    ) -> crate::retry::RetryOutcome<crate::actions::ActionSuccess> {
        let timeout = action.kind.timeout();
        let mut policy = observer.retry.clone();
        if self.job_routing {
            policy.max_attempts = policy.max_attempts.min(INLINE_ATTEMPTS_WITH_QUEUE);
            policy.max_delay = policy.max_delay.min(INLINE_MAX_DELAY_WITH_QUEUE);
            policy.initial_delay = policy.initial_delay.min(policy.max_delay);
        }
        run_with_retry(&policy, |_attempt| async {
            let Ok(_permit) = self.action_permits.acquire().await else {
                return Err(AttemptError::new(
                    ErrorCode::ShuttingDown,
                    "executor closed",
                ));
            };
            context.may_dispatch()?;
            let deadline = self.runner.attempt_deadline(action);
            match tokio::time::timeout(deadline, self.runner.attempt(action, context)).await {
                Ok(result) => result,
                Err(_) => Err(AttemptError::new(
                    ErrorCode::ActionTimeout,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                )),
            }
        })
        .await
    }

    async fn handle_failure(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        (error, attempts): (&AttemptError, u32),
        history: &[FailedAttempt],
    ) -> ActionStatus {
        let mut dead_letter = None;
        match observer.on_failure {
            FailurePolicy::Log => {
                tracing::error!(observer = %observer.name, action_index = action.index, code = %error.code, attempts, error = %error.message, "action failed for good and is dropped (on_failure: log)");
            }
            FailurePolicy::DeadLetter => {
                let letter = NewDeadLetter {
                    event: event.clone(),
                    observer: observer.name.to_string(),
                    action_index: action.index,
                    action_type: action.kind.type_name().to_owned(),
                    error_code: error.code,
                    // More than one attempt: the whole history, one line an attempt.
                    error_message: if history.len() > 1 {
                        crate::retry::history_text(history)
                    } else {
                        error.message.clone()
                    },
                    attempts,
                };
                match self.dead_letters.push(letter).await {
                    Ok(id) => {
                        tracing::warn!(observer = %observer.name, action_index = action.index, code = %error.code, attempts, dead_letter = %id, error = %error.message, "action failed for good; parked in the dead-letter queue");
                        dead_letter = Some(id);
                    }
                    Err(storage) => {
                        tracing::error!(observer = %observer.name, action_index = action.index, code = %error.code, error = %error.message, dead_letter_error = %storage, "action failed for good and could not be dead-lettered");
                    }
                }
            }
        }
        ActionStatus::Failed {
            code: error.code,
            message: error.message.clone(),
            dead_letter,
        }
    }
}
