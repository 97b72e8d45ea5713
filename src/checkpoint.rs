//! Where the listener records how far it got, and which actions already completed.
//!
//! A partition's checkpoint is a PgQ-style position in the change log: the last snapshot whose
//! transactions were all delivered, plus — inside a batch too large for one page — the batch's
//! end snapshot and the last change-log id delivered. Every save is a compare-and-swap on the
//! lease epoch (fencing token) and the checkpoint version, so a node that lost the partition, or
//! a second writer, cannot move it. The (event, observer, action) triples that completed are
//! written in the same transaction, so a replay after a crash skips them.
//!
//! Two real implementations (PostgreSQL, in memory) share one conformance suite.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ErrorCode;
use crate::jobs::NewJob;

/// How far a partition's delivery got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPosition {
    /// Every transaction visible in this snapshot (text form `xmin:xmax:xip,…`) was delivered;
    /// `None` before the first batch.
    pub snapshot: Option<String>,
    /// The end snapshot of the batch being delivered, when it spans several pages.
    pub batch_upto: Option<String>,
    /// The last change-log id delivered inside that batch.
    pub batch_position: Option<i64>,
}

/// A partition's checkpoint as its lease holder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub partition: i32,
    /// Lease epoch (fencing token) the holder claimed.
    pub epoch: i64,
    /// Bumped by every save; part of the compare-and-swap.
    pub version: i64,
    pub position: BatchPosition,
}

/// One action of one event for one observer: the unit of effectively-once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionKey {
    pub event_id: Uuid,
    pub observer: String,
    pub action_index: usize,
}

/// Actions settled since the last checkpoint save and not yet written anywhere.
///
/// The executor adds to it as actions settle; the page's checkpoint save takes everything in it
/// (so each key is written once in the common case), and a background writer flushes what a
/// long page leaves waiting, so that a crash in the middle of a slow page repeats little.
/// Bounded by the actions of one page.
#[derive(Debug, Default)]
pub struct PendingCompletions {
    keys: Mutex<Vec<ActionKey>>,
}

impl PendingCompletions {
    pub fn push(&self, key: ActionKey) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key);
    }

    /// Everything waiting, leaving it empty.
    pub fn take(&self) -> Vec<ActionKey> {
        std::mem::take(
            &mut *self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "partition {partition} checkpoint was moved by another holder (our epoch {epoch}, version {version}); this node no longer owns it"
    )]
    FencedOut {
        partition: i32,
        epoch: i64,
        version: i64,
    },
    #[error("checkpoint storage failed: {0}")]
    Storage(#[from] sqlx::Error),
}

impl CheckpointError {
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            CheckpointError::FencedOut { .. } => ErrorCode::FencedOut,
            CheckpointError::Storage(_) => ErrorCode::StorageUnavailable,
        }
    }
}

/// Durable checkpoints and the completed-actions ledger.
#[async_trait]
pub trait CheckpointStore: Send + Sync + std::fmt::Debug {
    /// Takes a partition over: bumps its epoch, names `node` its leader, returns its checkpoint.
    async fn claim(&self, partition: i32, node: &str) -> Result<Checkpoint, CheckpointError>;
    /// The partition's checkpoint as stored, if it was ever claimed.
    async fn load(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError>;
    /// Moves `current` to `next`, records `completed` and enqueues `jobs`, atomically, if nobody
    /// else moved or claimed the partition since `current` was read; returns the new checkpoint.
    /// Jobs whose idempotency key exists already are not enqueued again.
    async fn save_with_jobs(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
    ) -> Result<Checkpoint, CheckpointError>;
    /// [`save_with_jobs`](Self::save_with_jobs) without jobs.
    async fn save(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
    ) -> Result<Checkpoint, CheckpointError> {
        self.save_with_jobs(current, next, completed, &[]).await
    }
    /// Records completed actions ahead of the next save (best effort; the save records them too).
    async fn record_completed(&self, completed: &[ActionKey]) -> Result<(), CheckpointError>;
    /// Which actions of these events already completed.
    async fn completed_among(
        &self,
        event_ids: &[Uuid],
    ) -> Result<HashSet<ActionKey>, CheckpointError>;
}

/// Checkpoints in `fraiseql_observers.partitions` and `processed_actions`.
#[derive(Clone, Debug)]
pub struct PostgresCheckpointStore {
    pool: PgPool,
}

impl PostgresCheckpointStore {
    #[must_use]
    pub fn new(pool: PgPool) -> PostgresCheckpointStore {
        PostgresCheckpointStore { pool }
    }
}

type CheckpointRow = (i32, i64, i64, Option<String>, Option<String>, Option<i64>);

fn checkpoint_from_row(
    (partition, epoch, version, snapshot, batch_upto, batch_position): CheckpointRow,
) -> Checkpoint {
    Checkpoint {
        partition,
        epoch,
        version,
        position: BatchPosition {
            snapshot,
            batch_upto,
            batch_position,
        },
    }
}

/// The keys as column arrays, sorted: every writer of `processed_actions` (the early ledger
/// writer and checkpoint saves, which overlap) takes the row locks in the same order, so they
/// wait for each other instead of deadlocking.
fn key_columns(completed: &[ActionKey]) -> (Vec<Uuid>, Vec<String>, Vec<i32>) {
    let mut sorted: Vec<&ActionKey> = completed.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let completed = sorted;
    let event_ids = completed.iter().map(|key| key.event_id).collect();
    let observers = completed.iter().map(|key| key.observer.clone()).collect();
    let indexes = completed
        .iter()
        .map(|key| i32::try_from(key.action_index).unwrap_or(i32::MAX))
        .collect();
    (event_ids, observers, indexes)
}

const INSERT_COMPLETED: &str =
    "INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])
     ON CONFLICT DO NOTHING";

#[async_trait]
impl CheckpointStore for PostgresCheckpointStore {
    async fn claim(&self, partition: i32, node: &str) -> Result<Checkpoint, CheckpointError> {
        let row: CheckpointRow = sqlx::query_as(
            "SELECT partition, epoch, checkpoint_version, snapshot::text, batch_upto::text, batch_position
               FROM fraiseql_observers.claim_partition($1, $2)",
        )
        .bind(partition)
        .bind(node)
        .fetch_one(&self.pool)
        .await?;
        Ok(checkpoint_from_row(row))
    }

