//! The node's share of the change log: partition leases, membership and balance.
//!
//! A partition is led by the node holding its advisory lock (`pg_try_advisory_lock(namespace,
//! partition)`) on that node's **lease session**: one dedicated connection, never a pooled one,
//! that holds all of the node's partition locks and carries its heartbeat. Taking a lease bumps
//! the partition's epoch (the listener's `claim`), and every checkpoint write is a compare-and-swap
//! on epoch and version, so a node that lost a lease cannot move that partition's checkpoint.
//!
//! Every tick (default 500 ms) the supervisor, in one statement on the lease session:
//! heartbeats this node's `nodes` row, ends the lease sessions of nodes whose heartbeat is older
//! than the node timeout (a dead, paused or cut-off node: its locks are released with its session),
//! and reads which partition locks this session holds, which are taken at all, and how many other
//! nodes are live. Then it stops at once the listener of any partition whose lock it no longer
//! holds, gives back partitions above its fair share `ceil(P / live nodes)` gracefully (page
//! finished, checkpoint saved, then unlocked), and takes free partitions up to its share. A lease
//! session that fails stops every partition at once; a session whose backend changes between
//! statements means a transaction-mode pooler, which cannot hold session locks: refused.
//!
//! Invariants: a partition runs on this node only while this node's lease session holds its
//! lock (checked every tick); a partition listener is started only after its lock is taken and
//! the lock is released only after its listener has stopped.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointStore, PendingCompletions};
use crate::error::ErrorCode;
use crate::executor::Executor;
pub use crate::lease::LeaseValidity;
use crate::listener::{Listener, ListenerError, ListenerSettings, flush_pending_completions};
pub use crate::membership::LEASE_NAMESPACE;
use crate::membership::{self, LeaseSession, MembershipError, Observation};
use crate::metrics::Metrics;

pub const DEFAULT_PARTITIONS: u32 = 8;
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TICK: Duration = Duration::from_millis(500);
/// The share of the node timeout a confirmed tick makes the leases valid for, counted from when
/// the tick was sent. Peers may end this session once its heartbeat is a node timeout old and the
/// heartbeat was written after the tick was sent; the rest is the safety margin.
pub const LEASE_VALIDITY_SHARE: f64 = 0.8;

/// How a node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Partitions the change log is split into; the same on every node.
    pub partitions: u32,
    /// A node whose heartbeat is older than this is considered gone and its leases are ended.
    pub node_timeout: Duration,
    /// How often leases are verified, heartbeats written and the balance adjusted.
    pub tick: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            partitions: DEFAULT_PARTITIONS,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            tick: DEFAULT_TICK,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Storage(MembershipError),
    #[error("starting a partition failed: {0}")]
    Partition(#[from] ListenerError),
    #[error("partition count refused: {0}")]
    PartitionCount(String),
    #[error(
        "the lease session moved from server process {was} to {now}: a transaction-mode pooler (e.g. PgBouncer pool_mode=transaction) is between this node and PostgreSQL; leases need a direct connection or a session-mode pooler"
    )]
    TransactionPooler { was: i32, now: i32 },
    #[error(
        "node id {0:?} is already in use by a live node; give every node its own id (--node-id or FRAISEQL_OBSERVERS_NODE_ID)"
    )]
    DuplicateNode(String),
    #[error(
        "the lease session did not answer within {}: peers end its leases after the node timeout, so every partition stops here now",
        humantime::format_duration(*.0)
    )]
    Unresponsive(Duration),
}

impl ClusterError {
    /// Storage failures are retryable; the rest are configuration mistakes.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            ClusterError::Storage(_) | ClusterError::Unresponsive(_) => {
                ErrorCode::StorageUnavailable
            }
            ClusterError::Partition(error) => error.code(),
            _ => ErrorCode::ConfigInvalid,
        }
    }
}

impl From<MembershipError> for ClusterError {
    fn from(error: MembershipError) -> Self {
        match error {
            MembershipError::DuplicateNode(node) => ClusterError::DuplicateNode(node),
            MembershipError::PartitionCount(refusal) => ClusterError::PartitionCount(refusal),
            storage @ (MembershipError::Storage(_) | MembershipError::Partitions(_)) => {
                ClusterError::Storage(storage)
            }
        }
    }
}

