//! Circuit breakers per target endpoint (`scheme://host:port`), shared by the nodes through
//! Redis (or kept in process without it), so the whole cluster stops calling an endpoint that is
//! down — and only then: a burst we caused is the adaptive limiter's to shed
//! ([`crate::concurrency`]), not a reason to stop calling.
//!
//! **Closed** → the breaker counts the calls of a sliding window ([`BreakerPolicy::window`], ten
//! buckets) and opens when at least [`BreakerPolicy::minimum_calls`] were made in it and
//! [`BreakerPolicy::failure_rate_percent`] of them failed. Only failures that say the endpoint is
//! unwell count (connection failures, timeouts, 5xx); a 4xx answer or a 429 means it is up. A
//! failure that ends while this node's limiter for the endpoint is already shrinking is our own
//! overload being shed: it is not counted at all ([`CallOutcome::Discounted`]), nor is a call that
//! was not made.
//!
//! **Open** for an open period that starts at [`BreakerPolicy::first_open_for`] and doubles each
//! time a probe fails, up to [`BreakerPolicy::open_for`]; calls are refused without being made.
//! **Half-open** then: up to [`BreakerPolicy::half_open_probes`] calls go through; the first
//! success closes the breaker (and resets the open period), a failure opens it again for twice as
//! long. A probe that never reports (its node died) is given up after the longest open period.
//!
//! The state lives in the store and is read and updated around the call, never locked across
//! it. While a breaker is open, the executor hands the action to the job queue due when the
//! breaker reopens — marked as parked on this endpoint's circuit ([`circuit_id`]) — and job
//! workers postpone such jobs without spending an attempt, so an outage does not flood the
//! dead-letter queue. [`Breakers`] brings that work back as soon as the endpoint answers again:
//! when a probe closes the circuit it makes the endpoint's parked jobs due now (the job queue's
//! NOTIFY wakes the workers), and while the circuit is open it checks every
//! [`REACHABILITY_INTERVAL`] whether the endpoint accepts TCP connections again; an endpoint seen
//! refusing (or not answering) connections that accepts one ends the open period at once and
//! wakes its parked jobs, whose first ones are the probes. An endpoint that accepts connections
//! but answers 5xx gets no such shortcut: it waits out its doubling open period.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::error::ErrorCode;
use crate::jobs::PostgresJobQueue;
use crate::metrics::{BreakerTransitionLabels, EndpointLabel, Metrics};

/// How many buckets the sliding window is cut into.
const WINDOW_BUCKETS: u64 = 10;
/// How often an open circuit's endpoint is checked for accepting connections again.
pub const REACHABILITY_INTERVAL: Duration = Duration::from_millis(200);
/// How long one reachability check waits for a connection.
const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(1);
/// The most endpoints one node checks for reachability at once (endpoints come from the
/// configuration, so this is a guard, not a limit anyone should meet).
const MAX_WATCHED_ENDPOINTS: usize = 64;
/// The longest a refused half-open call is told to wait before asking again.
const HALF_OPEN_RECHECK: Duration = Duration::from_secs(1);
/// When the jobs parked on a circuit are swept a second time after it closed.
const SECOND_SWEEP_AFTER: Duration = Duration::from_millis(300);
/// Parked jobs made due per statement when a circuit closes.
const WAKE_BATCH: i64 = 10_000;

/// Default share of the window's calls that must fail to open the circuit.
pub const DEFAULT_FAILURE_RATE_PERCENT: u8 = 50;
/// Default least number of calls in the window before the rate is looked at.
pub const DEFAULT_MINIMUM_CALLS: u32 = 10;
/// Default length of the sliding window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Default first open period (doubled while the endpoint stays down).
pub const DEFAULT_FIRST_OPEN_FOR: Duration = Duration::from_secs(1);
/// Default longest open period.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(30);
/// Default number of calls let through when half-open.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 3;

/// When a breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Open when at least this share (percent, 1–100) of the window's counted calls failed.
    pub failure_rate_percent: u8,
    /// ... and at least this many calls were counted in the window.
    pub minimum_calls: u32,
    /// The sliding window the rate is measured over.
    pub window: Duration,
    /// The first open period after the breaker was closed.
    pub first_open_for: Duration,
    /// The longest open period: each failed probe doubles the period up to this.
    pub open_for: Duration,
    /// Calls let through while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_rate_percent: DEFAULT_FAILURE_RATE_PERCENT,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            window: DEFAULT_WINDOW,
            first_open_for: DEFAULT_FIRST_OPEN_FOR,
            open_for: DEFAULT_OPEN_FOR,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
        }
    }
}

impl BreakerPolicy {
    /// The first open period, never beyond the longest.
    fn first_period(&self) -> Duration {
        self.first_open_for
            .min(self.open_for)
            .max(Duration::from_millis(1))
    }

