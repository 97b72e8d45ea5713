//! Checkpoints in process memory.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

use super::{ActionKey, BatchPosition, Checkpoint, CheckpointError, CheckpointStore};
use crate::jobs::NewJob;

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
