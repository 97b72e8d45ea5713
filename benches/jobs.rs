//! The durable job queue with trivial jobs (a `log` action at trace level, nothing listening):
//! claim + complete throughput with 1 and 4 workers, claiming one job at a time and claiming 16 at
//! once (`DEFAULT_CLAIM_BATCH`), pickup latency (enqueue commit → claim) with workers waiting
//! on LISTEN, and one worker draining an ordered backlog (12,000 jobs over 200 entities by
//! default, `ORDERED_ENTITIES` / `ORDERED_PER_ENTITY`). `JOBS_ONLY` (a comma-separated list of
//! `ordered`, `single`, `batched`, `pickup`) runs only those parts; `CLAIM_BATCH` sets the claim
//! size of the batched runs and the ordered drain. As in
//! `benches/graphile/bench.mjs`: the jobs are enqueued before the timer starts and the jobs table
//! analyzed; the timer runs from starting the workers until the workers report every job done (an
//! in-process count, polled every millisecond), confirmed in the database; the
//! connection is plain TCP (`sslmode=disable`, as node-postgres connects by default). Every job is a change-log event of its own
//! entity, as the listener enqueues them: it carries an ordering key, so each claim checks that
//! no earlier job of the entity is unfinished (none is: nothing is held back). The same
//! measurements for graphile-worker are in `benches/graphile/` (run both: `benches/run-jobs.sh`).
//!
//! Run: `cargo bench --bench jobs` (needs the local PostgreSQL). Prints one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::jobs::{NewJob, PostgresJobQueue, enqueue_batch};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::load_str;
use fraiseql_observers::worker::{DEFAULT_CLAIM_BATCH, JobWorker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Jobs per throughput run: `JOBS` from the environment, 20,000 by default.
fn job_count() -> usize {
    std::env::var("JOBS")
        .ok()
        .and_then(|jobs| jobs.parse().ok())
        .unwrap_or(20_000)
}
const PICKUPS: usize = 500;

/// Jobs per claim in the batched runs and the ordered drain: `CLAIM_BATCH` from the environment,
/// the worker's default (`DEFAULT_CLAIM_BATCH`) otherwise.
fn claim_batch() -> u32 {
    std::env::var("CLAIM_BATCH")
        .ok()
        .and_then(|size| size.parse().ok())
        .unwrap_or(DEFAULT_CLAIM_BATCH)
}

fn job(index: usize) -> NewJob {
    let mut event = EntityEvent::new(
        EventKind::Insert,
        "Job",
        index.to_string(),
        json!({"n": index}),
        None,
    );
    event.position = Some(i64::try_from(index).unwrap() + 1);
    NewJob {
        queue: "default".into(),
        priority: 5,
        run_at: None,
        event,
        observer: "trivial".into(),
        action_index: 0,
        action_type: "log".into(),
        max_attempts: 3,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(10),
        parked_on: None,
        history: Vec::new(),
    }
}

fn worker(pool: &sqlx::PgPool, node: &str, claim_batch: u32) -> JobWorker {
    let yaml = "observers:\n  - name: trivial\n    entity: Job\n    events: [insert]\n    actions: [{type: log, level: trace}]\n";
    let no_env = |_: &str| None;
    let config = load_str(
        yaml,
        Format::Yaml,
        "bench.yaml",
        &LoadOptions {
            env: &no_env,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap();
    JobWorker::new(
        PostgresJobQueue::new(pool.clone(), node, Duration::from_secs(30)),
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_secs(1),
    )
    .with_claim_batch(claim_batch)
}

/// A pool on plain TCP: the server offers TLS here, which sqlx would take and node-postgres
/// (graphile-worker's client) would not.
async fn plain_pool(database: &TestDatabase) -> sqlx::PgPool {
    let separator = if database.url.contains('?') { '&' } else { '?' };
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&format!("{}{separator}sslmode=disable", database.url))
        .await
        .unwrap()
}

/// Jobs the workers reported done, from their metrics.
fn jobs_done(metrics: &fraiseql_observers::metrics::Metrics) -> u64 {
    metrics
        .jobs_run
        .get_or_create(&fraiseql_observers::metrics::ActionLabels {
            action_type: "log".into(),
            outcome: "succeeded".into(),
        })
        .get()
}

/// Whether any job is still waiting, pending or running: cheap on the partial indexes however
/// many jobs have completed (a count of completed rows would grow with the run and load the
/// server).
async fn unfinished(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM fraiseql_observers.jobs WHERE status = 'pending')
             OR EXISTS (SELECT 1 FROM fraiseql_observers.jobs WHERE status = 'running')
             OR EXISTS (SELECT 1 FROM fraiseql_observers.jobs
                         WHERE status = 'waiting' AND ordering_key IS NOT NULL)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// An ordered backlog: `ORDERED_ENTITIES` entities with `ORDERED_PER_ENTITY` changes each, written
/// interleaved (change k of entity e at change-log position k × entities + e), as a burst of
/// changes to a few hundred hot entities leaves it. Each entity's jobs must run one at a time, in
/// order.
fn ordered_backlog() -> Vec<NewJob> {
    let entities = env_number("ORDERED_ENTITIES", 200);
    let per_entity = env_number("ORDERED_PER_ENTITY", 60);
    (0..entities * per_entity)
        .map(|position| {
            let mut ordered = job(position % entities);
            ordered.event.position = Some(i64::try_from(position).unwrap() + 1);
            ordered
        })
        .collect()
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// When the heads of an ordered backlog become due after the workers started (as after a
/// receiver outage: each entity's first job failed and was rescheduled, the later ones queued
/// behind it and are due already).
const HEADS_DUE_IN: Duration = Duration::from_secs(1);

/// One node's worker (claims of `DEFAULT_CLAIM_BATCH`) draining the ordered backlog whose heads
/// become due `HEADS_DUE_IN` after it started: jobs/s from that moment, every entity's jobs
/// checked to have run one at a time in change order.
async fn ordered_drain() -> f64 {
    let backlog = ordered_backlog();
    run_backlog(
        &backlog,
        1,
        claim_batch(),
        Some(HEADS_DUE_IN),
        "ordered backlog",
    )
    .await
}

async fn throughput(workers: usize, claim_batch: u32) -> f64 {
    let batch: Vec<NewJob> = (0..job_count()).map(job).collect();
    run_backlog(&batch, workers, claim_batch, None, "independent jobs").await
}

/// Enqueues `batch`, then times `workers` workers from the moment its jobs are due until every
/// one is done. `heads_due_in`: each ordering key's first job is rescheduled that far ahead and
/// the workers started at once; the timer starts when those jobs are due.
async fn run_backlog(
    batch: &[NewJob],
    workers: usize,
    claim_batch: u32,
    heads_due_in: Option<Duration>,
    what: &str,
) -> f64 {
    let database = TestDatabase::migrated().await;
    let pool = plain_pool(&database).await;
    let jobs = batch.len();
    for chunk in batch.chunks(5_000) {
        enqueue_batch(&pool, chunk).await.unwrap();
    }
    sqlx::query("VACUUM ANALYZE fraiseql_observers.jobs")
        .execute(&pool)
        .await
        .unwrap();
    if let Some(delay) = heads_due_in {
        sqlx::query(
            "UPDATE fraiseql_observers.jobs SET run_at = now() + make_interval(secs => $1)
              WHERE (ordering_key, ordinal) IN (SELECT ordering_key, min(ordinal)
                                                  FROM fraiseql_observers.jobs GROUP BY ordering_key)",
        )
        .bind(delay.as_secs_f64())
        .execute(&pool)
        .await
        .unwrap();
    }
    let metrics = Arc::new(fraiseql_observers::metrics::Metrics::new());
    let shutdown = CancellationToken::new();
    let running: Vec<_> = (0..workers)
        .map(|index| {
            tokio::spawn(
                worker(&pool, &format!("w{index}"), claim_batch)
                    .with_metrics(metrics.clone())
                    .run(shutdown.clone()),
            )
        })
        .collect();
    if let Some(delay) = heads_due_in {
        tokio::time::sleep(delay).await;
    }
    let started = Instant::now();
    let target = u64::try_from(jobs).unwrap();
    while jobs_done(&metrics) < target {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while unfinished(&pool).await {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    for task in running {
        task.await.unwrap();
    }
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs_completed")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(done, i64::try_from(jobs).unwrap(), "every job completed");
    // Per entity, the jobs started (claimed) in change order, never two at once.
    let overtaken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT started_at, finished_at,
                    lag(finished_at) OVER (PARTITION BY ordering_key ORDER BY ordinal) AS previous_finished
               FROM fraiseql_observers.jobs_completed) AS chain
          WHERE started_at < previous_finished",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        overtaken, 0,
        "a job started before the previous one of its entity finished"
    );
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = jobs as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{what}: {workers} worker(s), claims of {claim_batch}: {jobs} jobs in {:.2} s = {rate:.0} jobs/s",
        elapsed.as_secs_f64()
    );
    rate
}

async fn pickup_latency() -> (f64, f64, f64) {
    let database = TestDatabase::migrated().await;
    let pool = plain_pool(&database).await;
    let shutdown = CancellationToken::new();
    let running: Vec<_> = (0..4)
        .map(|index| {
            tokio::spawn(
                worker(&pool, &format!("w{index}"), DEFAULT_CLAIM_BATCH).run(shutdown.clone()),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queue = PostgresJobQueue::new(pool.clone(), "enqueuer", Duration::from_secs(30));
    for index in 0..PICKUPS {
        queue.enqueue(&job(index)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while unfinished(&pool).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    for task in running {
        task.await.unwrap();
    }
    // created_at is the enqueueing transaction's time; started_at the claim's.
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000
           FROM fraiseql_observers.jobs_completed",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    latencies.sort_by(f64::total_cmp);
    let at = |fraction: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a small vector"
        )]
        let index = ((latencies.len() - 1) as f64 * fraction).round() as usize;
        latencies[index]
    };
    (at(0.5), at(0.99), *latencies.last().unwrap())
}

/// Whether `part` is to run: `JOBS_ONLY` (a comma-separated list of `ordered`, `single`,
/// `batched`, `pickup`) names it, or is not set.
fn runs(part: &str) -> bool {
    std::env::var("JOBS_ONLY").map_or(true, |only| only.split(',').any(|name| name.trim() == part))
}

#[tokio::main]
async fn main() {
    let mut report = json!({"queue": "fraiseql-observers", "jobs": job_count(),
                            "claim_batch": claim_batch()});
    if runs("ordered") {
        report["ordered_drain"] = json!(ordered_drain().await.round());
        report["ordered_backlog"] = json!({
            "entities": env_number("ORDERED_ENTITIES", 200),
            "per_entity": env_number("ORDERED_PER_ENTITY", 60),
        });
    }
    if runs("single") {
        let one = throughput(1, 1).await;
        let four = throughput(4, 1).await;
        report["throughput_single"] = json!({"1": one.round(), "4": four.round()});
    }
    if runs("batched") {
        let one = throughput(1, claim_batch()).await;
        let four = throughput(4, claim_batch()).await;
        report["throughput"] = json!({"1": one.round(), "4": four.round()});
    }
    if runs("pickup") {
        let (p50, p99, max) = pickup_latency().await;
        let tenth = |ms: f64| (ms * 10.0).round() / 10.0;
        report["pickup_ms"] = json!({"p50": tenth(p50), "p99": tenth(p99), "max": tenth(max)});
    }
    println!("{report}");
}
