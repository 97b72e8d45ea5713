//! Deduplication of side effects across nodes: before an action runs, its identity (event id,
//! observer, action index) is claimed with one atomic `SET key NX PX`; a success turns the claim
//! into a "done" mark kept for the dedup window, a failure releases it. A second node (failover
//! overlap, a duplicated change-log row with the same event id) finds the claim busy or done and
//! does not repeat the effect.
//!
//! Keys come from the event's identity, never from time buckets (two real updates of one entity
//! are two events with two ids). A claim is leased, and the lease is short (half the node timeout,
//! [`claim_lease_for`]): while the attempt and its inline retries run, [`Deduplication::hold`]
//! renews it every third of the lease, conditionally on the holder's token, and stops renewing when
//! the attempt ends. A node killed mid-attempt therefore leaves a claim that expires within one
//! lease — before the cluster declares the node dead and a successor takes its partitions — so the
//! entity's later changes do not wait behind it. A caller that finds a claim busy learns how long
//! it still lasts ([`Gate::Busy`]), and the action is retried when it ends, not after a backoff.
//!
//! A claim's token names its holder (the node id after a random part). When the holder is no
//! longer a live member of the cluster — its lease session in PostgreSQL is gone, which a
//! `kill -9` makes true at once — a node that meets its claim takes it over with a
//! compare-and-set on the token ([`Liveness`], counted as `claim_taken_over`), instead of waiting
//! out the lease: the killed node's entities move on as soon as their partitions do. A node cut
//! off from PostgreSQL is not live either; an attempt it still has in flight may then overlap the
//! successor's, which its idempotency key makes recognisable (as with any fenced node).
//!
//! A renewal that finds the claim gone (it expired while Redis was unreachable or the node was
//! paused for a whole lease, or Redis lost it) stops renewing and is counted as `claim_lost`; the
//! attempt in flight is not cut off (a request already sent cannot be unsent, and its
//! idempotency key makes an overlapping call by another node recognisable), and its completion
//! marks nothing done, since only the token holder completes. A renewal that fails because the
//! store is unreachable is counted as `renewal_failed` and tried again at the next renewal time;
//! the claim holds until its lease ends.
//!
//! `RedisDeduplicationStore` shares claims across nodes; `InMemoryDeduplicationStore` is the
//! one-node fallback with the same behaviour (one conformance suite checks both). When Redis is
//! unreachable, [`Unavailable`] decides: process (default: at-least-once wins over silence) or
//! defer the action.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This caller holds the claim (its token releases or completes it).
    Acquired(String),
    /// Another caller holds it: the effect may be happening right now. The claim lasts at most
    /// `expires_in` more unless its holder renews it.
    Busy {
        /// What is left of the holder's lease.
        expires_in: Duration,
        /// The holder's token (it names the holder's node, [`holder_of`]).
        token: String,
    },
    /// The effect happened within the window.
    Done,
}

/// A deduplication store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The store (Redis) is unreachable or refused the command.
    #[error("deduplication store unavailable: {0}")]
    Unavailable(String),
}

