//! The change log in PostgreSQL (`core.tb_entity_change_log`, read through
//! `fraiseql_observers.read_batch` and `read_page`): the only code with SQL for it.
//!
//! A page is read in one statement with the batch's end snapshot and the partition's lease epoch
//! (a fragment from the partitions' owner, [`crate::checkpoint`]). Rows come as JSON text with
//! their size (`row_to_json`, see `row_json_sql!`), so that the listener can bound them before
//! it parses them: a row over the row limit comes as an excerpt only, and a page ends before the
//! row that would start past the page limit (the first row always comes).

use sqlx::PgPool;

/// The change-log table, as FraiseQL names it.
pub const TABLE: &str = "core.tb_entity_change_log";

/// A change-log row (aliased `change`) as the JSON text every reader sends: `row_to_json`, which
/// writes the text in one pass over the columns (a `jsonb` image column is written as its own
/// text). `to_jsonb(change)::text`, used before, built a `jsonb` value of the whole row first —
/// copying the images, sorting the keys — only to print it: about twice the cost (2.3 µs more
/// per row of an orders table, PostgreSQL alone). The keys and values are the same; only the
/// outer object's spacing differs. `fraiseql_observers.read_page` (the node's page read,
/// `migrations/0022_read_page.sql`) writes the same text.
macro_rules! row_json_sql {
    () => {
        "row_to_json(change)::text"
    };
}

/// Failures of the change-log store.
#[derive(Debug, thiserror::Error)]
pub enum ChangeLogError {
    #[error("reading the change log failed: {0}")]
    Read(#[from] sqlx::Error),
    #[error("the page statement returned no row (a defect)")]
    NoBatch,
    /// A failure of a page read for several partitions at once, as each of them gets it.
    #[error("{0}")]
    Shared(std::sync::Arc<ChangeLogError>),
    /// The node's reader stopped (the node is shutting down).
    #[error("the node's change-log reader has stopped")]
    ReaderStopped,
}

/// Where a page starts and how it is bounded.
///
/// One page may serve several partitions whose checkpoints stand at the same position (a node's
/// reader reads them together): it holds the rows of all of them, each tagged with its partition,
/// and every partition's epoch as the statement saw it.
#[derive(Clone, Debug)]
pub struct PageQuery<'query> {
    /// The partitions read; their epochs are read with the page.
    pub partitions: &'query [i32],
    /// The checkpoint's snapshot (`None`: the start of the log).
    pub snapshot: Option<&'query str>,
    /// Inside an oversized batch: its end snapshot (else a new snapshot is taken).
    pub batch_upto: Option<&'query str>,
    /// Inside an oversized batch: the last position delivered.
    pub batch_position: Option<i64>,
    /// Rows per page (for all its partitions together).
    pub batch_size: u32,
    /// `Some(count)` to read only the rows of `partitions` (`entity_hash % count`); `None` for
    /// every row (`partitions` then names the one partition whose epoch is read).
    pub partition_count: Option<i32>,
    /// Rows over this many bytes of JSON come as an excerpt.
    pub max_row_bytes: u32,
    /// Characters of an oversized row's excerpt.
    pub excerpt_chars: usize,
    /// The page ends before the row that would take its text past this.
    pub max_page_bytes: u64,
}

/// A change-log row as read: its position, its partition, its size as JSON text, and the text
/// (whole, or an excerpt when the row is over the row limit).
#[derive(Clone, Debug)]
pub struct RawRow {
    pub position: i64,
    /// `entity_hash % partition count` (0 when the page was not read by partition).
    pub partition: i32,
    pub size: u64,
    pub text: String,
}

/// One page of a batch.
#[derive(Clone, Debug)]
pub struct Page {
    /// The batch's end snapshot.
    pub upto: String,
    /// Each partition's lease epoch as the statement saw it, in the order of the query's
    /// `partitions` (`None`: the partition has no row).
    pub epochs: Vec<Option<i64>>,
    pub rows: Vec<RawRow>,
    /// Whether the byte bound ended the page before the rows the batch reader returned.
    pub cut_short: bool,
}

