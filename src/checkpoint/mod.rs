//! Where the listener records how far it got, and which actions already completed.
//!
//! A partition's checkpoint is a PgQ-style position in the change log: the last snapshot whose
//! transactions were all delivered, plus — inside a batch too large for one page — the batch's
//! end snapshot and the last change-log id delivered. Every save is a compare-and-swap on the
//! lease epoch (fencing token) and the checkpoint version, so a node that lost the partition, or
//! a second writer, cannot move it. The (event, observer, action) triples that completed are
//! written in the same transaction, so a replay after a crash skips them. An action whose effect
//! is made in the service's own database records itself in that effect's transaction instead
//! ([`record_completed_in`]), so the effect and its ledger row cannot part.
//!
//! Two real implementations (PostgreSQL, in memory) share one conformance suite.

mod memory;
mod postgres;

#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance;

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

pub use crate::domain::ActionKey;
use crate::error::ErrorCode;
use crate::history::HistoryRecord;
use crate::jobs::NewJob;
pub use memory::InMemoryCheckpointStore;
pub use postgres::{
    LEDGER_PRUNE_BATCH, LEDGER_RETENTION, PostgresCheckpointStore, prune_completed,
    prune_completed_batch, record_completed_in,
};
pub use postgres::{PartitionRow, clear_handover, partition_rows, request_handover};
pub(crate) use postgres::{
    delivered_everywhere_below_sql, partition_epochs_sql, pending_handovers_columns,
};

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

/// Actions settled since the last checkpoint save.
///
/// The executor adds to it as actions settle. A background writer flushes what has waited
/// [`take_waited`](Self::take_waited) long (a slow page), so that a crash in the middle of such a
/// page repeats little; the page's checkpoint save writes the rest, leaving out what the writer
/// already wrote, so each key is written once. Bounded by the actions of one page.
#[derive(Debug, Default)]
pub struct PendingCompletions {
    state: Mutex<PendingState>,
}

#[derive(Debug, Default)]
struct PendingState {
    /// Not yet written, in settling order.
    waiting: Vec<(ActionKey, std::time::Instant)>,
    /// Written by the background writer since the last save.
    written: HashSet<ActionKey>,
}

impl PendingCompletions {
    fn state(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, key: ActionKey) {
        self.state().waiting.push((key, std::time::Instant::now()));
    }

    /// The keys that settled at least `age` ago, no longer waiting.
    pub fn take_waited(&self, age: std::time::Duration) -> Vec<ActionKey> {
        let mut state = self.state();
        let now = std::time::Instant::now();
        let due = state
            .waiting
            .partition_point(|(_, settled)| now.saturating_duration_since(*settled) >= age);
        state.waiting.drain(..due).map(|(key, _)| key).collect()
    }

    /// Notes keys the background writer stored, so the page's save leaves them out.
    pub fn mark_written(&self, keys: Vec<ActionKey>) {
        self.state().written.extend(keys);
    }

    /// `keys` without those the background writer already stored.
    #[must_use]
    pub fn unwritten(&self, mut keys: Vec<ActionKey>) -> Vec<ActionKey> {
        let state = self.state();
        if !state.written.is_empty() {
            keys.retain(|key| !state.written.contains(key));
        }
        keys
    }

    /// The page's save (or its failure record) stored everything: start afresh.
    pub fn clear(&self) {
        let mut state = self.state();
        state.waiting.clear();
        state.written.clear();
    }

    /// Keys not yet written, for tests and shutdown.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.state().waiting.len()
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
    /// [`save_with_jobs`](Self::save_with_jobs), and writes the page's `history` rows in the
    /// same statement or transaction, only if the checkpoint moves: exactly once per committed
    /// page. A store without a history table (in memory) leaves them out.
    async fn save_page(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
        history: &[HistoryRecord],
    ) -> Result<Checkpoint, CheckpointError> {
        let _ = history;
        self.save_with_jobs(current, next, completed, jobs).await
    }
    /// [`save_with_jobs`](Self::save_with_jobs) without jobs.
    async fn save(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
    ) -> Result<Checkpoint, CheckpointError> {
        self.save_with_jobs(current, next, completed, &[]).await
    }
    /// Records completed actions of a page that will be read again: one still in flight, or one
    /// whose checkpoint cannot move yet (a saved page is covered by its checkpoint).
    async fn record_completed(&self, completed: &[ActionKey]) -> Result<(), CheckpointError>;
    /// Which actions of these events already completed.
    async fn completed_among(
        &self,
        event_ids: &[Uuid],
    ) -> Result<HashSet<ActionKey>, CheckpointError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_store_conforms() {
        conformance::run(&InMemoryCheckpointStore::default(), ["a", "b"]).await;
    }
}
