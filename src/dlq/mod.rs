//! The dead-letter queue: actions that failed for good, kept with everything needed to
//! understand and re-run them.
//!
//! [`DeadLetterQueue`] is a seam with two real implementations, in memory
//! ([`InMemoryDeadLetterQueue`]) and in PostgreSQL ([`PostgresDeadLetterQueue`]), so it has one
//! conformance suite, [`conformance::run`], that both must pass.

mod postgres;

use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::EntityEvent;
use crate::error::ErrorCode;

pub(crate) use postgres::insert_dead_letter;
pub use postgres::{
    DEAD_LETTER_PRUNE_BATCH, EVENT_OMITTED, FULL_EVENT_BYTES, LISTED_EVENT_BYTES, LetterCursor,
    LetterGroup, MAX_LETTER_GROUPS, PostgresDeadLetterQueue, count_dead_letters_up_to,
    count_matching, delete_letters, last_error_line, letter_groups, placeholder_event,
    prune_dead_letters_batch, take_letters,
};

/// An action that failed for good, as handed to the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewDeadLetter {
    pub event: EntityEvent,
    pub observer: String,
    pub action_index: usize,
    pub action_type: String,
    pub error_code: ErrorCode,
    pub error_message: String,
    pub attempts: u32,
}

/// A stored dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub letter: NewDeadLetter,
}

impl DeadLetter {
    /// Whether the letter's event is only a stand-in (its stored event did not decode, or a
    /// listing abbreviated it): such a letter can be shown and purged, but not retried.
    #[must_use]
    pub fn event_is_unreadable(&self) -> bool {
        self.letter.event.data.get(EVENT_OMITTED).is_some()
    }
}

/// Which dead letters a listing or purge concerns; every set field must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeadLetterFilter {
    pub observer: Option<String>,
    pub action_type: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub entity_type: Option<String>,
    /// Only letters whose error message contains this text (case-insensitive).
    pub error_contains: Option<String>,
    /// Only letters created at or after this moment.
    pub created_after: Option<DateTime<Utc>>,
    /// Only letters created before this moment.
    pub created_before: Option<DateTime<Utc>>,
    /// At most this many (oldest first); `None` for all.
    pub limit: Option<usize>,
}

impl DeadLetterFilter {
    /// Whether `letter` satisfies every condition (the limit aside).
    #[must_use]
    pub fn accepts(&self, letter: &DeadLetter) -> bool {
        self.observer
            .as_ref()
            .is_none_or(|observer| *observer == letter.letter.observer)
            && self
                .action_type
                .as_ref()
                .is_none_or(|kind| *kind == letter.letter.action_type)
            && self
                .error_code
                .is_none_or(|code| code == letter.letter.error_code)
            && self
                .entity_type
                .as_ref()
                .is_none_or(|entity| *entity == letter.letter.event.entity_type)
            && self.error_contains.as_ref().is_none_or(|text| {
                letter
                    .letter
                    .error_message
                    .to_lowercase()
                    .contains(&text.to_lowercase())
            })
            && self
                .created_after
                .is_none_or(|moment| letter.created_at >= moment)
            && self
                .created_before
                .is_none_or(|moment| letter.created_at < moment)
    }
}

/// Failures of the queue itself.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("the dead-letter queue is full ({capacity} entries); purge or retry some")]
    Full { capacity: usize },
    #[error("dead-letter storage failed: {0}")]
    Storage(String),
}

impl DeadLetterError {
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        ErrorCode::StorageUnavailable
    }
}

/// Where actions that failed for good are kept.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync + std::fmt::Debug {
    /// Stores a letter and returns its id.
    async fn push(&self, letter: NewDeadLetter) -> Result<Uuid, DeadLetterError>;
    /// Letters matching `filter`, oldest first.
    async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, DeadLetterError>;
    async fn get(&self, id: Uuid) -> Result<Option<DeadLetter>, DeadLetterError>;
    /// Removes one letter (after a successful retry); whether it existed.
    async fn remove(&self, id: Uuid) -> Result<bool, DeadLetterError>;
    /// Removes every letter matching `filter` (the limit included); how many.
    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, DeadLetterError>;
    async fn count(&self) -> Result<u64, DeadLetterError>;
}