/// What the control plane sees and steers of the supervisor: the drain switch and the
/// partitions this node leads right now. A draining node gives back every lease (in-flight pages
/// finished and checkpointed) and takes none; resuming lets it take its share again.
#[derive(Clone, Debug, Default)]
pub struct ClusterHandle {
    draining: Arc<AtomicBool>,
    leading: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    /// When the supervisor last finished a tick (liveness).
    last_tick: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    validity: LeaseValidity,
    /// The coordinator epoch this node holds the role with; 0 while it does not.
    coordinator_epoch: Arc<AtomicI64>,
}

impl ClusterHandle {
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn resume(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// Partitions whose lease this node holds and whose listener runs.
    #[must_use]
    pub fn leading(&self) -> BTreeSet<i32> {
        self.leading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
    /// When the supervisor last completed a tick; `None` before the first.
    #[must_use]
    pub fn last_tick(&self) -> Option<std::time::Instant> {
        *self
            .last_tick
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// The lease validity the executors of this node's partitions check before every attempt.
    #[must_use]
    pub fn validity(&self) -> LeaseValidity {
        self.validity.clone()
    }
    /// The coordinator epoch this node took the role with, while it holds it (as of its last
    /// tick). Duties check it again, fenced, in their own transaction.
    #[must_use]
    pub fn coordinator_epoch(&self) -> Option<i64> {
        Some(self.coordinator_epoch.load(Ordering::SeqCst)).filter(|epoch| *epoch > 0)
    }
    fn set_coordinator_epoch(&self, epoch: Option<i64>) {
        self.coordinator_epoch
            .store(epoch.unwrap_or(0), Ordering::SeqCst);
    }
    fn set_leading(&self, partitions: impl Iterator<Item = i32>) {
        *self
            .leading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = partitions.collect();
    }
}

/// How long a partition received through a hand-over is kept when the node gives back excess.
const HANDOVER_PIN: Duration = Duration::from_mins(1);

/// Starts the listener of a leased partition.
#[derive(Clone, Debug)]
pub struct PartitionRunner {
    pub pool: PgPool,
    pub store: Arc<dyn CheckpointStore>,
    /// The executor every partition clones (each clone gets its own settled-actions buffer).
    pub executor: Executor,
    /// Batch size, poll interval, node id; partition and count are set per lease.
    pub listener: ListenerSettings,
    /// Change-log notifications per partition (one LISTEN connection per node).
    pub wakes: crate::listener::PartitionWakes,
    /// The node's change-log reader: partitions at the same position read in one statement.
    pub reader: crate::listener::NodeReader,
    pub metrics: Arc<Metrics>,
}

impl PartitionRunner {
    async fn run(
        self,
        partition: i32,
        partition_count: i32,
        stop: CancellationToken,
        validity: LeaseValidity,
    ) -> Result<(), ListenerError> {
        let pending = Arc::new(PendingCompletions::default());
        let executor = self
            .executor
            .clone()
            .with_settled_sink(pending.clone())
            .with_lease(validity);
        let settings = ListenerSettings {
            partition,
            partition_count: Some(partition_count),
            ..self.listener.clone()
        };
        let listener = Listener::start(self.pool.clone(), self.store.clone(), executor, settings)
            .await?
            .with_pending_completions(pending.clone())
            .with_wake(self.wakes.receiver(partition))
            .with_reader(self.reader.clone())
            .with_metrics(self.metrics.clone());
        let stop_writer = CancellationToken::new();
        let writer = flush_pending_completions(self.store.clone(), pending, stop_writer.clone());
        let delivering = async {
            let result = listener.run(stop).await;
            stop_writer.cancel();
            result
        };
        let (result, ()) = tokio::join!(delivering, writer);
        result
    }
}

/// One partition running on this node.
struct Held {
    stop: CancellationToken,
    abort: AbortHandle,
    releasing: bool,
    /// The lease session that took the lock: only that session can release it.
    session: u64,
    /// Received through a hand-over: kept when giving back excess until then.
    pinned_until: Option<std::time::Instant>,
}

/// The lease supervisor of one node.
pub struct Cluster {
    pool: PgPool,
    node_id: String,
    settings: ClusterSettings,
    runner: PartitionRunner,
    handle: ClusterHandle,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Records (or checks) the partition count; a count other than the recorded one is refused.
    ///
    /// # Errors
    /// The count differs from the one the change log is split by, or storage failed.
    pub async fn new(
        pool: PgPool,
        settings: ClusterSettings,
        runner: PartitionRunner,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ClusterError> {
        let requested = i32::try_from(settings.partitions).unwrap_or(i32::MAX);
        membership::register_partition_count(&pool, requested).await?;
        Ok(Cluster {
            pool,
            node_id: runner.listener.node_id.clone(),
            settings,
            runner,
            handle: ClusterHandle::default(),
            metrics,
        })
    }

    fn partition_count(&self) -> i32 {
        i32::try_from(self.settings.partitions.max(1)).unwrap_or(i32::MAX)
    }

    /// What the control plane sees and steers.
    #[must_use]
    pub fn handle(&self) -> ClusterHandle {
        self.handle.clone()
    }

    /// Leads partitions until `shutdown` is cancelled; then stops every partition gracefully
    /// (pages finished and checkpointed), releases the leases and leaves the cluster.
    ///
    /// # Errors
    /// A transaction-mode pooler or a duplicate node id was detected (fatal: nothing would be
    /// safe). Every other failure is retried.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ClusterError> {
        let mut session: Option<LeaseSession> = None;
        let mut sessions_opened = 0_u64;
        let mut held: HashMap<i32, Held> = HashMap::new();
        let mut tasks: JoinSet<(i32, Result<(), ListenerError>)> = JoinSet::new();
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // Not ready any more while the partitions are given back.
                    self.handle.drain();
                    break Ok(());
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    self.stopped(joined, &mut held, session.as_mut()).await;
                    self.publish(&held);
                    continue;
                }
                _ = tick.tick() => {}
            }
            if session.is_none() {
                sessions_opened += 1;
                match LeaseSession::open(&self.pool, &self.node_id, sessions_opened).await {
                    Ok(opened) => session = Some(opened),
                    Err(error @ MembershipError::DuplicateNode(_)) => break Err(error.into()),
                    Err(error) => {
                        tracing::warn!(%error, "opening the lease session failed; retrying");
                        continue;
                    }
                }
            }
            let Some(lease) = session.as_mut() else {
                continue;
            };
            let draining = self.handle.is_draining();
            // A cut-off or stalled database connection must not keep partitions running here:
            // past the node timeout, peers end this session and take the partitions over.
            let sent = std::time::Instant::now();
            let observed = tokio::time::timeout(
                self.settings.node_timeout,
                lease.observe(&self.node_id, draining, self.settings.node_timeout),
            )
            .await
            .map_err(|_| ClusterError::Unresponsive(self.settings.node_timeout))
            .and_then(|observed| observed.map_err(ClusterError::from));
            let seen = match observed {
                Ok(seen) => {
                    self.handle.validity.set(Some(
                        sent + self.settings.node_timeout.mul_f64(LEASE_VALIDITY_SHARE),
                    ));
                    seen
                }
                Err(error) => {
                    self.handle.validity.set(None);
                    self.handle.set_coordinator_epoch(None);
                    tracing::error!(%error, partitions = held.len(), "lease session lost: stopping every partition at once");
                    for partition in held.values() {
                        partition.abort.abort();
                    }
                    session = None;
                    continue;
                }
            };
            if seen.pid != lease.pid {
                break Err(ClusterError::TransactionPooler {
                    was: lease.pid,
                    now: seen.pid,
                });
            }
            if let Some(request) = seen.drain_request {
                self.apply_drain_request(lease, request).await;
            }
            self.balance(lease, &seen, &mut held, &mut tasks, &shutdown)
                .await;
            self.coordinate(lease, &seen).await;
            self.publish(&held);
            *self
                .handle
                .last_tick
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
        };
        self.handle.set_coordinator_epoch(None);
        for running in held.values() {
            running.stop.cancel();
        }
        while let Some(joined) = tasks.join_next().await {
            self.stopped(joined, &mut held, session.as_mut()).await;
        }
        self.publish(&held);
        if let Some(lease) = session {
            lease.leave(&self.node_id).await;
        }
        outcome
    }

