//! The Redis connection the shared-state stores use: one multiplexed, managed connection per
//! node (cloned into every store), created lazily so a node starts while Redis is down, with
//! bounded connect and response timeouts and reconnection with capped exponential backoff.

use std::time::Duration;

/// How long connecting and each response may take before the operation fails (and the store's
/// fallback applies).
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// A managed connection to `url`.
///
/// # Errors
/// The URL is invalid.
pub fn managed_connection(url: &str) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(REDIS_TIMEOUT);
    redis::aio::ConnectionManager::new_lazy_with_config(client, config)
}
