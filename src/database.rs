//! The service's database connection itself, apart from any table: reachability, a connection
//! for a series of store calls, and a bounded read-only transaction (a statement timeout the
//! server enforces). Stores own their tables; this owns nothing but the session.

use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

/// How long the first connection may take before the server counts as not answering.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pool waits for a free connection once the server is known to answer.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The database could not be reached at start: which server, and why, in words. Never holds the
/// URL itself (it may carry a password).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {server}{context}: {cause}")]
pub struct ConnectError {
    malformed: bool,
    server: String,
    context: String,
    cause: String,
}

impl ConnectError {
    /// Whether the URL itself is unusable (a setting to fix, not a server to wait for).
    #[must_use]
    pub fn is_malformed_url(&self) -> bool {
        self.malformed
    }

    /// Why the connection failed, without the server's address.
    #[must_use]
    pub fn cause(&self) -> &str {
        &self.cause
    }
}

/// The database could not be reached or answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("database unreachable: {0}")]
pub struct DatabaseError(#[from] sqlx::Error);

/// A pool of at most `max_connections` to the server `url` names, after one connection proved it
/// answers: a refused connection, an unknown host, failed authentication, an unknown database or a
/// TLS failure is reported at once with the server's `host:port`, rather than as a pool timeout.
///
/// # Errors
/// `url` is not a PostgreSQL URL, or the server cannot be reached within [`CONNECT_TIMEOUT`] or
/// refuses the session.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, ConnectError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("postgres" | "postgresql")) {
        return Err(ConnectError {
            malformed: true,
            server: "(DATABASE_URL)".to_owned(),
            context: String::new(),
            cause: "not a PostgreSQL URL such as postgres://user@host:5432/database (the scheme must be postgres:// or postgresql://)".to_owned(),
        });
    }
    let options = PgConnectOptions::from_str(url).map_err(|error| ConnectError {
        malformed: true,
        server: "(DATABASE_URL)".to_owned(),
        context: String::new(),
        cause: format!(
            "not a PostgreSQL URL such as postgres://user@host:5432/database ({})",
            configuration_reason(&error)
        ),
    })?;
    let server = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let context = format!(
        " (user {:?}, database {:?})",
        options.get_username(),
        options.get_database().unwrap_or(options.get_username())
    );
    let failed = |cause: String| ConnectError {
        malformed: false,
        server: server.clone(),
        context: context.clone(),
        cause,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Err(_) => {
            return Err(failed(format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(error)) => return Err(failed(connect_cause(&error, options.get_host()))),
        Ok(Ok(probe)) => {
            let _ = probe.close().await;
        }
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|error| failed(connect_cause(&error, "")))
}

/// The reason a URL did not parse, without the URL.
fn configuration_reason(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Configuration(source) => source.to_string(),
        other => other.to_string(),
    }
}

/// Why a connection attempt failed, in the words an operator searches for.
fn connect_cause(error: &sqlx::Error, host: &str) -> String {
    match error {
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is PostgreSQL running and listening there?)".to_owned()
            }
            std::io::ErrorKind::TimedOut => "connection timed out".to_owned(),
            _ if io.to_string().contains("lookup address") => {
                format!("unknown host {host:?} (the name does not resolve)")
            }
            _ => format!("network error: {io}"),
        },
        sqlx::Error::Tls(source) => format!("TLS failed: {source}"),
        sqlx::Error::Database(database) => {
            let kind = match database.code().as_deref() {
                Some("28P01" | "28000") => "authentication failed",
                Some("3D000") => "unknown database",
                Some("53300") => "too many connections",
                Some("57P03") => "the server is starting up or shutting down",
                _ => "refused",
            };
            format!("{kind}: {}", database.message())
        }
        other => other.to_string(),
    }
}

/// Whether the database answers.
///
/// # Errors
/// It does not.
pub async fn ping(pool: &PgPool) -> Result<(), DatabaseError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A connection of the pool, for several store calls in a row.
///
/// # Errors
/// No connection could be had.
pub async fn connection(pool: &PgPool) -> Result<PoolConnection<Postgres>, DatabaseError> {
    Ok(pool.acquire().await?)
}

/// A transaction whose every statement the server cancels after `timeout`; end it with
/// [`end_read`] (nothing it did is kept).
///
/// # Errors
/// The database could not be reached.
pub async fn bounded_read(
    pool: &PgPool,
    timeout: Duration,
) -> Result<Transaction<'static, Postgres>, DatabaseError> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(timeout.as_millis().to_string())
        .execute(&mut *transaction)
        .await?;
    Ok(transaction)
}

/// Ends a [`bounded_read`] transaction, keeping nothing.
///
/// # Errors
/// The database could not be reached.
pub async fn end_read(transaction: Transaction<'static, Postgres>) -> Result<(), DatabaseError> {
    transaction.rollback().await?;
    Ok(())
}
