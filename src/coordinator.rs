//! The coordinator's duties: the cluster's singleton work, done by the one node that holds the
//! coordinator role (taken, kept and given back by the lease supervisor, [`crate::cluster`]) so
//! that N nodes do not repeat it.
//!
//! - **rescue**: running jobs whose claim expired (their worker died or hung), or whose claimer is
//!   not a live node any more, go back to pending, every [`CoordinatorSettings::rescue_every`];
//! - **retention**, every [`CoordinatorSettings::retention_every`] and once on taking the role:
//!   finished jobs past the job retention, the completed-actions ledger past its retention, and,
//!   when asked for, dead letters and delivered change-log rows past theirs; and the history's
//!   day partitions: created ahead, and dropped whole past the history retention
//!   ([`maintain_history`]);
//! - the cluster-wide gauges of `/metrics` (dead letters, job depths) are read by the control
//!   façade only on the coordinator ([`crate::control`]).
//!
//! Every duty statement runs in a transaction that first checks, holding the coordinator row, that
//! the epoch this node took the role with is still the current one
//! ([`membership::coordinator_still`]): a node that lost the role while paused or cut off finds a
//! newer epoch and does nothing, and a new coordinator's epoch bump waits for a duty in flight to
//! commit. Retention deletes in bounded batches, one transaction each, and at most
//! [`MAX_BATCHES_PER_RUN`] per table and run, so no statement holds locks or writes WAL for long.
//! A failed duty is logged and counted and runs again at its next interval.

use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterHandle;
use crate::membership;
use crate::metrics::{DutyLabels, Metrics, TableLabel};

/// How often the coordinator rescues expired job claims by default.
pub const DEFAULT_RESCUE_INTERVAL: Duration = Duration::from_secs(1);

/// At most this many stranded waiting jobs promoted per rescue run (see
/// [`crate::jobs::promote_stranded_on`]).
const STRANDED_PER_RUN: i32 = 10_000;
/// How often the coordinator runs retention by default.
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_mins(10);
/// Batches one table's retention deletes in one run at most; the rest waits for the next run.
pub const MAX_BATCHES_PER_RUN: u32 = 200;
/// When a retention run stopped at [`MAX_BATCHES_PER_RUN`], the next one starts this soon instead
/// of a retention interval later, so a backlog of old rows is worked off steadily.
pub const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

/// What the coordinator does and how often.
#[derive(Clone, Debug)]
pub struct CoordinatorSettings {
    pub rescue_every: Duration,
    pub retention_every: Duration,
    /// Completed and cancelled jobs are deleted this long after they finished.
    pub job_retention: Duration,
    /// Completed-actions ledger rows are deleted this long after they were written.
    pub ledger_retention: Duration,
    /// Dead letters are deleted this long after they were created; `None`: kept until purged.
    pub dead_letter_retention: Option<Duration>,
    /// Change-log rows every partition has delivered are deleted this long after they were
    /// written; `None`: the change log is never pruned by the service.
    pub change_log_retention: Option<Duration>,
    /// History partitions whose day ended this long ago are dropped.
    pub history_retention: Duration,
    /// The cluster's partition count (every partition's checkpoint must have passed a row).
    pub partition_count: i32,
    /// A running job whose claimer is not a live node and that was claimed longer ago than this
    /// goes back to pending at once (the cluster's node timeout).
    pub orphaned_after: Duration,
}

impl CoordinatorSettings {
    /// The default intervals and the ledger's retention; dead letters and the change log kept.
    #[must_use]
    pub fn defaults(
        job_retention: Duration,
        partition_count: i32,
        node_timeout: Duration,
    ) -> CoordinatorSettings {
        CoordinatorSettings {
            rescue_every: DEFAULT_RESCUE_INTERVAL,
            retention_every: DEFAULT_RETENTION_INTERVAL,
            job_retention,
            ledger_retention: crate::checkpoint::LEDGER_RETENTION,
            dead_letter_retention: None,
            change_log_retention: None,
            history_retention: crate::history::DEFAULT_HISTORY_RETENTION,
            partition_count,
            orphaned_after: node_timeout,
        }
    }
}

/// Why a duty did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DutyError {
    #[error("{0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> DutyError {
    DutyError::Storage(error.to_string())
}

/// How a duty run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DutyRun {
    /// Done; this many rows were changed.
    Done(u64),
    /// The epoch is not this node's any more: nothing was done.
    Fenced,
}

/// Opens a transaction in which this node is still the coordinator of `epoch`; `None` when a
/// newer coordinator took the role.
async fn begin_fenced(
    pool: &PgPool,
    epoch: i64,
) -> Result<Option<Transaction<'static, Postgres>>, DutyError> {
    let mut transaction = pool.begin().await.map_err(storage)?;
    if membership::coordinator_still(&mut transaction, epoch)
        .await
        .map_err(storage)?
    {
        Ok(Some(transaction))
    } else {
        transaction.rollback().await.map_err(storage)?;
        Ok(None)
    }
}

