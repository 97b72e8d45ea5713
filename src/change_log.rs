//! The change log in PostgreSQL (`core.tb_entity_change_log`, read through
//! `fraiseql_observers.read_batch`): the only code with SQL for it.
//!
//! A page is read in one statement with the batch's end snapshot and the partition's lease epoch
//! (a fragment from the partitions' owner, [`crate::checkpoint`]). Rows come as JSON text with
//! their size, so that the listener can bound them before it parses them: a row over the row
//! limit comes as an excerpt only, and a page ends before the row that would take its text past
//! the page limit (the first row always comes).

use sqlx::PgPool;

/// The change-log table, as FraiseQL names it.
pub const TABLE: &str = "core.tb_entity_change_log";

/// Failures of the change-log store.
#[derive(Debug, thiserror::Error)]
pub enum ChangeLogError {
    #[error("reading the change log failed: {0}")]
    Read(#[from] sqlx::Error),
    #[error("the page statement returned no row (a defect)")]
    NoBatch,
}

/// Where a page starts and how it is bounded.
#[derive(Clone, Debug)]
pub struct PageQuery<'query> {
    /// The partition whose epoch is read with the page.
    pub partition: i32,
    /// The checkpoint's snapshot (`None`: the start of the log).
    pub snapshot: Option<&'query str>,
    /// Inside an oversized batch: its end snapshot (else a new snapshot is taken).
    pub batch_upto: Option<&'query str>,
    /// Inside an oversized batch: the last position delivered.
    pub batch_position: Option<i64>,
    /// Rows per page.
    pub batch_size: u32,
    /// `Some((partition, count))` to read only that partition's rows; `None` for all.
    pub partitioned: Option<(i32, i32)>,
    /// Rows over this many bytes of JSON come as an excerpt.
    pub max_row_bytes: u32,
    /// Characters of an oversized row's excerpt.
    pub excerpt_chars: usize,
    /// The page ends before the row that would take its text past this.
    pub max_page_bytes: u64,
}

/// A change-log row as read: its position, its size as JSON text, and the text (whole, or an
/// excerpt when the row is over the row limit).
#[derive(Clone, Debug)]
pub struct RawRow {
    pub position: i64,
    pub size: u64,
    pub text: String,
}

/// One page of a batch.
#[derive(Clone, Debug)]
pub struct Page {
    /// The batch's end snapshot.
    pub upto: String,
    /// The partition's lease epoch as the statement saw it.
    pub epoch: Option<i64>,
    pub rows: Vec<RawRow>,
    /// Whether the byte bound ended the page before the rows the batch reader returned.
    pub cut_short: bool,
}

/// One row of the page statement: the batch's end, the partition's epoch, how many rows the
/// batch reader returned, and a change (none on an empty page's single row): its position, its
/// size in bytes of JSON text and the text.
type PageRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// Reads the page after `query`'s position.
///
/// # Errors
/// The database failed.
pub async fn read_page(pool: &PgPool, query: &PageQuery<'_>) -> Result<Page, ChangeLogError> {
    let (partitions, partition_count) = match query.partitioned {
        Some((partition, count)) => (Some(vec![partition]), Some(count)),
        None => (None, None),
    };
    let page: Vec<PageRow> = sqlx::query_as(concat!(
        "WITH batch AS (
             SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS upto,
                    ",
        crate::checkpoint::partition_epoch_sql!(),
        " AS epoch),
         page AS (
             SELECT change.pk_entity_change_log AS position, to_jsonb(change)::text AS body
               FROM batch, fraiseql_observers.read_batch(
                    $3::pg_snapshot, batch.upto, $4, $5, $6, $7) AS change),
         sized AS (
             SELECT position, body, octet_length(body)::bigint AS size,
                    sum(octet_length(body)) OVER (ORDER BY position) AS running,
                    count(*) OVER () AS returned
               FROM page)
         SELECT batch.upto::text, batch.epoch, sized.returned, sized.position, sized.size,
                CASE WHEN sized.size <= $8 THEN sized.body ELSE left(sized.body, $9) END
           FROM batch
           LEFT JOIN sized ON sized.running - sized.size < $10
          ORDER BY sized.position"
    ))
    .bind(query.partition)
    .bind(query.batch_upto)
    .bind(query.snapshot)
    .bind(query.batch_upto.and(query.batch_position))
    .bind(i32::try_from(query.batch_size).unwrap_or(i32::MAX))
    .bind(partitions)
    .bind(partition_count)
    .bind(i64::from(query.max_row_bytes))
    .bind(i32::try_from(query.excerpt_chars).unwrap_or(i32::MAX))
    .bind(i64::try_from(query.max_page_bytes.max(1)).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let Some((upto, epoch, returned, ..)) = page.first() else {
        return Err(ChangeLogError::NoBatch);
    };
    let (upto, epoch, returned) = (upto.clone(), *epoch, returned.unwrap_or(0));
    let rows: Vec<RawRow> = page
        .into_iter()
        .filter_map(|(_, _, _, position, size, text)| {
            Some(RawRow {
                position: position?,
                size: u64::try_from(size?).unwrap_or(0),
                text: text?,
            })
        })
        .collect();
    let cut_short = i64::try_from(rows.len()).unwrap_or(i64::MAX) < returned;
    Ok(Page {
        upto,
        epoch,
        rows,
        cut_short,
    })
}

/// A row's identity columns, each cut to 256 characters: id, object type, object id, kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowIdentity {
    pub id: Option<String>,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub modification_type: Option<String>,
}

