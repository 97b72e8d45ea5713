//! Deduplication claims and cache operations through the real client path against the local
//! Redis (and the in-process stores for comparison), 64 in flight: claim + complete of distinct
//! keys, claims of keys already done (the duplicate path), cache sets and gets.
//!
//! Run: `cargo bench --bench redis` (needs the local Redis; `REDIS_URL` overrides). Prints a
//! Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fraiseql_observers::cache::{CacheBackend, InMemoryCache, RedisCache};
use fraiseql_observers::dedup::{
    Claim, DeduplicationStore, InMemoryDeduplicationStore, RedisDeduplicationStore,
};
use futures::stream::{self, StreamExt};

const KEYS: usize = 20_000;
const IN_FLIGHT: usize = 64;

async fn claim_and_complete(store: &Arc<dyn DeduplicationStore>, run: &str) -> f64 {
    let started = Instant::now();
    stream::iter(0..KEYS)
        .for_each_concurrent(IN_FLIGHT, |index| {
            let store = store.clone();
            async move {
                let key = format!("{run}:{index}");
                let Claim::Acquired(token) = store
                    .claim(&key, "node-a", Duration::from_mins(1))
                    .await
                    .unwrap()
                else {
                    panic!("fresh keys are acquired");
                };
                store
                    .complete(&key, &token, Duration::from_mins(1))
                    .await
                    .unwrap();
            }
        })
        .await;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = KEYS as f64 / started.elapsed().as_secs_f64();
    rate
}

async fn duplicate_checks(store: &Arc<dyn DeduplicationStore>, run: &str) -> f64 {
    let started = Instant::now();
    stream::iter(0..KEYS)
        .for_each_concurrent(IN_FLIGHT, |index| {
            let store = store.clone();
            async move {
                let claim = store
                    .claim(&format!("{run}:{index}"), "node-a", Duration::from_mins(1))
                    .await
                    .unwrap();
                assert_eq!(claim, Claim::Done);
            }
        })
        .await;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = KEYS as f64 / started.elapsed().as_secs_f64();
    rate
}

async fn cache_ops(cache: &Arc<dyn CacheBackend>, run: &str, write: bool) -> f64 {
    let started = Instant::now();
    stream::iter(0..KEYS)
        .for_each_concurrent(IN_FLIGHT, |index| {
            let cache = cache.clone();
            async move {
                let key = format!("{run}:cache:{index}");
                if write {
                    cache
                        .set(&key, "HTTP 200", Duration::from_mins(1))
                        .await
                        .unwrap();
                } else {
                    assert!(cache.get(&key).await.unwrap().is_some());
                }
            }
        })
        .await;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = KEYS as f64 / started.elapsed().as_secs_f64();
    rate
}

#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("fqo-bench-{}:", uuid::Uuid::new_v4().simple());
    let redis: Arc<dyn DeduplicationStore> =
        Arc::new(RedisDeduplicationStore::new(&url, prefix).unwrap());
    let memory: Arc<dyn DeduplicationStore> = Arc::new(InMemoryDeduplicationStore::default());
    println!("| {KEYS} keys, {IN_FLIGHT} in flight | Redis (local) | in-process |");
    println!("|---|---|---|");
    let (redis_fresh, memory_fresh) = (
        claim_and_complete(&redis, "fresh").await,
        claim_and_complete(&memory, "fresh").await,
    );
    println!(
        "| claim + complete (an action's two calls) | {redis_fresh:.0} actions/s | {memory_fresh:.0} actions/s |"
    );
    let (redis_dup, memory_dup) = (
        duplicate_checks(&redis, "fresh").await,
        duplicate_checks(&memory, "fresh").await,
    );
    println!(
        "| claim of a done key (duplicate skipped) | {redis_dup:.0} checks/s | {memory_dup:.0} checks/s |"
    );
    let redis_cache: Arc<dyn CacheBackend> = Arc::new(RedisCache::new(&url).unwrap());
    let memory_cache: Arc<dyn CacheBackend> = Arc::new(InMemoryCache::default());
    let run = format!("fqo-bench-{}", uuid::Uuid::new_v4().simple());
    let (redis_set, memory_set) = (
        cache_ops(&redis_cache, &run, true).await,
        cache_ops(&memory_cache, &run, true).await,
    );
    let (redis_get, memory_get) = (
        cache_ops(&redis_cache, &run, false).await,
        cache_ops(&memory_cache, &run, false).await,
    );
    println!("| cache set | {redis_set:.0} ops/s | {memory_set:.0} ops/s |");
    println!("| cache get (hit) | {redis_get:.0} ops/s | {memory_get:.0} ops/s |");
    redis_cache.invalidate(&format!("{run}:*")).await.unwrap();
}