/// Rescues job claims that expired, and those of nodes that are gone (claimed longer than
/// `orphaned_after` ago by a worker that is not a live node), and promotes stranded waiting jobs,
/// fenced by `epoch`.
///
/// # Errors
/// Storage failed.
pub async fn rescue_expired_jobs(
    pool: &PgPool,
    epoch: i64,
    orphaned_after: Duration,
) -> Result<DutyRun, DutyError> {
    let live: Vec<String> = membership::live_nodes(pool)
        .await
        .map_err(storage)?
        .into_iter()
        .map(|node| node.node_id)
        .collect();
    let Some(mut transaction) = begin_fenced(pool, epoch).await? else {
        return Ok(DutyRun::Fenced);
    };
    let expired = crate::jobs::rescue_expired_on(&mut *transaction)
        .await
        .map_err(storage)?;
    let orphaned = crate::jobs::rescue_orphaned_on(&mut *transaction, &live, orphaned_after)
        .await
        .map_err(storage)?;
    let stranded = crate::jobs::promote_stranded_on(&mut *transaction, STRANDED_PER_RUN)
        .await
        .map_err(storage)?;
    transaction.commit().await.map_err(storage)?;
    Ok(DutyRun::Done(expired + orphaned + stranded))
}

/// Creates the history's day partitions ahead and drops those past `retention`, fenced by
/// `epoch`, in one transaction; the partitions created and dropped, as one count.
///
/// # Errors
/// Storage failed, or a partition's lock was not granted in time (nothing changed).
pub async fn maintain_history(
    pool: &PgPool,
    epoch: i64,
    retention: Duration,
) -> Result<(DutyRun, crate::history::PartitionMaintenance), DutyError> {
    let Some(mut transaction) = begin_fenced(pool, epoch).await? else {
        return Ok((
            DutyRun::Fenced,
            crate::history::PartitionMaintenance::default(),
        ));
    };
    let maintenance = crate::history::maintain_partitions_on(&mut transaction, retention)
        .await
        .map_err(storage)?;
    transaction.commit().await.map_err(storage)?;
    let changed = maintenance.created.unsigned_abs() + maintenance.dropped.unsigned_abs();
    Ok((DutyRun::Done(u64::from(changed)), maintenance))
}

/// One table's retention: what it deletes per fenced batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    Jobs,
    Ledger,
    DeadLetters,
    ChangeLog,
}

impl Retention {
    fn duty(self) -> &'static str {
        match self {
            Retention::Jobs => "job_retention",
            Retention::Ledger => "ledger_retention",
            Retention::DeadLetters => "dead_letter_retention",
            Retention::ChangeLog => "change_log_retention",
        }
    }
    fn table(self) -> &'static str {
        match self {
            Retention::Jobs => "jobs",
            Retention::Ledger => "ledger",
            Retention::DeadLetters => "dead_letters",
            Retention::ChangeLog => "change_log",
        }
    }
}

/// Deletes one batch of `table` past `older_than`, fenced by `epoch`; with the batch size (a
/// batch smaller than it means nothing more can go now).
async fn prune_batch(
    pool: &PgPool,
    epoch: i64,
    table: Retention,
    older_than: Duration,
    partition_count: i32,
) -> Result<(DutyRun, u64), DutyError> {
    let Some(mut transaction) = begin_fenced(pool, epoch).await? else {
        return Ok((DutyRun::Fenced, 0));
    };
    let (deleted, batch) = match table {
        // Finished jobs go in one statement (their own index, no batch limit in the store).
        Retention::Jobs => (
            crate::jobs::prune_finished_on(&mut *transaction, older_than)
                .await
                .map_err(storage)?,
            u64::MAX,
        ),
        Retention::Ledger => (
            crate::checkpoint::prune_completed_batch(&mut *transaction, older_than)
                .await
                .map_err(storage)?,
            crate::checkpoint::LEDGER_PRUNE_BATCH,
        ),
        Retention::DeadLetters => (
            crate::dlq::prune_dead_letters_batch(&mut *transaction, older_than)
                .await
                .map_err(storage)?,
            crate::dlq::DEAD_LETTER_PRUNE_BATCH,
        ),
        Retention::ChangeLog => (
            crate::change_log::prune_delivered(&mut *transaction, older_than, partition_count)
                .await
                .map_err(storage)?,
            crate::change_log::PRUNE_BATCH,
        ),
    };
    transaction.commit().await.map_err(storage)?;
    Ok((DutyRun::Done(deleted), batch))
}

