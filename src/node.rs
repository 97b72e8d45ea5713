//! One running node: the pieces wired together, started and stopped as a unit.
//!
//! `Node::build` applies migrations, claims the partition and wires the executor (with the
//! PostgreSQL dead-letter queue, the completed-actions ledger and job routing) to the listener;
//! `run_until_stopped` delivers and runs job workers until the caller's token is cancelled, then
//! stops intake, finishes the page and the jobs in progress, and saves the checkpoint. A test
//! starts and stops a whole node in-process this way.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::ActionRunner;
use crate::checkpoint::{CheckpointStore, PendingCompletions, PostgresCheckpointStore};
use crate::config::{JobSettings, ObserversConfig};
use crate::dlq::PostgresDeadLetterQueue;
use crate::executor::Executor;
use crate::jobs::{JobWorker, PostgresJobQueue};
use crate::listener::{Listener, ListenerError, ListenerSettings, flush_pending_completions};
use crate::matcher::Matcher;

/// How often idle job workers look for work when no notification arrives.
const JOB_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often finished jobs past their retention are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_mins(10);

/// A node ready to run.
#[derive(Debug)]
pub struct Node {
    listener: Listener,
    ledger_writer: tokio::task::JoinHandle<()>,
    stop_ledger_writer: CancellationToken,
    workers: Vec<JobWorker>,
    jobs: PostgresJobQueue,
    job_settings: JobSettings,
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
        let matcher = Arc::new(Matcher::new(config.observers));
        let pending = Arc::new(PendingCompletions::default());
        let executor = Executor::new(
            matcher.clone(),
            runner.clone(),
            dead_letters,
            &config.executor,
        )
        .with_settled_sink(pending.clone())
        .with_job_routing();
        let jobs = PostgresJobQueue::new(
            pool.clone(),
            settings.node_id.clone(),
            config.jobs.visibility_timeout,
        );
        let workers = config
            .jobs
            .workers
            .iter()
            .flat_map(|(queue, count)| std::iter::repeat_n(queue, *count))
            .map(|queue| {
                JobWorker::new(
                    jobs.clone(),
                    queue.clone(),
                    runner.clone(),
                    matcher.clone(),
                    JOB_POLL_INTERVAL,
                )
            })
            .collect();
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
            workers,
            jobs,
            job_settings: config.jobs,
        })
    }

    /// Delivers and works jobs until `shutdown` is cancelled; the page in progress is finished
    /// and checkpointed, jobs in progress are finished, claimed-but-unstarted ones released.
    ///
    /// # Errors
    /// Another node took the partition over.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ListenerError> {
        let tasks = TaskTracker::new();
        let stop_workers = shutdown.child_token();
        for worker in self.workers {
            tasks.spawn(worker.run(stop_workers.clone()));
        }
        let (jobs, retention, pruning) =
            (self.jobs, self.job_settings.retention, stop_workers.clone());
        tasks.spawn(async move {
            loop {
                match jobs.prune_finished(retention).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "pruned finished jobs past retention"),
                    Err(error) => tracing::warn!(%error, "pruning finished jobs failed"),
                }
                tokio::select! {
                    () = pruning.cancelled() => return,
                    () = tokio::time::sleep(PRUNE_INTERVAL) => {}
                }
            }
        });
        tasks.close();
        let result = self.listener.run(shutdown.clone()).await;
        // The listener may also stop on its own (fenced out): stop the workers either way.
        stop_workers.cancel();
        tasks.wait().await;
        self.stop_ledger_writer.cancel();
        let _ = self.ledger_writer.await;
        result
    }
}
