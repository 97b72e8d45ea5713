//! Deduplication of side effects across nodes: before an action runs, its identity (event id,
//! observer, action index) is claimed with one atomic `SET key NX PX`; a success turns the claim
//! into a "done" mark kept for the dedup window, a failure releases it. A second node (failover
//! overlap, a duplicated change-log row with the same event id) finds the claim busy or done and
//! does not repeat the effect.
//!
//! Keys come from the event's identity, never from time buckets (two real updates of one entity
//! are two events with two ids). A claim is leased: a node that dies mid-action leaves a claim that
//! expires after the lease, so the work is not lost — the successor runs it then.
//!
//! `RedisDeduplicationStore` shares claims across nodes; `InMemoryDeduplicationStore` is the
//! one-node fallback with the same behaviour (one conformance suite checks both). When Redis is
//! unreachable, [`Unavailable`] decides: process (default: at-least-once wins over silence) or
//! defer the action.

use std::collections::HashMap;
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
    /// Another caller holds it: the effect may be happening right now.
    Busy,
    /// The effect happened within the window.
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("deduplication store unavailable: {0}")]
    Unavailable(String),
}

/// Claims of side effects.
#[async_trait]
pub trait DeduplicationStore: Send + Sync + std::fmt::Debug {
    /// Atomically claims `key` for `lease` unless it is claimed or done.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError>;
    /// Marks `key` done for `window`, if `token` still holds the claim.
    async fn complete(&self, key: &str, token: &str, window: Duration) -> Result<(), DedupError>;
    /// Gives the claim back (the attempt failed), if `token` still holds it.
    async fn release(&self, key: &str, token: &str) -> Result<(), DedupError>;
}

fn new_token() -> String {
    Uuid::new_v4().simple().to_string()
}

/// One node's claims, in process. Expired entries are ignored when met and swept every
/// [`SWEEP_EVERY`] operations; done marks are also capped at [`MEMORY_DONE_CAPACITY`] (the oldest
/// go first), so memory stays bounded however many actions complete within one window. Past the
/// cap a replay is still caught by the completed-actions ledger, which this store only speeds up.
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
    /// Keys in the order they were marked done, for the cap.
    done_order: std::collections::VecDeque<String>,
    operations: u64,
}

const SWEEP_EVERY: u64 = 4096;
/// Most done marks one node keeps in memory.
pub const MEMORY_DONE_CAPACITY: usize = 65_536;

impl MemoryState {
    fn sweep(&mut self) {
        self.operations += 1;
        if self.operations.is_multiple_of(SWEEP_EVERY) {
            let now = Instant::now();
            self.entries.retain(|_, (_, expires)| *expires > now);
            let entries = &self.entries;
            self.done_order
                .retain(|key| matches!(entries.get(key), Some((Mark::Done, _))));
        }
    }

