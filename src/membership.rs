//! The cluster's membership in PostgreSQL: the `nodes` table (one row per live node, its
//! heartbeat and lease session), the `cluster` table (the partition count every node must use)
//! and the partition advisory locks, all through one node's dedicated **lease session**.
//!
//! The coordinator role (`coordinator`: one node at a time owns the cluster's singleton duties) is
//! an advisory lock on the same session, its fencing epoch in the `coordinator` row.
//!
//! The only code with SQL for `nodes`, `cluster` and `coordinator`; the pending hand-overs a tick reads come
//! from the partitions' owner ([`crate::checkpoint`]) as a fragment of the same statement.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool, Row};

/// First key of every partition lock (`pg_try_advisory_lock(LEASE_NAMESPACE, partition)`).
pub const LEASE_NAMESPACE: i32 = 0x4651_4F42;
/// First key of the coordinator lock (`pg_try_advisory_lock(COORDINATOR_NAMESPACE, 0)`); apart
/// from the partitions' namespace so that no partition count can reach it.
pub const COORDINATOR_NAMESPACE: i32 = LEASE_NAMESPACE + 1;
/// Server-side bounds on how long a vanished client's session (and its locks) survives.
const SESSION_SETTINGS: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000; SET idle_session_timeout = 0; \
     SET statement_timeout = 5000";

/// Failures of the membership store.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cluster storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error(
        "node id {0:?} is already in use by a live node; give every node its own id (--node-id or FRAISEQL_OBSERVERS_NODE_ID)"
    )]
    DuplicateNode(String),
    #[error("partition count refused: {0}")]
    PartitionCount(String),
    #[error(transparent)]
    Partitions(#[from] crate::checkpoint::CheckpointError),
}

/// Records the partition count on first start, or checks it against the recorded one.
///
/// # Errors
/// [`MembershipError::PartitionCount`] when it differs; storage failed.
pub async fn register_partition_count(
    pool: &PgPool,
    requested: i32,
) -> Result<(), MembershipError> {
    let registered: Result<i32, sqlx::Error> =
        sqlx::query_scalar("SELECT fraiseql_observers.register_partition_count($1)")
            .bind(requested)
            .fetch_one(pool)
            .await;
    match registered {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("22023") => {
            Err(MembershipError::PartitionCount(error.message().to_owned()))
        }
        Err(error) => Err(error.into()),
    }
}

/// What one tick saw.
#[derive(Debug)]
pub(crate) struct Observation {
    pub(crate) pid: i32,
    /// Partition locks this session holds.
    pub(crate) mine: HashSet<i32>,
    /// Partition locks held by anyone.
    pub(crate) taken: HashSet<i32>,
    /// Other live nodes that are not draining.
    pub(crate) other_nodes: usize,
    /// Pending hand-over requests: partition → target node.
    pub(crate) handovers: HashMap<i32, String>,
    /// A drain (`true`) or resume (`false`) asked for this node through the control plane.
    pub(crate) drain_request: Option<bool>,
    /// This session holds the coordinator lock.
    pub(crate) coordinating: bool,
}

/// The dedicated connection holding this node's partition locks.
pub(crate) struct LeaseSession {
    connection: PgConnection,
    pub(crate) pid: i32,
    /// Which of this node's sessions (they are numbered as they are opened).
    pub(crate) generation: u64,
}

