//! Applying the SQL in `migrations/` to a database, safely when several nodes start at once.
//!
//! The migrations are compiled into the binary. The runner takes a session advisory lock, records
//! each applied migration with a checksum in `fraiseql_observers.schema_migrations`, applies the
//! missing ones in order, each in its own transaction, and refuses to run against a database
//! where an applied migration's text has since changed.

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};

/// Advisory-lock key held while migrating ("fqo-migr" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x6671_6f2d_6d69_6772;

/// One migration file.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_change_log",
        sql: include_str!("../migrations/0001_change_log.sql"),
    },
    Migration {
        version: 2,
        name: "0002_observer_schema",
        sql: include_str!("../migrations/0002_observer_schema.sql"),
    },
    Migration {
        version: 3,
        name: "0003_capture_trigger",
        sql: include_str!("../migrations/0003_capture_trigger.sql"),
    },
    Migration {
        version: 4,
        name: "0004_batch_reader",
        sql: include_str!("../migrations/0004_batch_reader.sql"),
    },
    Migration {
        version: 5,
        name: "0005_job_queue",
        sql: include_str!("../migrations/0005_job_queue.sql"),
    },
    Migration {
        version: 6,
        name: "0006_cluster",
        sql: include_str!("../migrations/0006_cluster.sql"),
    },
    Migration {
        version: 7,
        name: "0007_handover",
        sql: include_str!("../migrations/0007_handover.sql"),
    },
    Migration {
        version: 8,
        name: "0008_job_order",
        sql: include_str!("../migrations/0008_job_order.sql"),
    },
    Migration {
        version: 9,
        name: "0009_coordinator",
        sql: include_str!("../migrations/0009_coordinator.sql"),
    },
    Migration {
        version: 10,
        name: "0010_parked_jobs",
        sql: include_str!("../migrations/0010_parked_jobs.sql"),
    },
    Migration {
        version: 11,
        name: "0011_backfill",
        sql: include_str!("../migrations/0011_backfill.sql"),
    },
    Migration {
        version: 12,
        name: "0012_history",
        sql: include_str!("../migrations/0012_history.sql"),
    },
    Migration {
        version: 13,
        name: "0013_inline_attempts",
        sql: include_str!("../migrations/0013_inline_attempts.sql"),
    },
    Migration {
        version: 14,
        name: "0014_replay_runs",
        sql: include_str!("../migrations/0014_replay_runs.sql"),
    },
    Migration {
        version: 15,
        name: "0015_history_errors_recent",
        sql: include_str!("../migrations/0015_history_errors_recent.sql"),
    },
    Migration {
        version: 16,
        name: "0016_history_export",
        sql: include_str!("../migrations/0016_history_export.sql"),
    },
    Migration {
        version: 17,
        name: "0017_statement_capture",
        sql: include_str!("../migrations/0017_statement_capture.sql"),
    },
    Migration {
        version: 18,
        name: "0018_waiting_jobs",
        sql: include_str!("../migrations/0018_waiting_jobs.sql"),
    },
    Migration {
        version: 19,
        name: "0019_completion_promotes",
        sql: include_str!("../migrations/0019_completion_promotes.sql"),
    },
    Migration {
        version: 20,
        name: "0020_completed_jobs",
        sql: include_str!("../migrations/0020_completed_jobs.sql"),
    },
    Migration {
        version: 21,
        name: "0021_notify_partitions",
        sql: include_str!("../migrations/0021_notify_partitions.sql"),
    },
    Migration {
        version: 22,
        name: "0022_read_page",
        sql: include_str!("../migrations/0022_read_page.sql"),
    },
];

impl Migration {
    /// Hex SHA-256 of the migration's text.
    #[must_use]
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration {name} was changed after it was applied to this database (checksum {applied} in the database, {embedded} in this binary)"
    )]
    Changed {
        name: String,
        applied: String,
        embedded: String,
    },
    #[error(
        "the database has migration version {version}, newer than this binary knows ({latest}); run a newer fraiseql-observers"
    )]
    TooNew { version: i32, latest: i32 },
    #[error("migration {name} failed: {source}")]
    Failed {
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error while migrating: {0}")]
    Database(#[from] sqlx::Error),
}

/// What [`run`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations applied now, in order.
    pub applied: Vec<&'static str>,
    /// How many were already in place.
    pub already_applied: usize,
}

