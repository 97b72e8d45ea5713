//! The control façade: what the gRPC control plane, the HTTP endpoints and the CLI ask of a
//! node — its status, the cluster's status (from the shared database), hand-over of a partition
//! to a named node, drain and resume, readiness and liveness. Plain types; only `grpc` knows
//! tonic.
//!
//! The gauges of `/metrics` that are read from the database are refreshed by one background task
//! at a bounded interval ([`Control::refresh_gauges_every`]); a scrape renders what that task last
//! read and runs no query, so however often `/metrics` is scraped, the database sees one read-only
//! transaction per interval, under a statement timeout.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::change_log::{self, ChangeLogError};
use crate::checkpoint::{self, CheckpointError};
use crate::cluster::ClusterHandle;
use crate::database::{self, DatabaseError};
use crate::dlq::{DeadLetterError, count_dead_letters_up_to};
use crate::jobs::{PostgresJobQueue, QueueStats};
use crate::membership::{self, MembershipError};
use crate::metrics::{Metrics, OutcomeLabel, PartitionLabel, QueueLabel, QueueLabels, Rates};
use crate::metrics_text::EndpointFigures;

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
    /// Where the partition's checkpoint stands, in words (see `describe_snapshot`).
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
    pub figures: NodeFigures,
}

/// The figures of `status` beyond the counters: rates, latency, the dead-letter queue, the
/// Redis-backed stores and every HTTP endpoint's limit — all read from this node's metrics and
/// the database at the moment of the call, and the audit trail's rows this node wrote.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct NodeFigures {
    /// Observers in the configuration this node runs.
    pub observers: u32,
    /// Events and actions per second over the last minute; `None` in the node's first seconds.
    pub rates: Option<Rates>,
    /// Upper bound of the histogram bucket holding the 99th percentile of action durations.
    pub action_duration_p99_seconds: Option<f64>,
    /// Dead letters waiting, cluster-wide, counted up to [`DEAD_LETTER_COUNT_CAP`].
    pub dead_letters: i64,
    /// Deduplication outcomes other than a plain acquire, by outcome.
    pub dedup: std::collections::BTreeMap<String, u64>,
    /// Action result cache operations, by outcome (`hit`, `miss`, …).
    pub cache: std::collections::BTreeMap<String, u64>,
    /// This node's adaptive concurrency limit per HTTP endpoint.
    pub endpoints: Vec<EndpointFigures>,
    /// The audit trail as this node writes it; `None` when history is off.
    pub history: Option<HistoryFigures>,
}