    /// Drains (`true`) or resumes (`false`) as asked through the control plane, and clears the
    /// request.
    async fn apply_drain_request(&self, lease: &mut LeaseSession, request: bool) {
        if request {
            tracing::info!("draining on request");
            self.handle.drain();
        } else {
            tracing::info!("resuming on request");
            self.handle.resume();
        }
        if let Err(error) = lease.clear_drain_request(&self.node_id, request).await {
            tracing::warn!(%error, "clearing an applied drain request failed");
        }
    }

    /// Keeps, takes or gives back the coordinator role: a node that is not draining takes it when
    /// no session holds it; a draining node gives it back; a node whose session no longer holds
    /// the lock stops its duties.
    async fn coordinate(&self, lease: &mut LeaseSession, seen: &Observation) {
        let held = self.handle.coordinator_epoch();
        let draining = self.handle.is_draining();
        if seen.coordinating {
            if draining || held.is_none() {
                self.handle.set_coordinator_epoch(None);
                self.metrics.coordinator.set(0);
                match lease.release_coordinator().await {
                    Ok(()) if draining => {
                        tracing::info!("draining: coordinator role given back");
                    }
                    Ok(()) => {}
                    Err(error) => {
                        tracing::warn!(%error, "giving the coordinator role back failed");
                    }
                }
            }
            return;
        }
        if let Some(epoch) = held {
            tracing::warn!(
                epoch,
                "coordinator lock no longer held: coordinator duties stop"
            );
            self.handle.set_coordinator_epoch(None);
            self.metrics.coordinator.set(0);
        }
        if draining {
            return;
        }
        match lease.try_take_coordinator(&self.node_id).await {
            Ok(Some(epoch)) => {
                tracing::info!(epoch, "took the coordinator role");
                self.handle.set_coordinator_epoch(Some(epoch));
                self.metrics.coordinator.set(1);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "taking the coordinator role failed"),
        }
    }