/// Applies every missing migration.
///
/// # Errors
/// A migration failed (its transaction is rolled back), one already applied has changed, or the
/// database is newer than this binary.
pub async fn run(pool: &PgPool) -> Result<MigrationReport, MigrateError> {
    let mut connection = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *connection)
        .await?;
    let result = apply_missing(&mut connection).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *connection)
        .await;
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn apply_missing(connection: &mut PgConnection) -> Result<MigrationReport, MigrateError> {
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS fraiseql_observers;
         CREATE TABLE IF NOT EXISTS fraiseql_observers.schema_migrations (
             version    int         PRIMARY KEY,
             name       text        NOT NULL,
             checksum   text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .execute(&mut *connection)
    .await?;
    let applied: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT version, name, checksum FROM fraiseql_observers.schema_migrations ORDER BY version",
    )
    .fetch_all(&mut *connection)
    .await?;
    let latest = MIGRATIONS.last().map_or(0, |migration| migration.version);
    if let Some((version, _, _)) = applied.iter().find(|(version, _, _)| *version > latest) {
        return Err(MigrateError::TooNew {
            version: *version,
            latest,
        });
    }
    let mut report = MigrationReport::default();
    for migration in MIGRATIONS {
        let checksum = migration.checksum();
        if let Some((_, name, applied_checksum)) = applied
            .iter()
            .find(|(version, _, _)| *version == migration.version)
        {
            if *applied_checksum != checksum {
                return Err(MigrateError::Changed {
                    name: name.clone(),
                    applied: applied_checksum.clone(),
                    embedded: checksum,
                });
            }
            report.already_applied += 1;
            continue;
        }
        let mut transaction = connection.begin().await?;
        sqlx::raw_sql(migration.sql)
            .execute(&mut *transaction)
            .await
            .map_err(|source| MigrateError::Failed {
                name: migration.name,
                source,
            })?;
        sqlx::query("INSERT INTO fraiseql_observers.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(&checksum)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        tracing::info!(migration = migration.name, "applied migration");
        report.applied.push(migration.name);
    }
    Ok(report)
}

/// Where one migration stands in a database.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Applied, with the text this binary has.
    Applied,
    /// Not applied yet: `migrate` (or a starting node) applies it.
    Pending,
    /// Applied, but its text has changed since: `migrate` refuses to run.
    Changed { applied_checksum: String },
    /// Applied by a newer binary: this one does not know it and refuses to run.
    Unknown,
}

/// One line of [`status`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct MigrationStatus {
    pub version: i32,
    pub name: String,
    /// The checksum of this binary's text (for an unknown migration, the database's).
    pub checksum: String,
    pub state: MigrationState,
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every migration this binary has, and any the database has beyond them, with its state; reads
/// only (a database never migrated shows every migration pending).
///
/// # Errors
/// The database could not be read.
pub async fn status(pool: &PgPool) -> Result<Vec<MigrationStatus>, MigrateError> {
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('fraiseql_observers.schema_migrations')::text")
            .fetch_one(pool)
            .await?;
    let applied: Vec<(i32, String, String, chrono::DateTime<chrono::Utc>)> = if recorded.is_some() {
        sqlx::query_as(
            "SELECT version, name, checksum, applied_at FROM fraiseql_observers.schema_migrations ORDER BY version",
        )
        .fetch_all(pool)
        .await?
    } else {
        Vec::new()
    };
    let mut lines: Vec<MigrationStatus> = MIGRATIONS
        .iter()
        .map(|migration| {
            let checksum = migration.checksum();
            let found = applied
                .iter()
                .find(|(version, _, _, _)| *version == migration.version);
            let state = match found {
                None => MigrationState::Pending,
                Some((_, _, applied_checksum, _)) if *applied_checksum == checksum => {
                    MigrationState::Applied
                }
                Some((_, _, applied_checksum, _)) => MigrationState::Changed {
                    applied_checksum: applied_checksum.clone(),
                },
            };
            MigrationStatus {
                version: migration.version,
                name: migration.name.to_owned(),
                checksum,
                state,
                applied_at: found.map(|(_, _, _, at)| *at),
            }
        })
        .collect();
    for (version, name, checksum, at) in applied {
        if MIGRATIONS
            .iter()
            .all(|migration| migration.version != version)
        {
            lines.push(MigrationStatus {
                version,
                name,
                checksum,
                state: MigrationState::Unknown,
                applied_at: Some(at),
            });
        }
    }
    Ok(lines)
}
