//! Per-endpoint limits shared by the nodes, so N replicas do not multiply the load on a
//! customer's endpoint: a token bucket (`rate_limit: {per_second, burst}`) and a cap on calls in
//! flight (`max_in_flight`), both keyed by `scheme://host:port`. In Redis (Lua scripts on the
//! Redis clock) when `REDIS_URL` is set, in process otherwise.
//!
//! A call waits for a token and a slot (within its action's timeout). An in-flight slot is
//! leased, so a node that dies holding one frees it after the lease. A store failure lets the
//! call through: limits protect the target, they never lose work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use crate::config::RateLimit;

#[derive(Debug, thiserror::Error)]
#[error("limit store unavailable: {0}")]
pub struct LimitError(String);

/// Token buckets and in-flight slots per endpoint.
#[async_trait]
pub trait LimitStore: Send + Sync + std::fmt::Debug {
    /// Takes a token: `None` when taken, `Some(wait)` when the bucket is empty for that long.
    async fn take_token(
        &self,
        endpoint: &str,
        rate: RateLimit,
    ) -> Result<Option<Duration>, LimitError>;
    /// Takes an in-flight slot for at most `lease`; `None` when `limit` are taken.
    async fn enter(
        &self,
        endpoint: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Option<String>, LimitError>;
    /// Gives a slot back.
    async fn leave(&self, endpoint: &str, slot: &str) -> Result<(), LimitError>;
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One node's limits.
#[derive(Debug, Default)]
pub struct InMemoryLimitStore {
    buckets: Mutex<HashMap<String, Bucket>>,
    slots: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

#[async_trait]
impl LimitStore for InMemoryLimitStore {
    async fn take_token(
        &self,
        endpoint: &str,
        rate: RateLimit,
    ) -> Result<Option<Duration>, LimitError> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let bucket = buckets.entry(endpoint.to_owned()).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        });
        let per_second = f64::from(rate.per_second);
        bucket.tokens = (bucket.tokens + (now - bucket.at).as_secs_f64() * per_second)
            .min(f64::from(rate.burst));
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(None)
        } else {
            Ok(Some(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / per_second,
            )))
        }
    }

    async fn enter(
        &self,
        endpoint: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Option<String>, LimitError> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let held = slots.entry(endpoint.to_owned()).or_default();
        held.retain(|_, expires| *expires > now);
        if held.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
            return Ok(None);
        }
        let slot = Uuid::new_v4().simple().to_string();
        held.insert(slot.clone(), now + lease);
        Ok(Some(slot))
    }

    async fn leave(&self, endpoint: &str, slot: &str) -> Result<(), LimitError> {
        if let Some(held) = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(endpoint)
        {
            held.remove(slot);
        }
        Ok(())
    }
}

/// Limits shared through Redis.
#[derive(Clone, Debug)]
pub struct RedisLimitStore {
    connection: crate::redis_client::SharedConnection,
    prefix: String,
}

/// Token bucket: `ARGV` per second, burst. Returns 0 when a token was taken, else the wait in ms.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local data = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(data[1]) or burst
local at = tonumber(data[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait";

/// In-flight slots: `ARGV` limit, lease ms, slot. Returns 1 when the slot was taken.
const ENTER: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1";

impl RedisLimitStore {
    /// Limits on `url` under `prefix`; connects lazily.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self, LimitError> {
        let connection = crate::redis_client::managed_connection(url)
            .map_err(|error| LimitError(error.to_string()))?;
        Ok(Self::with_connection(connection, prefix))
    }

    /// A store on an existing managed connection (one per node, shared by every store).
    #[must_use]
    pub fn with_connection(
        connection: crate::redis_client::SharedConnection,
        prefix: impl Into<String>,
    ) -> Self {
        RedisLimitStore {
            connection,
            prefix: prefix.into(),
        }
    }
}

#[async_trait]
impl LimitStore for RedisLimitStore {
    async fn take_token(
        &self,
        endpoint: &str,
        rate: RateLimit,
    ) -> Result<Option<Duration>, LimitError> {
        let mut connection = self.connection.clone();
        let wait: u64 = redis::Script::new(TAKE)
            .key(format!("{}rate:{endpoint}", self.prefix))
            .arg(rate.per_second)
            .arg(rate.burst)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| LimitError(error.to_string()))?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }

    async fn enter(
        &self,
        endpoint: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Option<String>, LimitError> {
        let mut connection = self.connection.clone();
        let slot = Uuid::new_v4().simple().to_string();
        let taken: i64 = redis::Script::new(ENTER)
            .key(format!("{}inflight:{endpoint}", self.prefix))
            .arg(limit)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&slot)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| LimitError(error.to_string()))?;
        Ok((taken == 1).then_some(slot))
    }

    async fn leave(&self, endpoint: &str, slot: &str) -> Result<(), LimitError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("ZREM")
            .arg(format!("{}inflight:{endpoint}", self.prefix))
            .arg(slot)
            .query_async(&mut connection)
            .await
            .map_err(|error| LimitError(error.to_string()))?;
        Ok(())
    }
}

