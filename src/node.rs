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

use crate::actions::ActionRunner;
use crate::breaker::{BreakerPolicy, Breakers, InMemoryBreakerStore};
use crate::cache::{Cache, CacheBackend, InMemoryCache};
use crate::checkpoint::{CheckpointStore, PostgresCheckpointStore};
use crate::cluster::{Cluster, ClusterError, ClusterHandle, ClusterSettings, PartitionRunner};
use crate::control::Control;
use crate::coordinator::CoordinatorSettings;
use crate::dedup::Deduplication;
use crate::dedup::{DeduplicationStore, InMemoryDeduplicationStore, Unavailable};
use crate::dlq::PostgresDeadLetterQueue;
use crate::executor::Executor;
use crate::grpc::GrpcEndpoint;
use crate::jobs::PostgresJobQueue;
use crate::limits::{InMemoryLimitStore, LimitStore};
use crate::listener::{ListenerSettings, notification_fanout};
use crate::matcher::Matcher;
use crate::metrics::Metrics;
use crate::observers::ObserversConfig;
use crate::worker::JobWorker;

/// How often idle job workers look for work when no notification arrives.
const JOB_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The node's job workers: as many per queue as configured, leaving the rescue of expired
/// claims to the coordinator.
fn job_workers(
    settings: &crate::config::JobSettings,
    jobs: &PostgresJobQueue,
    runner: &ActionRunner,
    matcher: &Arc<Matcher>,
    metrics: &Arc<Metrics>,
    dedup: &Deduplication,
) -> impl Iterator<Item = JobWorker> {
    settings
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
            .with_metrics(metrics.clone())
            .with_deduplication(dedup.clone())
            .without_rescue()
        })
}

/// State the nodes share (through Redis, or in process on one node): deduplication claims and
/// circuit breakers.
#[derive(Clone, Debug)]
pub struct SharedState {
    /// Where side effects are claimed.
    pub dedup_store: Arc<dyn DeduplicationStore>,
    /// How long a completed action is remembered.
    pub dedup_window: Duration,
    pub dedup_unavailable: Unavailable,
    /// Circuit breakers per HTTP endpoint.
    pub breakers: Breakers,
    /// Where endpoint rate and in-flight limits are counted.
    pub limits: Arc<dyn LimitStore>,
    /// Where `cache: {ttl}` actions keep results, and the key prefix there.
    pub cache: Arc<dyn CacheBackend>,
    pub cache_prefix: String,
    /// The node's Redis connection (`REDIS_URL`), which `cache` actions remove keys through.
    pub redis: Option<crate::redis_client::SharedConnection>,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            dedup_store: Arc::new(InMemoryDeduplicationStore::default()),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            dedup_unavailable: Unavailable::Process,
            breakers: Breakers::new(
                Arc::new(InMemoryBreakerStore::default()),
                BreakerPolicy::default(),
            ),
            limits: Arc::new(InMemoryLimitStore::default()),
            cache: Arc::new(InMemoryCache::default()),
            cache_prefix: String::new(),
            redis: None,
        }
    }
}

