//! Adaptive concurrency per HTTP endpoint (`scheme://host:port`): how many calls this node has in
//! flight to one receiver, found from how the receiver answers instead of assumed.
//!
//! The limit is AIMD with a latency guard. It starts at [`DEFAULT_INITIAL_LIMIT`]; each call that
//! succeeds while the limit is in use, with the smoothed latency of the endpoint's answers (a
//! moving mean over about [`SMOOTHING`] answers) within twice its latency floor plus
//! [`LATENCY_SLACK`], adds `1 / limit` (one slot per limit's worth of calls); answers whose smoothed
//! latency is beyond that cut it by 10 % (single slow answers among fast ones are noise, not the
//! receiver queueing, and on a busy node they are often our own), a timeout, connection failure,
//! 429 or 503 by half, and a `Retry-After` holds every new call back
//! until it has passed. One cut per generation of calls: a call that started before the last cut
//! does not cut again, so a burst of failures from one overload halves the limit once. The floor
//! is the fastest answer seen; a call made alone (nothing else in flight) measures the service
//! time without our own queueing, and moves a floor that has become too low a sixteenth of the
//! way towards it, so a receiver that has become slower for good is not held at the minimum for
//! ever, while one that slows for a while is given fewer calls.
//!
//! Answers arrive late exactly when they matter most: a receiver whose accept queue is full drops
//! the handshake, and that call answers a second later, by which time one answer per limit's
//! worth would have grown the limit far past the receiver. So the limiter also watches the calls
//! still in flight: while more than one in [`STUCK_SHARE`] has waited longer than
//! [`STUCK_TOLERANCE`] times the floor, it does not grow. When those stuck calls come back, each
//! weighs in the smoothed latency as no more than that bound, so a few of them cut the limit once
//! instead of keeping the mean high, and cutting, for a hundred answers after. Stuck calls are
//! also acted on while they still wait: when more than one in [`STUCK_SHARE`] of the calls started
//! since the last cut has waited past that bound (and at least [`STUCK_CUT_AFTER`]), the limit
//! drops to the calls that are not stuck, what the receiver holds, and for [`SLOW_ABOVE_FOR`]
//! grows [`SLOW_ABOVE_FACTOR`] times slower past that edge.
//!
//! A call waits for a slot at most the queue wait; that time is not part of its attempt's
//! timeout. Past it (or when a `Retry-After` hold outlasts it) the call is not made:
//! [`ErrorCode::EndpointBusy`] (OB016), which the executor hands to the job queue without
//! spending an attempt. A configured `max_in_flight` stays the ceiling of the limit (and the
//! cluster-wide cap, counted by [`crate::limits`]).
//!
//! State is per node and in process: each node finds its own share of a receiver's capacity.
//! Endpoints come from the observers file (literal or environment URLs), so their number is
//! bounded by the configuration.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::ErrorCode;
use crate::metrics::{EndpointLabel, Metrics};
use crate::retry::AttemptError;

/// Calls in flight per endpoint before anything is known about it.
pub const DEFAULT_INITIAL_LIMIT: u32 = 12;
/// The highest limit when nothing lower is configured (today's node-wide action bound).
pub const DEFAULT_MAX_LIMIT: u32 = 256;
/// How long a call waits for a slot by default before it goes to the job queue.
pub const DEFAULT_QUEUE_WAIT: Duration = crate::config::DEFAULT_ENDPOINT_QUEUE_WAIT;

