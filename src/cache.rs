//! Opt-in result cache for actions (`cache: {ttl: 30s}` on a webhook): an **identical** request
//! within the TTL reuses the first one's result instead of being sent again. The key is the
//! action plus a hash of the fully rendered request — method, URL, body and headers, the
//! `Idempotency-Key` (event id, observer, action) included — so two different events never share
//! an entry and a side effect that has not happened is never skipped; a re-delivery of the same
//! event, or a pure lookup repeated within the TTL, is.
//!
//! Keys: `<prefix>cache:<action type>:<entity type>:<entity id>:<observer>:<index>:<hash>`, so
//! entries can be dropped by entity or by action type with a `SCAN` + `UNLINK` sweep (never
//! `KEYS`). Redis when `REDIS_URL` is set, in process otherwise; one conformance suite.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

pub use crate::template::glob_escape;

#[derive(Debug, thiserror::Error)]
#[error("cache unavailable: {0}")]
pub struct CacheError(String);

/// Stored results with a time to live.
#[async_trait]
pub trait CacheBackend: Send + Sync + std::fmt::Debug {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError>;
    /// Stores `value` under `key` for `ttl`; how many other entries the backend evicted to make
    /// room (always 0 for Redis, whose own expiry and eviction are its business).
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<u64, CacheError>;
    /// Removes every key matching `pattern` (`*` wildcards; other glob characters escaped by
    /// [`glob_escape`]); how many.
    async fn invalidate(&self, pattern: &str) -> Result<u64, CacheError>;
}

/// Whether `key` matches a pattern of literal text (with `\\` escapes) and `*` wildcards.
fn glob_matches(pattern: &str, key: &str) -> bool {
    // Tokens: literal characters or a star.
    let mut tokens: Vec<Option<char>> = Vec::with_capacity(pattern.len());
    let mut characters = pattern.chars();
    while let Some(character) = characters.next() {
        match character {
            '\\' => tokens.push(characters.next()),
            '*' => tokens.push(None),
            other => tokens.push(Some(other)),
        }
    }
    let key: Vec<char> = key.chars().collect();
    let (mut token, mut position) = (0, 0);
    let (mut star, mut star_position) = (None, 0);
    while position < key.len() {
        match tokens.get(token) {
            Some(Some(literal)) if *literal == key[position] => {
                token += 1;
                position += 1;
            }
            Some(None) => {
                star = Some(token);
                star_position = position;
                token += 1;
            }
            _ => match star {
                Some(at) => {
                    token = at + 1;
                    star_position += 1;
                    position = star_position;
                }
                None => return false,
            },
        }
    }
    tokens[token..].iter().all(Option::is_none)
}

/// Most entries one node's in-process cache holds; past it the entries closest to expiry go.
pub const IN_MEMORY_CAPACITY: usize = 100_000;

/// One node's cache. Expired entries are ignored when read and swept when the map has doubled
/// since the last sweep (amortized O(1) per insert), or reached [`IN_MEMORY_CAPACITY`]; at the
/// capacity, the entries that would expire first are evicted down to three quarters of it.
#[derive(Debug, Default)]
pub struct InMemoryCache {
    entries: Mutex<HashMap<String, (String, Instant)>>,
    sweep_at: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl CacheBackend for InMemoryCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(entries
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(value, _)| value.clone()))
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<u64, CacheError> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let sweep_at = self
            .sweep_at
            .load(std::sync::atomic::Ordering::Relaxed)
            .clamp(4096, IN_MEMORY_CAPACITY);
        let mut evicted = 0;
        if entries.len() >= sweep_at && !entries.contains_key(key) {
            let before = entries.len();
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= IN_MEMORY_CAPACITY {
                let mut expiries: Vec<Instant> =
                    entries.values().map(|(_, expires)| *expires).collect();
                let keep = IN_MEMORY_CAPACITY * 3 / 4;
                let cut = expiries.len() - keep;
                let (_, boundary, _) = expiries.select_nth_unstable(cut);
                let boundary = *boundary;
                entries.retain(|_, (_, expires)| *expires > boundary);
            }
            evicted = u64::try_from(before - entries.len()).unwrap_or(u64::MAX);
            self.sweep_at
                .store(entries.len() * 2, std::sync::atomic::Ordering::Relaxed);
        }
        entries.insert(key.to_owned(), (value.to_owned(), now + ttl));
        Ok(evicted)
    }

    async fn invalidate(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = entries.len();
        let now = Instant::now();
        entries.retain(|key, (_, expires)| *expires > now && !glob_matches(pattern, key));
        Ok(u64::try_from(before - entries.len()).unwrap_or(0))
    }
}