    async fn load(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let row: Option<CheckpointRow> = sqlx::query_as(
            "SELECT partition, epoch, checkpoint_version, snapshot::text, batch_upto::text, batch_position
               FROM fraiseql_observers.partitions WHERE partition = $1",
        )
        .bind(partition)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(checkpoint_from_row))
    }

    async fn save_with_jobs(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
    ) -> Result<Checkpoint, CheckpointError> {
        let mut transaction = self.pool.begin().await?;
        let new_version: Option<i64> = sqlx::query_scalar(
            "SELECT fraiseql_observers.save_checkpoint($1, $2, $3, $4::pg_snapshot, $5::pg_snapshot, $6)",
        )
        .bind(current.partition)
        .bind(current.epoch)
        .bind(current.version)
        .bind(&next.snapshot)
        .bind(&next.batch_upto)
        .bind(next.batch_position)
        .fetch_one(&mut *transaction)
        .await?;
        let Some(version) = new_version else {
            transaction.rollback().await?;
            return Err(CheckpointError::FencedOut {
                partition: current.partition,
                epoch: current.epoch,
                version: current.version,
            });
        };
        if !completed.is_empty() {
            let (event_ids, observers, indexes) = key_columns(completed);
            sqlx::query(INSERT_COMPLETED)
                .bind(event_ids)
                .bind(observers)
                .bind(indexes)
                .execute(&mut *transaction)
                .await?;
        }
        if !jobs.is_empty() {
            crate::jobs::enqueue_batch(&mut *transaction, jobs)
                .await
                .map_err(|error| match error {
                    crate::jobs::JobError::Storage(storage) => CheckpointError::Storage(storage),
                    crate::jobs::JobError::Corrupt { problem, .. } => {
                        CheckpointError::Storage(sqlx::Error::Protocol(problem))
                    }
                })?;
        }
        transaction.commit().await?;
        Ok(Checkpoint {
            partition: current.partition,
            epoch: current.epoch,
            version,
            position: next,
        })
    }

    async fn record_completed(&self, completed: &[ActionKey]) -> Result<(), CheckpointError> {
        if completed.is_empty() {
            return Ok(());
        }
        let (event_ids, observers, indexes) = key_columns(completed);
        sqlx::query(INSERT_COMPLETED)
            .bind(event_ids)
            .bind(observers)
            .bind(indexes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn completed_among(
        &self,
        event_ids: &[Uuid],
    ) -> Result<HashSet<ActionKey>, CheckpointError> {
        if event_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT event_id, observer, action_index FROM fraiseql_observers.processed_actions WHERE event_id = ANY($1)",
        )
        .bind(event_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(event_id, observer, action_index)| ActionKey {
                event_id,
                observer,
                action_index: usize::try_from(action_index).unwrap_or_default(),
            })
            .collect())
    }
}

/// Checkpoints in process memory, for tests and tools; same semantics as PostgreSQL.
#[derive(Debug, Default)]
pub struct InMemoryCheckpointStore {
    state: Mutex<InMemoryState>,
}

#[derive(Debug, Default)]
struct InMemoryState {
    checkpoints: HashMap<i32, Checkpoint>,
    completed: HashSet<ActionKey>,
    enqueued: Vec<NewJob>,
}