/// The identity columns of the row at `position` (empty when it is gone), read without reading
/// the row's images.
///
/// # Errors
/// The database failed.
pub async fn row_identity(pool: &PgPool, position: i64) -> Result<RowIdentity, ChangeLogError> {
    type Columns = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let columns: Option<Columns> = sqlx::query_as(
        "SELECT left(id::text, 256), left(object_type::text, 256),
                left(object_id::text, 256), left(modification_type::text, 256)
           FROM core.tb_entity_change_log WHERE pk_entity_change_log = $1",
    )
    .bind(position)
    .fetch_optional(pool)
    .await?;
    Ok(columns.map_or_else(
        RowIdentity::default,
        |(id, object_type, object_id, modification_type)| RowIdentity {
            id,
            object_type,
            object_id,
            modification_type,
        },
    ))
}

/// Rows of `partition` (of `partition_count`) committed after `snapshot` (`None`: the start of
/// the log) and not yet in it, counted up to `cap`.
///
/// # Errors
/// The database failed.
pub async fn backlog(
    connection: &mut sqlx::PgConnection,
    partition: i32,
    partition_count: i32,
    snapshot: Option<&str>,
    cap: i64,
) -> Result<u64, ChangeLogError> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM core.tb_entity_change_log AS log
              WHERE log.txid IS NOT NULL
                AND log.entity_hash % $2 = $1
                AND ($3::text IS NULL
                     OR (log.txid >= pg_snapshot_xmin($3::text::pg_snapshot)
                         AND NOT pg_visible_in_snapshot(log.txid, $3::text::pg_snapshot)))
              LIMIT $4) AS pending",
    )
    .bind(partition)
    .bind(partition_count)
    .bind(snapshot)
    .bind(cap)
    .fetch_one(connection)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The partition (of `partition_count`) the changes of one entity land in.
///
/// # Errors
/// The database failed.
pub async fn partition_of(
    pool: &PgPool,
    entity_type: &str,
    entity_id: &str,
    partition_count: i32,
) -> Result<i32, ChangeLogError> {
    Ok(
        sqlx::query_scalar("SELECT (core.observer_entity_hash($1, $2) % $3)::int")
            .bind(entity_type)
            .bind(entity_id)
            .bind(partition_count)
            .fetch_one(pool)
            .await?,
    )
}

/// Rows one retention statement deletes at most, so that no statement holds locks or writes WAL
/// for long.
pub const PRUNE_BATCH: u64 = 5_000;

/// Deletes at most [`PRUNE_BATCH`] change-log rows that every partition has delivered and that
/// were written more than `older_than` ago, on `executor` (the coordinator's fenced
/// transaction); how many. Fewer than a batch: nothing more can go now.
///
/// A row goes only when its writer's transaction is below the smallest `xmin` of every
/// partition's checkpoint snapshot (a fragment from the partitions' owner,
/// [`crate::checkpoint`]), so every partition has read past it — a lagging partition holds
/// retention back for all, and a partition with no checkpoint yet stops it. Rows without a
/// transaction id (written before the capture columns existed) are never read by the service
/// and are left alone.
///
/// # Errors
/// Storage failed.
pub async fn prune_delivered<'connection>(
    executor: impl sqlx::Executor<'connection, Database = sqlx::Postgres>,
    older_than: std::time::Duration,
    partition_count: i32,
) -> Result<u64, ChangeLogError> {
    let deleted = sqlx::query(concat!(
        "DELETE FROM core.tb_entity_change_log
          WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM core.tb_entity_change_log
                 WHERE txid < ",
        crate::checkpoint::delivered_everywhere_below_sql!("$2"),
        "
                   AND created_at < now() - make_interval(secs => $1)
                 LIMIT $3))"
    ))
    .bind(older_than.as_secs_f64())
    .bind(partition_count)
    .bind(i64::try_from(PRUNE_BATCH).unwrap_or(i64::MAX))
    .execute(executor)
    .await?
    .rows_affected();
    Ok(deleted)
}
