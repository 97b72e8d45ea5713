//! The control façade: what the gRPC control plane, the HTTP endpoints and the CLI ask of a
//! node — its status, the cluster's status (from the shared database), hand-over of a partition
//! to a named node, drain and resume, readiness and liveness. Plain types; only `grpc` knows
//! tonic.
//!
//! The gauges of `/metrics` that are read from the database are refreshed by one background task
//! at a bounded interval ([`Control::refresh_gauges_every`]); a scrape renders what that task last
//! read and runs no query, so however often `/metrics` is scraped, the database sees one read-only
//! transaction per interval, under a statement timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{PgPool, Postgres, Row};
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterHandle, LEASE_NAMESPACE};
use crate::jobs::{PostgresJobQueue, QueueStats};
use crate::metrics::{Metrics, OutcomeLabel, PartitionLabel, QueueLabels};

/// Backlog counts stop here, so a status call stays cheap on a huge backlog.
pub const BACKLOG_CAP: i64 = 1_000_000;
/// Dead-letter counts stop here (cluster status, `/metrics`): a flood of dead letters costs a
/// bounded read. A count at the cap means "at least this many".
pub const DEAD_LETTER_COUNT_CAP: i64 = 100_000;
/// How often the database-read gauges of `/metrics` are refreshed by default.
pub const DEFAULT_GAUGE_REFRESH_INTERVAL: Duration = Duration::from_secs(15);
/// The server cancels a gauge refresh's statement after this (`statement_timeout`).
pub const GAUGE_REFRESH_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a hand-over waits for the target by default.
pub const DEFAULT_HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PartitionState {
    pub partition: u32,
    /// The node whose lease session holds the partition's lock now, if any.
    pub leader: Option<String>,
    pub epoch: i64,
    /// Snapshot, and inside a batch the batch's end and position.
    pub checkpoint: String,
    pub backlog: u64,
    pub checkpoint_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Counters {
    pub events_processed: u64,
    pub actions_succeeded: u64,
    pub actions_failed: u64,
    pub actions_enqueued: u64,
    pub epoch_changes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub draining: bool,
    pub partition_count: u32,
    pub leases: Vec<PartitionState>,
    pub counters: Counters,
    pub queues: Vec<QueueStats>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeState {
    pub node_id: String,
    pub version: String,
    pub draining: bool,
    pub heartbeat_age_seconds: f64,
    pub uptime_seconds: u64,
    pub partitions: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterState {
    pub partition_count: u32,
    pub nodes: Vec<NodeState>,
    pub partitions: Vec<PartitionState>,
    /// Counted up to [`DEAD_LETTER_COUNT_CAP`].
    pub dead_letters: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HandOver {
    pub previous_leader: Option<String>,
    pub leader: String,
    pub epoch: i64,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Timeout(String),
    #[error("control storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("job queue statistics failed: {0}")]
    Jobs(#[from] crate::jobs::JobError),
}

/// One node's control façade.
#[derive(Clone, Debug)]
pub struct Control {
    pool: PgPool,
    node_id: String,
    partitions: u32,
    started: Instant,
    handle: ClusterHandle,
    metrics: Arc<Metrics>,
    jobs: PostgresJobQueue,
    /// A supervisor tick older than this means the node's loops are stuck.
    stuck_after: Duration,
    /// Every partition as the last gauge refresh read it; a scrape shows those this node leads
    /// at that moment. The lock also keeps concurrent scrapes from interleaving.
    partition_gauges: Arc<Mutex<Vec<PartitionState>>>,
}

impl Control {
    #[must_use]
    #[allow(clippy::too_many_arguments, reason = "wired once, by Node")]
    pub fn new(
        pool: PgPool,
        node_id: String,
        partitions: u32,
        handle: ClusterHandle,
        metrics: Arc<Metrics>,
        jobs: PostgresJobQueue,
        stuck_after: Duration,
    ) -> Control {
        Control {
            pool,
            node_id,
            partitions,
            started: Instant::now(),
            handle,
            metrics,
            jobs,
            stuck_after,
            partition_gauges: Arc::default(),
        }
    }

    #[must_use]
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This node: identity, the partitions it leads, counters, queues.
    ///
    /// # Errors
    /// The database could not be read.
    pub async fn status(&self) -> Result<NodeStatus, ControlError> {
        let leading = self.handle.leading();
        let leases = partition_states(&self.pool, self.partitions)
            .await?
            .into_iter()
            .filter(|state| leading.contains(&i32::try_from(state.partition).unwrap_or(-1)))
            .collect();
        let (actions_succeeded, actions_failed, actions_enqueued) = self.metrics.action_totals();
        Ok(NodeStatus {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            draining: self.handle.is_draining(),
            partition_count: self.partitions,
            leases,
            counters: Counters {
                events_processed: self.metrics.events_processed.get(),
                actions_succeeded,
                actions_failed,
                actions_enqueued,
                epoch_changes: self.metrics.epoch_changes.get(),
            },
            queues: self.jobs.stats().await?,
        })
    }

    /// Every live node and every partition, from the database.
    ///
    /// # Errors
    /// The database could not be read.
    pub async fn cluster_status(&self) -> Result<ClusterState, ControlError> {
        let partitions = partition_states(&self.pool, self.partitions).await?;
        let rows = sqlx::query(
            "SELECT node_id, version, draining,
                    extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age,
                    extract(epoch FROM now() - started_at)::float8 AS uptime
               FROM fraiseql_observers.nodes AS node
              WHERE EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                             WHERE activity.pid = node.lease_pid AND activity.backend_start = node.lease_started)
              ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut nodes = Vec::with_capacity(rows.len());
        for row in rows {
            let node_id: String = row.try_get("node_id")?;
            let uptime: f64 = row.try_get("uptime")?;
            nodes.push(NodeState {
                partitions: partitions
                    .iter()
                    .filter(|state| state.leader.as_deref() == Some(node_id.as_str()))
                    .map(|state| state.partition)
                    .collect(),
                node_id,
                version: row.try_get("version")?,
                draining: row.try_get("draining")?,
                heartbeat_age_seconds: row.try_get("heartbeat_age")?,
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "seconds of uptime"
                )]
                uptime_seconds: uptime.max(0.0) as u64,
            });
        }
        let dead_letters = count_dead_letters(&self.pool).await?;
        Ok(ClusterState {
            partition_count: self.partitions,
            nodes,
            partitions,
            dead_letters,
        })
    }

    /// Moves `partition` to `target`: the leader finishes its page, saves the checkpoint and
    /// lets go; the target takes it. Returns once the target leads it (new epoch).
    ///
    /// # Errors
    /// The partition or the target is unknown, the target did not take over in time, or
    /// storage failed.
    pub async fn hand_over(
        &self,
        partition: u32,
        target: &str,
        timeout: Duration,
    ) -> Result<HandOver, ControlError> {
        if partition >= self.partitions {
            return Err(ControlError::InvalidArgument(format!(
                "partition {partition} does not exist: the change log has {} partitions (0–{})",
                self.partitions,
                self.partitions - 1
            )));
        }
        let live: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM fraiseql_observers.nodes AS node
                             JOIN pg_stat_activity AS activity
                               ON activity.pid = node.lease_pid AND activity.backend_start = node.lease_started
                            WHERE node.node_id = $1 AND NOT node.draining)",
        )
        .bind(target)
        .fetch_one(&self.pool)
        .await?;
        if !live {
            return Err(ControlError::NotFound(format!(
                "node {target:?} is not a live, non-draining member of the cluster"
            )));
        }
        let started = Instant::now();
        let before = self.partition_state(partition).await?;
        if before.leader.as_deref() == Some(target) {
            return Ok(HandOver {
                previous_leader: before.leader.clone(),
                leader: target.to_owned(),
                epoch: before.epoch,
                took: started.elapsed(),
            });
        }
        let partition_id = i32::try_from(partition).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO fraiseql_observers.partitions (partition, handover_to, handover_requested_at)
             VALUES ($1, $2, now())
             ON CONFLICT (partition) DO UPDATE SET handover_to = excluded.handover_to,
                                                   handover_requested_at = excluded.handover_requested_at",
        )
        .bind(partition_id)
        .bind(target)
        .execute(&self.pool)
        .await?;
        let deadline = started + timeout;
        loop {
            let now = self.partition_state(partition).await?;
            if now.leader.as_deref() == Some(target) && now.epoch > before.epoch {
                return Ok(HandOver {
                    previous_leader: before.leader,
                    leader: target.to_owned(),
                    epoch: now.epoch,
                    took: started.elapsed(),
                });
            }
            if Instant::now() >= deadline {
                sqlx::query(
                    "UPDATE fraiseql_observers.partitions SET handover_to = NULL, handover_requested_at = NULL
                      WHERE partition = $1 AND handover_to = $2",
                )
                .bind(partition_id)
                .bind(target)
                .execute(&self.pool)
                .await?;
                return Err(ControlError::Timeout(format!(
                    "node {target:?} did not take partition {partition} within {}; the request was withdrawn",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn partition_state(&self, partition: u32) -> Result<PartitionState, ControlError> {
        partition_states(&self.pool, self.partitions)
            .await?
            .into_iter()
            .find(|state| state.partition == partition)
            .ok_or_else(|| ControlError::NotFound(format!("partition {partition} not found")))
    }

    /// Drains (`true`) or resumes (`false`) this node, or — named — another live node, which
    /// applies it on its next tick. Whether the node will be draining.
    ///
    /// # Errors
    /// The named node is not a live member, or storage failed.
    pub async fn set_draining(
        &self,
        node: Option<&str>,
        drain: bool,
    ) -> Result<bool, ControlError> {
        match node.filter(|node| !node.is_empty() && *node != self.node_id) {
            None => {
                if drain {
                    self.handle.drain();
                } else {
                    self.handle.resume();
                }
            }
            Some(node) => {
                let asked = sqlx::query(
                    "UPDATE fraiseql_observers.nodes AS node SET drain_request = $2
                      WHERE node_id = $1
                        AND EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                                     WHERE activity.pid = node.lease_pid
                                       AND activity.backend_start = node.lease_started)",
                )
                .bind(node)
                .bind(drain)
                .execute(&self.pool)
                .await?;
                if asked.rows_affected() == 0 {
                    return Err(ControlError::NotFound(format!(
                        "node {node:?} is not a live member of the cluster"
                    )));
                }
            }
        }
        Ok(drain)
    }

    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.handle.is_draining()
    }

    /// Live: the supervisor ticked recently. `Err` names what is stuck.
    ///
    /// # Errors
    /// The lease supervisor has not ticked within the allowed time.
    pub fn live(&self) -> Result<(), String> {
        match self.handle.last_tick() {
            Some(tick) if tick.elapsed() > self.stuck_after => Err(format!(
                "the lease supervisor last ticked {:.1} s ago",
                tick.elapsed().as_secs_f64()
            )),
            None if self.started.elapsed() > self.stuck_after => {
                Err("the lease supervisor has not ticked since start".to_owned())
            }
            _ => Ok(()),
        }
    }

    /// Ready: connected (the schema was migrated before the node started) and not draining.
    ///
    /// # Errors
    /// What keeps the node from being ready.
    pub async fn ready(&self) -> Result<(), String> {
        if self.handle.is_draining() {
            return Err("draining".to_owned());
        }
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|error| format!("database unreachable: {error}"))?;
        Ok(())
    }

    /// Reads the gauges that come from the database — every partition's backlog and checkpoint
    /// age, dead letters, job depths — in one read-only transaction under
    /// [`GAUGE_REFRESH_STATEMENT_TIMEOUT`], and keeps them for [`Control::render_metrics`].
    /// Counted in `database_gauge_refreshes_total` by outcome; a failed refresh keeps the values
    /// read before.
    ///
    /// # Errors
    /// The database could not be read in time.
    pub async fn refresh_gauges(&self) -> Result<(), ControlError> {
        let read = self.read_gauges().await;
        self.metrics
            .gauge_refreshes
            .get_or_create(&OutcomeLabel {
                outcome: if read.is_ok() { "succeeded" } else { "failed" }.to_owned(),
            })
            .inc();
        let (states, dead_letters, depths) = read?;
        let mut partition_gauges = self
            .partition_gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *partition_gauges = states;
        self.metrics.dead_letters.set(dead_letters);
        self.metrics.jobs.clear();
        for (queue, status, count) in depths {
            self.metrics
                .jobs
                .get_or_create(&QueueLabels { queue, status })
                .set(count);
        }
        Ok(())
    }

    async fn read_gauges(
        &self,
    ) -> Result<(Vec<PartitionState>, i64, Vec<(String, String, i64)>), ControlError> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(GAUGE_REFRESH_STATEMENT_TIMEOUT.as_millis().to_string())
            .execute(&mut *transaction)
            .await?;
        let states = partition_states(&mut *transaction, self.partitions).await?;
        let dead_letters = count_dead_letters(&mut *transaction).await?;
        let depths = sqlx::query_as(
            "SELECT queue, status, count(*) FROM fraiseql_observers.jobs
              WHERE status IN ('pending', 'running', 'failed')
              GROUP BY queue, status ORDER BY queue, status",
        )
        .fetch_all(&mut *transaction)
        .await?;
        transaction.rollback().await?;
        Ok((states, dead_letters, depths))
    }

    /// Refreshes the database-read gauges now and then every `interval` until `shutdown`; a
    /// failed refresh is logged and tried again at the next interval.
    pub async fn refresh_gauges_every(&self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.refresh_gauges().await {
                tracing::warn!(%error, "refreshing the database-read metrics failed; /metrics shows the previous values");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Renders every metric, the database-read gauges as the last refresh left them (per
    /// partition: those this node leads now). Runs no query.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let leading = self.handle.leading();
        let partition_gauges = self
            .partition_gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.metrics.partition_backlog.clear();
        self.metrics.partition_checkpoint_age.clear();
        for state in partition_gauges.iter() {
            if !leading.contains(&i32::try_from(state.partition).unwrap_or(-1)) {
                continue;
            }
            let label = PartitionLabel {
                partition: state.partition,
            };
            self.metrics
                .partition_backlog
                .get_or_create(&label)
                .set(i64::try_from(state.backlog).unwrap_or(i64::MAX));
            if let Some(age) = state.checkpoint_age_seconds {
                self.metrics
                    .partition_checkpoint_age
                    .get_or_create(&label)
                    .set(age);
            }
        }
        self.metrics.render()
    }
}

/// Dead letters, counted up to [`DEAD_LETTER_COUNT_CAP`].
async fn count_dead_letters<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
) -> Result<i64, ControlError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM fraiseql_observers.dead_letters LIMIT $1) AS letters",
    )
    .bind(DEAD_LETTER_COUNT_CAP)
    .fetch_one(executor)
    .await?)
}

