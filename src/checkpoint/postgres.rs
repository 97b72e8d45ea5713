//! The checkpoint store in PostgreSQL: the only code with SQL for `fraiseql_observers.partitions`
//! (checkpoints, lease epochs, leaders, hand-over requests) and `processed_actions` (the ledger).
//! Saves of several partitions go through one group-commit writer.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ActionKey, BatchPosition, Checkpoint, CheckpointError, CheckpointStore};
use crate::history::{HistoryColumns, HistoryRecord, bind_history_columns};
use crate::jobs::NewJob;

/// Checkpoints in `fraiseql_observers.partitions` and `processed_actions`.
#[derive(Clone, Debug)]
pub struct PostgresCheckpointStore {
    pool: PgPool,
    /// Group commit: saves without jobs go to one writer that commits every save waiting for it
    /// (one per partition at most) in a single statement. `None`: each save commits on its own.
    group: Option<tokio::sync::mpsc::UnboundedSender<GroupedSave>>,
}

impl PostgresCheckpointStore {
    /// Every save commits on its own.
    #[must_use]
    pub fn new(pool: PgPool) -> PostgresCheckpointStore {
        PostgresCheckpointStore { pool, group: None }
    }

    /// Saves that arrive while another is being written are committed together, in one
    /// statement and one WAL flush — each still its own compare-and-swap, so one partition fenced
    /// out does not hold back the others. A save finds the writer idle and goes at once, so this
    /// adds no delay. The writer stops when the last clone of the store is dropped. Needs a Tokio
    /// runtime.
    #[must_use]
    pub fn with_group_commit(pool: PgPool) -> PostgresCheckpointStore {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_groups(pool.clone(), receiver));
        PostgresCheckpointStore {
            pool,
            group: Some(sender),
        }
    }
}

/// One fenced save: from `current` to `next`, with the page's ledger rows.
#[derive(Debug)]
struct SaveRequest {
    current: Checkpoint,
    next: BatchPosition,
    completed: Vec<ActionKey>,
    /// The page's history rows, written only if the swap succeeds.
    history: Vec<HistoryRecord>,
}

impl SaveRequest {
    /// The saved checkpoint, given the version the compare-and-swap returned (`None`: fenced out).
    fn outcome(self, version: Option<i64>) -> Result<Checkpoint, CheckpointError> {
        match version {
            Some(version) => Ok(Checkpoint {
                partition: self.current.partition,
                epoch: self.current.epoch,
                version,
                position: self.next,
            }),
            None => Err(CheckpointError::FencedOut {
                partition: self.current.partition,
                epoch: self.current.epoch,
                version: self.current.version,
            }),
        }
    }
}

/// One save waiting for the group writer.
#[derive(Debug)]
struct GroupedSave {
    request: SaveRequest,
    reply: tokio::sync::oneshot::Sender<Result<Checkpoint, CheckpointError>>,
}

/// Most saves one group statement carries.
const MAX_GROUP: usize = 256;

/// Fenced saves of several partitions and their ledger rows in one statement: each partition's
/// compare-and-swap on its own (ascending partition order, so concurrent writers lock rows in the
/// same order), ledger and history rows only for the partitions whose swap succeeded.
static SAVE_GROUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH saved AS (
             SELECT request.partition,
                    fraiseql_observers.save_checkpoint(request.partition, request.epoch, request.version,
                        request.snapshot::pg_snapshot, request.batch_upto::pg_snapshot, request.batch_position) AS version
               FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[])
                    AS request(partition, epoch, version, snapshot, batch_upto, batch_position)),
         recorded AS (
             INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
             SELECT completed.event_id, completed.observer, completed.action_index
               FROM unnest($7::uuid[], $8::text[], $9::int[], $10::int[])
                    AS completed(event_id, observer, action_index, partition)
               JOIN saved ON saved.partition = completed.partition AND saved.version IS NOT NULL
             ON CONFLICT DO NOTHING),
         history AS (
             {} JOIN saved ON saved.partition = history_row.partition AND saved.version IS NOT NULL)
         SELECT partition, version FROM saved",
        crate::history::insert_sql(11)
    )
});

/// Group statements in flight at once: while one waits for its WAL flush, the next is written.
const GROUPS_IN_FLIGHT: usize = 2;