/// The lowest limit: one call at a time still finds out when the receiver recovers.
const MIN_LIMIT: f64 = 1.0;
/// Answers whose smoothed latency passes this multiple of the floor count as the receiver queueing.
const LATENCY_TOLERANCE: u32 = 2;
/// Latency below this is never "rising" (timer and scheduling noise on fast receivers).
const LATENCY_SLACK: Duration = Duration::from_millis(20);
/// How many answers the smoothed latency averages over, roughly (the weight of a new one is 1/n).
const SMOOTHING: u32 = 8;
/// Cut on a timeout, connection failure, 429 or 503.
const OVERLOAD_DECREASE: f64 = 0.5;
/// Cut on a slow success.
const LATENCY_DECREASE: f64 = 0.9;
/// The longest `Retry-After` hold applied to new calls.
const MAX_HOLD: Duration = Duration::from_mins(1);
/// A call made alone moves the floor up by this fraction (1/n) of the gap: a receiver slower for
/// a few calls is shielded first, one slower for good (dozens of calls) becomes the new normal.
const FLOOR_DRIFT: u32 = 16;
/// How long after a cut the limiter counts as shrinking (for the circuit breaker).
const SHRINKING_FOR: Duration = Duration::from_secs(2);
/// A call still unanswered after this multiple of the floor (plus [`LATENCY_SLACK`]) is stuck:
/// waiting in a queue the receiver cannot serve from, such as a connection whose handshake the
/// receiver's full accept queue dropped (the client retries it a second later).
const STUCK_TOLERANCE: u32 = 4;
/// No growth while more than one call in this many in flight is stuck: the receiver is already
/// past what it can take, and the answers that would say so are not back yet.
const STUCK_SHARE: u32 = 4;
/// A call counts as stuck for a cut (not only for holding growth) once it has waited at least
/// this long, and at least the stuck bound: a fast receiver answering late on a busy node is
/// not cut for it, a handshake dropped by a full accept queue (retried a second later) is.
const STUCK_CUT_AFTER: Duration = Duration::from_millis(250);
/// After a cut to the calls that were not stuck, growth beyond that limit is this many times
/// slower for [`SLOW_ABOVE_FOR`]: the receiver has just said where its edge is.
const SLOW_ABOVE_FACTOR: f64 = 32.0;
/// Past the edge, growth stays slow only while the smoothed latency is above this multiple of the
/// floor: the receiver is queueing our calls.
const EDGE_QUEUEING: f64 = 1.25;
/// How long the edge found by a stuck cut slows growth beyond it.
const SLOW_ABOVE_FOR: Duration = Duration::from_secs(30);

/// Endpoints tracked before idle ones are forgotten (their limit starts again from the initial
/// one if they come back).
const MAX_TRACKED_ENDPOINTS: usize = 4096;

/// How the limiter behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterSettings {
    /// Off: no adaptive limit (calls go straight out, as many as the executor runs).
    pub adaptive: bool,
    pub initial_limit: u32,
    pub max_limit: u32,
    /// How long a call waits for a slot before it is handed to the job queue.
    pub queue_wait: Duration,
}

impl LimiterSettings {
    /// The settings an executor's configuration asks for: its queue wait, on or off, and its
    /// node-wide action bound as the highest limit.
    #[must_use]
    pub fn of(executor: &crate::config::ExecutorSettings) -> LimiterSettings {
        LimiterSettings {
            adaptive: executor.adaptive_concurrency,
            initial_limit: DEFAULT_INITIAL_LIMIT,
            max_limit: u32::try_from(executor.max_concurrent_actions).unwrap_or(u32::MAX),
            queue_wait: executor.endpoint_queue_wait,
        }
    }
}

impl Default for LimiterSettings {
    fn default() -> Self {
        LimiterSettings {
            adaptive: true,
            initial_limit: DEFAULT_INITIAL_LIMIT,
            max_limit: DEFAULT_MAX_LIMIT,
            queue_wait: DEFAULT_QUEUE_WAIT,
        }
    }
}

/// How a call ended, as the limiter sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The receiver answered (any status but 429 and 503).
    Answered,
    /// Timeout, connection failure, 429 or 503; with the `Retry-After` it asked for.
    Overloaded { retry_after: Option<Duration> },
    /// Says nothing about the receiver (the call was not made).
    Ignored,
}

/// What the limiter knows about one endpoint at a moment (for tests and status).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub limit: u32,
    pub in_flight: u32,
    pub queued: u32,
    pub floor: Option<Duration>,
}

/// The adaptive limits of one node, per endpoint. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EndpointLimiter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: LimiterSettings,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug)]
struct Endpoint {
    label: EndpointLabel,
    notify: Notify,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: u32,
    queued: u32,
    floor: Option<Duration>,
    /// The answers' latency, smoothed (an exponentially weighted mean): one slow answer among fast
    /// ones is noise, not the receiver queueing.
    smoothed: Option<Duration>,
    /// Bumped at each cut; a call that started in an older generation does not cut again.
    generation: u64,
    last_cut: Option<Instant>,
    /// No new call before this (`Retry-After`).
    hold_until: Option<Instant>,
    /// When each call in flight started (how many started at that instant).
    started: std::collections::BTreeMap<Instant, u32>,
    /// The limit a stuck cut left, and when: growth beyond it is slower for a while.
    edge: Option<(f64, Instant)>,
}

