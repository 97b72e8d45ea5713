//! What running an action produced: its status, its report, an event's summary, and — for an
//! action handed to the job queue — the job to enqueue with its ordering key.
//!
//! Shared vocabulary of the pipeline and the stores (the executor writes these, the listener,
//! the checkpoint store, the job queue and the metrics read them), so it sits below all of them
//! and does no I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::config::FailurePolicy;
use crate::domain::{ActionKey, EntityEvent};
use crate::error::ErrorCode;

/// How one action ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ActionStatus {
    Succeeded {
        detail: String,
    },
    /// Completed before (a replay after a crash or a failover); not run again.
    AlreadyCompleted,
    /// Handed to the job queue (`mode: async`, or a transient failure that outlasted the in-page
    /// retries); the job is in [`ActionReport::job`] until the page's checkpoint stores it.
    Enqueued {
        queue: String,
    },
    Failed {
        code: ErrorCode,
        message: String,
        /// The id of the dead letter it was parked as, when it was.
        dead_letter: Option<Uuid>,
    },
}

impl ActionStatus {
    /// Whether the action needs nothing more from this page: done, handed to the job queue, or
    /// failed for good as the observer's policy says. An attempt refused because the node's
    /// leases are unconfirmed is left to the partition's next leader.
    #[must_use]
    pub fn settles(&self, on_failure: FailurePolicy) -> bool {
        match self {
            ActionStatus::Failed {
                code: ErrorCode::FencedOut,
                ..
            } => false,
            ActionStatus::Succeeded { .. }
            | ActionStatus::AlreadyCompleted
            | ActionStatus::Enqueued { .. } => true,
            ActionStatus::Failed { dead_letter, .. } => {
                dead_letter.is_some() || on_failure == FailurePolicy::Log
            }
        }
    }
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
    /// Nothing is left to do: the action succeeded (now or before), or failed for good and was
    /// dead-lettered or, per `on_failure: log`, logged. An unsettled action (its dead letter could
    /// not be stored) must run again; the listener does not move its checkpoint past it.
    pub settled: bool,
    /// The job to enqueue with the page's checkpoint, for [`ActionStatus::Enqueued`].
    #[serde(skip)]
    pub job: Option<NewJob>,
}

impl ActionReport {
    #[must_use]
    pub fn succeeded(&self) -> bool {
        matches!(
            self.status,
            ActionStatus::Succeeded { .. } | ActionStatus::AlreadyCompleted
        )
    }
}

/// What happened to one event.
#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    pub event_id: Uuid,
    pub matched_observers: Vec<String>,
    /// Observers registered for the event's entity and kind whose condition was false.
    pub unmatched_observers: Vec<String>,
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

    /// Whether every action of the event is settled (see [`ActionReport::settled`]).
    #[must_use]
    pub fn settled(&self) -> bool {
        self.actions.iter().all(|report| report.settled)
    }

    /// The jobs this event's actions were handed over as.
    pub fn jobs(&self) -> impl Iterator<Item = &NewJob> + '_ {
        self.actions.iter().filter_map(|report| report.job.as_ref())
    }

    /// The keys of the settled actions, for the completed-actions ledger.
    pub fn settled_keys(&self) -> impl Iterator<Item = ActionKey> + '_ {
        self.actions
            .iter()
            .filter(|report| report.settled)
            .map(|report| {
                ActionKey::new(self.event_id, report.observer.as_str(), report.action_index)
            })
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

/// Work to enqueue.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub queue: String,
    /// 0 (least) to 10 (most important).
    pub priority: i16,
    /// Not before this moment (`None`: now).
    pub run_at: Option<DateTime<Utc>>,
    pub event: EntityEvent,
    pub observer: String,
    pub action_index: usize,
    pub action_type: String,
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// The circuit (the breaker module's `circuit_id`) whose open breaker parked this job: it is
    /// made due as soon as that endpoint answers again. `None`: not parked.
    pub parked_on: Option<String>,
    /// The attempts made in the page before the hand-over, oldest first (numbered from 1): the
    /// job's history starts with them and the queue numbers its own attempts after them.
    pub history: Vec<crate::retry::FailedAttempt>,
}

impl NewJob {
    /// The job's identity: the action it runs.
    #[must_use]
    pub fn action_key(&self) -> ActionKey {
        ActionKey::new(self.event.id, self.observer.as_str(), self.action_index)
    }

    /// `<event id>:<observer>:<action index>` ([`ActionKey`]'s text), the job's identity in the
    /// queue.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        self.action_key().to_string()
    }

    /// The key whose jobs run one at a time in [`ordinal`](Self::ordinal) order; `None` for an
    /// event that does not come from the change log (it has no position to order by).
    #[must_use]
    pub fn ordering_key(&self) -> Option<String> {
        self.event.position.map(|_| {
            ordering_key(
                &self.observer,
                self.action_index,
                &self.event.entity_type,
                &self.event.entity_id,
            )
        })
    }

    /// The event's change-log position: per entity, the order the changes were made in.
    #[must_use]
    pub fn ordinal(&self) -> Option<i64> {
        self.event.position
    }
}

/// Longest ordering key stored as written; a longer one is stored as its SHA-256, so that every
/// key fits the job queue's ordering index (about 2.7 kB a row) whatever an entity id holds.
/// Keys that could be stored before keep their plain form, so jobs pending across an upgrade
/// still order with the new ones.
pub const MAX_PLAIN_ORDERING_KEY_BYTES: usize = 2048;

/// The ordering key of one observer's action for one entity: `["<observer>",<action
/// index>,"<entity type>","<entity id>"]`, a JSON array, so that no entity id can make two keys
/// collide — or, over [`MAX_PLAIN_ORDERING_KEY_BYTES`], `sha256:<hex>` of that array.
#[must_use]
pub fn ordering_key(
    observer: &str,
    action_index: usize,
    entity_type: &str,
    entity_id: &str,
) -> String {
    use sha2::Digest as _;
    let plain = serde_json::json!([observer, action_index, entity_type, entity_id]).to_string();
    if plain.len() <= MAX_PLAIN_ORDERING_KEY_BYTES {
        return plain;
    }
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(plain.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_keys_are_plain_when_short_and_hashed_when_long_and_always_distinct() {
        assert_eq!(
            ordering_key("orders", 1, "Order", "42"),
            r#"["orders",1,"Order","42"]"#
        );
        let long_a = ordering_key("orders", 0, "Order", &"\u{1}".repeat(500));
        let long_b = ordering_key("orders", 0, "Order", &"\u{2}".repeat(500));
        assert!(
            long_a.starts_with("sha256:") && long_a.len() == 71,
            "{long_a}"
        );
        assert_ne!(long_a, long_b);
        assert_eq!(
            long_a,
            ordering_key("orders", 0, "Order", &"\u{1}".repeat(500))
        );
    }
}