/// The audit trail's figures of one node (its own counts since it started).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HistoryFigures {
    /// `postgres`, or `postgres+search` (copied to a search backend).
    pub backend: String,
    /// Event rows written with this node's checkpoints.
    pub event_rows: u64,
    /// Job-outcome rows written by this node's workers.
    pub job_rows: u64,
    /// Job-outcome rows this node could not write.
    pub write_failures: u64,
    /// Documents this node exported to the search backend (only the node holding the export
    /// lock exports).
    pub exported: u64,
    /// Documents the search backend refused.
    pub dropped: u64,
    /// Rows waiting for the search backend, as the exporting node last saw them.
    pub waiting: i64,
    /// `_bulk` requests that failed as a whole.
    pub export_failures: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeState {
    pub node_id: String,
    pub version: String,
    pub draining: bool,
    pub heartbeat_age_seconds: f64,
    pub uptime_seconds: u64,
    pub partitions: Vec<u32>,
    /// Change-log rows behind the checkpoints of the partitions it leads.
    pub backlog: u64,
    /// The oldest checkpoint among the partitions it leads, seconds since written.
    pub oldest_checkpoint_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterState {
    pub partition_count: u32,
    pub nodes: Vec<NodeState>,
    pub partitions: Vec<PartitionState>,
    /// Counted up to [`DEAD_LETTER_COUNT_CAP`].
    pub dead_letters: i64,
    /// The node holding the coordinator role; `None` between a coordinator's death and the next
    /// taker's tick.
    pub coordinator: Option<CoordinatorState>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CoordinatorState {
    pub node_id: String,
    /// The fencing epoch it took the role with.
    pub epoch: i64,
    pub held_for_seconds: f64,
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
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Partitions(#[from] CheckpointError),
    #[error(transparent)]
    ChangeLog(#[from] ChangeLogError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error("job queue statistics failed: {0}")]
    Jobs(#[from] crate::jobs::JobError),
}

/// The gauges only the coordinator reads: dead letters, job depths and the oldest due job's age.
struct ClusterWideGauges {
    dead_letters: i64,
    depths: Vec<(String, String, i64)>,
    oldest_due: Vec<(String, f64)>,
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
    /// Observers in the configuration this node runs (for `status`).
    observers: u32,
    /// Where the history goes (`postgres`, `postgres+search`); `None`: history off.
    history_backend: Option<&'static str>,
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
            observers: 0,
            history_backend: None,
            stuck_after,
            partition_gauges: Arc::default(),
        }
    }

    /// The number of observers `status` reports.
    #[must_use]
    pub fn with_observer_count(mut self, observers: usize) -> Control {
        self.observers = u32::try_from(observers).unwrap_or(u32::MAX);
        self
    }

    /// Where this node's history goes (`postgres`, `postgres+search`), for `status`; `None`:
    /// history off (the default).
    #[must_use]
    pub fn with_history_backend(mut self, backend: Option<&'static str>) -> Control {
        self.history_backend = backend;
        self
    }

    fn history_figures(&self) -> Option<HistoryFigures> {
        let backend = self.history_backend?;
        let rows = |kind: &str| {
            self.metrics
                .history_rows
                .get_or_create(&crate::metrics::RecordKindLabel {
                    kind: kind.to_owned(),
                })
                .get()
        };
        let export = &self.metrics.history_export;
        let documents = |result: &str| {
            export
                .documents
                .get_or_create(&crate::metrics::ResultLabel {
                    result: result.to_owned(),
                })
                .get()
        };
        Some(HistoryFigures {
            backend: backend.to_owned(),
            event_rows: rows("event"),
            job_rows: rows("job"),
            write_failures: self.metrics.history_write_failures.get(),
            exported: documents("indexed"),
            dropped: documents("dropped"),
            waiting: export.waiting.get(),
            export_failures: export.failures.get(),
        })
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
        let mut connection = database::connection(&self.pool).await?;
        let leases = partition_states(&mut connection, self.partitions)
            .await?
            .into_iter()
            .filter(|state| leading.contains(&i32::try_from(state.partition).unwrap_or(-1)))
            .collect();
        let dead_letters =
            count_dead_letters_up_to(&mut *connection, DEAD_LETTER_COUNT_CAP).await?;
        let (actions_succeeded, actions_failed, actions_enqueued) = self.metrics.action_totals();
        self.metrics.sample_rates();
        // The node's own exposition, read back: one place decides what the labelled families
        // sum to, for `status` and for the `metrics` command alike.
        let summary = crate::metrics_text::parse(&self.metrics.render())
            .map(|samples| crate::metrics_text::summarize(&samples))
            .unwrap_or_default();
        let figures = NodeFigures {
            observers: self.observers,
            rates: self.metrics.rates(),
            action_duration_p99_seconds: summary.action_duration_p99_seconds,
            dead_letters,
            dedup: summary.dedup,
            cache: summary.cache,
            endpoints: summary.endpoints,
            history: self.history_figures(),
        };
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
            figures,
        })
    }

    /// The audit trail's rows matching `query`, newest first (`SearchEvents`).
    ///
    /// # Errors
    /// The history could not be read.
    pub async fn search_events(
        &self,
        query: &crate::history::HistoryQuery,
    ) -> Result<crate::history::HistoryPage, ControlError> {
        crate::history::search(&self.pool, query)
            .await
            .map_err(|error| ControlError::Database(DatabaseError::from(error)))
    }

    /// Every live node and every partition, from the database.
    ///
    /// # Errors
    /// The database could not be read.
    pub async fn cluster_status(&self) -> Result<ClusterState, ControlError> {
        let mut connection = database::connection(&self.pool).await?;
        let partitions = partition_states(&mut connection, self.partitions).await?;
        let nodes = membership::live_nodes(&self.pool)
            .await?
            .into_iter()
            .map(|node| {
                let led: Vec<&PartitionState> = partitions
                    .iter()
                    .filter(|state| state.leader.as_deref() == Some(node.node_id.as_str()))
                    .collect();
                NodeState {
                    partitions: led.iter().map(|state| state.partition).collect(),
                    backlog: led.iter().map(|state| state.backlog).sum(),
                    oldest_checkpoint_age_seconds: led
                        .iter()
                        .filter_map(|state| state.checkpoint_age_seconds)
                        .reduce(f64::max),
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "seconds of uptime"
                    )]
                    uptime_seconds: node.uptime_seconds.max(0.0) as u64,
                    node_id: node.node_id,
                    version: node.version,
                    draining: node.draining,
                    heartbeat_age_seconds: node.heartbeat_age_seconds,
                }
            })
            .collect();
        let dead_letters =
            count_dead_letters_up_to(&mut *connection, DEAD_LETTER_COUNT_CAP).await?;
        let coordinator = membership::coordinator(&self.pool)
            .await?
            .map(|row| CoordinatorState {
                node_id: row.node_id,
                epoch: row.epoch,
                held_for_seconds: row.held_for_seconds,
            });
        Ok(ClusterState {
            partition_count: self.partitions,
            nodes,
            partitions,
            dead_letters,
            coordinator,
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
        let live = membership::is_live_and_taking(&self.pool, target).await?;
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
        checkpoint::request_handover(&self.pool, partition_id, target).await?;
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
                checkpoint::clear_handover(&self.pool, partition_id, target).await?;
                return Err(ControlError::Timeout(format!(
                    "node {target:?} did not take partition {partition} within {}; the request was withdrawn",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn partition_state(&self, partition: u32) -> Result<PartitionState, ControlError> {
        let mut connection = database::connection(&self.pool).await?;
        partition_states(&mut connection, self.partitions)
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
                let asked = membership::request_drain(&self.pool, node, drain).await?;
                if !asked {
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
        database::ping(&self.pool)
            .await
            .map_err(|error| error.to_string())?;
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
        let (states, cluster_wide) = read?;
        let mut partition_gauges = self
            .partition_gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *partition_gauges = states;
        self.metrics.jobs.clear();
        self.metrics.catalog.oldest_due_job_age.clear();
        let Some(cluster_wide) = cluster_wide else {
            // Only the coordinator reads the cluster-wide gauges; the others show 0 and no
            // queue series (dashboards take the max across nodes).
            self.metrics.dead_letters.set(0);
            return Ok(());
        };
        self.metrics.dead_letters.set(cluster_wide.dead_letters);
        for (queue, status, count) in cluster_wide.depths {
            self.metrics
                .jobs
                .get_or_create(&QueueLabels { queue, status })
                .set(count);
        }
        for (queue, age) in cluster_wide.oldest_due {
            self.metrics
                .catalog
                .oldest_due_job_age
                .get_or_create(&QueueLabel { queue })
                .set(age);
        }
        Ok(())
    }

    async fn read_gauges(
        &self,
    ) -> Result<(Vec<PartitionState>, Option<ClusterWideGauges>), ControlError> {
        let mut transaction =
            database::bounded_read(&self.pool, GAUGE_REFRESH_STATEMENT_TIMEOUT).await?;
        let states = partition_states(&mut transaction, self.partitions).await?;
        let cluster_wide = if self.handle.coordinator_epoch().is_some() {
            Some(ClusterWideGauges {
                dead_letters: count_dead_letters_up_to(&mut *transaction, DEAD_LETTER_COUNT_CAP)
                    .await?,
                depths: crate::jobs::depths(&mut *transaction).await?,
                oldest_due: crate::jobs::oldest_due_ages(&mut *transaction).await?,
            })
        } else {
            None
        };
        database::end_read(transaction).await?;
        Ok((states, cluster_wide))
    }

    /// Refreshes the database-read gauges now and then every `interval` (and at once when this
    /// node takes or loses the coordinator role) until `shutdown`; a failed refresh is logged
    /// and tried again at the next interval.
    pub async fn refresh_gauges_every(&self, interval: Duration, shutdown: CancellationToken) {
        let role_check = interval.min(Duration::from_millis(500));
        loop {
            let role = self.handle.coordinator_epoch();
            if let Err(error) = self.refresh_gauges().await {
                tracing::warn!(%error, "refreshing the database-read metrics failed; /metrics shows the previous values");
            }
            let next = Instant::now() + interval;
            while Instant::now() < next && self.handle.coordinator_epoch() == role {
                self.metrics.sample_rates();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(role_check.min(next.saturating_duration_since(Instant::now()))) => {}
                }
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

/// A checkpoint's snapshot (`pg_snapshot` text, `xmin:xmax:xip,…`) in words: which writers'
/// changes are behind it. Text that is not a snapshot is shown as it is.
fn describe_snapshot(snapshot: &str) -> String {
    let mut parts = snapshot.splitn(3, ':');
    let (Some(_xmin), Some(xmax), Some(open)) = (parts.next(), parts.next(), parts.next()) else {
        return snapshot.to_owned();
    };
    if xmax.parse::<u64>().is_err() {
        return snapshot.to_owned();
    }
    let open: Vec<&str> = open.split(',').filter(|xid| !xid.is_empty()).collect();
    match open.as_slice() {
        [] => format!("after every transaction before {xmax}"),
        [one] => format!("after every transaction before {xmax} but {one}, still open then"),
        many => format!(
            "after every transaction before {xmax} but {} still open then ({}{})",
            many.len(),
            many.iter().take(3).copied().collect::<Vec<_>>().join(", "),
            if many.len() > 3 { ", …" } else { "" }
        ),
    }
}

/// Every partition: its current lock holder, epoch, checkpoint and backlog (capped at
/// [`BACKLOG_CAP`]), from the partitions' store, the lease locks and the change log.
async fn partition_states(
    connection: &mut sqlx::PgConnection,
    partitions: u32,
) -> Result<Vec<PartitionState>, ControlError> {
    let count = i32::try_from(partitions).unwrap_or(i32::MAX);
    let rows = checkpoint::partition_rows(&mut *connection, count).await?;
    let holders = membership::lock_holders(&mut *connection).await?;
    let mut states = Vec::with_capacity(rows.len());
    for row in rows {
        let backlog = change_log::backlog(
            &mut *connection,
            row.partition,
            count,
            row.snapshot.as_deref(),
            BACKLOG_CAP,
        )
        .await?;
        let mut checkpoint = row
            .snapshot
            .as_deref()
            .map_or_else(|| "at the start of the log".to_owned(), describe_snapshot);
        if let Some((upto, position)) = &row.batch {
            let _ = write!(
                checkpoint,
                "; inside a batch up to {}",
                describe_snapshot(upto).trim_start_matches("after ")
            );
            if let Some(position) = position {
                let _ = write!(checkpoint, ", after change-log row {position}");
            }
        }
        states.push(PartitionState {
            partition: u32::try_from(row.partition).unwrap_or(0),
            leader: holders.get(&row.partition).cloned(),
            epoch: row.epoch,
            checkpoint,
            backlog,
            checkpoint_age_seconds: row.age_seconds,
        });
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::describe_snapshot;

    #[test]
    fn a_checkpoint_snapshot_is_described_in_words() {
        assert_eq!(
            describe_snapshot("15239:15239:"),
            "after every transaction before 15239"
        );
        assert_eq!(
            describe_snapshot("100:105:101"),
            "after every transaction before 105 but 101, still open then"
        );
        assert_eq!(
            describe_snapshot("100:110:101,102,103,104"),
            "after every transaction before 110 but 4 still open then (101, 102, 103, …)"
        );
        assert_eq!(describe_snapshot("not a snapshot"), "not a snapshot");
    }
}