async fn write_groups(
    pool: PgPool,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<GroupedSave>,
) {
    use futures::StreamExt as _;
    let mut held_over: Vec<GroupedSave> = Vec::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        let first = if !held_over.is_empty() && in_flight.len() < GROUPS_IN_FLIGHT {
            Some(held_over.remove(0))
        } else {
            tokio::select! {
                request = requests.recv(), if open && in_flight.len() < GROUPS_IN_FLIGHT => {
                    if request.is_none() {
                        open = false;
                    }
                    request
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => None,
                else => return,
            }
        };
        let Some(first) = first else { continue };
        // Everything else already waiting, one save per partition: a partition's second save
        // waits for the next statement.
        let mut group = vec![first];
        let mut partitions: HashSet<i32> = HashSet::from([group[0].request.current.partition]);
        let mut waiting = std::mem::take(&mut held_over);
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        for request in waiting {
            if group.len() < MAX_GROUP && partitions.insert(request.request.current.partition) {
                group.push(request);
            } else {
                held_over.push(request);
            }
        }
        group.sort_by_key(|save| save.request.current.partition);
        in_flight.push(write_group(pool.clone(), group));
    }
}

/// Writes one group and answers each of its saves.
async fn write_group(pool: PgPool, group: Vec<GroupedSave>) {
    let requests: Vec<&SaveRequest> = group.iter().map(|save| &save.request).collect();
    match save_group(&pool, &requests).await {
        Ok(versions) => {
            for save in group {
                let version = versions
                    .get(&save.request.current.partition)
                    .copied()
                    .flatten();
                let _ = save.reply.send(save.request.outcome(version));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for save in group {
                let _ = save
                    .reply
                    .send(Err(CheckpointError::Storage(sqlx::Error::Protocol(
                        format!("checkpoint group write failed: {message}"),
                    ))));
            }
        }
    }
}

/// The new version of each partition's checkpoint (`None`: fenced out).
async fn save_group(
    pool: &PgPool,
    group: &[&SaveRequest],
) -> Result<HashMap<i32, Option<i64>>, sqlx::Error> {
    let mut keys: Vec<(&ActionKey, i32)> = group
        .iter()
        .flat_map(|request| {
            request
                .completed
                .iter()
                .map(move |key| (key, request.current.partition))
        })
        .collect();
    // Ledger rows locked in one global order (see key_columns).
    keys.sort_unstable();
    keys.dedup_by(|a, b| a.0 == b.0);
    let history = HistoryColumns::of(group.iter().flat_map(|request| &request.history))
        .map_err(|error| sqlx::Error::Encode(error.into()))?;
    let query = sqlx::query_as(sqlx::AssertSqlSafe(SAVE_GROUP.as_str()))
        .bind(
            group
                .iter()
                .map(|r| r.current.partition)
                .collect::<Vec<_>>(),
        )
        .bind(group.iter().map(|r| r.current.epoch).collect::<Vec<_>>())
        .bind(group.iter().map(|r| r.current.version).collect::<Vec<_>>())
        .bind(
            group
                .iter()
                .map(|r| r.next.snapshot.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            group
                .iter()
                .map(|r| r.next.batch_upto.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            group
                .iter()
                .map(|r| r.next.batch_position)
                .collect::<Vec<_>>(),
        )
        .bind(keys.iter().map(|(key, _)| key.event_id).collect::<Vec<_>>())
        .bind(
            keys.iter()
                .map(|(key, _)| key.observer.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            keys.iter()
                .map(|(key, _)| i32::try_from(key.action_index).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
        .bind(
            keys.iter()
                .map(|(_, partition)| *partition)
                .collect::<Vec<_>>(),
        );
    let rows: Vec<(i32, Option<i64>)> = bind_history_columns!(query, history)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

type CheckpointRow = (i32, i64, i64, Option<String>, Option<String>, Option<i64>);

fn checkpoint_from_row(
    (partition, epoch, version, snapshot, batch_upto, batch_position): CheckpointRow,
) -> Checkpoint {
    Checkpoint {
        partition,
        epoch,
        version,
        position: BatchPosition {
            snapshot,
            batch_upto,
            batch_position,
        },
    }
}

/// The keys as column arrays, sorted: every writer of `processed_actions` (the early ledger
/// writer and checkpoint saves, which overlap) takes the row locks in the same order, so they
/// wait for each other instead of deadlocking. A `database` action's transaction
/// ([`record_completed_in`]) holds one key only, and only until its call commits; the others
/// record a key after that, so they find it committed and do not wait.
fn key_columns(completed: &[ActionKey]) -> (Vec<Uuid>, Vec<String>, Vec<i32>) {
    let mut sorted: Vec<&ActionKey> = completed.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let completed = sorted;
    let event_ids = completed.iter().map(|key| key.event_id).collect();
    let observers = completed.iter().map(|key| key.observer.clone()).collect();
    let indexes = completed
        .iter()
        .map(|key| i32::try_from(key.action_index).unwrap_or(i32::MAX))
        .collect();
    (event_ids, observers, indexes)
}

const INSERT_COMPLETED: &str =
    "INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])
     ON CONFLICT DO NOTHING";

/// Records `key` in the completed-actions ledger inside the caller's transaction, before the
/// action's effect is made in that same transaction: `true` when this transaction recorded it (do
/// the work; the commit makes both durable together, a rollback neither), `false` when the key was
/// already recorded (done before: do nothing). A transaction that recorded the same key and has
/// not ended yet is waited for (the primary key's uniqueness check), so of two concurrent callers
/// exactly one does the work — bounded by the caller's `statement_timeout`.
///
/// # Errors
/// Storage failed (the ledger table is missing when the migrations were not applied).
pub async fn record_completed_in(
    connection: &mut sqlx::PgConnection,
    key: &ActionKey,
) -> Result<bool, CheckpointError> {
    let recorded: Option<i32> = sqlx::query_scalar(
        "INSERT INTO fraiseql_observers.processed_actions (event_id, observer, action_index)
         VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING
         RETURNING 1",
    )
    .bind(key.event_id)
    .bind(&key.observer)
    .bind(i32::try_from(key.action_index).unwrap_or(i32::MAX))
    .fetch_optional(connection)
    .await?;
    Ok(recorded.is_some())
}

/// How long a completed action stays in the ledger. It is read only while its event can be read
/// again — its page not yet checkpointed — which is seconds in the common case; a day covers a
/// partition stuck on a failing page for a long time.
pub const LEDGER_RETENTION: std::time::Duration = std::time::Duration::from_hours(24);
/// Rows one pruning statement deletes, so that no statement holds locks or writes WAL for long.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes ledger rows older than `older_than`, in batches; how many.
///
/// # Errors
/// Storage failed (what was deleted before stays deleted).
pub async fn prune_completed(
    pool: &PgPool,
    older_than: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let mut pruned = 0;
    loop {
        let deleted = prune_completed_batch(pool, older_than).await?;
        pruned += deleted;
        if deleted < PRUNE_BATCH.unsigned_abs() {
            return Ok(pruned);
        }
    }
}

/// Deletes at most [`PRUNE_BATCH`] ledger rows older than `older_than` on `executor` (the
/// coordinator's fenced transaction, or a pool); how many. Fewer than a batch: nothing older is
/// left.
///
/// # Errors
/// Storage failed.
pub async fn prune_completed_batch<'connection>(
    executor: impl sqlx::Executor<'connection, Database = sqlx::Postgres>,
    older_than: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM fraiseql_observers.processed_actions
          WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM fraiseql_observers.processed_actions
                 WHERE completed_at < now() - make_interval(secs => $1)
                 LIMIT $2))",
    )
    .bind(older_than.as_secs_f64())
    .bind(PRUNE_BATCH)
    .execute(executor)
    .await?
    .rows_affected())
}

/// Ledger rows one pruning batch deletes at most.
pub const LEDGER_PRUNE_BATCH: u64 = PRUNE_BATCH.unsigned_abs();

/// A SQL expression: the transaction id below which every partition's checkpoint has passed
/// (`xid8`; the smallest `xmin` of the checkpoint snapshots of partitions `0..count`), or NULL
/// unless each of those partitions has a checkpoint. Every change-log row written by a
/// transaction below it was delivered by its partition. The argument is the SQL text of the
/// partition count (a parameter, `"$2"`). The change log's retention reads it in its delete.
macro_rules! delivered_everywhere_below_sql {
    ($count:literal) => {
        concat!(
            "(SELECT CASE WHEN count(*) FILTER (WHERE snapshot IS NOT NULL) = ",
            $count,
            " THEN min(pg_snapshot_xmin(snapshot)) END
                FROM fraiseql_observers.partitions WHERE partition >= 0 AND partition < ",
            $count,
            ")"
        )
    };
}
pub(crate) use delivered_everywhere_below_sql;

#[async_trait]
impl CheckpointStore for PostgresCheckpointStore {
    async fn claim(&self, partition: i32, node: &str) -> Result<Checkpoint, CheckpointError> {
        let row: CheckpointRow = sqlx::query_as(
            "SELECT partition, epoch, checkpoint_version, snapshot::text, batch_upto::text, batch_position
               FROM fraiseql_observers.claim_partition($1, $2)",
        )
        .bind(partition)
        .bind(node)
        .fetch_one(&self.pool)
        .await?;
        Ok(checkpoint_from_row(row))
    }

    async fn load(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let row: Option<CheckpointRow> = sqlx::query_as(
            "SELECT partition, epoch, checkpoint_version, snapshot::text, batch_upto::text, batch_position
               FROM fraiseql_observers.partitions WHERE partition = $1",
        )
        .bind(partition)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(checkpoint_from_row))
    }

    async fn save_with_jobs(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
    ) -> Result<Checkpoint, CheckpointError> {
        self.save_page(current, next, completed, jobs, &[]).await
    }

    async fn save_page(
        &self,
        current: &Checkpoint,
        next: BatchPosition,
        completed: &[ActionKey],
        jobs: &[NewJob],
        history: &[HistoryRecord],
    ) -> Result<Checkpoint, CheckpointError> {
        if jobs.is_empty() {
            // One statement: alone, or grouped with other partitions' saves.
            let request = SaveRequest {
                current: current.clone(),
                next,
                completed: completed.to_vec(),
                history: history.to_vec(),
            };
            let Some(group) = &self.group else {
                let versions = save_group(&self.pool, &[&request]).await?;
                let version = versions.get(&current.partition).copied().flatten();
                return request.outcome(version);
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            if group.send(GroupedSave { request, reply }).is_ok()
                && let Ok(result) = answer.await
            {
                return result;
            }
            return Err(CheckpointError::Storage(sqlx::Error::PoolClosed));
        }
        let mut transaction = self.pool.begin().await?;
        let new_version: Option<i64> = sqlx::query_scalar(
            "SELECT fraiseql_observers.save_checkpoint($1, $2, $3, $4::pg_snapshot, $5::pg_snapshot, $6)",
        )
        .bind(current.partition)
        .bind(current.epoch)
        .bind(current.version)
        .bind(&next.snapshot)
        .bind(&next.batch_upto)
        .bind(next.batch_position)
        .fetch_one(&mut *transaction)
        .await?;
        let Some(version) = new_version else {
            transaction.rollback().await?;
            return Err(CheckpointError::FencedOut {
                partition: current.partition,
                epoch: current.epoch,
                version: current.version,
            });
        };
        if !completed.is_empty() {
            let (event_ids, observers, indexes) = key_columns(completed);
            sqlx::query(INSERT_COMPLETED)
                .bind(event_ids)
                .bind(observers)
                .bind(indexes)
                .execute(&mut *transaction)
                .await?;
        }
        crate::history::insert_on(&mut *transaction, history).await?;
        if !jobs.is_empty() {
            crate::jobs::enqueue_batch(&mut *transaction, jobs)
                .await
                .map_err(|error| match error {
                    crate::jobs::JobError::Storage(storage) => CheckpointError::Storage(storage),
                    crate::jobs::JobError::Corrupt { problem, .. } => {
                        CheckpointError::Storage(sqlx::Error::Protocol(problem))
                    }
                })?;
        }
        transaction.commit().await?;
        Ok(Checkpoint {
            partition: current.partition,
            epoch: current.epoch,
            version,
            position: next,
        })
    }

    async fn record_completed(&self, completed: &[ActionKey]) -> Result<(), CheckpointError> {
        if completed.is_empty() {
            return Ok(());
        }
        let (event_ids, observers, indexes) = key_columns(completed);
        sqlx::query(INSERT_COMPLETED)
            .bind(event_ids)
            .bind(observers)
            .bind(indexes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn completed_among(
        &self,
        event_ids: &[Uuid],
    ) -> Result<HashSet<ActionKey>, CheckpointError> {
        if event_ids.is_empty() {
            return Ok(HashSet::new());
        }
        // Planned at every call (an unnamed statement), not prepared once: a plan cached while
        // the ledger was small (a fresh install, or after retention emptied it) is a sequential
        // scan, and PostgreSQL keeps it while the ledger grows until the next ANALYZE (autovacuum
        // runs it a minute or more later) — re-checking every row against every id of the page. At 3,000 events/s in a fresh database that scan was the largest
        // cost of the whole pipeline in PostgreSQL; a plan made for the call's own ids and the
        // table's current size probes the primary key.
        let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT event_id, observer, action_index FROM fraiseql_observers.processed_actions WHERE event_id = ANY($1)",
        )
        .bind(event_ids)
        .persistent(false)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(event_id, observer, action_index)| ActionKey {
                event_id,
                observer,
                action_index: usize::try_from(action_index).unwrap_or_default(),
            })
            .collect())
    }
}

/// The pending hand-over requests (made within the last minute), as two columns of a select list,
/// `handover_partitions` and `handover_targets` (partition order): the lease tick reads them in
/// its one statement.
macro_rules! pending_handovers_columns {
    () => {
        "ARRAY(SELECT partition FROM fraiseql_observers.partitions
                WHERE handover_to IS NOT NULL AND handover_requested_at > now() - interval '1 minute'
                ORDER BY partition) AS handover_partitions,
         ARRAY(SELECT handover_to FROM fraiseql_observers.partitions
                WHERE handover_to IS NOT NULL AND handover_requested_at > now() - interval '1 minute'
                ORDER BY partition) AS handover_targets"
    };
}
pub(crate) use pending_handovers_columns;

