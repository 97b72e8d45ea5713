//! The Redis connection the shared-state stores use: one multiplexed, managed connection per
//! node (cloned into every store), created lazily so a node starts while Redis is down, with
//! bounded connect and response timeouts and reconnection with capped exponential backoff —
//! behind a fail-fast gate.
//!
//! The gate: a managed connection makes every command issued while it reconnects wait for the
//! reconnection (its retries and backoff) and then fail; with Redis gone, every guard operation of
//! every action would pay that wait, and deliveries would crawl instead of degrading. So after a
//! connection-class failure, commands fail at once for [`PROBE_INTERVAL`]; then one command probes
//! (the others still fail fast) and its outcome opens or closes the gate again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long connecting and each response may take before the operation fails (and the store's
/// fallback applies).
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// After a connection failure, how long commands fail without trying before one probes again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// A managed connection to `url`, behind the fail-fast gate.
///
/// # Errors
/// The URL is invalid.
pub fn managed_connection(url: &str) -> RedisResult<SharedConnection> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(REDIS_TIMEOUT);
    Ok(SharedConnection {
        manager: redis::aio::ConnectionManager::new_lazy_with_config(client, config)?,
        gate: Arc::new(Gate::default()),
    })
}

/// Where a Redis URL points (`host:port` or a socket path), without its credentials.
///
/// # Errors
/// The URL is invalid.
pub fn server_of(url: &str) -> RedisResult<String> {
    Ok(redis::Client::open(url)?
        .get_connection_info()
        .addr()
        .to_string())
}

/// Whether Redis answers a `PING` within [`REDIS_TIMEOUT`].
///
/// # Errors
/// It does not, or answers with an error.
pub async fn ping(connection: &SharedConnection) -> RedisResult<()> {
    let mut connection = connection.clone();
    match tokio::time::timeout(
        REDIS_TIMEOUT,
        redis::cmd("PING").query_async::<String>(&mut connection),
    )
    .await
    {
        Ok(answer) => answer.map(drop),
        Err(_) => Err(RedisError::from((
            ErrorKind::Io,
            "no answer",
            format!("PING got no answer within {} s", REDIS_TIMEOUT.as_secs()),
        ))),
    }
}

/// The node's Redis connection; clones share the connection and the gate.
#[derive(Clone)]
pub struct SharedConnection {
    manager: redis::aio::ConnectionManager,
    gate: Arc<Gate>,
}

/// Shows the gate, never the URL (it may carry a password).
impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let closed = self
            .gate
            .closed_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some();
        formatter
            .debug_struct("SharedConnection")
            .field("failing_fast", &closed)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Gate {
    /// Set after a connection failure: commands fail without trying until then.
    closed_until: std::sync::Mutex<Option<Instant>>,
    /// One command is probing a closed gate.
    probing: AtomicBool,
}

/// What the gate lets a command do.
enum Pass {
    Open,
    Probe,
}

impl Gate {
    fn enter(&self) -> Result<Pass, RedisError> {
        let closed_until = *self
            .closed_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match closed_until {
            None => Ok(Pass::Open),
            Some(until)
                if Instant::now() >= until
                    && self
                        .probing
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok() =>
            {
                Ok(Pass::Probe)
            }
            Some(_) => Err(RedisError::from((
                ErrorKind::Io,
                "Redis unreachable",
                "a recent command failed to connect; the next probe is due shortly".to_owned(),
            ))),
        }
    }

    fn leave<T>(&self, pass: &Pass, result: &RedisResult<T>) {
        let unreachable = matches!(result, Err(error) if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout());
        let mut closed_until = self
            .closed_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if unreachable {
            *closed_until = Some(Instant::now() + PROBE_INTERVAL);
        } else if result.is_ok() {
            *closed_until = None;
        }
        if matches!(pass, Pass::Probe) {
            self.probing.store(false, Ordering::Release);
        }
    }
}

impl ConnectionLike for SharedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let pass = self.gate.enter()?;
            let result = self.manager.req_packed_command(cmd).await;
            self.gate.leave(&pass, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let pass = self.gate.enter()?;
            let result = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.gate.leave(&pass, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_until_the_probe_interval_passes() {
        // A port nothing listens on: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut connection = managed_connection(&format!("redis://127.0.0.1:{port}/")).unwrap();
        let first: RedisResult<Value> = redis::cmd("PING").query_async(&mut connection).await;
        assert!(first.is_err());
        for _ in 0..100 {
            let refused: RedisResult<Value> = redis::cmd("PING").query_async(&mut connection).await;
            let error = refused.unwrap_err();
            // Refused by the gate, without a connection attempt.
            assert!(error.to_string().contains("Redis unreachable"), "{error}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
        let probe: RedisResult<Value> = redis::cmd("PING").query_async(&mut connection).await;
        let error = probe.unwrap_err();
        assert!(
            !error.to_string().contains("Redis unreachable"),
            "after the interval a command tries the server again: {error}"
        );
    }
}