impl LeaseSession {
    pub(crate) async fn open(
        pool: &PgPool,
        node_id: &str,
        generation: u64,
    ) -> Result<LeaseSession, MembershipError> {
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&format!("fraiseql-observers lease {node_id}"));
        let mut connection = PgConnection::connect_with(&options).await?;
        sqlx::raw_sql(SESSION_SETTINGS)
            .execute(&mut connection)
            .await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut connection)
            .await?;
        // Another live node under the same id would share our row and fight over it.
        let other_alive: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM fraiseql_observers.nodes AS node
                              JOIN pg_stat_activity AS activity
                                ON activity.pid = node.lease_pid AND activity.backend_start = node.lease_started
                             WHERE node.node_id = $1 AND node.lease_pid <> pg_backend_pid())",
        )
        .bind(node_id)
        .fetch_one(&mut connection)
        .await?;
        if other_alive {
            return Err(MembershipError::DuplicateNode(node_id.to_owned()));
        }
        Ok(LeaseSession {
            connection,
            pid,
            generation,
        })
    }

    /// Heartbeat, end stale nodes' sessions, and read the lease picture — one statement.
    pub(crate) async fn observe(
        &mut self,
        node_id: &str,
        draining: bool,
        node_timeout: Duration,
    ) -> Result<Observation, MembershipError> {
        let row = sqlx::query(
            concat!(
            "WITH beat AS (
                 INSERT INTO fraiseql_observers.nodes AS node (node_id, lease_pid, lease_started, version, draining)
                 SELECT $1, pg_backend_pid(), backend_start, $2, $3
                   FROM pg_stat_activity WHERE pid = pg_backend_pid()
                 ON CONFLICT (node_id) DO UPDATE
                    SET heartbeat_at = now(), lease_pid = excluded.lease_pid,
                        lease_started = excluded.lease_started, version = excluded.version,
                        draining = excluded.draining
                 RETURNING 1),
             stale AS (
                 DELETE FROM fraiseql_observers.nodes AS node
                  WHERE node_id <> $1
                    AND (heartbeat_at < now() - make_interval(secs => $4)
                         OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                                         WHERE activity.pid = node.lease_pid
                                           AND activity.backend_start = node.lease_started))
              RETURNING node_id, lease_pid, lease_started)
             SELECT pg_backend_pid() AS pid,
                    ARRAY(SELECT objid::bigint FROM pg_locks
                           WHERE locktype = 'advisory' AND classid = $5::bigint::oid AND objsubid = 2
                             AND granted AND pid = pg_backend_pid()) AS mine,
                    ARRAY(SELECT objid::bigint FROM pg_locks
                           WHERE locktype = 'advisory' AND classid = $5::bigint::oid AND objsubid = 2
                             AND granted
                             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS taken,
                    (SELECT count(*) FROM fraiseql_observers.nodes AS node
                      WHERE node_id <> $1 AND NOT draining
                        AND heartbeat_at >= now() - make_interval(secs => $4)
                        AND EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                                     WHERE activity.pid = node.lease_pid
                                       AND activity.backend_start = node.lease_started)) AS other_nodes,
                    ",
            crate::checkpoint::pending_handovers_columns!(),
            ",
                    (SELECT drain_request FROM fraiseql_observers.nodes WHERE node_id = $1) AS drain_request,
                    EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND classid = $6::bigint::oid AND objid = 0
                               AND objsubid = 2 AND granted AND pid = pg_backend_pid()) AS coordinating,
                    -- In the select list, so that only the joined sessions are ended (a
                    -- volatile call in WHERE could be pushed down to every session).
                    ARRAY(SELECT stale.node_id || CASE WHEN pg_terminate_backend(activity.pid) THEN '' ELSE ' (already gone)' END
                            FROM stale JOIN pg_stat_activity AS activity
                              ON activity.pid = stale.lease_pid AND activity.backend_start = stale.lease_started) AS ended"
        ),
        )
        .bind(node_id)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(draining)
        .bind(node_timeout.as_secs_f64())
        .bind(i64::from(LEASE_NAMESPACE))
        .bind(i64::from(COORDINATOR_NAMESPACE))
        .fetch_one(&mut self.connection)
        .await?;
        let ended: Vec<String> = row.try_get("ended")?;
        for node in ended {
            tracing::warn!(%node, "node missed its heartbeats; its lease session was ended so that its partitions can be taken over");
        }
        let partitions = |column: &str| -> Result<HashSet<i32>, sqlx::Error> {
            let values: Vec<i64> = row.try_get(column)?;
            Ok(values
                .into_iter()
                .filter_map(|value| i32::try_from(value).ok())
                .collect())
        };
        let handover_partitions: Vec<i32> = row.try_get("handover_partitions")?;
        let handover_targets: Vec<String> = row.try_get("handover_targets")?;
        Ok(Observation {
            drain_request: row.try_get("drain_request")?,
            coordinating: row.try_get("coordinating")?,
            handovers: handover_partitions
                .into_iter()
                .zip(handover_targets)
                .collect(),
            pid: row.try_get("pid")?,
            mine: partitions("mine")?,
            taken: partitions("taken")?,
            other_nodes: usize::try_from(row.try_get::<i64, _>("other_nodes")?).unwrap_or(0),
        })
    }

    pub(crate) async fn try_lock(&mut self, partition: i32) -> Result<bool, MembershipError> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LEASE_NAMESPACE)
            .bind(partition)
            .fetch_one(&mut self.connection)
            .await?)
    }

    /// The drain or resume request `request` has been applied.
    pub(crate) async fn clear_drain_request(
        &mut self,
        node_id: &str,
        request: bool,
    ) -> Result<(), MembershipError> {
        sqlx::query(
            "UPDATE fraiseql_observers.nodes SET drain_request = NULL WHERE node_id = $1 AND drain_request = $2",
        )
        .bind(node_id)
        .bind(request)
        .execute(&mut self.connection)
        .await?;
        Ok(())
    }

    /// The hand-over request for `partition` to this node is fulfilled.
    pub(crate) async fn clear_handover(
        &mut self,
        partition: i32,
        node_id: &str,
    ) -> Result<(), MembershipError> {
        crate::checkpoint::clear_handover(&mut self.connection, partition, node_id)
            .await
            .map_err(|error| match error {
                crate::checkpoint::CheckpointError::Storage(error) => {
                    MembershipError::Storage(error)
                }
                fenced @ crate::checkpoint::CheckpointError::FencedOut { .. } => {
                    MembershipError::Storage(sqlx::Error::Protocol(fenced.to_string()))
                }
            })
    }

    pub(crate) async fn unlock(&mut self, partition: i32) -> Result<(), MembershipError> {
        let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1, $2)")
            .bind(LEASE_NAMESPACE)
            .bind(partition)
            .fetch_one(&mut self.connection)
            .await?;
        Ok(())
    }

    /// Takes the coordinator role if no session holds it: the lock, then the epoch bumped (which
    /// waits for a duty of the previous coordinator still in its transaction). `None`: another
    /// node has it.
    pub(crate) async fn try_take_coordinator(
        &mut self,
        node_id: &str,
    ) -> Result<Option<i64>, MembershipError> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, 0)")
            .bind(COORDINATOR_NAMESPACE)
            .fetch_one(&mut self.connection)
            .await?;
        if !locked {
            return Ok(None);
        }
        let epoch = sqlx::query_scalar(
            "INSERT INTO fraiseql_observers.coordinator AS role (singleton, epoch, node_id, acquired_at)
             VALUES (true, 1, $1, now())
             ON CONFLICT (singleton) DO UPDATE
                SET epoch = role.epoch + 1, node_id = excluded.node_id, acquired_at = now()
             RETURNING epoch",
        )
        .bind(node_id)
        .fetch_one(&mut self.connection)
        .await;
        match epoch {
            Ok(epoch) => Ok(Some(epoch)),
            Err(error) => {
                // Without a new epoch the role must not be held: the previous one's duties
                // would not be fenced.
                let _ = self.release_coordinator().await;
                Err(error.into())
            }
        }
    }

    /// Gives the coordinator role back (draining): another node takes it at its next tick.
    pub(crate) async fn release_coordinator(&mut self) -> Result<(), MembershipError> {
        let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1, 0)")
            .bind(COORDINATOR_NAMESPACE)
            .fetch_one(&mut self.connection)
            .await?;
        Ok(())
    }

    /// Leaves the cluster: the row goes, and closing the session releases every lock.
    pub(crate) async fn leave(mut self, node_id: &str) {
        let left = sqlx::query(
            "DELETE FROM fraiseql_observers.nodes WHERE node_id = $1 AND lease_pid = pg_backend_pid()",
        )
        .bind(node_id)
        .execute(&mut self.connection)
        .await;
        if let Err(error) = left {
            tracing::warn!(%error, "leaving the cluster table failed; the row expires");
        }
        let _ = self.connection.close().await;
    }
}