/// How long to look again for a free in-flight slot.
const SLOT_RETRY: Duration = Duration::from_millis(20);

/// Waits for a token of `rate` at `endpoint` (a store failure lets the call through).
pub async fn wait_for_token(store: &dyn LimitStore, endpoint: &str, rate: RateLimit) {
    loop {
        match store.take_token(endpoint, rate).await {
            Ok(None) => return,
            Ok(Some(wait)) => tokio::time::sleep(wait).await,
            Err(error) => {
                tracing::warn!(%error, endpoint, "rate limit unavailable; calling");
                return;
            }
        }
    }
}

/// Waits for one of `limit` in-flight slots at `endpoint`; `None` when the store failed (the
/// call goes ahead unlimited).
pub async fn wait_for_slot(
    store: &dyn LimitStore,
    endpoint: &str,
    limit: u32,
    lease: Duration,
) -> Option<String> {
    loop {
        match store.enter(endpoint, limit, lease).await {
            Ok(Some(slot)) => return Some(slot),
            Ok(None) => tokio::time::sleep(SLOT_RETRY).await,
            Err(error) => {
                tracing::warn!(%error, endpoint, "in-flight limit unavailable; calling");
                return None;
            }
        }
    }
}

/// Behaviour every store has.
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use super::{LimitStore, RateLimit};
    use std::time::{Duration, Instant};

    /// A burst is granted at once, then about `per_second` per second; slots are capped, given
    /// back, and expire with their lease.
    ///
    /// # Panics
    /// When the store misbehaves.
    pub async fn check(stores: &[&dyn LimitStore], endpoint: &str) {
        let rate = RateLimit {
            per_second: 20,
            burst: 5,
        };
        let started = Instant::now();
        let mut granted = 0;
        while started.elapsed() < Duration::from_millis(500) {
            for store in stores {
                if store.take_token(endpoint, rate).await.unwrap().is_none() {
                    granted += 1;
                }
            }
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "small"
        )]
        let ceiling = 5 + (started.elapsed().as_secs_f64() * 20.0).ceil() as usize + 1;
        assert!(
            (5..=ceiling).contains(&granted),
            "granted {granted}, at most {ceiling} across every store"
        );

        let slots = format!("{endpoint}/slots");
        let lease = Duration::from_millis(300);
        let first = stores[0].enter(&slots, 2, lease).await.unwrap().unwrap();
        let _second = stores[stores.len() - 1]
            .enter(&slots, 2, lease)
            .await
            .unwrap()
            .unwrap();
        assert!(
            stores[0].enter(&slots, 2, lease).await.unwrap().is_none(),
            "two at most"
        );
        stores[0].leave(&slots, &first).await.unwrap();
        assert!(
            stores[stores.len() - 1]
                .enter(&slots, 2, lease)
                .await
                .unwrap()
                .is_some()
        );
        assert!(stores[0].enter(&slots, 2, lease).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            stores[0].enter(&slots, 2, lease).await.unwrap().is_some(),
            "slots of a vanished holder expire with their lease"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_in_memory_store_conforms() {
        let store = InMemoryLimitStore::default();
        conformance::check(&[&store], "http://a:80").await;
    }
}