impl State {
    /// Cut within [`SHRINKING_FOR`] and still above the lowest limit.
    fn is_shrinking(&self) -> bool {
        self.limit > MIN_LIMIT
            && self
                .last_cut
                .is_some_and(|cut| cut.elapsed() < SHRINKING_FOR)
    }

    fn call_started(&mut self, at: Instant) {
        *self.started.entry(at).or_default() += 1;
    }

    fn call_ended(&mut self, at: Instant) {
        if let std::collections::btree_map::Entry::Occupied(mut entry) = self.started.entry(at) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    /// How long a call may wait before it counts as stuck (`None` before the first answer).
    fn stuck_bound(&self) -> Option<Duration> {
        self.floor
            .map(|floor| floor * STUCK_TOLERANCE + LATENCY_SLACK)
    }

    /// Calls in flight for longer than `bound`.
    fn in_flight_longer_than(&self, now: Instant, bound: Duration) -> u32 {
        let Some(before) = now.checked_sub(bound) else {
            return 0;
        };
        self.started.range(..before).map(|(_, count)| count).sum()
    }

    /// Calls in flight for longer than [`STUCK_TOLERANCE`] times the floor (plus slack).
    fn stuck(&self, now: Instant) -> u32 {
        self.stuck_bound()
            .map_or(0, |bound| self.in_flight_longer_than(now, bound))
    }

    /// Cuts the limit to the calls in flight that are not stuck, when more than a share of them
    /// is: the receiver holds what it answers, the rest are waiting for a handshake it dropped.
    /// Seen while they wait, not a second later when they come back, so the limit stops near
    /// the receiver's edge instead of far past it. Only calls started since the last cut count
    /// towards the share (older ones were acted on), so one wave cuts once.
    fn cut_to_what_is_answered(&mut self, now: Instant) {
        let Some(bound) = self.stuck_bound().map(|bound| bound.max(STUCK_CUT_AFTER)) else {
            return;
        };
        let Some(before) = now.checked_sub(bound) else {
            return;
        };
        if self.last_cut.is_some_and(|cut| cut >= before) {
            return;
        }
        let since = self.last_cut.map_or(Bound::Unbounded, Bound::Excluded);
        let new_stuck: u32 = self
            .started
            .range((since, Bound::Excluded(before)))
            .map(|(_, count)| count)
            .sum();
        if new_stuck == 0 || f64::from(new_stuck * STUCK_SHARE) <= self.limit {
            return;
        }
        let stuck = self.in_flight_longer_than(now, bound);
        let answered = f64::from(self.in_flight.saturating_sub(stuck)).max(MIN_LIMIT);
        if answered < self.limit {
            self.limit = answered;
            self.generation += 1;
            self.last_cut = Some(now);
            self.edge = Some((answered, now));
        }
    }

    /// One step of growth: a slot per limit's worth of answers, slower beyond a recent edge
    /// while the receiver queues (answers slower than [`EDGE_QUEUEING`] of the floor). Answers
    /// as fast as the floor say the edge has moved (another node stopped calling, the receiver
    /// scaled up): growth is at full speed again.
    fn grow(&mut self, max: f64, now: Instant) {
        let queueing = match (self.smoothed, self.floor) {
            (Some(smoothed), Some(floor)) => {
                smoothed.as_secs_f64() > floor.as_secs_f64() * EDGE_QUEUEING
            }
            _ => true,
        };
        let slower = queueing
            && self.edge.is_some_and(|(edge, at)| {
                self.limit >= edge && now.saturating_duration_since(at) < SLOW_ABOVE_FOR
            });
        let step = if slower {
            1.0 / (self.limit * SLOW_ABOVE_FACTOR)
        } else {
            1.0 / self.limit
        };
        self.limit = (self.limit + step).min(max);
    }
}

impl Default for EndpointLimiter {
    fn default() -> Self {
        EndpointLimiter::new(LimiterSettings::default(), None)
    }
}

impl EndpointLimiter {
    #[must_use]
    pub fn new(settings: LimiterSettings, metrics: Option<Arc<Metrics>>) -> EndpointLimiter {
        let settings = LimiterSettings {
            max_limit: settings.max_limit.max(1),
            initial_limit: settings.initial_limit.clamp(1, settings.max_limit.max(1)),
            ..settings
        };
        EndpointLimiter {
            shared: Arc::new(Shared {
                settings,
                endpoints: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    #[must_use]
    pub fn settings(&self) -> LimiterSettings {
        self.shared.settings
    }

    fn endpoint(&self, endpoint: &str, label: &str) -> Arc<Endpoint> {
        let mut endpoints = self
            .shared
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if endpoints.len() >= MAX_TRACKED_ENDPOINTS && !endpoints.contains_key(endpoint) {
            // A target host rendered from event data can name any number of endpoints: forget
            // the idle ones before tracking another. A permit or a waiter holds its endpoint, so
            // one held only here has nothing in flight or queued; a `Retry-After` hold is kept.
            let now = Instant::now();
            endpoints.retain(|_, known| {
                Arc::strong_count(known) > 1
                    || known
                        .state
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .hold_until
                        .is_some_and(|until| until > now)
            });
        }
        endpoints
            .entry(endpoint.to_owned())
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    label: EndpointLabel {
                        endpoint: label.to_owned(),
                    },
                    notify: Notify::new(),
                    state: Mutex::new(State {
                        limit: f64::from(self.shared.settings.initial_limit),
                        in_flight: 0,
                        queued: 0,
                        floor: None,
                        smoothed: None,
                        generation: 0,
                        last_cut: None,
                        hold_until: None,
                        started: std::collections::BTreeMap::new(),
                        edge: None,
                    }),
                })
            })
            .clone()
    }

