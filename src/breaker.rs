//! Circuit breakers per target endpoint (`scheme://host:port`), shared by the nodes through
//! Redis (or kept in process without it), so the whole cluster stops calling an endpoint that
//! keeps failing.
//!
//! Closed → `consecutive_failures` transient failures in a row → Open for `open_for` (calls are
//! refused without being made) → half-open: up to `half_open_probes` calls go through; a success
//! closes the breaker, a failure opens it again. Only failures that say the endpoint is unwell
//! count (connection failures, timeouts, 5xx); a 4xx answer or a 429 means it is up.
//!
//! The state lives in the store and is read and updated around the call, never locked across
//! it. While a breaker is open, the executor hands the action to the job queue due when the
//! breaker reopens, and job workers postpone such jobs without spending an attempt, so an
//! outage does not flood the dead-letter queue.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::ErrorCode;

/// When a breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

/// Whether a call may be made now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: call.
    Allowed,
    /// Half-open: call, as one of the probes.
    Probe,
    /// Open (or the probes are taken): do not call before this has passed.
    Refused { retry_in: Duration },
}

#[derive(Debug, thiserror::Error)]
#[error("circuit breaker store unavailable: {0}")]
pub struct BreakerError(String);

/// Whether an attempt's error says the endpoint is unwell.
#[must_use]
pub fn counts_as_failure(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::ConnectionFailed | ErrorCode::ActionTimeout | ErrorCode::RemoteUnavailable
    )
}

/// Breaker state per endpoint.
#[async_trait]
pub trait BreakerStore: Send + Sync + std::fmt::Debug {
    async fn admit(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
    ) -> Result<Admission, BreakerError>;
    /// Records a call's outcome (`failed`: it counts as a failure).
    async fn record(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
        failed: bool,
    ) -> Result<(), BreakerError>;
}

#[derive(Clone, Copy, Debug, Default)]
enum State {
    #[default]
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        probes: u32,
    },
}

#[derive(Debug, Default)]
struct Breaker {
    state: State,
    failures: u32,
}

/// One node's breakers.
#[derive(Debug, Default)]
pub struct InMemoryBreakerStore {
    breakers: Mutex<HashMap<String, Breaker>>,
}

#[async_trait]
impl BreakerStore for InMemoryBreakerStore {
    async fn admit(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
    ) -> Result<Admission, BreakerError> {
        let mut breakers = self
            .breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let breaker = breakers.entry(endpoint.to_owned()).or_default();
        let now = Instant::now();
        if let State::Open { until } = breaker.state {
            if now < until {
                return Ok(Admission::Refused {
                    retry_in: until - now,
                });
            }
            breaker.state = State::HalfOpen { probes: 0 };
        }
        Ok(match &mut breaker.state {
            State::HalfOpen { probes } if *probes < policy.half_open_probes => {
                *probes += 1;
                Admission::Probe
            }
            State::HalfOpen { .. } => Admission::Refused {
                retry_in: policy.open_for.min(Duration::from_secs(1)),
            },
            _ => Admission::Allowed,
        })
    }

    async fn record(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
        failed: bool,
    ) -> Result<(), BreakerError> {
        let mut breakers = self
            .breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let breaker = breakers.entry(endpoint.to_owned()).or_default();
        let open = |breaker: &mut Breaker| {
            breaker.state = State::Open {
                until: Instant::now() + policy.open_for,
            };
            breaker.failures = 0;
        };
        match (breaker.state, failed) {
            (State::HalfOpen { .. }, true) => open(breaker),
            (State::HalfOpen { .. } | State::Closed, false) => *breaker = Breaker::default(),
            (State::Closed, true) => {
                breaker.failures += 1;
                if breaker.failures >= policy.consecutive_failures {
                    open(breaker);
                }
            }
            (State::Open { .. }, _) => {}
        }
        Ok(())
    }
}

/// Breakers shared through Redis: one hash per endpoint (`state`, `until` in ms of the Redis
/// clock, `failures`, `probes`), read and changed by Lua scripts so each step is atomic.
#[derive(Clone, Debug)]
pub struct RedisBreakerStore {
    connection: crate::redis_client::SharedConnection,
    prefix: String,
}

/// Returns `{admission, retry_in_ms}`: 1 allowed, 2 probe, 0 refused. `ARGV`: open-for ms, probes.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then
  local untilms = tonumber(redis.call('HGET', KEYS[1], 'until'))
  if now < untilms then return {0, untilms - now} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probes', 0)
  state = 'half_open'
end
if state == 'half_open' then
  local probes = redis.call('HINCRBY', KEYS[1], 'probes', 1)
  if probes <= tonumber(ARGV[2]) then return {2, 0} end
  return {0, math.min(tonumber(ARGV[1]), 1000)}
end
return {1, 0}";

/// `ARGV`: failed (1/0), threshold, open-for ms.
const RECORD: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local failed = ARGV[1] == '1'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + tonumber(ARGV[3]), 'failures', 0)
end
if state == 'half_open' then
  if failed then open() else redis.call('DEL', KEYS[1]) end
