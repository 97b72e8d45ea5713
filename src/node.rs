//! One running node: the pieces wired together, started and stopped as a unit.
//!
//! `Node::build` applies migrations, claims the partition and wires the executor (with the
//! PostgreSQL dead-letter queue and the completed-actions ledger) to the listener;
//! `run_until_stopped` delivers until the caller's token is cancelled, finishing the page in
//! progress and saving its checkpoint. A test starts and stops a whole node in-process this way.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::actions::ActionRunner;
use crate::checkpoint::{CheckpointStore, PendingCompletions, PostgresCheckpointStore};
use crate::config::ObserversConfig;
use crate::dlq::PostgresDeadLetterQueue;
use crate::executor::Executor;
use crate::listener::{Listener, ListenerError, ListenerSettings, flush_pending_completions};
use crate::matcher::Matcher;

/// A node ready to run.
#[derive(Debug)]
pub struct Node {
    listener: Listener,
    ledger_writer: tokio::task::JoinHandle<()>,
    stop_ledger_writer: CancellationToken,
}

impl Node {
    /// Migrates the database, builds the pipeline from `config`, and claims the partition.
    ///
    /// # Errors
    /// Migrations, the HTTP client or the partition claim failed.
    pub async fn build(
        pool: PgPool,
        config: ObserversConfig,
        settings: ListenerSettings,
    ) -> anyhow::Result<Node> {
        crate::migrate::run(&pool).await?;
        let store: Arc<dyn CheckpointStore> = Arc::new(PostgresCheckpointStore::new(pool.clone()));
        let dead_letters = Arc::new(PostgresDeadLetterQueue::new(pool.clone()));
        let runner = ActionRunner::new(Arc::new(config.templates))?;
        let pending = Arc::new(PendingCompletions::default());
        let executor = Executor::new(
            Arc::new(Matcher::new(config.observers)),
            runner,
            dead_letters,
            &config.executor,
        )
        .with_settled_sink(pending.clone());
        let listener = Listener::start(pool, store.clone(), executor, settings)
            .await?
            .with_pending_completions(pending.clone());
        let stop_ledger_writer = CancellationToken::new();
        let ledger_writer = tokio::spawn(flush_pending_completions(
            store,
            pending,
            stop_ledger_writer.clone(),
        ));
        Ok(Node {
            listener,
            ledger_writer,
            stop_ledger_writer,
        })
    }

    /// Delivers until `shutdown` is cancelled; the page in progress is finished and checkpointed.
    ///
    /// # Errors
    /// Another node took the partition over.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ListenerError> {
        let result = self.listener.run(shutdown).await;
        self.stop_ledger_writer.cancel();
        let _ = self.ledger_writer.await;
        result
    }
}