    /// Stops partitions whose lock is gone, gives back those asked for elsewhere and those above
    /// the fair share, and takes the ones handed over to this node and free ones up to the share.
    async fn balance(
        &self,
        lease: &mut LeaseSession,
        seen: &Observation,
        held: &mut HashMap<i32, Held>,
        tasks: &mut JoinSet<(i32, Result<(), ListenerError>)>,
        shutdown: &CancellationToken,
    ) {
        let count = self.partition_count();
        let draining = self.handle.is_draining();
        for (partition, running) in held.iter_mut() {
            if !seen.mine.contains(partition) {
                tracing::error!(
                    partition,
                    "lease no longer held: stopping the partition at once"
                );
                running.abort.abort();
            }
            let wanted_elsewhere = seen
                .handovers
                .get(partition)
                .is_some_and(|target| *target != self.node_id);
            if wanted_elsewhere && !running.releasing {
                tracing::info!(partition, target = %seen.handovers[partition], "handing a partition over");
                running.releasing = true;
                running.stop.cancel();
            }
        }
        let target = if draining {
            0
        } else {
            fair_share(count, seen.other_nodes + 1)
        };
        let now = std::time::Instant::now();
        let mut active: Vec<(bool, i32)> = held
            .iter()
            .filter(|(_, running)| !running.releasing)
            .map(|(partition, running)| {
                let pinned = running.pinned_until.is_some_and(|until| until > now);
                (pinned, *partition)
            })
            .collect();
        if active.len() > target {
            // Keep pinned (handed-over) partitions; give back the others first.
            active.sort_unstable_by_key(|(pinned, partition)| (!pinned, *partition));
            for (_, partition) in active.iter().skip(target) {
                if let Some(running) = held.get_mut(partition) {
                    tracing::info!(partition, target, "giving back a partition");
                    running.releasing = true;
                    running.stop.cancel();
                }
            }
            return;
        }
        if draining {
            return;
        }
        // Hand-overs to this node first, whatever the share; then free partitions up to it.
        let mut handed: Vec<i32> = seen
            .handovers
            .iter()
            .filter(|(_, target)| **target == self.node_id)
            .map(|(partition, _)| *partition)
            .filter(|partition| (0..count).contains(partition))
            .collect();
        handed.sort_unstable();
        for partition in handed {
            if !held.contains_key(&partition)
                && !seen.taken.contains(&partition)
                && self
                    .take(lease, partition, held, tasks, shutdown, true)
                    .await
                && let Err(error) = lease.clear_handover(partition, &self.node_id).await
            {
                tracing::warn!(partition, %error, "clearing a fulfilled hand-over failed");
            }
        }
        let first = first_partition(&self.node_id, count);
        for offset in 0..count {
            let active = held.values().filter(|running| !running.releasing).count();
            if active >= target {
                break;
            }
            let partition = (first + offset) % count;
            let reserved = seen
                .handovers
                .get(&partition)
                .is_some_and(|target| *target != self.node_id);
            if held.contains_key(&partition) || seen.taken.contains(&partition) || reserved {
                continue;
            }
            self.take(lease, partition, held, tasks, shutdown, false)
                .await;
        }
    }