    /// What is known about `endpoint` now; `None` before its first call.
    #[must_use]
    pub fn snapshot(&self, endpoint: &str) -> Option<Snapshot> {
        let endpoints = self
            .shared
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = endpoints
            .get(endpoint)?
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(Snapshot {
            limit: self.effective(&state, None),
            in_flight: state.in_flight,
            queued: state.queued,
            floor: state.floor,
        })
    }

    /// Whether the limit of `endpoint` was cut within the last seconds and can still go lower:
    /// failures then are our own overload being shed, not an outage.
    #[must_use]
    pub fn is_shrinking(&self, endpoint: &str) -> bool {
        let endpoints = self
            .shared
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(known) = endpoints.get(endpoint) else {
            return false;
        };
        let state = known.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.is_shrinking()
    }

    /// The whole-call limit now, at most `ceiling` (a configured `max_in_flight`).
    fn effective(&self, state: &State, ceiling: Option<u32>) -> u32 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "the limit is between 1 and max_limit"
        )]
        let limit = state.limit.floor() as u32;
        limit
            .clamp(1, self.shared.settings.max_limit)
            .min(ceiling.unwrap_or(u32::MAX).max(1))
    }

    fn publish(&self, endpoint: &Endpoint, state: &State) {
        if let Some(metrics) = &self.shared.metrics {
            metrics
                .endpoints
                .limit
                .get_or_create(&endpoint.label)
                .set(i64::from(self.effective(state, None)));
            metrics
                .endpoints
                .in_flight
                .get_or_create(&endpoint.label)
                .set(i64::from(state.in_flight));
            metrics
                .endpoints
                .queued
                .get_or_create(&endpoint.label)
                .set(i64::from(state.queued));
        }
    }

    /// Waits for a slot at `endpoint` (named `label` in metrics), at most the queue wait.
    /// `ceiling`: a configured `max_in_flight`. With the adaptive limit off, returns at once.
    ///
    /// # Errors
    /// [`ErrorCode::EndpointBusy`] when no slot came within the queue wait, or the endpoint's
    /// `Retry-After` hold lasts beyond it (then `retry_after` says how long).
    pub async fn acquire(
        &self,
        endpoint: &str,
        label: &str,
        ceiling: Option<u32>,
    ) -> Result<Option<EndpointPermit>, AttemptError> {
        if !self.shared.settings.adaptive {
            return Ok(None);
        }
        let known = self.endpoint(endpoint, label);
        let started = Instant::now();
        let deadline = started + self.shared.settings.queue_wait;
        let mut waiting: Option<Waiting> = None;
        let result = loop {
            let notified = known.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut state = known.state.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                state.cut_to_what_is_answered(now);
                let hold = state.hold_until.filter(|until| *until > now);
                if hold.is_none() && state.in_flight < self.effective(&state, ceiling) {
                    state.in_flight += 1;
                    let started = Instant::now();
                    state.call_started(started);
                    let permit = EndpointPermit {
                        limiter: self.clone(),
                        endpoint: known.clone(),
                        started,
                        generation: state.generation,
                        in_flight_at_start: state.in_flight,
                        finished: false,
                    };
                    if let Some(mut waiting) = waiting.take() {
                        waiting.leave(&mut state);
                    }
                    self.publish(&known, &state);
                    break Ok(Some(permit));
                }
                if let Some(until) = hold
                    && until >= deadline
                {
                    if let Some(mut waiting) = waiting.take() {
                        waiting.leave(&mut state);
                    }
                    self.publish(&known, &state);
                    break Err(busy(label, Some(until - now)));
                }
                if now >= deadline {
                    if let Some(mut waiting) = waiting.take() {
                        waiting.leave(&mut state);
                    }
                    self.publish(&known, &state);
                    break Err(busy(label, None));
                }
                if waiting.is_none() {
                    state.queued += 1;
                    self.publish(&known, &state);
                    waiting = Some(Waiting {
                        endpoint: known.clone(),
                        limiter: self.clone(),
                        counted: true,
                    });
                }
                hold.map_or(deadline, |until| until.min(deadline))
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => {}
            }
        };
        if let Some(metrics) = &self.shared.metrics {
            metrics
                .endpoints
                .queue_time
                .get_or_create(&known.label)
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    fn finish(&self, permit: &EndpointPermit, signal: Signal) {
        let endpoint = &permit.endpoint;
        let mut state = endpoint
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = self.effective(&state, None);
        state.in_flight = state.in_flight.saturating_sub(1);
        state.call_ended(permit.started);
        let now = Instant::now();
        let latency = now.saturating_duration_since(permit.started);
        let max = f64::from(self.shared.settings.max_limit);
        let cut = |state: &mut State, factor: f64| {
            if permit.generation == state.generation {
                state.limit = (state.limit * factor).max(MIN_LIMIT);
                state.generation += 1;
                state.last_cut = Some(now);
            }
        };
        match signal {
            Signal::Ignored => {}
            Signal::Answered => {
                let floor = match state.floor {
                    Some(floor) if latency < floor => latency,
                    // Alone in flight: no queueing of ours in this latency.
                    Some(floor) if permit.in_flight_at_start <= 1 => {
                        floor + latency.saturating_sub(floor) / FLOOR_DRIFT
                    }
                    Some(floor) => floor,
                    None => latency,
                };
                state.floor = Some(floor);
                let bound = floor * STUCK_TOLERANCE + LATENCY_SLACK;
                // A stuck call from before the last cut says nothing more: that cut answered it.
                let acted_on = permit.generation != state.generation && latency > bound;
                if !acted_on {
                    // One answer moves the mean at most as far as a stuck call's: a handful of
                    // calls that waited a second for a handshake say "too many" once, not for a
                    // hundred answers after the limit has already come down.
                    let sample = latency.min(bound);
                    let smoothed = state.smoothed.map_or(sample, |smoothed| {
                        (smoothed * (SMOOTHING - 1) + sample) / SMOOTHING
                    });
                    state.smoothed = Some(smoothed);
                    if smoothed <= floor * LATENCY_TOLERANCE + LATENCY_SLACK {
                        // Grow only while the limit is in use (an idle endpoint's limit says
                        // nothing) and no more than a share of the calls is stuck.
                        if f64::from(permit.in_flight_at_start) * 2.0 >= state.limit.floor()
                            && f64::from(state.stuck(now) * STUCK_SHARE) <= state.limit
                        {
                            state.grow(max, now);
                        }
                    } else {
                        cut(&mut state, LATENCY_DECREASE);
                    }
                }
                state.cut_to_what_is_answered(now);
            }
            Signal::Overloaded { retry_after } => {
                cut(&mut state, OVERLOAD_DECREASE);
                if let Some(wait) = retry_after.filter(|wait| !wait.is_zero()) {
                    let until = now + wait.min(MAX_HOLD);
                    state.hold_until = Some(state.hold_until.map_or(until, |held| held.max(until)));
                }
            }
        }
        let after = self.effective(&state, None);
        self.publish(endpoint, &state);
        drop(state);
        // The slot given back, and any the limit grew by.
        endpoint.notify.notify_one();
        for _ in before..after {
            endpoint.notify.notify_one();
        }
    }
}