    /// The length of one bucket of the window.
    fn bucket_millis(&self) -> u64 {
        (millis(self.window) / WINDOW_BUCKETS).max(1)
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

/// What a call says about its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The endpoint answered (whatever the status, but 5xx).
    Succeeded,
    /// Connection failure, timeout or 5xx while the limiter was not shedding our own overload.
    Failed,
    /// Says nothing: the call was not made, or failed while this node's limiter was already
    /// shrinking for the endpoint. A half-open probe reported so is given back.
    Discounted,
}

/// A breaker's state as the store holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of the `breaker_state` gauge: 0 closed, 1 open (refusing calls), 2 half-open.
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// What recording a call changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The call opened the circuit (from closed, or a failed probe), for this long.
    Opened {
        open_for: Duration,
    },
    /// The call (a probe) closed the circuit.
    Closed,
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

/// How a call that ended with `code` (`None`: success) counts, given whether this node's limiter
/// was already shrinking for the endpoint when it ended.
#[must_use]
pub fn outcome_of(code: Option<ErrorCode>, limiter_was_shrinking: bool) -> CallOutcome {
    let Some(code) = code else {
        return CallOutcome::Succeeded;
    };
    if code.call_not_made() || (counts_as_failure(code) && limiter_was_shrinking) {
        CallOutcome::Discounted
    } else if counts_as_failure(code) {
        CallOutcome::Failed
    } else {
        CallOutcome::Succeeded
    }
}

/// The identity of an endpoint's circuit as the job queue stores it on parked jobs: a digest of
/// `scheme://host:port`, so that a host from the environment is not written to the database.
#[must_use]
pub fn circuit_id(endpoint: &str) -> String {
    let digest = Sha256::digest(endpoint.as_bytes());
    hex::encode(&digest[..16])
}

/// Breaker state per endpoint.
#[async_trait]
pub trait BreakerStore: Send + Sync + std::fmt::Debug {
    /// May a call be made now? Moves an open breaker whose period has passed to half-open and
    /// hands out its probes.
    async fn admit(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
    ) -> Result<Admission, BreakerError>;
    /// Records a call's outcome; says whether it opened or closed the circuit.
    async fn record(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
        outcome: CallOutcome,
    ) -> Result<Transition, BreakerError>;
    /// The breaker's state (an open one whose period has passed is still open until a call asks).
    async fn state(&self, endpoint: &str) -> Result<BreakerState, BreakerError>;
    /// Ends an open breaker's period now (half-open, no probe out); `false` when it was not open.
    async fn end_open_period(&self, endpoint: &str) -> Result<bool, BreakerError>;
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
        /// Probes out since this moment; given up after the longest open period.
        since: Instant,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    number: u64,
    calls: u64,
    failures: u64,
}

impl Bucket {
    /// Whether this bucket holds calls within the window of the current bucket `number`.
    fn counts_at(&self, number: u64) -> bool {
        self.calls > 0 && self.number + WINDOW_BUCKETS > number
    }
}

#[derive(Debug, Default)]
struct Breaker {
    state: State,
    /// The current open period (the first one while closed).
    period: Option<Duration>,
    buckets: [Bucket; 10],
}

/// One node's breakers.
#[derive(Debug)]
pub struct InMemoryBreakerStore {
    breakers: Mutex<HashMap<String, Breaker>>,
    /// The origin of the window's bucket numbers.
    origin: Instant,
}

impl Default for InMemoryBreakerStore {
    fn default() -> Self {
        InMemoryBreakerStore {
            breakers: Mutex::new(HashMap::new()),
            origin: Instant::now(),
        }
    }
}

/// Endpoints tracked before idle ones are forgotten: a target host rendered from event data can
/// name any number of them, and a closed breaker with no call in its window holds nothing worth
/// keeping.
const MAX_TRACKED_ENDPOINTS: usize = 4096;

impl InMemoryBreakerStore {
    /// The breaker of `endpoint`, made closed if unknown; at [`MAX_TRACKED_ENDPOINTS`], closed
    /// breakers with no call in the window are forgotten first.
    fn breaker<'a>(
        &self,
        breakers: &'a mut HashMap<String, Breaker>,
        endpoint: &str,
        policy: &BreakerPolicy,
        now: Instant,
    ) -> &'a mut Breaker {
        if breakers.len() >= MAX_TRACKED_ENDPOINTS && !breakers.contains_key(endpoint) {
            let number = self.bucket_number(policy, now);
            breakers.retain(|_, breaker| {
                !matches!(breaker.state, State::Closed)
                    || breaker
                        .buckets
                        .iter()
                        .any(|bucket| bucket.counts_at(number))
            });
        }
        breakers.entry(endpoint.to_owned()).or_default()
    }

    /// The window bucket `now` falls in.
    fn bucket_number(&self, policy: &BreakerPolicy, now: Instant) -> u64 {
        let elapsed =
            u64::try_from(now.duration_since(self.origin).as_millis()).unwrap_or(u64::MAX);
        elapsed / policy.bucket_millis()
    }

    /// How many endpoints are tracked now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn open(breaker: &mut Breaker, period: Duration, now: Instant) -> Transition {
        *breaker = Breaker {
            state: State::Open {
                until: now + period,
            },
            period: Some(period),
            buckets: [Bucket::default(); 10],
        };
        Transition::Opened { open_for: period }
    }
}