/// Claims of side effects.
#[async_trait]
pub trait DeduplicationStore: Send + Sync + std::fmt::Debug {
    /// Atomically claims `key` for `lease` unless it is claimed or done; the token names
    /// `holder` (a node id, or empty).
    ///
    /// # Errors
    /// The store is unreachable.
    async fn claim(&self, key: &str, holder: &str, lease: Duration) -> Result<Claim, DedupError>;
    /// Replaces the claim `stale` holds on `key` by a new one of `holder` for `lease`; the new
    /// token, or `None` when `stale` no longer holds it.
    ///
    /// # Errors
    /// The store is unreachable.
    async fn take_over(
        &self,
        key: &str,
        stale: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<String>, DedupError>;
    /// Extends the claim on `key` to `lease` from now, if `token` still holds it; `false` when it
    /// does not (expired, released, completed, or taken by another caller since).
    ///
    /// # Errors
    /// The store is unreachable.
    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool, DedupError>;
    /// Marks `key` done for `window`, if `token` still holds the claim.
    ///
    /// # Errors
    /// The store is unreachable.
    async fn complete(&self, key: &str, token: &str, window: Duration) -> Result<(), DedupError>;
    /// Gives the claim back (the attempt failed), if `token` still holds it.
    ///
    /// # Errors
    /// The store is unreachable.
    async fn release(&self, key: &str, token: &str) -> Result<(), DedupError>;
}

/// The random part of a token: a simple UUID.
const TOKEN_RANDOM_LENGTH: usize = 32;

fn new_token(holder: &str) -> String {
    format!("{}{holder}", Uuid::new_v4().simple())
}

/// The node a claim's token names; `None` for a token without one.
#[must_use]
pub fn holder_of(token: &str) -> Option<&str> {
    token
        .get(TOKEN_RANDOM_LENGTH..)
        .filter(|holder| !holder.is_empty())
}

/// One node's claims, in process. Expired entries are ignored when met and swept once as many
/// operations have passed as the last sweep left entries (at least [`SWEEP_EVERY`]): an operation
/// adds at most one entry, so a sweep visits at most twice the operations since the one before,
/// however large the store. Done marks are also capped at [`MEMORY_DONE_CAPACITY`] (the oldest go
/// first), so memory stays bounded however many actions complete within one window. Past the cap
/// a replay is still caught by the completed-actions ledger, which this store only speeds up.
#[derive(Debug, Default)]
pub struct InMemoryDeduplicationStore {
    state: Mutex<MemoryState>,
}

#[derive(Debug)]
enum Mark {
    /// Claimed by the holder of this token.
    Claimed(String),
    Done,
}

#[derive(Debug, Default)]
struct MemoryState {
    entries: HashMap<String, (Mark, Instant)>,
    /// Done marks in the order they were made, each with its expiry: the cap drops the oldest, the
    /// sweep the expired, neither looking the key up unless it goes.
    done_order: std::collections::VecDeque<(Instant, String)>,
    /// Operations since the last sweep.
    operations: usize,
    /// Entries the last sweep left (the next one comes after as many operations).
    swept_to: usize,
}

/// Fewest operations between two sweeps of the in-memory store.
const SWEEP_EVERY: usize = 4096;
/// Most done marks one node keeps in memory.
pub const MEMORY_DONE_CAPACITY: usize = 65_536;

impl MemoryState {
    /// Drops expired entries once the operations since the last sweep reach the entries that
    /// sweep left.
    fn sweep(&mut self) {
        self.operations += 1;
        if self.operations < SWEEP_EVERY.max(self.swept_to) {
            return;
        }
        self.operations = 0;
        let now = Instant::now();
        self.entries.retain(|_, (_, expires)| *expires > now);
        self.done_order.retain(|(expires, _)| *expires > now);
        self.swept_to = self.entries.len().max(self.done_order.len());
    }

    /// The live mark of `key` and when it expires, treating an expired entry as absent.
    fn live_until(&self, key: &str) -> Option<(&Mark, Instant)> {
        self.entries
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(mark, expires)| (mark, *expires))
    }

    /// The live mark of `key`, treating an expired entry as absent.
    fn live(&self, key: &str) -> Option<&Mark> {
        self.live_until(key).map(|(mark, _)| mark)
    }

    fn holds(&self, key: &str, token: &str) -> bool {
        matches!(self.live(key), Some(Mark::Claimed(holder)) if holder == token)
    }

    fn mark_done(&mut self, key: &str, window: Duration) {
        let expires = Instant::now() + window;
        self.entries.insert(key.to_owned(), (Mark::Done, expires));
        self.done_order.push_back((expires, key.to_owned()));
        while self.done_order.len() > MEMORY_DONE_CAPACITY {
            let Some((made_until, oldest)) = self.done_order.pop_front() else {
                break;
            };
            // Only the mark this record was made for: the key may have been claimed and marked
            // done again since (its earlier mark expired), and that newer mark stays.
            if matches!(self.entries.get(&oldest), Some((Mark::Done, at)) if *at == made_until) {
                self.entries.remove(&oldest);
            }
        }
    }
}

impl InMemoryDeduplicationStore {
    fn with_state<T>(&self, work: impl FnOnce(&mut MemoryState) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.sweep();
        work(&mut state)
    }