/// The search-backend export of the history (`history: {backend: search}`) when history is
/// recorded, and where the history goes, for `status` (`None`: history off).
fn history_export(
    pool: &PgPool,
    config: &ObserversConfig,
    record_history: bool,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(
    Option<crate::history_export::HistoryExporter>,
    Option<&'static str>,
)> {
    if !record_history {
        return Ok((None, None));
    }
    Ok(match &config.history_search {
        Some(search) => (
            Some(crate::history_export::HistoryExporter::new(
                pool.clone(),
                search.clone(),
                Some(metrics.clone()),
            )?),
            Some("postgres+search"),
        ),
        None => (None, Some("postgres")),
    })
}

/// The deduplication gate of the node `node_id`: claims leased to end before the cluster
/// declares a killed node dead, and taken over at once when their holder is no longer live.
fn deduplication(
    shared: &SharedState,
    metrics: &Arc<Metrics>,
    cluster: &ClusterSettings,
    pool: &PgPool,
    node_id: &str,
) -> Deduplication {
    Deduplication {
        store: shared.dedup_store.clone(),
        window: shared.dedup_window,
        when_unavailable: shared.dedup_unavailable,
        metrics: Some(metrics.clone()),
        claim_lease: crate::dedup::claim_lease_for(cluster.node_timeout),
        holder: node_id.to_owned(),
        liveness: Some(Arc::new(crate::dedup::LiveMembers::new(
            pool.clone(),
            node_id,
        ))),
    }
}

/// The node's one change-log reader, shared by the partitions it leads.
fn node_reader(
    pool: &PgPool,
    cluster: &ClusterSettings,
    settings: &ListenerSettings,
) -> (crate::listener::NodeReader, crate::listener::ReaderTask) {
    crate::listener::NodeReader::new(
        pool.clone(),
        crate::listener::ReaderSettings {
            partition_count: i32::try_from(cluster.partitions.max(1)).unwrap_or(i32::MAX),
            max_row_bytes: settings.max_row_bytes,
            max_page_bytes: settings.max_page_bytes,
        },
    )
}

/// The node's breakers: counted in its metrics, and making the work parked on a circuit due as
/// soon as the endpoint answers again.
fn node_breakers(breakers: &Breakers, metrics: &Arc<Metrics>, jobs: &PostgresJobQueue) -> Breakers {
    breakers
        .clone()
        .with_metrics(metrics.clone())
        .with_parked_jobs(jobs.clone())
}

/// How long completed actions are remembered by default.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_mins(10);

/// Where a node serves its control plane and HTTP endpoints (bound by the caller, so a test can
/// use port 0 and learn the port).
#[derive(Debug, Default)]
pub struct Endpoints {
    pub grpc: Option<GrpcEndpoint>,
    pub http: Option<tokio::net::TcpListener>,
}

/// A node ready to run.
#[derive(Debug)]
pub struct Node {
    pool: PgPool,
    metrics: Arc<Metrics>,
    control: Control,
    endpoints: Endpoints,
    cluster: Cluster,
    wakes: crate::listener::PartitionWakes,
    reader: crate::listener::ReaderTask,
    workers: Vec<JobWorker>,
    /// How often the database-read gauges of `/metrics` are refreshed (with an HTTP endpoint).
    gauge_refresh_interval: Duration,
    /// The coordinator's duties, run while this node holds the role.
    coordinator: CoordinatorSettings,
    /// The copy of the history to a search backend (`history: {backend: search}`).
    history_export: Option<crate::history_export::HistoryExporter>,
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
        Node::build_with_shared_state(pool, config, settings, cluster, SharedState::default()).await
    }

    /// [`Node::build`] with the shared state to use (Redis from `run`).
    ///
    /// # Errors
    /// As [`Node::build`].
    pub async fn build_with_shared_state(
        pool: PgPool,
        config: ObserversConfig,
        settings: ListenerSettings,
        cluster: ClusterSettings,
        shared: SharedState,
    ) -> anyhow::Result<Node> {
        crate::migrate::run(&pool).await?;
        // History is written unless the observers file or the node's settings turn it off.
        let settings = ListenerSettings {
            record_history: settings.record_history && config.history,
            // This node's own budget, of the size the settings give: never shared with another
            // node built from the same settings.
            row_budget: crate::listener::RowBudget::new(settings.row_budget.rows()),
            ..settings
        };
        let metrics = Arc::new(Metrics::new());
        let (history_export, history_backend) =
            history_export(&pool, &config, settings.record_history, &metrics)?;
        let dedup = deduplication(&shared, &metrics, &cluster, &pool, &settings.node_id);
        let store: Arc<dyn CheckpointStore> =
            Arc::new(PostgresCheckpointStore::with_group_commit(pool.clone()));
        let dead_letters = Arc::new(PostgresDeadLetterQueue::new(pool.clone()));
        let limiter = crate::concurrency::EndpointLimiter::new(
            crate::concurrency::LimiterSettings::of(&config.executor),
            Some(metrics.clone()),
        );
        let jobs = PostgresJobQueue::new(
            pool.clone(),
            settings.node_id.clone(),
            config.jobs.visibility_timeout,
        );
        let mut runner = ActionRunner::new(Arc::new(config.templates))?
            .with_private_targets_allowed(&config.executor.private_targets_allowed)?
            .with_limiter(limiter)
            .with_database(pool.clone())
            .with_breakers(node_breakers(&shared.breakers, &metrics, &jobs))
            .with_limits(shared.limits.clone())
            .with_cache(Cache {
                backend: shared.cache.clone(),
                prefix: shared.cache_prefix.clone(),
                metrics: Some(metrics.clone()),
            });
        if let Some(connection) = shared.redis.clone() {
            runner = runner.with_redis(connection);
        }
        let observer_count = config.observers.len();
        let matcher = Arc::new(Matcher::new(config.observers));
        let executor = Executor::new(
            matcher.clone(),
            runner.clone(),
            dead_letters,
            &config.executor,
        )
        .with_job_routing()
        .with_deduplication(dedup.clone());
        let history_node = settings.record_history.then_some(settings.node_id.as_str());
        let workers = job_workers(&config.jobs, &jobs, &runner, &matcher, &metrics, &dedup)
            .map(|worker| worker.with_history_of(history_node))
            .collect();
        let wakes = crate::listener::PartitionWakes::new(cluster.partitions);
        let (node_reader, reader) = node_reader(&pool, &cluster, &settings);
        let runner = PartitionRunner {
            pool: pool.clone(),
            store,
            executor,
            listener: settings,
            wakes: wakes.clone(),
            reader: node_reader,
            metrics: metrics.clone(),
        };
        let stuck_after = (cluster.node_timeout * 3).max(Duration::from_secs(30));
        let partitions = cluster.partitions;
        let coordinator = CoordinatorSettings::defaults(
            config.jobs.retention,
            i32::try_from(partitions.max(1)).unwrap_or(i32::MAX),
            cluster.node_timeout,
        );
        let node_id = runner.listener.node_id.clone();
        let cluster = Cluster::new(pool.clone(), cluster, runner, metrics.clone()).await?;
        let control = Control::new(
            pool.clone(),
            node_id,
            partitions,
            cluster.handle(),
            metrics.clone(),
            jobs.clone(),
            stuck_after,
        )
        .with_observer_count(observer_count)
        .with_history_backend(history_backend);
        Ok(Node {
            pool,
            metrics,
            control,
            endpoints: Endpoints::default(),
            cluster,
            wakes,
            reader,
            workers,
            gauge_refresh_interval: crate::control::DEFAULT_GAUGE_REFRESH_INTERVAL,
            coordinator,
            history_export,
        })
    }

    /// Retention of dead letters and of delivered change-log rows (both off unless given), run
    /// by the coordinator.
    #[must_use]
    pub fn with_retention(
        mut self,
        dead_letters: Option<Duration>,
        change_log: Option<Duration>,
    ) -> Node {
        self.coordinator.dead_letter_retention = dead_letters;
        self.coordinator.change_log_retention = change_log;
        self
    }

    /// How long the history is kept (whole day partitions are dropped past it), run by the
    /// coordinator.
    #[must_use]
    pub fn with_history_retention(mut self, retention: Duration) -> Node {
        self.coordinator.history_retention = retention;
        self
    }

    /// How often the coordinator rescues expired job claims and runs retention.
    #[must_use]
    pub fn with_coordinator_intervals(mut self, rescue: Duration, retention: Duration) -> Node {
        self.coordinator.rescue_every = rescue;
        self.coordinator.retention_every = retention;
        self
    }

    /// What the control plane sees and steers: drain/resume, the partitions led.
    #[must_use]
    pub fn handle(&self) -> ClusterHandle {
        self.cluster.handle()
    }

    /// The control façade (status, cluster status, hand-over, drain).
    #[must_use]
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Serves the gRPC control plane and the HTTP endpoints on these listeners while running.
    #[must_use]
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> Node {
        self.endpoints = endpoints;
        self
    }

    /// Refreshes the database-read gauges of `/metrics` this often (default
    /// [`DEFAULT_GAUGE_REFRESH_INTERVAL`](crate::control::DEFAULT_GAUGE_REFRESH_INTERVAL)).
    #[must_use]
    pub fn with_gauge_refresh_interval(mut self, interval: Duration) -> Node {
        self.gauge_refresh_interval = interval;
        self
    }

    /// This node's metrics.
    #[must_use]
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Leads partitions and works jobs until `shutdown` is cancelled; pages in progress are
    /// finished and checkpointed and the leases given back, jobs in progress are finished,
    /// claimed-but-unstarted ones released.
    ///
    /// # Errors
    /// The cluster supervisor met a fatal condition (transaction-mode pooler, duplicate node id).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ClusterError> {
        // A JoinSet: dropping this future (a killed node in a test) aborts every task with it.
        let mut tasks = tokio::task::JoinSet::new();
        let stop_workers = shutdown.child_token();
        for worker in self.workers {
            tasks.spawn(worker.run(stop_workers.clone()));
        }
        tasks.spawn(crate::coordinator::run_duties(
            self.pool.clone(),
            self.cluster.handle(),
            self.coordinator,
            self.metrics.clone(),
            stop_workers.clone(),
        ));
        if let Some(endpoint) = self.endpoints.grpc {
            let (control, stop) = (self.control.clone(), stop_workers.clone());
            tasks.spawn(async move {
                if let Err(error) = crate::grpc::serve(endpoint, control, stop).await {
                    tracing::error!(%error, "the gRPC control plane stopped");
                }
            });
        }
        if let Some(listener) = self.endpoints.http {
            let (control, stop) = (self.control.clone(), stop_workers.clone());
            let interval = self.gauge_refresh_interval;
            tasks.spawn(async move { control.refresh_gauges_every(interval, stop).await });
            let (control, stop) = (self.control.clone(), stop_workers.clone());
            tasks.spawn(async move {
                if let Err(error) = crate::http::serve(listener, control, stop).await {
                    tracing::error!(%error, "the HTTP endpoints stopped");
                }
            });
        }
        if let Some(exporter) = self.history_export {
            tasks.spawn(exporter.run(stop_workers.clone()));
        }
        tasks.spawn(notification_fanout(
            self.pool,
            self.wakes,
            stop_workers.clone(),
        ));
        // The reader outlives the listeners, whose last pages it may still be reading.
        let stop_reader = CancellationToken::new();
        tasks.spawn(self.reader.run(stop_reader.clone()));
        let result = self.cluster.run(shutdown.clone()).await;
        stop_reader.cancel();
        // The supervisor may also stop on its own (fatal): stop the workers either way.
        stop_workers.cancel();
        while tasks.join_next().await.is_some() {}
        result
    }
}