#[async_trait]
impl BreakerStore for InMemoryBreakerStore {
    async fn admit(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
    ) -> Result<Admission, BreakerError> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let breaker = self.breaker(&mut breakers, endpoint, policy, now);
        if let State::Open { until } = breaker.state {
            if now < until {
                return Ok(Admission::Refused {
                    retry_in: until - now,
                });
            }
            breaker.state = State::HalfOpen {
                probes: 0,
                since: now,
            };
        }
        let period = breaker.period.unwrap_or_else(|| policy.first_period());
        Ok(match &mut breaker.state {
            State::HalfOpen { probes, since } => {
                if now.duration_since(*since) >= policy.open_for {
                    // The probes out never reported: their nodes are gone.
                    *probes = 0;
                    *since = now;
                }
                if *probes < policy.half_open_probes {
                    *probes += 1;
                    Admission::Probe
                } else {
                    Admission::Refused {
                        retry_in: period.min(HALF_OPEN_RECHECK),
                    }
                }
            }
            _ => Admission::Allowed,
        })
    }

    async fn record(
        &self,
        endpoint: &str,
        policy: &BreakerPolicy,
        outcome: CallOutcome,
    ) -> Result<Transition, BreakerError> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let breaker = self.breaker(&mut breakers, endpoint, policy, now);
        Ok(match (breaker.state, outcome) {
            (State::Open { .. }, _) | (State::Closed, CallOutcome::Discounted) => Transition::None,
            (State::HalfOpen { .. }, CallOutcome::Failed) => {
                let period = breaker.period.unwrap_or_else(|| policy.first_period());
                Self::open(breaker, (period * 2).min(policy.open_for), now)
            }
            (State::HalfOpen { .. }, CallOutcome::Succeeded) => {
                *breaker = Breaker::default();
                Transition::Closed
            }
            (State::HalfOpen { probes, since }, CallOutcome::Discounted) => {
                breaker.state = State::HalfOpen {
                    probes: probes.saturating_sub(1),
                    since,
                };
                Transition::None
            }
            (State::Closed, counted) => {
                let number = self.bucket_number(policy, now);
                let bucket = &mut breaker.buckets
                    [usize::try_from(number % WINDOW_BUCKETS).unwrap_or_default()];
                if bucket.number != number {
                    *bucket = Bucket {
                        number,
                        calls: 0,
                        failures: 0,
                    };
                }
                bucket.calls += 1;
                if counted != CallOutcome::Failed {
                    return Ok(Transition::None);
                }
                bucket.failures += 1;
                let (calls, failures) = breaker
                    .buckets
                    .iter()
                    .filter(|bucket| bucket.counts_at(number))
                    .fold((0, 0), |(calls, failures), bucket| {
                        (calls + bucket.calls, failures + bucket.failures)
                    });
                if calls >= u64::from(policy.minimum_calls)
                    && failures * 100 >= u64::from(policy.failure_rate_percent) * calls
                {
                    Self::open(breaker, policy.first_period(), now)
                } else {
                    Transition::None
                }
            }
        })
    }

    async fn state(&self, endpoint: &str) -> Result<BreakerState, BreakerError> {
        let breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(match breakers.get(endpoint).map(|breaker| breaker.state) {
            None | Some(State::Closed) => BreakerState::Closed,
            Some(State::Open { .. }) => BreakerState::Open,
            Some(State::HalfOpen { .. }) => BreakerState::HalfOpen,
        })
    }

    async fn end_open_period(&self, endpoint: &str) -> Result<bool, BreakerError> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(breaker) = breakers.get_mut(endpoint) else {
            return Ok(false);
        };
        if !matches!(breaker.state, State::Open { .. }) {
            return Ok(false);
        }
        breaker.state = State::HalfOpen {
            probes: 0,
            since: Instant::now(),
        };
        Ok(true)
    }
}

/// Breakers shared through Redis: one hash per endpoint — `state`, `until` (ms of the Redis
/// clock: the end of the open period, or when half-open the moment the probes went out),
/// `period` (the current open period, ms), `probes`, and per window bucket `n<i>` (its number),
/// `c<i>` (calls) and `f<i>` (failures) — read and changed by Lua scripts so each step is atomic.
#[derive(Clone, Debug)]
pub struct RedisBreakerStore {
    connection: crate::redis_client::SharedConnection,
    prefix: String,
}

/// Returns `{admission, retry_in_ms}`: 1 allowed, 2 probe, 0 refused.
/// `ARGV`: probes, longest open period ms, half-open recheck ms, first open period ms.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then
  local untilms = tonumber(redis.call('HGET', KEYS[1], 'until'))
  if now < untilms then return {0, untilms - now} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probes', 0, 'until', now)
  state = 'half_open'