fn busy(label: &str, hold: Option<Duration>) -> AttemptError {
    let message = if hold.is_some() {
        format!(
            "{label} asked to wait {} ms (Retry-After); not called",
            hold.unwrap_or_default().as_millis()
        )
    } else {
        format!(
            "every slot of {label}'s concurrency limit stayed taken for the queue wait; not called"
        )
    };
    let mut error = AttemptError::new(ErrorCode::EndpointBusy, message);
    error.retry_after = hold;
    error
}

/// A call counted as queued until it gets a slot or gives up (or its future is dropped).
struct Waiting {
    endpoint: Arc<Endpoint>,
    limiter: EndpointLimiter,
    counted: bool,
}

impl Waiting {
    fn leave(&mut self, state: &mut State) {
        if std::mem::take(&mut self.counted) {
            state.queued = state.queued.saturating_sub(1);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if std::mem::take(&mut self.counted) {
            let mut state = self
                .endpoint
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.queued = state.queued.saturating_sub(1);
            self.limiter.publish(&self.endpoint, &state);
            drop(state);
            // A wake-up this waiter may have taken goes to the next one.
            self.endpoint.notify.notify_one();
        }
    }
}

/// One slot at an endpoint, held for one call. Dropped without [`finish`](Self::finish), the
/// slot is given back and the call says nothing about the receiver.
#[derive(Debug)]
pub struct EndpointPermit {
    limiter: EndpointLimiter,
    endpoint: Arc<Endpoint>,
    started: Instant,
    generation: u64,
    in_flight_at_start: u32,
    finished: bool,
}

impl EndpointPermit {
    /// Whether this permit's endpoint is shrinking now (see [`EndpointLimiter::is_shrinking`]).
    /// Asked as the call ends, before [`finish`](Self::finish): a failure then is our own
    /// overload being shed, which the circuit breaker does not count.
    #[must_use]
    pub fn endpoint_is_shrinking(&self) -> bool {
        self.endpoint
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_shrinking()
    }

