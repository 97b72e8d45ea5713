//! The steady load: one change per transaction, at a fixed rate, through the tracked table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;

/// Orders the load cycles through; each change bumps one order's `version` by one.
pub const ORDERS: i32 = 200;

/// A running writer.
pub struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

/// What the writer saw; the change log itself is the truth of what committed.
#[derive(Default)]
pub struct Counts {
    pub committed: AtomicU64,
    pub failed: AtomicU64,
}

impl Load {
    /// Starts writing `per_second` changes per second on `pool`, riding out a database outage
    /// (failed writes are counted and skipped; the change log says which ones committed).
    #[must_use]
    pub fn start(pool: PgPool, per_second: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (stopping, counting) = (stop.clone(), counts.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut next = 0_i32;
            while !stopping.load(Ordering::Relaxed) {
                tick.tick().await;
                let written = sqlx::query("UPDATE orders SET version = version + 1 WHERE id = $1")
                    .bind(next)
                    .execute(&pool)
                    .await;
                if written.is_ok() {
                    counting.committed.fetch_add(1, Ordering::Relaxed);
                    next = (next + 1) % ORDERS;
                } else {
                    counting.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Load { stop, counts, task }
    }

    /// Stops after the write in progress.
    pub async fn finish(self) -> Arc<Counts> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.counts
    }
}

/// Creates the tracked table and its first version of every order (one transaction).
pub async fn prepare(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, version bigint NOT NULL);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(pool)
    .await
    .expect("tracked orders table");
}

/// Inserts version 1 of every order.
pub async fn insert_orders(pool: &PgPool) {
    sqlx::query("INSERT INTO orders SELECT id, 1 FROM generate_series(0, $1 - 1) AS id")
        .bind(ORDERS)
        .execute(pool)
        .await
        .expect("first versions of the orders");
}