    /// Entries held (claims and done marks), for tests.
    #[must_use]
    pub fn len(&self) -> usize {
        self.with_state(|state| state.entries.len())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl DeduplicationStore for InMemoryDeduplicationStore {
    async fn claim(&self, key: &str, holder: &str, lease: Duration) -> Result<Claim, DedupError> {
        Ok(self.with_state(|state| match state.live_until(key) {
            Some((Mark::Done, _)) => Claim::Done,
            Some((Mark::Claimed(token), expires)) => Claim::Busy {
                expires_in: expires.saturating_duration_since(Instant::now()),
                token: token.clone(),
            },
            None => {
                let token = new_token(holder);
                state.entries.insert(
                    key.to_owned(),
                    (Mark::Claimed(token.clone()), Instant::now() + lease),
                );
                Claim::Acquired(token)
            }
        }))
    }

    async fn take_over(
        &self,
        key: &str,
        stale: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<String>, DedupError> {
        Ok(self.with_state(|state| {
            if !state.holds(key, stale) {
                return None;
            }
            let token = new_token(holder);
            state.entries.insert(
                key.to_owned(),
                (Mark::Claimed(token.clone()), Instant::now() + lease),
            );
            Some(token)
        }))
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool, DedupError> {
        Ok(self.with_state(|state| {
            if !state.holds(key, token) {
                return false;
            }
            if let Some((_, expires)) = state.entries.get_mut(key) {
                *expires = Instant::now() + lease;
            }
            true
        }))
    }

    async fn complete(&self, key: &str, token: &str, window: Duration) -> Result<(), DedupError> {
        self.with_state(|state| {
            if state.holds(key, token) {
                state.mark_done(key, window);
            }
        });
        Ok(())
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), DedupError> {
        self.with_state(|state| {
            if state.holds(key, token) {
                state.entries.remove(key);
            }
        });
        Ok(())
    }
}

/// Claims shared by every node through Redis: one multiplexed connection that reconnects with
/// backoff, bounded connect and response timeouts, keys under a prefix.
#[derive(Clone, Debug)]
pub struct RedisDeduplicationStore {
    connection: crate::redis_client::SharedConnection,
    prefix: String,
}

/// `SET NX PX`, and on conflict say whether the holder is done: `{1, 0, ''}` acquired,
/// `{2, 0, ''}` done, `{0, milliseconds left of the holder's lease, its token}` busy.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0, ''} end
local holder = redis.call('GET', KEYS[1])
if holder == 'done' then return {2, 0, ''} end
return {0, redis.call('PTTL', KEYS[1]), holder or ''}";
/// Replace a stale holder's claim by ours (compare its token, then `SET PX`): 1 taken, 0 not.
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";
/// Extend our claim (compare the token, then `PEXPIRE`): 1 renewed, 0 not ours any more.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";
/// Replace our claim by the done mark.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
end
return 0";
/// Delete our claim.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0";

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RedisDeduplicationStore {
    /// A store on `url` (`redis://…`) whose keys start with `prefix`. Connects lazily, so a node
    /// starts while Redis is down.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self, DedupError> {
        let connection = crate::redis_client::managed_connection(url)
            .map_err(|error| DedupError::Unavailable(error.to_string()))?;
        Ok(Self::with_connection(connection, prefix))
    }

    /// A store on an existing managed connection (one per node, shared by every store).
    #[must_use]
    pub fn with_connection(
        connection: crate::redis_client::SharedConnection,
        prefix: impl Into<String>,
    ) -> Self {
        RedisDeduplicationStore {
            connection,
            prefix: prefix.into(),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}dedup:{key}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &str,
        key: &str,
        first: &str,
        second: u64,
    ) -> Result<T, DedupError> {
        let mut connection = self.connection.clone();
        redis::Script::new(script)
            .key(self.key(key))
            .arg(first)
            .arg(second)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| DedupError::Unavailable(error.to_string()))
    }
}

#[async_trait]
impl DeduplicationStore for RedisDeduplicationStore {
    async fn claim(&self, key: &str, holder: &str, lease: Duration) -> Result<Claim, DedupError> {
        let token = new_token(holder);
        let (status, left, holder): (i64, i64, String) =
            self.run(CLAIM, key, &token, millis(lease)).await?;
        Ok(match status {
            1 => Claim::Acquired(token),
            2 => Claim::Done,
            // PTTL is never negative here (the key exists and was set with PX), but clamp anyway.
            _ => Claim::Busy {
                expires_in: Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                token: holder,
            },
        })
    }

    async fn take_over(
        &self,
        key: &str,
        stale: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<String>, DedupError> {
        let token = new_token(holder);
        let mut connection = self.connection.clone();
        let replaced: i64 = redis::Script::new(TAKE_OVER)
            .key(self.key(key))
            .arg(stale)
            .arg(&token)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| DedupError::Unavailable(error.to_string()))?;
        Ok((replaced == 1).then_some(token))
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool, DedupError> {
        let renewed: i64 = self.run(RENEW, key, token, millis(lease)).await?;
        Ok(renewed == 1)
    }

    async fn complete(&self, key: &str, token: &str, window: Duration) -> Result<(), DedupError> {
        self.run::<i64>(COMPLETE, key, token, millis(window))
            .await
            .map(|_| ())
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), DedupError> {
        self.run::<i64>(RELEASE, key, token, 0).await.map(|_| ())
    }
}

/// What to do when the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unavailable {
    /// Run the action anyway (at-least-once; the idempotency key still travels with it).
    #[default]
    Process,
    /// Do not run it now: it is retried later (through the job queue when there is one).
    Defer,
}

impl std::str::FromStr for Unavailable {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "process" => Ok(Unavailable::Process),
            "defer" => Ok(Unavailable::Defer),
            other => Err(format!("expected process or defer, found {other:?}")),
        }
    }
}