    /// The live mark of `key`, treating an expired entry as absent.
    fn live(&self, key: &str) -> Option<&Mark> {
        self.entries
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(mark, _)| mark)
    }

    fn holds(&self, key: &str, token: &str) -> bool {
        matches!(self.live(key), Some(Mark::Claimed(holder)) if holder == token)
    }

    fn mark_done(&mut self, key: &str, window: Duration) {
        self.entries
            .insert(key.to_owned(), (Mark::Done, Instant::now() + window));
        self.done_order.push_back(key.to_owned());
        while self.done_order.len() > MEMORY_DONE_CAPACITY {
            let Some(oldest) = self.done_order.pop_front() else {
                break;
            };
            if matches!(self.entries.get(&oldest), Some((Mark::Done, _))) {
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
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError> {
        Ok(self.with_state(|state| match state.live(key) {
            Some(Mark::Done) => Claim::Done,
            Some(Mark::Claimed(_)) => Claim::Busy,
            None => {
                let token = new_token();
                state.entries.insert(
                    key.to_owned(),
                    (Mark::Claimed(token.clone()), Instant::now() + lease),
                );
                Claim::Acquired(token)
            }
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

/// `SET NX PX`, and on conflict say whether the holder is done: 1 acquired, 2 done, 0 busy.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == 'done' then return 2 end
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

    async fn run(
        &self,
        script: &str,
        key: &str,
        first: &str,
        second: u64,
    ) -> Result<i64, DedupError> {
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
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError> {
        let token = new_token();
        Ok(match self.run(CLAIM, key, &token, millis(lease)).await? {
            1 => Claim::Acquired(token),
            2 => Claim::Done,
            _ => Claim::Busy,
        })
    }

    async fn complete(&self, key: &str, token: &str, window: Duration) -> Result<(), DedupError> {
        self.run(COMPLETE, key, token, millis(window))
            .await
            .map(|_| ())
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), DedupError> {
        self.run(RELEASE, key, token, 0).await.map(|_| ())
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

/// Conformance suite every store passes (used by the unit tests and `tests/dedup.rs`).
/// The gate every attempt of a side effect passes, inline or from the job queue: claims shared
/// by the nodes, counted in the metrics.
#[derive(Clone, Debug)]
pub struct Deduplication {
    pub store: Arc<dyn DeduplicationStore>,
    /// How long a completed action is remembered.
    pub window: Duration,
    pub when_unavailable: Unavailable,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What a claim lets the caller do.
#[derive(Debug)]
pub enum Gate {
    /// Run it; with a token to complete or release the claim afterwards.
    Run(Option<String>),
    /// Done within the window (by this or another node): do not run it again.
    Done,
    /// Another node holds it, or the store is unreachable and the policy says defer.
    Later(String),
}

impl Deduplication {
    /// Claims `key` for `lease`.
    pub async fn gate(&self, key: &str, lease: Duration) -> Gate {
        let outcome = |name: &str| {
            if let Some(metrics) = &self.metrics {
                metrics.record_dedup(name);
            }
        };
        match self.store.claim(key, lease).await {
            Ok(Claim::Acquired(token)) => Gate::Run(Some(token)),
            Ok(Claim::Done) => {
                outcome("duplicate_skipped");
                Gate::Done
            }
            Ok(Claim::Busy) => {
                outcome("busy_elsewhere");
                Gate::Later("another node is running this action right now".to_owned())
            }
            Err(error) => {
                outcome("store_unavailable");
                match self.when_unavailable {
                    Unavailable::Process => {
                        tracing::warn!(%error, key, "deduplication unavailable: running the action anyway (at-least-once)");
                        Gate::Run(None)
                    }
                    Unavailable::Defer => {
                        Gate::Later(format!("deduplication unavailable: {error}"))
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

        // First claim wins; a second finds it busy; done after completion.
        let Claim::Acquired(token) = store.claim(&key("a"), lease).await.unwrap() else {
            panic!("a fresh key is acquired");
        };
        assert_eq!(store.claim(&key("a"), lease).await.unwrap(), Claim::Busy);
        store.complete(&key("a"), &token, window).await.unwrap();
        assert_eq!(store.claim(&key("a"), lease).await.unwrap(), Claim::Done);

        // A released claim can be taken again; a stale token changes nothing.
        let Claim::Acquired(first) = store.claim(&key("b"), lease).await.unwrap() else {
            panic!("acquired");
        };
        store.release(&key("b"), &first).await.unwrap();
        let Claim::Acquired(second) = store.claim(&key("b"), lease).await.unwrap() else {
            panic!("a released claim is free again");
        };
        store.release(&key("b"), &first).await.unwrap();
        store.complete(&key("b"), &first, window).await.unwrap();
        assert_eq!(
            store.claim(&key("b"), lease).await.unwrap(),
            Claim::Busy,
            "an old token neither releases nor completes the new holder's claim"
        );
        store.complete(&key("b"), &second, window).await.unwrap();
        assert_eq!(store.claim(&key("b"), lease).await.unwrap(), Claim::Done);

        // Keys never collide: another action of the same event is its own key.
        assert!(matches!(
            store.claim(&key("b:other"), lease).await.unwrap(),
            Claim::Acquired(_)
        ));

        // A claim whose holder vanished expires after its lease; a done mark after the window.
        let short = Duration::from_millis(150);
        assert!(matches!(
            store.claim(&key("c"), short).await.unwrap(),
            Claim::Acquired(_)
        ));
        assert_eq!(store.claim(&key("c"), lease).await.unwrap(), Claim::Busy);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Claim::Acquired(token) = store.claim(&key("c"), lease).await.unwrap() else {
            panic!("an abandoned claim expires");
        };
        store.complete(&key("c"), &token, short).await.unwrap();
        assert_eq!(store.claim(&key("c"), lease).await.unwrap(), Claim::Done);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                store.claim(&key("c"), lease).await.unwrap(),
                Claim::Acquired(_)
            ),
            "after the window the action may run again"
        );
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
                .map(|store| store.claim(key, Duration::from_secs(30))),
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
            let key = format!("event-{index}:orders:0");
            let Claim::Acquired(token) = store.claim(&key, Duration::from_mins(1)).await.unwrap()
            else {
                panic!("{key} was not free");
            };
            store.complete(&key, &token, window).await.unwrap();
        }
        assert!(
            store.len() <= MEMORY_DONE_CAPACITY,
            "{} entries",
            store.len()
        );
        let lease = Duration::from_mins(1);
        let newest = format!("event-{}:orders:0", total - 1);
        assert_eq!(store.claim(&newest, lease).await.unwrap(), Claim::Done);
        let oldest = store.claim("event-0:orders:0", lease).await.unwrap();
        assert!(
            matches!(oldest, Claim::Acquired(_)),
            "the oldest done mark made room: {oldest:?}"
        );
    }

    #[tokio::test]
    async fn the_in_memory_store_conforms() {
        let store = InMemoryDeduplicationStore::default();
        conformance::check(&store, "memory").await;
        conformance::race(&[&store], "race").await;
    }
}
