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
//! - At most `max_concurrent_actions` attempts are in flight in the node; a permit is held only
//!   during an attempt, never while waiting to retry.
//! - An action that fails for good is reported in the summary and, per its observer's
//!   `on_failure`, parked in the dead-letter queue or logged — never silently dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::actions::{ActionContext, ActionRunner};
use crate::config::{ActionDefinition, ExecutorSettings, FailurePolicy, ObserverDefinition};
use crate::dlq::{DeadLetterQueue, NewDeadLetter};
use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::matcher::Matcher;
use crate::retry::{AttemptError, run_with_retry};

/// How one action ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ActionStatus {
    Succeeded {
        detail: String,
    },
    Failed {
        code: ErrorCode,
        message: String,
        /// The id of the dead letter it was parked as, when it was.
        dead_letter: Option<Uuid>,
    },
}

/// One action's part in an event's execution.
#[derive(Clone, Debug, Serialize)]
pub struct ActionReport {
    pub observer: String,
    pub action_index: usize,
    pub action_type: &'static str,
    #[serde(flatten)]
    pub status: ActionStatus,
    pub attempts: u32,
    #[serde(serialize_with = "serialize_millis")]
    pub duration: Duration,
}

impl ActionReport {
    #[must_use]
    pub fn succeeded(&self) -> bool {
        matches!(self.status, ActionStatus::Succeeded { .. })
    }
}

/// What happened to one event.
#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    pub event_id: Uuid,
    pub matched_observers: Vec<String>,
    pub actions: Vec<ActionReport>,
    #[serde(serialize_with = "serialize_millis")]
    pub duration: Duration,
}

impl EventSummary {
    #[must_use]
    pub fn failed_actions(&self) -> usize {
        self.actions
            .iter()
            .filter(|report| !report.succeeded())
            .count()
    }
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn serialize_millis<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64() * 1000.0)
}

/// Runs the actions of matched observers.
#[derive(Debug, Clone)]
pub struct Executor {
    matcher: Arc<Matcher>,
    runner: ActionRunner,
    dead_letters: Arc<dyn DeadLetterQueue>,
    action_permits: Arc<Semaphore>,
    max_concurrent_entities: usize,
}

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
        }
    }

    #[must_use]
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Executes a batch: per-entity order, entities concurrently. Summaries come back in batch order.
    pub async fn execute_batch(&self, events: &[EntityEvent]) -> Vec<EventSummary> {
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
            for position in group {
                done.push((position, self.execute_event(&events[position]).await));
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
    #[tracing::instrument(skip_all, fields(event_id = %event.id, entity_type = %event.entity_type, entity_id = %event.entity_id, kind = %event.kind))]
    pub async fn execute_event(&self, event: &EntityEvent) -> EventSummary {
        let started = Instant::now();
        let matched: Vec<&ObserverDefinition> = self.matcher.matching(event).collect();
        let envelopes: Vec<serde_json::Value> = matched
            .iter()
            .map(|observer| event.envelope(observer.name.as_str()))
            .collect();

        let mut running: FuturesUnordered<_> = matched
            .iter()
            .zip(&envelopes)
            .flat_map(|(observer, envelope)| {
                observer
                    .actions
                    .iter()
                    .map(move |action| self.execute_action(event, observer, action, envelope))
            })
            .collect();
        let mut actions = Vec::with_capacity(running.len());
        while let Some(report) = running.next().await {
            actions.push(report);
        }
        actions.sort_by(|left, right| {
            (
                matched
                    .iter()
                    .position(|observer| observer.name.as_str() == left.observer),
                left.action_index,
            )
                .cmp(&(
                    matched
                        .iter()
                        .position(|observer| observer.name.as_str() == right.observer),
                    right.action_index,
                ))
        });
        EventSummary {
            event_id: event.id,
            matched_observers: matched
                .iter()
                .map(|observer| observer.name.to_string())
                .collect(),
            actions,
            duration: started.elapsed(),
        }
    }

    async fn execute_action(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        envelope: &serde_json::Value,
    ) -> ActionReport {
        let started = Instant::now();
        let context = ActionContext {
            event,
            observer: &observer.name,
            action_index: action.index,
            envelope,
        };
        let timeout = action.kind.timeout();
        let outcome = run_with_retry(&observer.retry, |_attempt| async {
            let Ok(_permit) = self.action_permits.acquire().await else {
                return Err(AttemptError::new(
                    ErrorCode::ShuttingDown,
                    "executor closed",
                ));
            };
            match tokio::time::timeout(timeout, self.runner.attempt(action, &context)).await {
                Ok(result) => result,
                Err(_) => Err(AttemptError::new(
                    ErrorCode::ActionTimeout,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                )),
            }
        })
        .await;

        let status = match outcome.result {
            Ok(success) => ActionStatus::Succeeded {
                detail: success.detail,
            },
            Err(error) => {
                self.handle_failure(event, observer, action, &error, outcome.attempts)
                    .await
            }
        };
        ActionReport {
            observer: observer.name.to_string(),
            action_index: action.index,
            action_type: action.kind.type_name(),
            status,
            attempts: outcome.attempts,
            duration: started.elapsed(),
        }
    }

    async fn handle_failure(
        &self,
        event: &EntityEvent,
        observer: &ObserverDefinition,
        action: &ActionDefinition,
        error: &AttemptError,
        attempts: u32,
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
                    error_message: error.message.clone(),
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