/// Runs one table's retention in batches (at most [`MAX_BATCHES_PER_RUN`]), fenced by `epoch`;
/// the rows deleted (`DutyRun::Done`; a run that stopped at the batch cap leaves more for the next
/// run, which [`run_duties`] then starts after [`CATCH_UP_INTERVAL`]), or `Fenced` as soon as a
/// batch finds the role gone.
///
/// # Errors
/// Storage failed (batches committed before stay committed).
pub async fn prune(
    pool: &PgPool,
    epoch: i64,
    table: Retention,
    older_than: Duration,
    partition_count: i32,
) -> Result<DutyRun, DutyError> {
    Ok(
        prune_capped(pool, epoch, table, older_than, partition_count)
            .await?
            .0,
    )
}

/// [`prune`], and whether it stopped at the batch cap with more left.
async fn prune_capped(
    pool: &PgPool,
    epoch: i64,
    table: Retention,
    older_than: Duration,
    partition_count: i32,
) -> Result<(DutyRun, bool), DutyError> {
    let mut total = 0_u64;
    for _ in 0..MAX_BATCHES_PER_RUN {
        match prune_batch(pool, epoch, table, older_than, partition_count).await? {
            (DutyRun::Fenced, _) => return Ok((DutyRun::Fenced, false)),
            (DutyRun::Done(deleted), batch) => {
                total += deleted;
                if deleted < batch {
                    return Ok((DutyRun::Done(total), false));
                }
            }
        }
    }
    Ok((DutyRun::Done(total), true))
}

/// Runs the duties while this node holds the coordinator role, until `shutdown`.
pub async fn run_duties(
    pool: PgPool,
    handle: ClusterHandle,
    settings: CoordinatorSettings,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut duties_epoch: Option<i64> = None;
    let mut next_retention = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.rescue_every) => {}
        }
        let Some(epoch) = handle.coordinator_epoch() else {
            duties_epoch = None;
            continue;
        };
        if duties_epoch != Some(epoch) {
            // Just took the role: retention runs now, not an interval later.
            duties_epoch = Some(epoch);
            next_retention = Instant::now();
        }
        let rescued = rescue_expired_jobs(&pool, epoch, settings.orphaned_after).await;
        if let Ok(DutyRun::Done(count)) = &rescued {
            metrics.jobs_rescued.inc_by(*count);
            if *count > 0 {
                tracing::info!(
                    rescued = count,
                    "job claims past their visibility timeout put back to pending"
                );
            }
        }
        record(&metrics, "rescue", &rescued);
        if Instant::now() < next_retention {
            continue;
        }
        let history = maintain_history(&pool, epoch, settings.history_retention).await;
        if let Ok((DutyRun::Done(_), maintenance)) = &history
            && (maintenance.created > 0 || maintenance.dropped > 0)
        {
            tracing::info!(
                created = maintenance.created,
                dropped = maintenance.dropped,
                "history day partitions created ahead and dropped past their retention"
            );
        }
        record(&metrics, "history_partitions", &history.map(|(run, _)| run));
        let mut more_left = false;
        let tables = [
            (Retention::Jobs, Some(settings.job_retention)),
            (Retention::Ledger, Some(settings.ledger_retention)),
            (Retention::DeadLetters, settings.dead_letter_retention),
            (Retention::ChangeLog, settings.change_log_retention),
        ];
        for (table, retention) in tables {
            let Some(older_than) = retention else {
                continue;
            };
            let run = prune_capped(&pool, epoch, table, older_than, settings.partition_count).await;
            let run = match run {
                Ok((run, capped)) => {
                    more_left |= capped;
                    Ok(run)
                }
                Err(error) => Err(error),
            };
            if let Ok(DutyRun::Done(deleted)) = &run {
                metrics
                    .pruned_rows
                    .get_or_create(&TableLabel {
                        table: table.table().to_owned(),
                    })
                    .inc_by(*deleted);
                if *deleted > 0 {
                    tracing::info!(
                        table = table.table(),
                        deleted,
                        "retention deleted rows past their retention"
                    );
                }
            }
            record(&metrics, table.duty(), &run);
            if matches!(run, Ok(DutyRun::Fenced)) {
                break;
            }
        }
        next_retention = Instant::now()
            + if more_left {
                CATCH_UP_INTERVAL
            } else {
                settings.retention_every
            };
    }
}

fn record(metrics: &Metrics, duty: &str, run: &Result<DutyRun, DutyError>) {
    let outcome = match run {
        Ok(DutyRun::Done(_)) => "succeeded",
        Ok(DutyRun::Fenced) => {
            tracing::warn!(duty, "coordinator duty fenced: another node holds the role");
            "fenced"
        }
        Err(error) => {
            tracing::warn!(duty, %error, "coordinator duty failed; it runs again at its next interval");
            "failed"
        }
    };
    metrics
        .coordinator_duties
        .get_or_create(&DutyLabels {
            duty: duty.to_owned(),
            outcome: outcome.to_owned(),
        })
        .inc();
}