    /// Gives the slot back, telling the limiter how the call went (its latency is the time
    /// since the slot was taken).
    pub fn finish(mut self, signal: Signal) {
        self.finished = true;
        self.limiter.finish(&self, signal);
    }
}

impl Drop for EndpointPermit {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.limiter.finish(self, Signal::Ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(initial: u32, queue_wait: Duration) -> EndpointLimiter {
        EndpointLimiter::new(
            LimiterSettings {
                adaptive: true,
                initial_limit: initial,
                max_limit: 64,
                queue_wait,
            },
            None,
        )
    }

    #[tokio::test]
    async fn the_limit_caps_calls_in_flight_and_queue_wait_is_bounded() {
        let limiter = limiter(2, Duration::from_millis(50));
        let first = limiter.acquire("e", "e", None).await.unwrap().unwrap();
        let _second = limiter.acquire("e", "e", None).await.unwrap().unwrap();
        let refused = limiter.acquire("e", "e", None).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::EndpointBusy);
        assert_eq!(limiter.snapshot("e").unwrap().queued, 0);
        let waiter = tokio::spawn({
            let limiter = limiter.clone();
            async move {
                limiter
                    .acquire("e", "e", None)
                    .await
                    .map(|permit| permit.is_some())
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.finish(Signal::Ignored);
        assert!(
            waiter.await.unwrap().unwrap(),
            "a freed slot goes to a waiter"
        );
        let ceiling = limiter.acquire("other", "other", Some(1)).await.unwrap();
        assert!(ceiling.is_some());
        assert!(
            limiter.acquire("other", "other", Some(1)).await.is_err(),
            "a configured max_in_flight caps the limit"
        );
    }

    #[tokio::test]
    async fn overload_halves_once_per_generation_and_retry_after_holds_calls() {
        let limiter = limiter(16, Duration::from_millis(30));
        let mut permits = Vec::new();
        for _ in 0..8 {
            permits.push(limiter.acquire("e", "e", None).await.unwrap().unwrap());
        }
        for permit in permits {
            permit.finish(Signal::Overloaded { retry_after: None });
        }
        assert_eq!(limiter.snapshot("e").unwrap().limit, 8, "one cut per burst");
        assert!(limiter.is_shrinking("e"));
        let permit = limiter.acquire("e", "e", None).await.unwrap().unwrap();
        permit.finish(Signal::Overloaded {
            retry_after: Some(Duration::from_secs(5)),
        });
        assert_eq!(limiter.snapshot("e").unwrap().limit, 4);
        let held = limiter.acquire("e", "e", None).await.unwrap_err();
        assert_eq!(held.code, ErrorCode::EndpointBusy);
        let wait = held.retry_after.unwrap();
        assert!(wait > Duration::from_secs(4) && wait <= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn fast_answers_grow_the_limit_and_slow_ones_shrink_it() {
        let limiter = limiter(4, Duration::from_secs(1));
        for _ in 0..40 {
            let permits: Vec<_> = futures::future::join_all(
                (0..limiter.snapshot("e").map_or(4, |known| known.limit))
                    .map(|_| limiter.acquire("e", "e", None)),
            )
            .await;
            for permit in permits {
                permit.unwrap().unwrap().finish(Signal::Answered);
            }
        }
        let grown = limiter.snapshot("e").unwrap().limit;
        assert!(grown > 4, "{grown}");
        // The receiver queues: answers of several calls at once come back slow.
        for _ in 0..10 {
            let permits: Vec<_> =
                futures::future::join_all((0..4).map(|_| limiter.acquire("e", "e", None))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            for permit in permits {
                permit.unwrap().unwrap().finish(Signal::Answered);
            }
        }
        let shrunk = limiter.snapshot("e").unwrap().limit;
        assert!(shrunk < grown, "{shrunk} after {grown}");
    }

    #[tokio::test]
    async fn endpoints_past_the_bound_forget_idle_ones_but_not_busy_or_held_ones() {
        let limiter = limiter(4, Duration::from_millis(10));
        let busy = limiter
            .acquire("busy", "busy", None)
            .await
            .unwrap()
            .unwrap();
        let held = limiter
            .acquire("held", "held", None)
            .await
            .unwrap()
            .unwrap();
        held.finish(Signal::Overloaded {
            retry_after: Some(Duration::from_secs(30)),
        });
        for endpoint in 0..MAX_TRACKED_ENDPOINTS {
            let name = format!("e{endpoint}");
            let permit = limiter.acquire(&name, &name, None).await.unwrap().unwrap();
            permit.finish(Signal::Answered);
        }
        let tracked = limiter.shared.endpoints.lock().unwrap().len();
        assert!(tracked <= MAX_TRACKED_ENDPOINTS, "{tracked}");
        assert_eq!(limiter.snapshot("busy").unwrap().in_flight, 1, "busy kept");
        assert_eq!(
            limiter.snapshot("held").unwrap().limit,
            2,
            "held kept, cut kept"
        );
        assert!(
            limiter.acquire("held", "held", None).await.is_err(),
            "still held"
        );
        busy.finish(Signal::Answered);
    }

    #[tokio::test]
    async fn calls_stuck_in_flight_cut_the_limit_to_those_answered_once_per_wave() {
        let limiter = limiter(16, Duration::from_millis(20));
        // A first answer sets the floor (about nothing: the stuck bound is its minimum).
        let first = limiter.acquire("e", "e", None).await.unwrap().unwrap();
        first.finish(Signal::Answered);
        let mut stuck = Vec::new();
        for _ in 0..8 {
            stuck.push(limiter.acquire("e", "e", None).await.unwrap().unwrap());
        }
        tokio::time::sleep(STUCK_CUT_AFTER / 2).await;
        let fresh: Vec<_> =
            futures::future::join_all((0..3).map(|_| limiter.acquire("e", "e", None)))
                .await
                .into_iter()
                .map(|permit| permit.unwrap().unwrap())
                .collect();
        assert_eq!(limiter.snapshot("e").unwrap().limit, 16, "none stuck yet");
        tokio::time::sleep(STUCK_CUT_AFTER / 2 + Duration::from_millis(50)).await;
        // 8 of 11 in flight are stuck: the next call finds the limit cut to the 3 answered ones.
        let refused = limiter.acquire("e", "e", None).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::EndpointBusy);
        assert_eq!(limiter.snapshot("e").unwrap().limit, 3);
        // The stuck calls come back: that wave was acted on, it does not cut again.
        for permit in stuck {
            permit.finish(Signal::Answered);
        }
        assert_eq!(limiter.snapshot("e").unwrap().limit, 3);
        for permit in fresh {
            permit.finish(Signal::Answered);
        }
        assert!(limiter.snapshot("e").unwrap().limit >= 3);
    }
}