/// The hand-over request of `partition` to `node_id` is fulfilled (by its lease tick) or withdrawn
/// (by the requester, after its deadline).
///
/// # Errors
/// Storage failed.
pub async fn clear_handover(
    connection: impl sqlx::PgExecutor<'_>,
    partition: i32,
    node_id: &str,
) -> Result<(), CheckpointError> {
    sqlx::query(
        "UPDATE fraiseql_observers.partitions SET handover_to = NULL, handover_requested_at = NULL
          WHERE partition = $1 AND handover_to = $2",
    )
    .bind(partition)
    .bind(node_id)
    .execute(connection)
    .await?;
    Ok(())
}

/// The lease epochs of the partitions `$1` (an `int[]`) as an array in the same order (NULL for a
/// partition without a row), a scalar sub-select: the page statement reads them with the page,
/// so that a leader paused while another took a partition over finds out before it dispatches
/// anything.
macro_rules! partition_epochs_sql {
    () => {
        "(SELECT array_agg(partitions.epoch ORDER BY wanted.ordinal)
            FROM unnest($1::int[]) WITH ORDINALITY AS wanted(partition, ordinal)
            LEFT JOIN fraiseql_observers.partitions ON partitions.partition = wanted.partition)"
    };
}
pub(crate) use partition_epochs_sql;