elseif state == 'closed' then
  if failed then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= tonumber(ARGV[2]) then open() end
  else
    redis.call('DEL', KEYS[1])
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 10 + 60000)
return 0";

impl RedisBreakerStore {
    /// Breakers on `url` under `prefix`; connects lazily.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self, BreakerError> {
        let connection = crate::redis_client::managed_connection(url)
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(Self::with_connection(connection, prefix))
    }

    /// A store on an existing managed connection (one per node, shared by every store).
    #[must_use]
    pub fn with_connection(
        connection: crate::redis_client::SharedConnection,
        prefix: impl Into<String>,
    ) -> Self {
        RedisBreakerStore {
            connection,
            prefix: prefix.into(),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl BreakerStore for RedisBreakerStore {
    async fn admit(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
    ) -> Result<Admission, BreakerError> {
        let mut connection = self.connection.clone();
        let (admission, retry_in): (i64, u64) = redis::Script::new(ADMIT)
            .key(format!("{}breaker:{endpoint}", self.prefix))
            .arg(millis(policy.open_for))
            .arg(policy.half_open_probes)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(match admission {
            1 => Admission::Allowed,
            2 => Admission::Probe,
            _ => Admission::Refused {
                retry_in: Duration::from_millis(retry_in),
            },
        })
    }

    async fn record(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
        failed: bool,
    ) -> Result<(), BreakerError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::Script::new(RECORD)
            .key(format!("{}breaker:{endpoint}", self.prefix))
            .arg(u8::from(failed))
            .arg(policy.consecutive_failures)
            .arg(millis(policy.open_for))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(())
    }
}

/// A store and the policy every endpoint gets.
#[derive(Clone, Debug)]
pub struct Breakers {
    pub store: std::sync::Arc<dyn BreakerStore>,
    pub policy: BreakerPolicy,
}

impl Breakers {
    /// May a call to `endpoint` be made? A store failure admits (the breaker fails open).
    pub async fn admit(&self, endpoint: &str) -> Admission {
        match self.store.admit(endpoint, &self.policy).await {
            Ok(admission) => admission,
            Err(error) => {
                tracing::warn!(%error, endpoint, "circuit breaker state unavailable; calling");
                Admission::Allowed
            }
        }
    }

    /// Records how a call to `endpoint` ended.
    pub async fn record(&self, endpoint: &str, code: Option<ErrorCode>) {
        let failed = code.is_some_and(counts_as_failure);
        if let Err(error) = self.store.record(endpoint, &self.policy, failed).await {
            tracing::warn!(%error, endpoint, "recording a call in its circuit breaker failed");
        }
    }
}

/// Behaviour every store has.
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use super::{Admission, BreakerPolicy, BreakerStore};
    use std::time::Duration;

    /// Closed → open after the failures; open refuses; half-open probe; probe failure → open;
    /// probe success → closed; a success resets the failure count.
    ///
    /// # Panics
    /// When the store misbehaves.
    pub async fn check(store: &dyn BreakerStore, endpoint: &str) {
        let policy = BreakerPolicy {
            consecutive_failures: 3,
            open_for: Duration::from_millis(300),
            half_open_probes: 1,
        };
        assert_eq!(
            store.admit(endpoint, &policy).await.unwrap(),
            Admission::Allowed
        );
        store.record(endpoint, &policy, true).await.unwrap();
        store.record(endpoint, &policy, true).await.unwrap();
        store.record(endpoint, &policy, false).await.unwrap();
        store.record(endpoint, &policy, true).await.unwrap();
        store.record(endpoint, &policy, true).await.unwrap();
        assert_eq!(
            store.admit(endpoint, &policy).await.unwrap(),
            Admission::Allowed,
            "a success in between resets the count"
        );
        store.record(endpoint, &policy, true).await.unwrap();
        let Admission::Refused { retry_in } = store.admit(endpoint, &policy).await.unwrap() else {
            panic!("three failures in a row open the breaker");
        };
        assert!(retry_in <= policy.open_for && retry_in > Duration::ZERO);

        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            store.admit(endpoint, &policy).await.unwrap(),
            Admission::Probe
        );
        assert!(
            matches!(
                store.admit(endpoint, &policy).await.unwrap(),
                Admission::Refused { .. }
            ),
            "one probe at a time"
        );
        store.record(endpoint, &policy, true).await.unwrap();
        assert!(
            matches!(
                store.admit(endpoint, &policy).await.unwrap(),
                Admission::Refused { .. }
            ),
            "a failed probe opens it again"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            store.admit(endpoint, &policy).await.unwrap(),
            Admission::Probe
        );
        store.record(endpoint, &policy, false).await.unwrap();
        assert_eq!(
            store.admit(endpoint, &policy).await.unwrap(),
            Admission::Allowed,
            "a successful probe closes it"
        );
        assert_eq!(
            store
                .admit(&format!("{endpoint}-other"), &policy)
                .await
                .unwrap(),
            Admission::Allowed,
            "endpoints are independent"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_in_memory_store_conforms() {
        conformance::check(&InMemoryBreakerStore::default(), "http://a:80").await;
    }
}