/// How long a claim lasts without renewal when no node timeout says otherwise: half the cluster's
/// default node timeout (5 s).
pub const DEFAULT_CLAIM_LEASE: Duration = Duration::from_millis(2500);
/// The shortest claim lease: renewals (every third of it) must not flood the store.
pub const MIN_CLAIM_LEASE: Duration = Duration::from_millis(500);
/// Renewals per lease: a claim survives two renewals lost in a row.
const RENEWALS_PER_LEASE: u32 = 3;

/// The claim lease of a cluster whose nodes are declared dead after `node_timeout`: half of it
/// (at least [`MIN_CLAIM_LEASE`]). A claim left by a killed node has then expired by the time a
/// successor takes the node's partitions, with a margin for a renewal that came late.
#[must_use]
pub fn claim_lease_for(node_timeout: Duration) -> Duration {
    (node_timeout / 2).max(MIN_CLAIM_LEASE)
}

/// The gate every attempt of a side effect passes, inline or from the job queue: claims shared
/// by the nodes, renewed while the attempt runs, counted in the metrics.
#[derive(Clone, Debug)]
pub struct Deduplication {
    pub store: Arc<dyn DeduplicationStore>,
    /// How long a completed action is remembered.
    pub window: Duration,
    pub when_unavailable: Unavailable,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// How long a claim lasts unless renewed ([`claim_lease_for`] the node timeout); renewed
    /// every third of it while the attempt runs ([`Deduplication::hold`]).
    pub claim_lease: Duration,
    /// This node's id, named in its claims' tokens (empty: claims name no holder).
    pub holder: String,
    /// Which nodes are live, to take over the claims of those that are not (none: claims of a
    /// dead node are waited out).
    pub liveness: Option<Arc<dyn Liveness>>,
}

/// Which nodes are live members of the cluster.
#[async_trait]
pub trait Liveness: Send + Sync + std::fmt::Debug {
    /// Whether `node` is certainly not live, by what was known at `seen` or later (an answer
    /// from before `seen` could miss a node that joined since). Unsure (storage failed): `false`.
    async fn is_gone(&self, node: &str, seen: Instant) -> bool;
}

/// [`Liveness`] from the cluster's membership in PostgreSQL (a node is live while its lease
/// session is): one read of the live members serves every question asked before it began,
/// and answers stay fresh for [`LIVE_MEMBERS_FRESH`]. Only a node that is itself a live member
/// calls another one gone (a node run without the cluster's membership never does).
#[derive(Debug)]
pub struct LiveMembers {
    pool: sqlx::PgPool,
    node_id: String,
    read: tokio::sync::Mutex<Option<(Instant, std::collections::HashSet<String>)>>,
}

/// How long one read of the live members answers questions about claims met since.
const LIVE_MEMBERS_FRESH: Duration = Duration::from_millis(200);