/// One partition's row as an operator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionRow {
    pub partition: i32,
    /// 0 before any node claimed it.
    pub epoch: i64,
    /// The checkpoint's snapshot (`None`: the start of the log).
    pub snapshot: Option<String>,
    /// Inside an oversized batch: the batch's end snapshot and the last row delivered.
    pub batch: Option<(String, Option<i64>)>,
    /// Seconds since the checkpoint was last saved.
    pub age_seconds: Option<f64>,
}

/// A partition row's columns: partition, epoch, snapshot, batch end, batch position, age.
type PartitionColumns = (
    i32,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<f64>,
);

/// Every partition below `count`, whether it has a row yet or not, in partition order.
///
/// # Errors
/// Storage failed.
pub async fn partition_rows(
    connection: &mut sqlx::PgConnection,
    count: i32,
) -> Result<Vec<PartitionRow>, CheckpointError> {
    let rows: Vec<PartitionColumns> = sqlx::query_as(
        "SELECT p.partition, part.epoch, part.snapshot::text, part.batch_upto::text,
                    part.batch_position, extract(epoch FROM now() - part.updated_at)::float8
               FROM generate_series(0, $1 - 1) AS p (partition)
               LEFT JOIN fraiseql_observers.partitions AS part ON part.partition = p.partition
              ORDER BY p.partition",
    )
    .bind(count)
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(partition, epoch, snapshot, batch_upto, batch_position, age_seconds)| PartitionRow {
                partition,
                epoch: epoch.unwrap_or(0),
                snapshot,
                batch: batch_upto.map(|upto| (upto, batch_position)),
                age_seconds,
            },
        )
        .collect())
}

/// Asks for `partition` to be handed over to `target` (the target's lease tick sees it).
///
/// # Errors
/// Storage failed.
pub async fn request_handover(
    pool: &PgPool,
    partition: i32,
    target: &str,
) -> Result<(), CheckpointError> {
    sqlx::query(
        "INSERT INTO fraiseql_observers.partitions (partition, handover_to, handover_requested_at)
         VALUES ($1, $2, now())
         ON CONFLICT (partition) DO UPDATE SET handover_to = excluded.handover_to,
                                               handover_requested_at = excluded.handover_requested_at",
    )
    .bind(partition)
    .bind(target)
    .execute(pool)
    .await?;
    Ok(())
}
