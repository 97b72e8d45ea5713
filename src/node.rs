//! One running node: the pieces wired together, started and stopped as a unit.
//!
//! `Node::build` applies migrations, checks the partition count and wires the executor (with the
//! PostgreSQL dead-letter queue, the completed-actions ledger and job routing) to the cluster
//! supervisor, which runs a listener for each partition this node leads; `run_until_stopped`
//! leads partitions and runs job workers until the caller's token is cancelled, then finishes the
//! pages and jobs in progress, saves the checkpoints and gives the leases back. A test starts and
//! stops a whole node in-process this way.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::ActionRunner;
use crate::checkpoint::{CheckpointStore, PostgresCheckpointStore};
use crate::cluster::{Cluster, ClusterError, ClusterSettings, DrainSwitch, PartitionRunner};
use crate::config::{JobSettings, ObserversConfig};
use crate::dlq::PostgresDeadLetterQueue;
use crate::executor::Executor;
use crate::jobs::{JobWorker, PostgresJobQueue};
use crate::listener::{ListenerSettings, notification_fanout};
use crate::matcher::Matcher;

/// How often idle job workers look for work when no notification arrives.
const JOB_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often finished jobs past their retention are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_mins(10);

/// A node ready to run.
#[derive(Debug)]
pub struct Node {
    pool: PgPool,
    cluster: Cluster,
    wake: tokio::sync::watch::Sender<u64>,
    workers: Vec<JobWorker>,
    jobs: PostgresJobQueue,
    job_settings: JobSettings,
}

impl Node {
    /// Migrates the database, builds the pipeline from `config`, and checks the partition count.
    ///
    /// # Errors
    /// Migrations or the HTTP client failed, or the partition count differs from the recorded one.
    pub async fn build(
        pool: PgPool,
        config: ObserversConfig,
        settings: ListenerSettings,
        cluster: ClusterSettings,
    ) -> anyhow::Result<Node> {
        crate::migrate::run(&pool).await?;
        let store: Arc<dyn CheckpointStore> = Arc::new(PostgresCheckpointStore::new(pool.clone()));
        let dead_letters = Arc::new(PostgresDeadLetterQueue::new(pool.clone()));
        let runner = ActionRunner::new(Arc::new(config.templates))?;
        let matcher = Arc::new(Matcher::new(config.observers));
        let executor = Executor::new(
            matcher.clone(),
            runner.clone(),
            dead_letters,
            &config.executor,
        )
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
        let (wake, woken) = tokio::sync::watch::channel(0_u64);
        let runner = PartitionRunner {
            pool: pool.clone(),
            store,
            executor,
            listener: settings,
            wake: woken,
        };
        let cluster = Cluster::new(pool.clone(), cluster, runner).await?;
        Ok(Node {
            pool,
            cluster,
            wake,
            workers,
            jobs,
            job_settings: config.jobs,
        })
    }

    /// The switch that drains (gives back every lease) and resumes this node.
    #[must_use]
    pub fn drain_switch(&self) -> DrainSwitch {
        self.cluster.drain_switch()
    }

    /// Leads partitions and works jobs until `shutdown` is cancelled; pages in progress are
    /// finished and checkpointed and the leases given back, jobs in progress are finished,
    /// claimed-but-unstarted ones released.
    ///
    /// # Errors
    /// The cluster supervisor met a fatal condition (transaction-mode pooler, duplicate node id).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ClusterError> {
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
        tasks.spawn(notification_fanout(
            self.pool,
            self.wake,
            stop_workers.clone(),
        ));
        tasks.close();
        let result = self.cluster.run(shutdown.clone()).await;
        // The supervisor may also stop on its own (fatal): stop the workers either way.
        stop_workers.cancel();
        tasks.wait().await;
        result
    }
}