/// Every partition: its current lock holder, epoch, checkpoint and backlog (capped at
/// [`BACKLOG_CAP`]).
async fn partition_states<'connection>(
    executor: impl sqlx::Executor<'connection, Database = Postgres>,
    partitions: u32,
) -> Result<Vec<PartitionState>, ControlError> {
    let rows = sqlx::query(
        "WITH locks AS (
             SELECT objid::bigint AS partition, pid FROM pg_locks
              WHERE locktype = 'advisory' AND classid = $2::bigint::oid AND objsubid = 2 AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
         SELECT p.partition, node.node_id AS leader, coalesce(part.epoch, 0) AS epoch,
                coalesce(part.snapshot::text, '(start of the log)')
                    || CASE WHEN part.batch_upto IS NULL THEN ''
                            ELSE ' (batch to ' || part.batch_upto::text || ' at row '
                                 || coalesce(part.batch_position::text, '-') || ')' END AS checkpoint,
                extract(epoch FROM now() - part.updated_at)::float8 AS age,
                (SELECT count(*) FROM (
                     SELECT 1 FROM core.tb_entity_change_log AS log
                      WHERE log.txid IS NOT NULL
                        AND log.entity_hash % $1 = p.partition
                        AND (part.snapshot IS NULL
                             OR (log.txid >= pg_snapshot_xmin(part.snapshot)
                                 AND NOT pg_visible_in_snapshot(log.txid, part.snapshot)))
                      LIMIT $3) AS pending) AS backlog
           FROM generate_series(0, $1 - 1) AS p (partition)
           LEFT JOIN fraiseql_observers.partitions AS part ON part.partition = p.partition
           LEFT JOIN locks ON locks.partition = p.partition
           LEFT JOIN fraiseql_observers.nodes AS node ON node.lease_pid = locks.pid
          ORDER BY p.partition",
    )
    .bind(i32::try_from(partitions).unwrap_or(i32::MAX))
    .bind(i64::from(LEASE_NAMESPACE))
    .bind(BACKLOG_CAP)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PartitionState {
                partition: u32::try_from(row.try_get::<i32, _>("partition")?).unwrap_or(0),
                leader: row.try_get("leader")?,
                epoch: row.try_get("epoch")?,
                checkpoint: row.try_get("checkpoint")?,
                backlog: u64::try_from(row.try_get::<i64, _>("backlog")?).unwrap_or(0),
                checkpoint_age_seconds: row.try_get("age")?,
            })
        })
        .collect()
}
