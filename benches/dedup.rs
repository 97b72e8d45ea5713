//! Deduplication claims through the real client path against the local Redis (and the in-process
//! store for comparison): claim + complete of distinct keys with 64 in flight, and claims of keys
//! already done (the duplicate path).
//!
//! Run: `cargo bench --bench dedup` (needs the local Redis; `REDIS_URL` overrides). Prints a
//! Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
                let Claim::Acquired(token) =
                    store.claim(&key, Duration::from_mins(1)).await.unwrap()
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
                    .claim(&format!("{run}:{index}"), Duration::from_mins(1))
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
}