end
if state == 'half_open' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'until') or now)
  local probes = tonumber(redis.call('HGET', KEYS[1], 'probes') or 0)
  if now - since >= tonumber(ARGV[2]) then
    probes = 0
    redis.call('HSET', KEYS[1], 'until', now)
  end
  if probes < tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'probes', probes + 1)
    return {2, 0}
  end
  redis.call('HSET', KEYS[1], 'probes', probes)
  local period = tonumber(redis.call('HGET', KEYS[1], 'period') or ARGV[4])
  return {0, math.min(period, tonumber(ARGV[3]))}
end
return {1, 0}";

/// Returns 0 (no change), 1 (opened; then the period in ms) or 2 (closed).
/// `ARGV`: outcome (`s`, `f`, `d`), failure rate percent, minimum calls, bucket ms,
/// first open period ms, longest open period ms, key lifetime ms.
const RECORD: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local key = KEYS[1]
local state = redis.call('HGET', key, 'state') or 'closed'
local outcome = ARGV[1]
local function open(period)
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'open', 'until', now + period, 'period', period)
  redis.call('PEXPIRE', key, tonumber(ARGV[7]))
  return {1, period}
end
if state == 'half_open' then
  if outcome == 'f' then
    local period = tonumber(redis.call('HGET', key, 'period') or ARGV[5])
    return open(math.min(period * 2, tonumber(ARGV[6])))
  elseif outcome == 's' then
    redis.call('DEL', key)
    return {2, 0}
  end
  local probes = tonumber(redis.call('HGET', key, 'probes') or 0)
  if probes > 0 then redis.call('HSET', key, 'probes', probes - 1) end
  return {0, 0}
end
if state ~= 'closed' or outcome == 'd' then return {0, 0} end
local bucket = math.floor(now / tonumber(ARGV[4]))
local slot = bucket % 10
if tonumber(redis.call('HGET', key, 'n' .. slot) or -1) ~= bucket then
  redis.call('HSET', key, 'n' .. slot, bucket, 'c' .. slot, 0, 'f' .. slot, 0)
end
redis.call('HINCRBY', key, 'c' .. slot, 1)
redis.call('PEXPIRE', key, tonumber(ARGV[7]))
if outcome ~= 'f' then return {0, 0} end
redis.call('HINCRBY', key, 'f' .. slot, 1)
local calls, failures = 0, 0
for i = 0, 9 do
  local fields = redis.call('HMGET', key, 'n' .. i, 'c' .. i, 'f' .. i)
  if fields[1] and tonumber(fields[1]) > bucket - 10 then
    calls = calls + tonumber(fields[2])
    failures = failures + tonumber(fields[3])
  end
end
if calls >= tonumber(ARGV[3]) and failures * 100 >= tonumber(ARGV[2]) * calls then
  return open(tonumber(ARGV[5]))
end
return {0, 0}";

/// `1` when the breaker was open and is half-open now.
const END_OPEN_PERIOD: &str = r"
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probes', 0, 'until', now)
return 1";

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

    fn key(&self, endpoint: &str) -> String {
        format!("{}breaker:{endpoint}", self.prefix)
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
            .key(self.key(endpoint))
            .arg(policy.half_open_probes)
            .arg(millis(policy.open_for))
            .arg(millis(HALF_OPEN_RECHECK))
            .arg(millis(policy.first_period()))
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
        outcome: CallOutcome,
    ) -> Result<Transition, BreakerError> {
        let mut connection = self.connection.clone();
        let outcome = match outcome {
            CallOutcome::Succeeded => "s",
            CallOutcome::Failed => "f",
            CallOutcome::Discounted => "d",
        };
        // The hash outlives any open period and window by far, then goes (closed, empty).
        let lifetime = millis(policy.open_for.max(policy.window)) * 10 + 60_000;
        let (transition, period): (i64, u64) = redis::Script::new(RECORD)
            .key(self.key(endpoint))
            .arg(outcome)
            .arg(policy.failure_rate_percent)
            .arg(policy.minimum_calls)
            .arg(policy.bucket_millis())
            .arg(millis(policy.first_period()))
            .arg(millis(policy.open_for))
            .arg(lifetime)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(match transition {
            1 => Transition::Opened {
                open_for: Duration::from_millis(period),
            },
            2 => Transition::Closed,
            _ => Transition::None,
        })
    }

    async fn state(&self, endpoint: &str) -> Result<BreakerState, BreakerError> {
        let mut connection = self.connection.clone();
        let state: Option<String> = redis::cmd("HGET")
            .arg(self.key(endpoint))
            .arg("state")
            .query_async(&mut connection)
            .await
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(match state.as_deref() {
            Some("open") => BreakerState::Open,
            Some("half_open") => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        })
    }

    async fn end_open_period(&self, endpoint: &str) -> Result<bool, BreakerError> {
        let mut connection = self.connection.clone();
        let ended: i64 = redis::Script::new(END_OPEN_PERIOD)
            .key(self.key(endpoint))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| BreakerError(error.to_string()))?;
        Ok(ended == 1)
    }
}