impl InMemoryCheckpointStore {
    /// The jobs saves enqueued, in order.
    #[must_use]
    pub fn enqueued(&self) -> Vec<NewJob> {
        self.state().enqueued.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InMemoryState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CheckpointStore for InMemoryCheckpointStore {
    async fn claim(&self, partition: i32, _node: &str) -> Result<Checkpoint, CheckpointError> {
        let mut state = self.state();
        let checkpoint = state
            .checkpoints
            .entry(partition)
            .or_insert_with(|| Checkpoint {
                partition,
                epoch: 0,
                version: 0,
                position: BatchPosition::default(),
            });
        checkpoint.epoch += 1;
        Ok(checkpoint.clone())
    }

    async fn load(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        Ok(self.state().checkpoints.get(&partition).cloned())
    }

    async fn save_with_jobs(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
    ) -> Result<Checkpoint, CheckpointError> {
        let mut state = self.state();
        let stored = state.checkpoints.get_mut(&current.partition);
        let Some(stored) = stored
            .filter(|stored| stored.epoch == current.epoch && stored.version == current.version)
        else {
            return Err(CheckpointError::FencedOut {
                partition: current.partition,
                epoch: current.epoch,
                version: current.version,
            });
        };
        stored.version += 1;
        stored.position = next;
        let saved = stored.clone();
        state.completed.extend(completed.iter().cloned());
        for job in jobs {
            let key = job.idempotency_key();
            if !state
                .enqueued
                .iter()
                .any(|enqueued| enqueued.idempotency_key() == key)
            {
                state.enqueued.push(job.clone());
            }
        }
        Ok(saved)
    }

    async fn record_completed(&self, completed: &[ActionKey]) -> Result<(), CheckpointError> {
        self.state().completed.extend(completed.iter().cloned());
        Ok(())
    }

    async fn completed_among(
        &self,
        event_ids: &[Uuid],
    ) -> Result<HashSet<ActionKey>, CheckpointError> {
        let wanted: HashSet<&Uuid> = event_ids.iter().collect();
        Ok(self
            .state()
            .completed
            .iter()
            .filter(|key| wanted.contains(&key.event_id))
            .cloned()
            .collect())
    }
}

/// The behaviour every [`CheckpointStore`] must have. `snapshots` are two valid snapshot texts
/// for the store (any strings for the in-memory one; `pg_snapshot` texts for PostgreSQL).
#[doc(hidden)]
pub mod conformance {
    use super::{ActionKey, BatchPosition, CheckpointError, CheckpointStore};

    /// Runs the suite on partition 7 of an empty store. Panics on the first violation.
    pub async fn run(store: &dyn CheckpointStore, snapshots: [&str; 2]) {
        assert!(
            store.load(7).await.unwrap().is_none(),
            "an unclaimed partition has no checkpoint"
        );
        let first = store.claim(7, "node-a").await.unwrap();
        assert_eq!(first.epoch, 1);
        assert_eq!(
            first.position,
            BatchPosition::default(),
            "a new partition starts at the beginning"
        );

        let key = |index: usize| ActionKey {
            event_id: uuid::Uuid::from_u128(42),
            observer: "orders".into(),
            action_index: index,
        };
        let in_batch = BatchPosition {
            snapshot: None,
            batch_upto: Some(snapshots[0].into()),
            batch_position: Some(10),
        };
        let saved = store
            .save(&first, in_batch.clone(), &[key(0)])
            .await
            .unwrap();
        assert_eq!(saved.version, first.version + 1);
        assert_eq!(saved.position, in_batch);
        assert_eq!(
            store.load(7).await.unwrap().unwrap(),
            saved,
            "what is saved is what is loaded"
        );

        // A second save from the same stale view is a conflict, detected, not overwritten.
        let stale = store
            .save(&first, BatchPosition::default(), &[key(5)])
            .await;
        assert!(
            matches!(stale, Err(CheckpointError::FencedOut { partition: 7, .. })),
            "{stale:?}"
        );
        assert_eq!(store.load(7).await.unwrap().unwrap(), saved);

        // Another node claims the partition: the old holder is fenced out, the new one continues.
        let taken = store.claim(7, "node-b").await.unwrap();
        assert_eq!(taken.epoch, 2);
        assert_eq!(
            taken.position, in_batch,
            "the successor resumes from the saved position"
        );
        let old_holder = store
            .save(
                &saved,
                BatchPosition {
                    snapshot: Some(snapshots[1].into()),
                    ..BatchPosition::default()
                },
                &[key(6)],
            )
            .await;
        assert!(
            matches!(old_holder, Err(CheckpointError::FencedOut { .. })),
            "{old_holder:?}"
        );
        let done = BatchPosition {
            snapshot: Some(snapshots[1].into()),
            batch_upto: None,
            batch_position: None,
        };
        let moved = store.save(&taken, done.clone(), &[key(1)]).await.unwrap();
        assert_eq!(moved.position, done);
        assert_eq!(moved.epoch, 2);

        // Completed actions: those saved or recorded count; those of rejected saves do not.
        store.record_completed(&[key(2)]).await.unwrap();
        store.record_completed(&[key(2)]).await.unwrap();
        let completed = store
            .completed_among(&[uuid::Uuid::from_u128(42), uuid::Uuid::from_u128(1)])
            .await
            .unwrap();
        let mut indexes: Vec<usize> = completed.iter().map(|key| key.action_index).collect();
        indexes.sort_unstable();
        assert_eq!(indexes, [0, 1, 2]);
        assert!(store.completed_among(&[]).await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_store_conforms() {
        conformance::run(&InMemoryCheckpointStore::default(), ["a", "b"]).await;
    }
}