impl LiveMembers {
    /// The membership as seen by the node `node_id`.
    #[must_use]
    pub fn new(pool: sqlx::PgPool, node_id: impl Into<String>) -> LiveMembers {
        LiveMembers {
            pool,
            node_id: node_id.into(),
            read: tokio::sync::Mutex::new(None),
        }
    }
}

#[async_trait]
impl Liveness for LiveMembers {
    async fn is_gone(&self, node: &str, seen: Instant) -> bool {
        let mut read = self.read.lock().await;
        let fresh = read
            .as_ref()
            .is_some_and(|(at, _)| *at >= seen.checked_sub(LIVE_MEMBERS_FRESH).unwrap_or(seen));
        if !fresh {
            let started = Instant::now();
            match crate::membership::live_nodes(&self.pool).await {
                Ok(nodes) => {
                    *read = Some((started, nodes.into_iter().map(|row| row.node_id).collect()));
                }
                Err(error) => {
                    tracing::debug!(%error, "reading the live nodes failed; waiting out claims");
                    return false;
                }
            }
        }
        read.as_ref()
            .is_some_and(|(_, live)| live.contains(&self.node_id) && !live.contains(node))
    }
}

/// What a claim lets the caller do.
#[derive(Debug)]
pub enum Gate {
    /// Run it; with a token to complete or release the claim afterwards.
    Run(Option<String>),
    /// Done within the window (by this or another node): do not run it again.
    Done,
    /// Another node (or another attempt here) holds the claim: try again once it ends, at most
    /// `expires_in` from now unless its holder keeps renewing it.
    Busy {
        /// What is left of the holder's lease.
        expires_in: Duration,
    },
    /// The store is unreachable and the policy says defer; the reason says so.
    Deferred(String),
}

impl Deduplication {
    fn count(&self, outcome: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.record_dedup(outcome);
        }
    }

    /// Claims `key` for one claim lease; takes over a claim whose holder is no longer live.
    pub async fn gate(&self, key: &str) -> Gate {
        let claimed = self.store.claim(key, &self.holder, self.claim_lease).await;
        let seen = Instant::now();
        match claimed {
            Ok(Claim::Acquired(token)) => Gate::Run(Some(token)),
            Ok(Claim::Done) => {
                self.count("duplicate_skipped");
                Gate::Done
            }
            Ok(Claim::Busy { expires_in, token }) => {
                if let Some(taken) = self.take_over_if_gone(key, &token, seen).await {
                    return Gate::Run(Some(taken));
                }
                self.count("busy_elsewhere");
                Gate::Busy { expires_in }
            }
            Err(error) => {
                self.count("store_unavailable");
                match self.when_unavailable {
                    Unavailable::Process => {
                        tracing::warn!(%error, key, "deduplication unavailable: running the action anyway (at-least-once)");
                        Gate::Run(None)
                    }
                    Unavailable::Defer => {
                        Gate::Deferred(format!("deduplication unavailable: {error}"))
                    }
                }
            }
        }
    }

    /// The claim `stale` holds on `key`, taken over when its holder is another node that is no
    /// longer live; the new token.
    async fn take_over_if_gone(&self, key: &str, stale: &str, seen: Instant) -> Option<String> {
        let liveness = self.liveness.as_ref()?;
        let holder = holder_of(stale).filter(|holder| *holder != self.holder)?;
        if !liveness.is_gone(holder, seen).await {
            return None;
        }
        match self
            .store
            .take_over(key, stale, &self.holder, self.claim_lease)
            .await
        {
            Ok(Some(token)) => {
                self.count("claim_taken_over");
                tracing::info!(
                    key,
                    holder,
                    "took over a deduplication claim of a node that is no longer live"
                );
                Some(token)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, key, "taking over a stale claim failed; waiting it out");
                None
            }
        }
    }

    /// Runs `attempt` while holding the claim `token` on `key`: renews it every third of the claim
    /// lease until `attempt` finishes, then stops. Without a token (the store was unreachable and
    /// the policy runs the action anyway) it only runs `attempt`. A renewal that finds the claim
    /// gone stops renewing; the attempt still runs to its end (see the module documentation).
    pub async fn hold<T>(
        &self,
        key: &str,
        token: Option<&str>,
        attempt: impl Future<Output = T>,
    ) -> T {
        let Some(token) = token else {
            return attempt.await;
        };
        let renewing = self.keep_claim(key, token);
        tokio::pin!(attempt, renewing);
        tokio::select! {
            biased;
            output = &mut attempt => return output,
            () = &mut renewing => {}
        }
        attempt.await
    }

    /// Renews the claim every third of the lease; returns only when the claim is lost.
    async fn keep_claim(&self, key: &str, token: &str) {
        let every = self.claim_lease / RENEWALS_PER_LEASE;
        let mut warned = false;
        loop {
            tokio::time::sleep(every).await;
            match self.store.renew(key, token, self.claim_lease).await {
                Ok(true) => {}
                Ok(false) => {
                    self.count("claim_lost");
                    tracing::warn!(
                        key,
                        "deduplication claim lost while its attempt runs (not renewed within its lease); another node may run the action too"
                    );
                    return;
                }
                Err(error) => {
                    self.count("renewal_failed");
                    if !warned {
                        warned = true;
                        tracing::warn!(%error, key, "renewing a deduplication claim failed; retrying until its lease ends");
                    }
                }
            }
        }
    }

    /// After the attempt(s): mark done on success, give the claim back otherwise.
    pub async fn settle(&self, key: &str, token: Option<&str>, succeeded: bool) {
        let Some(token) = token else { return };
        let result = if succeeded {
            self.store.complete(key, token, self.window).await
        } else {
            self.store.release(key, token).await
        };
        if let Err(error) = result {
            tracing::warn!(%error, key, "updating a deduplication claim failed; it expires with its lease");
        }
    }
}