/// A store, the policy every endpoint gets, and what the node does around transitions: count
/// them in the metrics, check an open circuit's endpoint for reachability, and make the jobs
/// parked on a circuit due when it closes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Breakers {
    store: Arc<dyn BreakerStore>,
    policy: BreakerPolicy,
    metrics: Option<Arc<Metrics>>,
    parked_jobs: Option<PostgresJobQueue>,
    /// Endpoints whose reachability this node is checking.
    watched: Arc<Mutex<HashSet<String>>>,
}

impl Breakers {
    /// Breakers in `store` under `policy`, without metrics or parked-job wake-ups.
    #[must_use]
    pub fn new(store: Arc<dyn BreakerStore>, policy: BreakerPolicy) -> Breakers {
        Breakers {
            store,
            policy,
            metrics: None,
            parked_jobs: None,
            watched: Arc::default(),
        }
    }

    /// Exports each endpoint's state and its circuit's openings and closings to `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Breakers {
        self.metrics = Some(metrics);
        self
    }

    /// Makes the jobs of `queue`'s table parked on a circuit due as soon as its endpoint answers.
    #[must_use]
    pub fn with_parked_jobs(mut self, queue: PostgresJobQueue) -> Breakers {
        self.parked_jobs = Some(queue);
        self
    }

    /// The policy every endpoint gets.
    #[must_use]
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    /// The store the state lives in.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn BreakerStore> {
        &self.store
    }

    /// May a call to `endpoint` (named `label` in metrics and logs) be made? A store failure
    /// admits (the breaker fails open). A refusal starts this node's reachability check of the
    /// endpoint, if it is not running.
    pub async fn admit(&self, endpoint: &str, label: &str) -> Admission {
        let admission = match self.store.admit(endpoint, &self.policy).await {
            Ok(admission) => admission,
            Err(error) => {
                tracing::warn!(%error, endpoint = label, "circuit breaker state unavailable; calling");
                return Admission::Allowed;
            }
        };
        match admission {
            Admission::Allowed => self.publish_state(label, BreakerState::Closed),
            Admission::Probe => self.publish_state(label, BreakerState::HalfOpen),
            Admission::Refused { .. } => {
                self.publish_state(label, BreakerState::Open);
                self.watch(endpoint, label);
            }
        }
        admission
    }

    /// Records how a call to `endpoint` ended (`code`: its error; `limiter_was_shrinking`: this
    /// node's limiter for the endpoint was already shrinking when it ended).
    pub async fn record(
        &self,
        endpoint: &str,
        label: &str,
        code: Option<ErrorCode>,
        limiter_was_shrinking: bool,
    ) {
        self.record_outcome(endpoint, label, outcome_of(code, limiter_was_shrinking))
            .await;
    }

    /// Records a call's outcome, acting on the transition it caused.
    pub async fn record_outcome(&self, endpoint: &str, label: &str, outcome: CallOutcome) {
        match self.store.record(endpoint, &self.policy, outcome).await {
            Ok(Transition::None) => {}
            Ok(Transition::Opened { open_for }) => {
                tracing::warn!(
                    endpoint = label,
                    open_for_ms = u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
                    "circuit opened: the endpoint is failing; its work waits in the job queue"
                );
                self.count_transition(label, "opened");
                self.publish_state(label, BreakerState::Open);
                self.watch(endpoint, label);
            }
            Ok(Transition::Closed) => {
                tracing::info!(
                    endpoint = label,
                    "circuit closed: the endpoint answers again"
                );
                self.count_transition(label, "closed");
                self.publish_state(label, BreakerState::Closed);
                self.wake_parked(endpoint, label).await;
                // Calls refused while the probes ran may park their jobs just after this sweep
                // (their postponement or their page's checkpoint commits later): sweep again.
                if self.parked_jobs.is_some()
                    && let Ok(runtime) = tokio::runtime::Handle::try_current()
                {
                    let breakers = self.clone();
                    let endpoint = endpoint.to_owned();
                    let label = label.to_owned();
                    runtime.spawn(async move {
                        tokio::time::sleep(SECOND_SWEEP_AFTER).await;
                        breakers.wake_parked(&endpoint, &label).await;
                    });
                }
            }
            Err(error) => {
                tracing::warn!(%error, endpoint = label, "recording a call in its circuit breaker failed");
            }
        }
    }

    fn publish_state(&self, label: &str, state: BreakerState) {
        if let Some(metrics) = &self.metrics {
            metrics
                .breakers
                .state
                .get_or_create(&EndpointLabel {
                    endpoint: label.to_owned(),
                })
                .set(state.gauge());
        }
    }

    fn count_transition(&self, label: &str, transition: &str) {
        if let Some(metrics) = &self.metrics {
            metrics
                .breakers
                .transitions
                .get_or_create(&BreakerTransitionLabels {
                    endpoint: label.to_owned(),
                    transition: transition.to_owned(),
                })
                .inc();
        }
    }

    /// Makes the jobs parked on `endpoint`'s circuit due now (the job queue notifies its
    /// workers), in bounded statements.
    async fn wake_parked(&self, endpoint: &str, label: &str) {
        let Some(queue) = &self.parked_jobs else {
            return;
        };
        let circuit = circuit_id(endpoint);
        let mut woken = 0_u64;
        loop {
            match queue.wake_parked(&circuit, WAKE_BATCH).await {
                Ok(count) => {
                    woken += count;
                    if count < u64::try_from(WAKE_BATCH).unwrap_or(u64::MAX) {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, endpoint = label, "making parked jobs due failed; they run when their time comes");
                    break;
                }
            }
        }
        if woken > 0 {
            tracing::info!(endpoint = label, jobs = woken, "parked jobs due now");
            if let Some(metrics) = &self.metrics {
                metrics
                    .breakers
                    .jobs_woken
                    .get_or_create(&EndpointLabel {
                        endpoint: label.to_owned(),
                    })
                    .inc_by(woken);
            }
        }
    }

    /// Starts this node's reachability check of `endpoint` while its circuit is open, unless
    /// one runs (or too many do, or there is no runtime to run it on, or its host comes from
    /// event data).
    fn watch(&self, endpoint: &str, label: &str) {
        // A host rendered from event data (labelled `template:<name>`) is only ever connected to
        // through the SSRF guard; a plain connect here would bypass it. Such endpoints wait out
        // their open period.
        if label.starts_with("template:") {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            if watched.len() >= MAX_WATCHED_ENDPOINTS || !watched.insert(endpoint.to_owned()) {
                return;
            }
        }
        let breakers = self.clone();
        let endpoint = endpoint.to_owned();
        let label = label.to_owned();
        runtime.spawn(async move {
            breakers.watch_while_open(&endpoint, &label).await;
            breakers
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&endpoint);
        });
    }

    /// While `endpoint`'s circuit is open, tries a TCP connection to it every
    /// [`REACHABILITY_INTERVAL`]. Once a connection was refused or timed out, the first one that
    /// succeeds ends the open period and wakes the parked jobs (whose first calls are the probes).
    async fn watch_while_open(&self, endpoint: &str, label: &str) {
        let Some(authority) = endpoint.split_once("://").map(|(_, authority)| authority) else {
            return;
        };
        let mut seen_unreachable = false;
        loop {
            match self.store.state(endpoint).await {
                Ok(BreakerState::Open) => {}
                Ok(_) | Err(_) => return,
            }
            let reachable = matches!(
                tokio::time::timeout(
                    REACHABILITY_TIMEOUT,
                    tokio::net::TcpStream::connect(authority)
                )
                .await,
                Ok(Ok(_))
            );
            if !reachable {
                seen_unreachable = true;
            } else if seen_unreachable {
                if let Ok(true) = self.store.end_open_period(endpoint).await {
                    tracing::info!(
                        endpoint = label,
                        "endpoint accepts connections again; circuit half-open"
                    );
                    self.publish_state(label, BreakerState::HalfOpen);
                }
                self.wake_parked(endpoint, label).await;
                return;
            }
            tokio::time::sleep(REACHABILITY_INTERVAL).await;
        }
    }
}