/// The partition count the cluster was started with (`None` before any node started).
///
/// # Errors
/// Storage failed.
pub async fn partition_count(pool: &PgPool) -> Result<Option<i32>, MembershipError> {
    Ok(
        sqlx::query_scalar("SELECT partition_count FROM fraiseql_observers.cluster")
            .fetch_optional(pool)
            .await?,
    )
}

/// A live node as the `nodes` table has it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRow {
    pub node_id: String,
    pub version: String,
    pub draining: bool,
    pub heartbeat_age_seconds: f64,
    pub uptime_seconds: f64,
}

/// Every node whose lease session is alive, by id.
///
/// # Errors
/// Storage failed.
pub async fn live_nodes(pool: &PgPool) -> Result<Vec<NodeRow>, MembershipError> {
    let rows: Vec<(String, String, bool, f64, f64)> = sqlx::query_as(
        "SELECT node_id, version, draining,
                extract(epoch FROM now() - heartbeat_at)::float8,
                extract(epoch FROM now() - started_at)::float8
           FROM fraiseql_observers.nodes AS node
          WHERE EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                         WHERE activity.pid = node.lease_pid AND activity.backend_start = node.lease_started)
          ORDER BY node_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(node_id, version, draining, heartbeat_age_seconds, uptime_seconds)| NodeRow {
                node_id,
                version,
                draining,
                heartbeat_age_seconds,
                uptime_seconds,
            },
        )
        .collect())
}