/// The cache in Redis.
#[derive(Clone, Debug)]
pub struct RedisCache {
    connection: crate::redis_client::SharedConnection,
}

impl RedisCache {
    /// A cache on `url`; connects lazily.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(url: &str) -> Result<Self, CacheError> {
        let connection = crate::redis_client::managed_connection(url)
            .map_err(|error| CacheError(error.to_string()))?;
        Ok(Self::with_connection(connection))
    }

    /// A cache on an existing managed connection (one per node, shared by every store).
    #[must_use]
    pub fn with_connection(connection: crate::redis_client::SharedConnection) -> Self {
        RedisCache { connection }
    }
}

#[async_trait]
impl CacheBackend for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut connection = self.connection.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .map_err(|error| CacheError(error.to_string()))
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<u64, CacheError> {
        let mut connection = self.connection.clone();
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut connection)
            .await
            .map_err(|error| CacheError(error.to_string()))?;
        Ok(0)
    }

    async fn invalidate(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut connection = self.connection.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await
                .map_err(|error| CacheError(error.to_string()))?;
            if !keys.is_empty() {
                let unlinked: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await
                    .map_err(|error| CacheError(error.to_string()))?;
                removed += unlinked;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

/// Where an action's result is cached: its identity and entity, for keys and invalidation.
#[derive(Clone, Copy, Debug)]
pub struct CacheScope<'a> {
    pub action_type: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    pub observer: &'a str,
    pub action_index: usize,
}

/// A backend, the deployment's key prefix, and counters.
#[derive(Clone, Debug)]
pub struct Cache {
    pub backend: std::sync::Arc<dyn CacheBackend>,
    pub prefix: String,
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Cache {
    /// The key of one rendered request.
    #[must_use]
    pub fn key(&self, scope: CacheScope<'_>, request: &[&[u8]]) -> String {
        let mut hash = Sha256::new();
        for part in request {
            hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
            hash.update(part);
        }
        format!(
            "{}cache:{}:{}:{}:{}:{}:{}",
            self.prefix,
            scope.action_type,
            scope.entity_type,
            scope.entity_id,
            scope.observer,
            scope.action_index,
            hex::encode(hash.finalize())
        )
    }

    fn count(&self, outcome: &str) {
        self.count_many(outcome, 1);
    }

    fn count_many(&self, outcome: &str, how_many: u64) {
        if let Some(metrics) = &self.metrics
            && how_many > 0
        {
            metrics.record_cache(outcome, how_many);
        }
    }

    /// A stored result (a cache failure is a miss).
    pub async fn get(&self, key: &str) -> Option<String> {
        match self.backend.get(key).await {
            Ok(Some(value)) => {
                self.count("hit");
                Some(value)
            }
            Ok(None) => {
                self.count("miss");
                None
            }
            Err(error) => {
                self.count("error");
                tracing::warn!(%error, "cache unavailable; calling");
                None
            }
        }
    }

    /// Stores a result (best effort).
    pub async fn set(&self, key: &str, value: &str, ttl: Duration) {
        match self.backend.set(key, value, ttl).await {
            Ok(evicted) => {
                self.count("store");
                self.count_many("evicted", evicted);
            }
            Err(error) => {
                self.count("error");
                tracing::warn!(%error, "storing a cached result failed");
            }
        }
    }

    /// Drops every cached result about one entity; how many.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn invalidate_entity(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<u64, CacheError> {
        let pattern = format!(
            "{}cache:*:{}:{}:*",
            glob_escape(&self.prefix),
            glob_escape(entity_type),
            glob_escape(entity_id)
        );
        let removed = self.backend.invalidate(&pattern).await?;
        self.count_many("invalidated", removed);
        Ok(removed)
    }

    /// Drops every cached result of one action type; how many.
    ///
    /// # Errors
    /// The backend failed.
    pub async fn invalidate_action_type(&self, action_type: &str) -> Result<u64, CacheError> {
        let pattern = format!(
            "{}cache:{}:*",
            glob_escape(&self.prefix),
            glob_escape(action_type)
        );
        let removed = self.backend.invalidate(&pattern).await?;
        self.count_many("invalidated", removed);
        Ok(removed)
    }
}

#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod conformance {
    use super::{Cache, CacheScope};
    use std::time::Duration;

    fn scope<'a>(entity_id: &'a str, action_type: &'a str) -> CacheScope<'a> {
        CacheScope {
            action_type,
            entity_type: "Order",
            entity_id,
            observer: "orders",
            action_index: 0,
        }
    }

    /// Get/set with TTL; invalidation by entity and by action type removes exactly the matching
    /// entries, glob characters in ids included.
    ///
    /// # Panics
    /// When the cache misbehaves.
    pub async fn check(cache: &Cache) {
        let minute = Duration::from_mins(1);
        let a = cache.key(scope("42", "webhook"), &[b"POST", b"body"]);
        let b = cache.key(scope("42", "webhook"), &[b"POST", b"other body"]);
        let c = cache.key(scope("43", "webhook"), &[b"POST", b"body"]);
        let d = cache.key(scope("42", "search"), &[b"POST", b"body"]);
        let star = cache.key(scope("4*", "webhook"), &[b"POST", b"body"]);
        assert_ne!(a, b, "different requests, different keys");
        assert_eq!(a, cache.key(scope("42", "webhook"), &[b"POST", b"body"]));
        assert_ne!(
            cache.key(scope("42", "webhook"), &[b"POSTb", b"ody"]),
            a,
            "parts are delimited"
        );
        assert_eq!(cache.get(&a).await, None);
        for key in [&a, &b, &c, &d, &star] {
            cache.set(key, "HTTP 200", minute).await;
        }
        assert_eq!(cache.get(&a).await.as_deref(), Some("HTTP 200"));

        assert_eq!(
            cache.invalidate_entity("Order", "4*").await.unwrap(),
            1,
            "a literal star"
        );
        assert_eq!(cache.get(&star).await, None);
        assert!(cache.get(&c).await.is_some());
        assert_eq!(cache.invalidate_entity("Order", "42").await.unwrap(), 3);
        assert_eq!(cache.get(&a).await, None);
        assert_eq!(cache.get(&d).await, None);
        assert!(cache.get(&c).await.is_some(), "another entity is untouched");
        cache.set(&d, "HTTP 200", minute).await;
        assert_eq!(cache.invalidate_action_type("webhook").await.unwrap(), 1);
        assert_eq!(cache.get(&c).await, None);
        assert!(
            cache.get(&d).await.is_some(),
            "another action type is untouched"
        );

        let short = cache.key(scope("44", "webhook"), &[b"x"]);
        cache
            .set(&short, "HTTP 200", Duration::from_millis(100))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.get(&short).await, None, "entries expire");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_stars_and_escaped_literals() {
        assert!(glob_matches("a*c", "abbbc"));
        assert!(glob_matches("a*", "a"));
        assert!(!glob_matches("a*d", "abc"));
        assert!(glob_matches(
            &format!("x:{}:*", glob_escape("4*")),
            "x:4*:1"
        ));
        assert!(!glob_matches(
            &format!("x:{}:*", glob_escape("4*")),
            "x:42:1"
        ));
    }

    #[tokio::test]
    async fn the_in_memory_cache_conforms() {
        let cache = Cache {
            backend: std::sync::Arc::new(InMemoryCache::default()),
            prefix: "p:".into(),
            metrics: None,
        };
        conformance::check(&cache).await;
    }

    #[tokio::test]
    async fn the_in_memory_cache_stays_within_its_capacity_and_counts_what_it_evicts() {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let cache = Cache {
            backend: std::sync::Arc::new(InMemoryCache::default()),
            prefix: "p:".into(),
            metrics: Some(metrics.clone()),
        };
        // The first entries expire last: at the capacity, the ones closest to expiry go first.
        let total = IN_MEMORY_CAPACITY + 10;
        for index in 0..total {
            let ttl = Duration::from_hours(1)
                .checked_sub(Duration::from_millis(u64::try_from(index).unwrap()))
                .unwrap();
            cache.set(&format!("k{index}"), "v", ttl).await;
        }
        let evicted = metrics
            .cache
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: "evicted".into(),
            })
            .get();
        assert!(evicted > 0, "nothing evicted past the capacity");
        let held = u64::try_from(total).unwrap() - evicted;
        assert!(
            held <= u64::try_from(IN_MEMORY_CAPACITY).unwrap(),
            "{held} entries held"
        );
        assert_eq!(
            cache.get("k0").await.as_deref(),
            Some("v"),
            "latest to expire kept"
        );
        assert_eq!(
            cache.get(&format!("k{}", IN_MEMORY_CAPACITY - 1)).await,
            None,
            "closest to expiry evicted"
        );
    }
}