/// Behaviour every store has.
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use super::{Admission, BreakerPolicy, BreakerState, BreakerStore, CallOutcome, Transition};
    use std::time::Duration;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_rate_percent: 50,
            minimum_calls: 4,
            window: Duration::from_millis(500),
            first_open_for: Duration::from_millis(100),
            open_for: Duration::from_millis(350),
            half_open_probes: 2,
        }
    }

    async fn record(store: &dyn BreakerStore, endpoint: &str, outcome: CallOutcome) -> Transition {
        store.record(endpoint, &policy(), outcome).await.unwrap()
    }

    async fn admit(store: &dyn BreakerStore, endpoint: &str) -> Admission {
        store.admit(endpoint, &policy()).await.unwrap()
    }

    async fn refused_for(store: &dyn BreakerStore, endpoint: &str) -> Duration {
        match admit(store, endpoint).await {
            Admission::Refused { retry_in } => retry_in,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Waits until `endpoint`'s open period has passed and it hands out a probe.
    async fn first_probe(store: &dyn BreakerStore, endpoint: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match admit(store, endpoint).await {
                Admission::Probe => return,
                Admission::Refused { retry_in } => {
                    assert!(std::time::Instant::now() < deadline, "no probe came");
                    tokio::time::sleep(retry_in + Duration::from_millis(5)).await;
                }
                Admission::Allowed => panic!("an open circuit let a call through"),
            }
        }
    }

    /// Every behaviour, on endpoints derived from `endpoint`.
    ///
    /// # Panics
    /// When the store misbehaves.
    pub async fn check(store: &dyn BreakerStore, endpoint: &str) {
        rate_over_a_window_with_minimum_calls(store, &format!("{endpoint}/rate")).await;
        discounted_calls_do_not_count(store, &format!("{endpoint}/discounted")).await;
        failures_age_out_of_the_window(store, &format!("{endpoint}/window")).await;
        open_period_doubles_up_to_the_cap_and_resets_on_close(store, &format!("{endpoint}/open"))
            .await;
        half_open_admits_a_few_probes(store, &format!("{endpoint}/probes")).await;
        reachability_ends_the_open_period(store, &format!("{endpoint}/reach")).await;
        assert_eq!(
            admit(store, &format!("{endpoint}/untouched")).await,
            Admission::Allowed,
            "endpoints are independent"
        );
    }

    /// Below the minimum number of calls nothing opens, however many fail; at the minimum, the
    /// failure rate decides.
    async fn rate_over_a_window_with_minimum_calls(store: &dyn BreakerStore, endpoint: &str) {
        for _ in 0..3 {
            assert_eq!(
                record(store, endpoint, CallOutcome::Failed).await,
                Transition::None,
                "three failures are fewer than the four calls the rate needs"
            );
        }
        assert_eq!(admit(store, endpoint).await, Admission::Allowed);
        for _ in 0..3 {
            record(store, endpoint, CallOutcome::Succeeded).await;
        }
        // 4 failures of 7 calls: 57 % ≥ 50 %.
        let Transition::Opened { open_for } = record(store, endpoint, CallOutcome::Failed).await
        else {
            panic!("four failures out of seven calls open the circuit");
        };
        assert_eq!(open_for, policy().first_open_for);
        assert_eq!(store.state(endpoint).await.unwrap(), BreakerState::Open);
        let retry_in = refused_for(store, endpoint).await;
        assert!(retry_in <= policy().first_open_for && retry_in > Duration::ZERO);

        let healthy = format!("{endpoint}-healthy");
        for _ in 0..6 {
            record(store, &healthy, CallOutcome::Succeeded).await;
        }
        for _ in 0..5 {
            assert_eq!(
                record(store, &healthy, CallOutcome::Failed).await,
                Transition::None,
                "five failures in eleven calls stay under half"
            );
        }
        assert_eq!(admit(store, &healthy).await, Admission::Allowed);
    }

    /// Calls that were not made, or failed while the limiter was shedding our own overload,
    /// are neither calls nor failures.
    async fn discounted_calls_do_not_count(store: &dyn BreakerStore, endpoint: &str) {
        for _ in 0..20 {
            assert_eq!(
                record(store, endpoint, CallOutcome::Discounted).await,
                Transition::None
            );
        }
        assert_eq!(admit(store, endpoint).await, Admission::Allowed);
        for _ in 0..3 {
            record(store, endpoint, CallOutcome::Failed).await;
        }
        assert_eq!(
            admit(store, endpoint).await,
            Admission::Allowed,
            "the discounted calls did not make up the minimum"
        );
    }

    /// Failures older than the window are forgotten.
    async fn failures_age_out_of_the_window(store: &dyn BreakerStore, endpoint: &str) {
        for _ in 0..3 {
            record(store, endpoint, CallOutcome::Failed).await;
        }
        tokio::time::sleep(policy().window + Duration::from_millis(100)).await;
        assert_eq!(
            record(store, endpoint, CallOutcome::Failed).await,
            Transition::None,
            "the three earlier failures left the window"
        );
        assert_eq!(admit(store, endpoint).await, Admission::Allowed);
    }

    async fn open(store: &dyn BreakerStore, endpoint: &str) {
        for _ in 0..3 {
            record(store, endpoint, CallOutcome::Failed).await;
        }
        assert!(matches!(
            record(store, endpoint, CallOutcome::Failed).await,
            Transition::Opened { .. }
        ));
    }

    /// Each failed probe doubles the open period, up to the longest; a successful probe closes
    /// the circuit and the next opening starts short again.
    async fn open_period_doubles_up_to_the_cap_and_resets_on_close(
        store: &dyn BreakerStore,
        endpoint: &str,
    ) {
        open(store, endpoint).await;
        let mut periods = Vec::new();
        for _ in 0..3 {
            first_probe(store, endpoint).await;
            let Transition::Opened { open_for } =
                record(store, endpoint, CallOutcome::Failed).await
            else {
                panic!("a failed probe opens the circuit again");
            };
            let retry_in = refused_for(store, endpoint).await;
            assert!(
                retry_in <= open_for && retry_in > open_for / 2,
                "{retry_in:?} of {open_for:?}"
            );
            periods.push(open_for);
        }
        assert_eq!(
            periods,
            [200, 350, 350].map(Duration::from_millis),
            "doubled from 100 ms, capped at 350 ms"
        );
        first_probe(store, endpoint).await;
        assert_eq!(
            record(store, endpoint, CallOutcome::Succeeded).await,
            Transition::Closed
        );
        assert_eq!(store.state(endpoint).await.unwrap(), BreakerState::Closed);
        assert_eq!(admit(store, endpoint).await, Admission::Allowed);
        for _ in 0..3 {
            assert_eq!(
                record(store, endpoint, CallOutcome::Failed).await,
                Transition::None,
                "closing emptied the window"
            );
        }
        assert_eq!(
            record(store, endpoint, CallOutcome::Failed).await,
            Transition::Opened {
                open_for: policy().first_open_for
            },
            "the period starts short again after a close"
        );
    }

    /// Half-open lets `half_open_probes` calls through, refuses the rest for a short while, and
    /// gets a probe back that reported nothing.
    async fn half_open_admits_a_few_probes(store: &dyn BreakerStore, endpoint: &str) {
        open(store, endpoint).await;
        first_probe(store, endpoint).await;
        assert_eq!(store.state(endpoint).await.unwrap(), BreakerState::HalfOpen);
        assert_eq!(admit(store, endpoint).await, Admission::Probe, "two probes");
        let retry_in = refused_for(store, endpoint).await;
        assert!(
            retry_in <= policy().first_open_for,
            "a refused call asks again soon: {retry_in:?}"
        );
        assert_eq!(
            record(store, endpoint, CallOutcome::Discounted).await,
            Transition::None
        );
        assert_eq!(
            admit(store, endpoint).await,
            Admission::Probe,
            "a probe that was not made is given back"
        );
        assert_eq!(
            record(store, endpoint, CallOutcome::Succeeded).await,
            Transition::Closed,
            "the first successful probe closes the circuit"
        );
        assert_eq!(admit(store, endpoint).await, Admission::Allowed);
        assert_eq!(
            record(store, endpoint, CallOutcome::Failed).await,
            Transition::None,
            "a probe reporting after the close is an ordinary call"
        );
    }

    /// `end_open_period` moves an open circuit to half-open at once, and nothing else.
    async fn reachability_ends_the_open_period(store: &dyn BreakerStore, endpoint: &str) {
        assert!(!store.end_open_period(endpoint).await.unwrap(), "closed");
        open(store, endpoint).await;
        first_probe(store, endpoint).await;
        record(store, endpoint, CallOutcome::Failed).await;
        assert!(refused_for(store, endpoint).await > Duration::from_millis(100));
        assert!(store.end_open_period(endpoint).await.unwrap());
        assert_eq!(store.state(endpoint).await.unwrap(), BreakerState::HalfOpen);
        assert!(!store.end_open_period(endpoint).await.unwrap(), "half-open");
        assert_eq!(admit(store, endpoint).await, Admission::Probe);
        let Transition::Opened { open_for } = record(store, endpoint, CallOutcome::Failed).await
        else {
            panic!("a failed probe opens it again");
        };
        assert_eq!(
            open_for,
            Duration::from_millis(350),
            "an ended period still doubles (200 → 400, capped)"
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

    #[tokio::test]
    async fn endpoints_past_the_bound_forget_idle_closed_breakers_and_keep_open_ones() {
        let store = InMemoryBreakerStore::default();
        let policy = BreakerPolicy {
            minimum_calls: 1,
            failure_rate_percent: 100,
            window: Duration::from_millis(100),
            ..BreakerPolicy::default()
        };
        let failed = store
            .record("http://down:80", &policy, CallOutcome::Failed)
            .await
            .unwrap();
        assert!(matches!(failed, Transition::Opened { .. }));
        for host in 0..MAX_TRACKED_ENDPOINTS {
            store
                .record(
                    &format!("http://h{host}:80"),
                    &policy,
                    CallOutcome::Succeeded,
                )
                .await
                .unwrap();
        }
        assert_eq!(
            store.tracked(),
            MAX_TRACKED_ENDPOINTS + 1,
            "all within the window"
        );
        tokio::time::sleep(policy.window * 2).await;
        store
            .record("http://new:80", &policy, CallOutcome::Succeeded)
            .await
            .unwrap();
        assert_eq!(store.tracked(), 2, "the open breaker and the new one");
        assert_eq!(
            store.state("http://down:80").await.unwrap(),
            BreakerState::Open
        );
    }

    #[test]
    fn failures_while_the_limiter_shrinks_and_calls_not_made_are_discounted() {
        assert_eq!(
            outcome_of(Some(ErrorCode::ConnectionFailed), false),
            CallOutcome::Failed
        );
        assert_eq!(
            outcome_of(Some(ErrorCode::ActionTimeout), true),
            CallOutcome::Discounted
        );
        assert_eq!(
            outcome_of(Some(ErrorCode::CircuitOpen), false),
            CallOutcome::Discounted
        );
        assert_eq!(
            outcome_of(Some(ErrorCode::EndpointBusy), false),
            CallOutcome::Discounted
        );
        assert_eq!(outcome_of(None, true), CallOutcome::Succeeded);
    }

    #[test]
    fn circuit_ids_hide_the_endpoint() {
        let id = circuit_id("https://secret-host.internal:443");
        assert_eq!(id.len(), 32);
        assert!(!id.contains("secret"));
        assert_eq!(id, circuit_id("https://secret-host.internal:443"));
        assert_ne!(id, circuit_id("https://other:443"));
    }
}