/// Whether `node` is a live member that is not draining (one that may take a partition).
///
/// # Errors
/// Storage failed.
pub async fn is_live_and_taking(pool: &PgPool, node: &str) -> Result<bool, MembershipError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM fraiseql_observers.nodes AS node
                         JOIN pg_stat_activity AS activity
                           ON activity.pid = node.lease_pid AND activity.backend_start = node.lease_started
                        WHERE node.node_id = $1 AND NOT node.draining)",
    )
    .bind(node)
    .fetch_one(pool)
    .await?)
}

/// Asks the live node `node` to drain (`true`) or resume (`false`) at its next tick; `false` when
/// no such live node exists.
///
/// # Errors
/// Storage failed.
pub async fn request_drain(
    pool: &PgPool,
    node: &str,
    drain: bool,
) -> Result<bool, MembershipError> {
    let asked = sqlx::query(
        "UPDATE fraiseql_observers.nodes AS node SET drain_request = $2
          WHERE node_id = $1
            AND EXISTS (SELECT 1 FROM pg_stat_activity AS activity
                         WHERE activity.pid = node.lease_pid
                           AND activity.backend_start = node.lease_started)",
    )
    .bind(node)
    .bind(drain)
    .execute(pool)
    .await?;
    Ok(asked.rows_affected() > 0)
}

/// Which node's lease session holds each partition lock now: partition → node id.
///
/// # Errors
/// Storage failed.
pub async fn lock_holders(
    connection: &mut PgConnection,
) -> Result<HashMap<i32, String>, MembershipError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT locks.objid::bigint, node.node_id
           FROM pg_locks AS locks
           JOIN fraiseql_observers.nodes AS node ON node.lease_pid = locks.pid
          WHERE locks.locktype = 'advisory' AND locks.classid = $1::bigint::oid
            AND locks.objsubid = 2 AND locks.granted
            AND locks.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(LEASE_NAMESPACE))
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(partition, node)| Some((i32::try_from(partition).ok()?, node)))
        .collect())
}

/// Fences a coordinator duty: inside `transaction`, holds the coordinator row (FOR SHARE, so a
/// new coordinator's epoch bump waits for this transaction) and says whether `epoch` is still
/// the current one. A duty goes on only on `true`.
///
/// # Errors
/// Storage failed.
pub async fn coordinator_still(
    transaction: &mut PgConnection,
    epoch: i64,
) -> Result<bool, MembershipError> {
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT epoch FROM fraiseql_observers.coordinator WHERE singleton FOR SHARE",
    )
    .fetch_optional(transaction)
    .await?;
    Ok(current == Some(epoch))
}

/// Who holds the coordinator role.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorRow {
    /// The node that took it last.
    pub node_id: String,
    pub epoch: i64,
    /// Seconds since it was taken.
    pub held_for_seconds: f64,
}

/// The coordinator now: the node whose live lease session holds the lock, with the epoch it
/// took; `None` while no node holds it (between a death and the next taker's tick).
///
/// # Errors
/// Storage failed.
pub async fn coordinator(pool: &PgPool) -> Result<Option<CoordinatorRow>, MembershipError> {
    let row: Option<(String, i64, f64)> = sqlx::query_as(
        "SELECT role.node_id, role.epoch, extract(epoch FROM now() - role.acquired_at)::float8
           FROM fraiseql_observers.coordinator AS role
           JOIN fraiseql_observers.nodes AS node ON node.node_id = role.node_id
           JOIN pg_locks AS locks
             ON locks.pid = node.lease_pid AND locks.locktype = 'advisory'
            AND locks.classid = $1::bigint::oid AND locks.objid = 0 AND locks.objsubid = 2
            AND locks.granted
            AND locks.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(COORDINATOR_NAMESPACE))
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(node_id, epoch, held_for_seconds)| CoordinatorRow {
            node_id,
            epoch,
            held_for_seconds,
        }),
    )
}