/// Default bound of the in-memory queue.
pub const DEFAULT_IN_MEMORY_CAPACITY: usize = 100_000;

/// A dead-letter queue in process memory: for tests and single-process tools. Bounded; a full
/// queue refuses new letters with [`DeadLetterError::Full`] rather than dropping old ones.
#[derive(Debug)]
pub struct InMemoryDeadLetterQueue {
    capacity: usize,
    letters: Mutex<Vec<DeadLetter>>,
}

impl Default for InMemoryDeadLetterQueue {
    fn default() -> Self {
        InMemoryDeadLetterQueue::with_capacity(DEFAULT_IN_MEMORY_CAPACITY)
    }
}

impl InMemoryDeadLetterQueue {
    #[must_use]
    pub fn with_capacity(capacity: usize) -> InMemoryDeadLetterQueue {
        InMemoryDeadLetterQueue {
            capacity,
            letters: Mutex::new(Vec::new()),
        }
    }

    fn letters(&self) -> std::sync::MutexGuard<'_, Vec<DeadLetter>> {
        self.letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl DeadLetterQueue for InMemoryDeadLetterQueue {
    async fn push(&self, letter: NewDeadLetter) -> Result<Uuid, DeadLetterError> {
        let mut letters = self.letters();
        if letters.len() >= self.capacity {
            return Err(DeadLetterError::Full {
                capacity: self.capacity,
            });
        }
        let id = Uuid::now_v7();
        letters.push(DeadLetter {
            id,
            created_at: Utc::now(),
            letter,
        });
        Ok(id)
    }

    async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let letters = self.letters();
        Ok(letters
            .iter()
            .filter(|letter| filter.accepts(letter))
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }

    async fn get(&self, id: Uuid) -> Result<Option<DeadLetter>, DeadLetterError> {
        Ok(self
            .letters()
            .iter()
            .find(|letter| letter.id == id)
            .cloned())
    }

    async fn remove(&self, id: Uuid) -> Result<bool, DeadLetterError> {
        let mut letters = self.letters();
        let before = letters.len();
        letters.retain(|letter| letter.id != id);
        Ok(letters.len() < before)
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64, DeadLetterError> {
        let mut letters = self.letters();
        let mut budget = filter.limit.unwrap_or(usize::MAX);
        let before = letters.len();
        letters.retain(|letter| {
            if budget > 0 && filter.accepts(letter) {
                budget -= 1;
                false
            } else {
                true
            }
        });
        Ok(u64::try_from(before - letters.len()).unwrap_or(u64::MAX))
    }

    async fn count(&self) -> Result<u64, DeadLetterError> {
        Ok(u64::try_from(self.letters().len()).unwrap_or(u64::MAX))
    }
}

/// The behaviour every [`DeadLetterQueue`] implementation must have.
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use serde_json::json;

    use super::{DeadLetterFilter, DeadLetterQueue, NewDeadLetter};
    use crate::domain::{EntityEvent, EventKind};
    use crate::error::ErrorCode;

    fn letter(observer: &str, entity: &str, code: ErrorCode) -> NewDeadLetter {
        NewDeadLetter {
            event: EntityEvent::new(
                EventKind::Update,
                entity,
                "42",
                json!({"status": "paid"}),
                Some(json!({"status": "new"})),
            ),
            observer: observer.to_owned(),
            action_index: 1,
            action_type: "webhook".to_owned(),
            error_code: code,
            error_message: "HTTP 500: boom".to_owned(),
            attempts: 5,
        }
    }

    /// Runs the suite against an empty queue. Panics on the first violation.
    pub async fn run(queue: &dyn DeadLetterQueue) {
        assert_eq!(
            queue.count().await.unwrap(),
            0,
            "the queue must start empty"
        );

        let first = letter("orders", "Order", ErrorCode::RemoteUnavailable);
        let first_id = queue.push(first.clone()).await.unwrap();
        let second_id = queue
            .push(letter("orders", "Order", ErrorCode::RemoteRejected))
            .await
            .unwrap();
        let third_id = queue
            .push(letter("users", "User", ErrorCode::TemplateFailed))
            .await
            .unwrap();
        assert_eq!(queue.count().await.unwrap(), 3);

        let stored = queue
            .get(first_id)
            .await
            .unwrap()
            .expect("a pushed letter can be read back");
        assert_eq!(stored.id, first_id);
        assert_eq!(
            stored.letter, first,
            "the letter round-trips unchanged, event included"
        );
        assert!(queue.get(uuid::Uuid::now_v7()).await.unwrap().is_none());

        let all = queue.list(&DeadLetterFilter::default()).await.unwrap();
        let ids: Vec<_> = all.iter().map(|letter| letter.id).collect();
        assert_eq!(
            ids,
            [first_id, second_id, third_id],
            "listing is oldest first"
        );

        let by_observer = DeadLetterFilter {
            observer: Some("orders".into()),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&by_observer).await.unwrap().len(), 2);
        let by_code = DeadLetterFilter {
            error_code: Some(ErrorCode::TemplateFailed),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&by_code).await.unwrap()[0].id, third_id);
        let by_entity = DeadLetterFilter {
            entity_type: Some("User".into()),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&by_entity).await.unwrap().len(), 1);
        let limited = DeadLetterFilter {
            limit: Some(1),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&limited).await.unwrap()[0].id, first_id);
        let before_all = DeadLetterFilter {
            created_before: Some(stored.created_at),
            ..DeadLetterFilter::default()
        };
        assert!(queue.list(&before_all).await.unwrap().is_empty());
        let since_first = DeadLetterFilter {
            created_after: Some(stored.created_at),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&since_first).await.unwrap().len(), 3);
        let by_error = DeadLetterFilter {
            error_contains: Some("500: BO".into()),
            observer: Some("users".into()),
            ..DeadLetterFilter::default()
        };
        assert_eq!(queue.list(&by_error).await.unwrap()[0].id, third_id);
        let by_other_error = DeadLetterFilter {
            error_contains: Some("100% not there_".into()),
            ..DeadLetterFilter::default()
        };
        assert!(
            queue.list(&by_other_error).await.unwrap().is_empty(),
            "the text is matched literally, wildcards included"
        );

        assert!(queue.remove(second_id).await.unwrap());
        assert!(
            !queue.remove(second_id).await.unwrap(),
            "removing twice reports absence"
        );
        assert_eq!(queue.count().await.unwrap(), 2);

        assert_eq!(queue.purge(&by_observer).await.unwrap(), 1);
        assert_eq!(queue.count().await.unwrap(), 1);
        assert_eq!(queue.purge(&DeadLetterFilter::default()).await.unwrap(), 1);
        assert_eq!(queue.count().await.unwrap(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_queue_conforms() {
        conformance::run(&InMemoryDeadLetterQueue::default()).await;
    }

    #[tokio::test]
    async fn in_memory_queue_refuses_beyond_capacity() {
        let queue = InMemoryDeadLetterQueue::with_capacity(1);
        let event = EntityEvent::new(
            crate::domain::EventKind::Insert,
            "Order",
            "1",
            serde_json::json!({}),
            None,
        );
        let letter = NewDeadLetter {
            event,
            observer: "o".into(),
            action_index: 0,
            action_type: "log".into(),
            error_code: ErrorCode::Internal,
            error_message: "x".into(),
            attempts: 1,
        };
        queue.push(letter.clone()).await.unwrap();
        assert!(matches!(
            queue.push(letter).await,
            Err(DeadLetterError::Full { capacity: 1 })
        ));
        assert_eq!(
            queue.count().await.unwrap(),
            1,
            "nothing already stored was dropped"
        );
    }
}