#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use super::{Claim, DeduplicationStore};
    use std::time::Duration;

    /// Runs every behaviour check against `store`.
    ///
    /// # Panics
    /// When the store misbehaves.
    pub async fn check(store: &dyn DeduplicationStore, unique: &str) {
        let key = |name: &str| format!("{unique}:{name}");
        let lease = Duration::from_secs(30);
        let window = Duration::from_mins(1);

        // First claim wins; a second finds it busy, with what is left of the lease; done after
        // completion.
        let Claim::Acquired(token) = store.claim(&key("a"), "node-a", lease).await.unwrap() else {
            panic!("a fresh key is acquired");
        };
        assert_busy_within(store, &key("a"), lease).await;
        store.complete(&key("a"), &token, window).await.unwrap();
        assert_eq!(
            store.claim(&key("a"), "node-a", lease).await.unwrap(),
            Claim::Done
        );

        // A released claim can be taken again; a stale token changes nothing.
        let Claim::Acquired(first) = store.claim(&key("b"), "node-a", lease).await.unwrap() else {
            panic!("acquired");
        };
        store.release(&key("b"), &first).await.unwrap();
        let Claim::Acquired(second) = store.claim(&key("b"), "node-a", lease).await.unwrap() else {
            panic!("a released claim is free again");
        };
        assert_stale_token_changes_nothing(store, &key("b"), &first, &second).await;

        // Keys never collide: another action of the same event is its own key.
        assert!(matches!(
            store.claim(&key("b:other"), "node-a", lease).await.unwrap(),
            Claim::Acquired(_)
        ));

        // A claim whose holder vanished expires after its lease; a done mark after the window.
        let short = Duration::from_millis(150);
        assert!(matches!(
            store.claim(&key("c"), "node-a", short).await.unwrap(),
            Claim::Acquired(_)
        ));
        assert_busy_within(store, &key("c"), short).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Claim::Acquired(token) = store.claim(&key("c"), "node-a", lease).await.unwrap() else {
            panic!("an abandoned claim expires");
        };
        store.complete(&key("c"), &token, short).await.unwrap();
        assert_eq!(
            store.claim(&key("c"), "node-a", lease).await.unwrap(),
            Claim::Done
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                store.claim(&key("c"), "node-a", lease).await.unwrap(),
                Claim::Acquired(_)
            ),
            "after the window the action may run again"
        );

        renewal(store, &key).await;
        take_over(store, &key).await;
    }

    /// A claim's token names its holder; only the exact token of a claim is taken over, and the
    /// old holder can neither renew, release nor complete it afterwards.
    async fn take_over(store: &dyn DeduplicationStore, key: &dyn Fn(&str) -> String) {
        let lease = Duration::from_secs(30);
        let Claim::Acquired(stale) = store.claim(&key("over"), "node-a", lease).await.unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        assert_eq!(super::holder_of(&stale), Some("node-a"));
        let Claim::Busy { token, .. } = store.claim(&key("over"), "node-b", lease).await.unwrap()
        else {
            panic!("claimed by node-a");
        };
        assert_eq!(token, stale, "a busy claim says whose it is");
        assert_eq!(
            store
                .take_over(&key("over"), "not-the-token", "node-b", lease)
                .await
                .unwrap(),
            None,
            "only the holder's exact token is taken over"
        );
        let taken = store
            .take_over(&key("over"), &stale, "node-b", lease)
            .await
            .unwrap()
            .expect("the stale claim is taken over");
        assert_eq!(super::holder_of(&taken), Some("node-b"));
        assert_eq!(
            store
                .take_over(&key("over"), &stale, "node-c", lease)
                .await
                .unwrap(),
            None,
            "a claim is taken over once"
        );
        assert!(!store.renew(&key("over"), &stale, lease).await.unwrap());
        assert_stale_token_changes_nothing(store, &key("over"), &stale, &taken).await;
        assert_eq!(super::holder_of("0123456789abcdef0123456789abcdef"), None);
    }

    /// `stale` neither releases nor completes the claim `current` holds on `key`; `current`
    /// completes it.
    async fn assert_stale_token_changes_nothing(
        store: &dyn DeduplicationStore,
        key: &str,
        stale: &str,
        current: &str,
    ) {
        let lease = Duration::from_secs(30);
        store.release(key, stale).await.unwrap();
        store.complete(key, stale, lease).await.unwrap();
        assert!(
            matches!(
                store.claim(key, "node-a", lease).await.unwrap(),
                Claim::Busy { .. }
            ),
            "{key}: an old token neither releases nor completes the new holder's claim"
        );
        store.complete(key, current, lease).await.unwrap();
        assert_eq!(
            store.claim(key, "node-a", lease).await.unwrap(),
            Claim::Done
        );
    }

    /// A claim is busy, and lasts no longer than `lease`.
    async fn assert_busy_within(store: &dyn DeduplicationStore, key: &str, lease: Duration) {
        match store.claim(key, "node-a", lease).await.unwrap() {
            Claim::Busy { expires_in, .. } => assert!(
                !expires_in.is_zero() && expires_in <= lease,
                "{key}: {expires_in:?} left of a {lease:?} lease"
            ),
            other => panic!("{key} is claimed, found {other:?}"),
        }
    }

    /// Renewing with the holder's token extends the claim; any other token, or a claim that
    /// expired, completed or was taken over, is not renewed.
    async fn renewal(store: &dyn DeduplicationStore, key: &dyn Fn(&str) -> String) {
        let short = Duration::from_millis(150);
        let renewed_to = Duration::from_millis(1500);

        // The holder's renewal outlives the original lease.
        let Claim::Acquired(holder) = store.claim(&key("renew"), "node-a", short).await.unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        assert!(
            store
                .renew(&key("renew"), &holder, renewed_to)
                .await
                .unwrap(),
            "the holder renews its claim"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_busy_within(store, &key("renew"), renewed_to).await;
        store.release(&key("renew"), &holder).await.unwrap();

        // Another token renews nothing, and the claim still ends with its own lease.
        let Claim::Acquired(holder) = store
            .claim(&key("stranger"), "node-a", short)
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        assert!(
            !store
                .renew(&key("stranger"), "not-the-token", renewed_to)
                .await
                .unwrap(),
            "a stranger's token does not renew"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Claim::Acquired(taker) = store
            .claim(&key("stranger"), "node-a", short)
            .await
            .unwrap()
        else {
            panic!("the claim a stranger tried to renew expired with its lease");
        };

        // The expired holder can neither renew the new holder's claim nor revive its own.
        assert!(
            !store
                .renew(&key("stranger"), &holder, renewed_to)
                .await
                .unwrap(),
            "an expired holder's token does not renew the new claim"
        );
        assert!(
            store
                .renew(&key("stranger"), &taker, renewed_to)
                .await
                .unwrap()
        );
        assert_busy_within(store, &key("stranger"), renewed_to).await;

        // A completed claim is a done mark: nothing to renew, and its window is kept.
        store
            .complete(&key("stranger"), &taker, Duration::from_mins(1))
            .await
            .unwrap();
        assert!(
            !store.renew(&key("stranger"), &taker, short).await.unwrap(),
            "a done mark is not a claim"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            store
                .claim(&key("stranger"), "node-a", short)
                .await
                .unwrap(),
            Claim::Done
        );

        // A key never claimed is not renewed into existence.
        assert!(!store.renew(&key("never"), "any", renewed_to).await.unwrap());
        assert!(matches!(
            store.claim(&key("never"), "node-a", short).await.unwrap(),
            Claim::Acquired(_)
        ));
    }

    /// Many concurrent claimers of one key: exactly one acquires.
    ///
    /// # Panics
    /// When more or fewer than one claimer acquires.
    pub async fn race(stores: &[&dyn DeduplicationStore], key: &str) {
        let claims = futures::future::join_all(
            stores
                .iter()
                .cycle()
                .take(stores.len() * 16)
                .map(|store| store.claim(key, "node-a", Duration::from_secs(30))),
        )
        .await;
        let acquired = claims
            .iter()
            .filter(|claim| matches!(claim, Ok(Claim::Acquired(_))))
            .count();
        assert_eq!(acquired, 1, "{claims:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_done_marks_are_capped_oldest_first() {
        let store = InMemoryDeduplicationStore::default();
        let window = Duration::from_mins(10);
        let total = MEMORY_DONE_CAPACITY + 1000;
        for index in 0..total {
            mark_done(&store, &format!("event-{index}:orders:0"), window).await;
        }
        assert!(
            store.len() <= MEMORY_DONE_CAPACITY,
            "{} entries",
            store.len()
        );
        let lease = Duration::from_mins(1);
        let newest = format!("event-{}:orders:0", total - 1);
        assert_eq!(
            store.claim(&newest, "node-a", lease).await.unwrap(),
            Claim::Done
        );
        let oldest = store
            .claim("event-0:orders:0", "node-a", lease)
            .await
            .unwrap();
        assert!(
            matches!(oldest, Claim::Acquired(_)),
            "the oldest done mark made room: {oldest:?}"
        );
    }

    /// Claims `key` and marks it done for `window`.
    async fn mark_done(store: &InMemoryDeduplicationStore, key: &str, window: Duration) {
        let Claim::Acquired(token) = store
            .claim(key, "node-a", Duration::from_mins(1))
            .await
            .unwrap()
        else {
            panic!("{key} was not free");
        };
        store.complete(key, &token, window).await.unwrap();
    }

    #[tokio::test]
    async fn a_key_done_again_keeps_its_new_mark_when_the_cap_drops_its_old_one() {
        let store = InMemoryDeduplicationStore::default();
        mark_done(&store, "event-again:orders:0", Duration::from_millis(1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The first mark expired: the key is claimed and done again, for long.
        mark_done(&store, "event-again:orders:0", Duration::from_mins(10)).await;
        // Enough marks after it that the cap reaches the first mark's record, not the second's.
        for index in 0..MEMORY_DONE_CAPACITY - 1 {
            mark_done(
                &store,
                &format!("event-{index}:orders:0"),
                Duration::from_mins(10),
            )
            .await;
        }
        assert_eq!(
            store
                .claim("event-again:orders:0", "node-a", Duration::from_mins(1))
                .await
                .unwrap(),
            Claim::Done,
            "the second done mark is still there"
        );
    }

    #[tokio::test]
    async fn expired_entries_are_swept_while_the_store_keeps_growing() {
        let store = InMemoryDeduplicationStore::default();
        for index in 0..5_000 {
            mark_done(
                &store,
                &format!("old-{index}:orders:0"),
                Duration::from_millis(1),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Only claims from here on, each adding an entry.
        let fresh = 3 * SWEEP_EVERY;
        for index in 0..fresh {
            let claim = store
                .claim(
                    &format!("new-{index}:orders:0"),
                    "node-a",
                    Duration::from_mins(1),
                )
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
        }
        assert!(
            store.len() <= fresh,
            "the expired done marks were swept: {} entries for {fresh} live claims",
            store.len()
        );
    }

    #[tokio::test]
    async fn the_in_memory_store_conforms() {
        let store = InMemoryDeduplicationStore::default();
        conformance::check(&store, "memory").await;
        conformance::race(&[&store], "race").await;
    }
}