/// One row of the page statement: the batch's end, the partitions' epochs, whether the byte bound
/// cut the page, and a change (none on the row that ends an empty or cut page): its position, its
/// partition, its size in bytes of JSON text and the text.
type PageRow = (
    String,
    Vec<Option<i64>>,
    bool,
    Option<i64>,
    Option<i32>,
    Option<i64>,
    Option<String>,
);

/// Reads the page after `query`'s position: `fraiseql_observers.read_page`
/// (`migrations/0022_read_page.sql`) turns each row into its JSON text once and stops at the byte
/// bound; the partitions' epochs are read by the same statement.
///
/// # Errors
/// The database failed.
pub async fn read_page(pool: &PgPool, query: &PageQuery<'_>) -> Result<Page, ChangeLogError> {
    let partitions = query.partition_count.map(|_| query.partitions.to_vec());
    let page: Vec<PageRow> = sqlx::query_as(concat!(
        "SELECT page.upto, ",
        crate::checkpoint::partition_epochs_sql!(),
        ", page.cut_short, page.row_position, page.row_partition, page.row_size, page.row_text
           FROM fraiseql_observers.read_page($3::pg_snapshot, $2::text, $4, $5, $6, $7, $8, $9, $10)
                AS page"
    ))
    .bind(query.partitions)
    .bind(query.batch_upto)
    .bind(query.snapshot)
    .bind(query.batch_upto.and(query.batch_position))
    .bind(i32::try_from(query.batch_size).unwrap_or(i32::MAX))
    .bind(partitions)
    .bind(query.partition_count)
    .bind(i64::from(query.max_row_bytes))
    .bind(i32::try_from(query.excerpt_chars).unwrap_or(i32::MAX))
    .bind(i64::try_from(query.max_page_bytes.max(1)).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let Some((upto, epochs, ..)) = page.first() else {
        return Err(ChangeLogError::NoBatch);
    };
    let (upto, epochs) = (upto.clone(), epochs.clone());
    let cut_short = page.iter().any(|(_, _, cut_short, ..)| *cut_short);
    let rows: Vec<RawRow> = page
        .into_iter()
        .filter_map(|(_, _, _, position, partition, size, text)| {
            Some(RawRow {
                position: position?,
                partition: partition.unwrap_or(0),
                size: u64::try_from(size?).unwrap_or(0),
                text: text?,
            })
        })
        .collect();
    Ok(Page {
        upto,
        epochs,
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

/// A tracked table as the backfill reads it: the capture trigger's arguments and the primary key
/// it walks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackedTable {
    /// The table as PostgreSQL prints it (`schema.table`, quoted where needed).
    pub name: String,
    pub schema: String,
    pub table: String,
    /// The entity type capture writes for the table's rows.
    pub entity_type: String,
    /// The column whose value is the entity id.
    pub id_column: String,
    /// The primary key's columns, in key order, with their types as `format_type` prints them.
    pub key_columns: Vec<(String, String)>,
}

/// Why a table cannot be backfilled.
#[derive(Debug, thiserror::Error)]
pub enum TrackedTableError {
    #[error("table {0} does not exist (expected schema.table)")]
    NoSuchTable(String),
    #[error(
        "table {0} is not tracked: attach capture first with SELECT core.observer_track_table('{0}'::regclass, 'EntityType')"
    )]
    NotTracked(String),
    #[error("table {0} has its capture trigger disabled")]
    CaptureDisabled(String),
    #[error("table {0} has no primary key: the backfill walks the table in primary-key order")]
    NoPrimaryKey(String),
    #[error("reading table {table} failed: {source}")]
    Database {
        table: String,
        #[source]
        source: sqlx::Error,
    },
}

/// Looks `table_name` (`schema.table`, or a name on the search path) up among the tracked tables.
///
/// # Errors
/// The table does not exist, is not tracked (or its trigger is disabled), has no primary key, or
/// the database failed.
pub async fn tracked_table(
    pool: &PgPool,
    table_name: &str,
) -> Result<TrackedTable, TrackedTableError> {
    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<bool>,
    );
    let database = |source| TrackedTableError::Database {
        table: table_name.to_owned(),
        source,
    };
    let row: Option<Row> = sqlx::query_as(
        "SELECT class.oid::regclass::text, namespace.nspname::text, class.relname::text,
                tracked.entity_type, tracked.id_column, tracked.enabled
           FROM pg_class AS class
           JOIN pg_namespace AS namespace ON namespace.oid = class.relnamespace
           LEFT JOIN core.observer_tracked_tables AS tracked ON tracked.table_name::oid = class.oid
          WHERE class.oid = to_regclass($1) AND class.relkind IN ('r', 'p')",
    )
    .bind(table_name)
    .fetch_optional(pool)
    .await
    .map_err(database)?;
    let Some((name, schema, table, entity_type, id_column, enabled)) = row else {
        return Err(TrackedTableError::NoSuchTable(table_name.to_owned()));
    };
    let (Some(entity_type), Some(id_column)) = (entity_type, id_column) else {
        return Err(TrackedTableError::NotTracked(name));
    };
    if enabled != Some(true) {
        return Err(TrackedTableError::CaptureDisabled(name));
    }
    let key_columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT attribute.attname::text, format_type(attribute.atttypid, attribute.atttypmod)
           FROM pg_index AS index
          CROSS JOIN LATERAL unnest(index.indkey::int2[]) WITH ORDINALITY AS key(attnum, ordinal)
           JOIN pg_attribute AS attribute
             ON attribute.attrelid = index.indrelid AND attribute.attnum = key.attnum
          WHERE index.indrelid = $1::regclass AND index.indisprimary
          ORDER BY key.ordinal",
    )
    .bind(&name)
    .fetch_all(pool)
    .await
    .map_err(database)?;
    if key_columns.is_empty() {
        return Err(TrackedTableError::NoPrimaryKey(name));
    }
    Ok(TrackedTable {
        name,
        schema,
        table,
        entity_type,
        id_column,
        key_columns,
    })
}