    /// Shows the partitions led (not being given back) to the control plane and the metrics.
    fn publish(&self, held: &HashMap<i32, Held>) {
        let leading: Vec<i32> = held
            .iter()
            .filter(|(_, running)| !running.releasing)
            .map(|(partition, _)| *partition)
            .collect();
        self.metrics
            .leases_held
            .set(i64::try_from(leading.len()).unwrap_or(i64::MAX));
        self.metrics
            .draining
            .set(i64::from(self.handle.is_draining()));
        self.handle.set_leading(leading.into_iter());
    }

    /// Tries to lock `partition` and starts its listener; whether it did.
    async fn take(
        &self,
        lease: &mut LeaseSession,
        partition: i32,
        held: &mut HashMap<i32, Held>,
        tasks: &mut JoinSet<(i32, Result<(), ListenerError>)>,
        shutdown: &CancellationToken,
        handed_over: bool,
    ) -> bool {
        match lease.try_lock(partition).await {
            Ok(true) => {
                let count = self.partition_count();
                let stop = shutdown.child_token();
                let runner = self.runner.clone();
                let stopping = stop.clone();
                let validity = self.handle.validity();
                let abort = tasks.spawn(async move {
                    (
                        partition,
                        runner.run(partition, count, stopping, validity).await,
                    )
                });
                held.insert(
                    partition,
                    Held {
                        stop,
                        abort,
                        releasing: false,
                        session: lease.generation,
                        pinned_until: handed_over.then(|| std::time::Instant::now() + HANDOVER_PIN),
                    },
                );
                self.metrics.epoch_changes.inc();
                tracing::info!(partition, node = %self.node_id, handed_over, "partition lease taken");
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(partition, %error, "taking a lease failed");
                false
            }
        }
    }

    /// A partition's listener ended (given back, fenced out, failed or aborted): unlock it.
    async fn stopped(
        &self,
        joined: Result<(i32, Result<(), ListenerError>), tokio::task::JoinError>,
        held: &mut HashMap<i32, Held>,
        session: Option<&mut LeaseSession>,
    ) {
        let partition = match joined {
            Ok((partition, Ok(()))) => {
                tracing::info!(partition, "partition stopped");
                partition
            }
            Ok((partition, Err(error))) => {
                tracing::warn!(partition, %error, "partition listener ended");
                partition
            }
            Err(error) => {
                // Aborted (lease lost) or panicked: find which one is gone.
                let gone: Vec<i32> = held
                    .iter()
                    .filter(|(_, running)| running.abort.id() == error.id())
                    .map(|(partition, _)| *partition)
                    .collect();
                if error.is_panic() {
                    tracing::error!(?gone, "partition listener panicked");
                }
                let Some(partition) = gone.first().copied() else {
                    return;
                };
                partition
            }
        };
        let Some(gone) = held.remove(&partition) else {
            return;
        };
        if let Some(lease) = session
            && lease.generation == gone.session
            && let Err(error) = lease.unlock(partition).await
        {
            tracing::warn!(partition, %error, "unlocking a partition failed; the next tick verifies the session");
        }
    }
}

/// `ceil(partitions / nodes)`.
#[must_use]
pub fn fair_share(partitions: i32, nodes: usize) -> usize {
    let partitions = usize::try_from(partitions).unwrap_or(0);
    partitions.div_ceil(nodes.max(1))
}

/// Where a node starts looking for free partitions, spread by its id.
fn first_partition(node_id: &str, count: i32) -> i32 {
    let hash = node_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    i32::try_from(hash % u64::try_from(count.max(1)).unwrap_or(1)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(8, 1), 8);
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 8), 1);
        assert_eq!(fair_share(8, 20), 1);
        assert_eq!(fair_share(8, 0), 8);
    }

    #[test]
    fn first_partition_is_in_range_and_stable() {
        for node in ["a", "node-1", "node-2", "ünïcode"] {
            let first = first_partition(node, 8);
            assert!((0..8).contains(&first));
            assert_eq!(first, first_partition(node, 8));
        }
    }
}