/// `"name"` with inner quotes doubled: an identifier from the catalog, safe in SQL text. The
/// backfill's statements are built from these identifiers and from key types as `format_type`
/// prints them (also from the catalog, quoted by PostgreSQL); every value is a bind parameter.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl TrackedTable {
    /// `"schema"."table"`: the table in SQL text, whatever the search path.
    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.table)
        )
    }

    /// `source."a", source."b"`: the key columns of the row alias `source`.
    fn key_list(&self) -> String {
        self.key_columns
            .iter()
            .map(|(column, _)| format!("source.{}", quote_identifier(column)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ARRAY[source."a"::text, …]`: the key as text, the form positions are stored in.
    fn key_as_text(&self) -> String {
        let columns = self
            .key_columns
            .iter()
            .map(|(column, _)| format!("source.{}::text", quote_identifier(column)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ARRAY[{columns}]")
    }

    /// `ROW(($n::text[])[1]::type, …)`: parameter `$n` (a text key) as a row of the key's types.
    fn key_parameter(&self, parameter: usize) -> String {
        let values = self
            .key_columns
            .iter()
            .enumerate()
            .map(|(index, (_, type_name))| {
                format!("(${parameter}::text[])[{}]::{type_name}", index + 1)
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("ROW({values})")
    }

    /// `ROW(source."a", …) > ROW($n…)`, or `true` without a position.
    fn after_key_condition(&self, after_key: Option<&[String]>, parameter: usize) -> String {
        match after_key {
            Some(_) => format!(
                "ROW({}) > {}",
                self.key_list(),
                self.key_parameter(parameter)
            ),
            None => "true".to_owned(),
        }
    }
}

/// The synthetic change-log row of `source` (a row of the tracked table): the same function
/// capture calls, with `'INSERT'` and the row's current image.
const SYNTHETIC_ENTRY_SQL: &str =
    "core.observer_change_entry($1, $2, $3, $4, 'INSERT', to_jsonb(source), NULL)";

/// `NOT EXISTS` a delivered change-log row of `entry`'s entity (any kind, any time), one probe of
/// `tb_entity_change_log_entity_hash_idx` per row. `OFFSET 0` keeps it a per-row probe: as a
/// plain `NOT EXISTS` the planner may turn it into a hash anti-join that reads the whole log for
/// every batch (measured: 1,000-row batches at 2.6k rows/s against a 1M-row log).
const NOT_YET_CAPTURED_SQL: &str = "NOT EXISTS (
        SELECT 1 FROM core.tb_entity_change_log AS logged
         WHERE logged.entity_hash = core.observer_entity_hash(entry.object_type::text, entry.object_id::text)
           AND logged.txid IS NOT NULL
           AND logged.object_type = entry.object_type
           AND logged.object_id = entry.object_id
        OFFSET 0)";

/// What one backfill batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyntheticBatch {
    /// Rows of the table the batch covered (locked).
    pub scanned: u64,
    /// Synthetic INSERT rows written: the scanned rows whose entity had no change in the log.
    pub written: u64,
    /// The primary key of the batch's last row (text per key column); `None` when the table has
    /// no row after the position: the backfill is done.
    pub last_key: Option<Vec<String>>,
}

/// One backfill batch on `connection` (inside the caller's transaction): locks the next
/// `batch_size` rows of `table` after `after_key` in primary-key order `FOR SHARE`, then writes a
/// synthetic INSERT change-log row for each of them whose entity has no change in the log yet.
///
/// Why this cannot double-deliver or misorder a row: the lock makes a concurrent UPDATE or DELETE
/// of a locked row wait until the caller commits, so its captured change gets a larger change-log
/// id than (and commits after) the synthetic INSERT; a change committed before the lock is seen
/// by the second statement (a new snapshot under READ COMMITTED) and the row is skipped — its
/// entity's captured change already carries the whole row. Rows inserted since capture was
/// attached have their captured INSERT and are skipped the same way.
///
/// # Errors
/// The database failed (a deadlock or lock timeout included: the caller rolls back and retries).
pub async fn write_synthetic_inserts(
    connection: &mut sqlx::PgConnection,
    table: &TrackedTable,
    after_key: Option<&[String]>,
    batch_size: u32,
) -> Result<SyntheticBatch, ChangeLogError> {
    let lock_sql = format!(
        "SELECT {key_text} FROM {table} AS source WHERE {after} ORDER BY {keys} LIMIT $2 FOR SHARE OF source",
        key_text = table.key_as_text(),
        table = table.qualified(),
        after = table.after_key_condition(after_key, 1),
        keys = table.key_list(),
    );
    let locked: Vec<(Vec<String>,)> = sqlx::query_as(sqlx::AssertSqlSafe(lock_sql))
        .bind(after_key)
        .bind(i64::from(batch_size.max(1)))
        .fetch_all(&mut *connection)
        .await?;
    let Some((last_key,)) = locked.last().cloned() else {
        return Ok(SyntheticBatch::default());
    };
    let insert_sql = format!(
        "INSERT INTO core.tb_entity_change_log (
             tenant_id, object_type, object_id, modification_type,
             object_data, object_data_before, updated_fields,
             actor_type, actor_id, trace_id, extra_metadata)
         SELECT entry.tenant_id, entry.object_type, entry.object_id, entry.modification_type,
                entry.object_data, entry.object_data_before, entry.updated_fields,
                entry.actor_type, entry.actor_id, entry.trace_id, entry.extra_metadata
           FROM {table} AS source
          CROSS JOIN LATERAL {SYNTHETIC_ENTRY_SQL} AS entry
          WHERE {after} AND ROW({keys}) <= {upto} AND {NOT_YET_CAPTURED_SQL}
          ORDER BY {keys}",
        table = table.qualified(),
        after = table.after_key_condition(after_key, 5),
        keys = table.key_list(),
        upto = table.key_parameter(6),
    );
    let written = sqlx::query(sqlx::AssertSqlSafe(insert_sql))
        .bind(&table.entity_type)
        .bind(&table.id_column)
        .bind(&table.schema)
        .bind(&table.table)
        .bind(after_key)
        .bind(&last_key)
        .execute(&mut *connection)
        .await?
        .rows_affected();
    Ok(SyntheticBatch {
        scanned: u64::try_from(locked.len()).unwrap_or(u64::MAX),
        written,
        last_key: Some(last_key),
    })
}

/// What a backfill of `table` would do now: rows in the table, how many of them would get a
/// synthetic INSERT (their entity has no change in the log), and up to `sample_size` of those
/// entries as JSON (`object_type`, `object_id`, `tenant_id`, `object_data`). Read only.
///
/// # Errors
/// The database failed.
pub async fn preview_synthetic_inserts(
    pool: &PgPool,
    table: &TrackedTable,
    sample_size: u32,
) -> Result<(u64, u64, Vec<serde_json::Value>), ChangeLogError> {
    let counts_sql = format!(
        "SELECT count(*), count(*) FILTER (WHERE {NOT_YET_CAPTURED_SQL})
           FROM {table} AS source CROSS JOIN LATERAL {SYNTHETIC_ENTRY_SQL} AS entry",
        table = table.qualified(),
    );
    let sample_sql = format!(
        "SELECT jsonb_build_object('object_type', entry.object_type, 'object_id', entry.object_id,
                                   'tenant_id', entry.tenant_id, 'object_data', entry.object_data)
           FROM {table} AS source CROSS JOIN LATERAL {SYNTHETIC_ENTRY_SQL} AS entry
          WHERE {NOT_YET_CAPTURED_SQL}
          ORDER BY {keys} LIMIT $5",
        table = table.qualified(),
        keys = table.key_list(),
    );
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *transaction)
        .await?;
    let (total, missing): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(counts_sql))
        .bind(&table.entity_type)
        .bind(&table.id_column)
        .bind(&table.schema)
        .bind(&table.table)
        .fetch_one(&mut *transaction)
        .await?;
    let sample: Vec<(serde_json::Value,)> = sqlx::query_as(sqlx::AssertSqlSafe(sample_sql))
        .bind(&table.entity_type)
        .bind(&table.id_column)
        .bind(&table.schema)
        .bind(&table.table)
        .bind(i64::from(sample_size))
        .fetch_all(&mut *transaction)
        .await?;
    transaction.rollback().await?;
    Ok((
        u64::try_from(total).unwrap_or(0),
        u64::try_from(missing).unwrap_or(0),
        sample.into_iter().map(|(entry,)| entry).collect(),
    ))
}

/// Rows in `table` (an exact count; read only, takes no lock a writer waits for).
///
/// # Errors
/// The database failed.
pub async fn count_rows(pool: &PgPool, table: &TrackedTable) -> Result<u64, ChangeLogError> {
    let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        table.qualified()
    )))
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Changes chosen by their columns, for `replay`: every filter given must hold. Positions up to
/// `upto` only (the log's last position when the selection was made, so that changes written
/// while a replay runs are not part of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeSelection {
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    /// Written at or after this moment (`created_at`).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Written before this moment.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// The last position included.
    pub upto: i64,
}

/// The filter of [`ChangeSelection`] on alias `change`, its values bound from `$1`.
const SELECTED: &str = "(change.pk_entity_change_log <= $1
      AND ($2::text IS NULL OR change.object_type = $2)
      AND ($3::text IS NULL OR change.object_id::text = $3)
      AND ($4::timestamptz IS NULL OR change.created_at >= $4)
      AND ($5::timestamptz IS NULL OR change.created_at < $5))";

/// The log's last position now (0 when it is empty).
///
/// # Errors
/// The database failed.
pub async fn last_position(pool: &PgPool) -> Result<i64, ChangeLogError> {
    let last: Option<i64> =
        sqlx::query_scalar("SELECT max(pk_entity_change_log) FROM core.tb_entity_change_log")
            .fetch_one(pool)
            .await?;
    Ok(last.unwrap_or(0))
}

/// `(position, size, text)` rows as [`RawRow`]s.
fn raw_rows(rows: Vec<(i64, i64, String)>) -> Vec<RawRow> {
    rows.into_iter()
        .map(|(position, size, text)| RawRow {
            position,
            partition: 0,
            size: u64::try_from(size).unwrap_or(0),
            text,
        })
        .collect()
}

/// The rows at `positions` that still exist, in log order, as JSON text with their size (a row
/// over `max_row_bytes` comes as its first `excerpt_chars` characters, as in a page).
///
/// # Errors
/// The database failed.
pub async fn rows_at(
    pool: &PgPool,
    positions: &[i64],
    (max_row_bytes, excerpt_chars): (u32, usize),
) -> Result<Vec<RawRow>, ChangeLogError> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(concat!(
        "SELECT position, size, CASE WHEN size <= $2 THEN body ELSE left(body, $3) END
           FROM (SELECT change.pk_entity_change_log AS position, ",
        row_json_sql!(),
        " AS body
                   FROM core.tb_entity_change_log AS change
                  WHERE change.pk_entity_change_log = ANY($1)) AS selected,
                LATERAL (SELECT octet_length(body)::bigint AS size) AS sized
          ORDER BY position"
    ))
    .bind(positions)
    .bind(i64::from(max_row_bytes))
    .bind(i32::try_from(excerpt_chars).unwrap_or(i32::MAX))
    .fetch_all(pool)
    .await?;
    Ok(raw_rows(rows))
}

/// How many changes `selection` holds after position `after`.
///
/// # Errors
/// The database failed.
pub async fn count_selected(
    pool: &PgPool,
    selection: &ChangeSelection,
    after: i64,
) -> Result<u64, ChangeLogError> {
    let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM core.tb_entity_change_log AS change
          WHERE {SELECTED} AND change.pk_entity_change_log > $6"
    )))
    .bind(selection.upto)
    .bind(selection.entity_type.as_deref())
    .bind(selection.entity_id.as_deref())
    .bind(selection.since)
    .bind(selection.until)
    .bind(after)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Up to `limit` changes of `selection` after position `after`, in log order, as JSON text with
/// their size (a row over `max_row_bytes` comes as its first `excerpt_chars` characters, as in a
/// page). The positions are chosen first, so that only the rows returned are turned into JSON
/// (even when the planner sorts every remaining match).
///
/// # Errors
/// The database failed.
pub async fn read_selected(
    pool: &PgPool,
    selection: &ChangeSelection,
    after: i64,
    limit: u32,
    (max_row_bytes, excerpt_chars): (u32, usize),
) -> Result<Vec<RawRow>, ChangeLogError> {
    const ROW_JSON: &str = row_json_sql!();
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT position, size, CASE WHEN size <= $8 THEN body ELSE left(body, $9) END
           FROM (SELECT change.pk_entity_change_log AS position
                   FROM core.tb_entity_change_log AS change
                  WHERE {SELECTED} AND change.pk_entity_change_log > $6
                  ORDER BY change.pk_entity_change_log
                  LIMIT $7) AS selected
           JOIN core.tb_entity_change_log AS change ON change.pk_entity_change_log = selected.position,
                LATERAL (SELECT {ROW_JSON} AS body) AS text,
                LATERAL (SELECT octet_length(body)::bigint AS size) AS sized
          ORDER BY position"
    )))
    .bind(selection.upto)
    .bind(selection.entity_type.as_deref())
    .bind(selection.entity_id.as_deref())
    .bind(selection.since)
    .bind(selection.until)
    .bind(after)
    .bind(i64::from(limit))
    .bind(i64::from(max_row_bytes))
    .bind(i32::try_from(excerpt_chars).unwrap_or(i32::MAX))
    .fetch_all(pool)
    .await?;
    Ok(raw_rows(rows))
}
