//! The durable job queue and its worker against a fresh PostgreSQL database per test.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::jobs::{FailOutcome, NewJob, PostgresJobQueue, Step, enqueue_batch};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::retry::AttemptError;
use fraiseql_observers::worker::{JobWorker, WorkOutcome};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn new_job(entity_id: &str, priority: i16) -> NewJob {
    NewJob {
        queue: "default".into(),
        priority,
        run_at: None,
        event: EntityEvent::new(
            EventKind::Insert,
            "Order",
            entity_id,
            json!({"id": entity_id}),
            None,
        ),
        observer: "orders".into(),
        action_index: 0,
        action_type: "webhook".into(),
        max_attempts: 3,
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(10),
        parked_on: None,
        history: Vec::new(),
    }
}

fn queue(database: &TestDatabase, node: &str) -> PostgresJobQueue {
    PostgresJobQueue::new(database.pool.clone(), node, Duration::from_secs(30))
}

/// A job's status and attempts, wherever it is: in the queue, or recorded as completed.
async fn status_of(database: &TestDatabase, id: Uuid) -> (String, i32) {
    sqlx::query_as(
        "SELECT status, attempts FROM fraiseql_observers.jobs WHERE id = $1
         UNION ALL
         SELECT 'completed', attempts FROM fraiseql_observers.jobs_completed WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn enqueue_claim_complete_and_stats() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let id = jobs.enqueue(&new_job("1", 5)).await.unwrap().unwrap();
    assert_eq!(
        jobs.enqueue(&new_job("2", 5)).await.unwrap().map(|_| ()),
        Some(())
    );

    let claimed = jobs.claim("default", 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempts, 1);
    assert_eq!(
        claimed[0].idempotency_key,
        format!("{}:orders:0", claimed[0].event.id)
    );
    assert!(jobs.complete(claimed[0].id).await.unwrap());
    assert!(
        !jobs.complete(claimed[0].id).await.unwrap(),
        "a finished job cannot be completed twice"
    );

    let stats = jobs.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].pending, stats[0].running, stats[0].completed),
        (1, 0, 1)
    );
    assert!(stats[0].p50_ms.is_some() && stats[0].mean_ms.is_some());
    assert_eq!(stats[0].completed_last_day, 1, "{stats:?}");
    assert!(
        stats[0]
            .oldest_due_age_seconds
            .is_some_and(|age| age >= 0.0),
        "the pending job is due: {stats:?}"
    );
    assert!(
        jobs.claim("other-queue", 10).await.unwrap().is_empty(),
        "queues are separate"
    );
    let _ = id;
}

#[tokio::test]
async fn the_same_work_is_enqueued_once() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let job = new_job("1", 5);
    assert!(jobs.enqueue(&job).await.unwrap().is_some());
    assert!(
        jobs.enqueue(&job).await.unwrap().is_none(),
        "a replayed event does not enqueue again"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn a_completed_job_leaves_the_queue_and_its_key_stays_taken_until_retention() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let job = new_job("1", 7);
    let id = jobs.enqueue(&job).await.unwrap().unwrap();
    let claimed = jobs.claim("default", 1).await.unwrap();
    assert!(jobs.complete(claimed[0].id).await.unwrap());

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the completed job's row is gone from the queue");
    let record: (Uuid, String, i16, i32, bool, bool) = sqlx::query_as(
        "SELECT id, idempotency_key, priority, attempts, started_at IS NOT NULL,
                finished_at >= started_at AND started_at >= created_at
           FROM fraiseql_observers.jobs_completed",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(record, (id, job.idempotency_key(), 7, 1, true, true));

    assert!(
        jobs.enqueue(&job).await.unwrap().is_none(),
        "a replayed event does not enqueue its completed job again"
    );
    let mut transaction = database.pool.begin().await.unwrap();
    let requeued =
        fraiseql_observers::jobs::requeue_batch(&mut transaction, std::slice::from_ref(&job))
            .await
            .unwrap();
    transaction.commit().await.unwrap();
    assert_eq!(
        (requeued.requeued, requeued.enqueued),
        (0, 0),
        "a retry of a delivered action is left alone"
    );
    assert_eq!(jobs.stats().await.unwrap()[0].completed, 1);

    assert_eq!(jobs.prune_finished(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(jobs.stats().await.unwrap(), Vec::new());
    assert!(
        jobs.enqueue(&job).await.unwrap().is_some(),
        "once retention dropped the record, the key is free again (the window is retention's)"
    );
}

/// An enqueue of a job whose earlier job (same idempotency key) is being completed: the insert
/// waits for the completion, its own check ran before the completion committed, and the insert
/// trigger drops the job — the replay stays a no-op in that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_enqueued_while_its_key_completes_is_dropped() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let job = new_job("1", 5);
    jobs.enqueue(&job).await.unwrap().unwrap();
    let claimed = jobs.claim("default", 1).await.unwrap();

    // The completion, held open: the same delete-and-record the completing statement does.
    let mut completing = database.pool.begin().await.unwrap();
    sqlx::query(
        "WITH done AS (
             DELETE FROM fraiseql_observers.jobs WHERE id = $1
          RETURNING id, idempotency_key, queue, priority, event_id, observer, action_index,
                    action_type, ordering_key, ordinal, attempts, inline_attempts, errors, created_at,
                    started_at)
         INSERT INTO fraiseql_observers.jobs_completed
                (id, idempotency_key, queue, priority, event_id, observer, action_index, action_type,
                 ordering_key, ordinal, attempts, inline_attempts, errors, created_at, started_at)
         SELECT * FROM done",
    )
    .bind(claimed[0].id)
    .execute(&mut *completing)
    .await
    .unwrap();

    let pool = database.pool.clone();
    let replayed = job.clone();
    let enqueue = tokio::spawn(async move { enqueue_batch(&pool, &[replayed]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !enqueue.is_finished(),
        "the enqueue waits on the row being deleted"
    );
    completing.commit().await.unwrap();
    enqueue.await.unwrap().unwrap();

    let (queued, completed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM fraiseql_observers.jobs),
                (SELECT count(*) FROM fraiseql_observers.jobs_completed)",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(
        (queued, completed),
        (0, 1),
        "the replayed job did not stay in the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_never_claim_the_same_job() {
    let database = TestDatabase::migrated().await;
    let batch: Vec<NewJob> = (0..300)
        .map(|index| new_job(&index.to_string(), 5))
        .collect();
    enqueue_batch(&database.pool, &batch).await.unwrap();
    let claim_all = |node: &'static str| {
        let jobs = queue(&database, node);
        async move {
            let mut mine = Vec::new();
            loop {
                let claimed = jobs.claim("default", 7).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|job| job.id));
            }
        }
    };
    let (first, second) = tokio::join!(tokio::spawn(claim_all("a")), tokio::spawn(claim_all("b")));
    let (first, second) = (first.unwrap(), second.unwrap());
    let first_set: HashSet<Uuid> = first.iter().copied().collect();
    assert!(
        second.iter().all(|id| !first_set.contains(id)),
        "a job was claimed twice"
    );
    assert_eq!(first.len() + second.len(), 300);
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both workers got work: {} / {}",
        first.len(),
        second.len()
    );
}

#[tokio::test]
async fn higher_priority_jobs_are_claimed_first() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    for (entity, priority) in [("low", 1), ("top", 10), ("mid", 5)] {
        jobs.enqueue(&new_job(entity, priority)).await.unwrap();
    }
    let order: Vec<String> = jobs
        .claim("default", 3)
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.event.entity_id)
        .collect();
    assert_eq!(order, ["top", "mid", "low"]);
}

#[tokio::test]
async fn failures_reschedule_the_same_row_then_dead_letter_with_the_history() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let id = jobs.enqueue(&new_job("1", 5)).await.unwrap().unwrap();
    let unavailable = AttemptError::new(ErrorCode::RemoteUnavailable, "HTTP 503: down");
    let mut delays = Vec::new();
    for attempt in 1..=2 {
        let job = jobs.claim("default", 1).await.unwrap().pop().unwrap();
        assert_eq!(
            (job.id, job.attempts),
            (id, attempt),
            "the same row, attempt {attempt}"
        );
        let failed_at = chrono::Utc::now();
        let FailOutcome::Rescheduled { run_at } = jobs.fail(&job, &unavailable).await.unwrap()
        else {
            panic!("attempt {attempt} should be rescheduled")
        };
        delays.push(run_at - failed_at);
        assert!(
            jobs.claim("default", 1).await.unwrap().is_empty(),
            "not claimable before run_at"
        );
        sqlx::query("UPDATE fraiseql_observers.jobs SET run_at = now() WHERE id = $1")
            .bind(id)
            .execute(&database.pool)
            .await
            .unwrap();
    }
    assert!(delays[1] > delays[0], "run_at grows: {delays:?}");
    assert!(
        delays[0] >= chrono::Duration::milliseconds(190),
        "{delays:?}"
    );

    let job = jobs.claim("default", 1).await.unwrap().pop().unwrap();
    assert_eq!(job.errors.len(), 2, "the history travels with the job");
    let FailOutcome::DeadLettered { dead_letter } = jobs.fail(&job, &unavailable).await.unwrap()
    else {
        panic!("the last attempt is final")
    };
    assert_eq!(status_of(&database, id).await, ("failed".into(), 3));
    let letter = PostgresDeadLetterQueue::new(database.pool.clone())
        .get(dead_letter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(letter.letter.attempts, 3);
    assert_eq!(letter.letter.error_code, ErrorCode::RemoteUnavailable);
    for attempt in 1..=3 {
        assert!(
            letter
                .letter
                .error_message
                .contains(&format!("attempt {attempt} (")),
            "{}",
            letter.letter.error_message
        );
    }
    assert_eq!(
        jobs.prune_finished(Duration::ZERO).await.unwrap(),
        0,
        "failed jobs are never pruned"
    );
}

#[tokio::test]
async fn a_permanent_failure_dead_letters_at_once() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    jobs.enqueue(&new_job("1", 5)).await.unwrap();
    let job = jobs.claim("default", 1).await.unwrap().pop().unwrap();
    let outcome = jobs
        .fail(
            &job,
            &AttemptError::new(ErrorCode::RemoteRejected, "HTTP 400"),
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, FailOutcome::DeadLettered { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        PostgresDeadLetterQueue::new(database.pool.clone())
            .count()
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_dead_workers_job_is_picked_up_after_the_visibility_timeout_and_a_slow_one_is_not() {
    let database = TestDatabase::migrated().await;
    let dead = PostgresJobQueue::new(
        database.pool.clone(),
        "dead-node",
        Duration::from_millis(600),
    );
    let alive = PostgresJobQueue::new(
        database.pool.clone(),
        "slow-node",
        Duration::from_millis(600),
    );
    let abandoned = dead
        .enqueue(&new_job("abandoned", 5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.claim("default", 1).await.unwrap()[0].id, abandoned);
    let slow = alive.enqueue(&new_job("slow", 5)).await.unwrap().unwrap();
    assert_eq!(alive.claim("default", 1).await.unwrap()[0].id, slow);

    // The dead node never heartbeats; the slow one does, every 200 ms, for 1.5 s.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut rescued = 0;
    while tokio::time::Instant::now() < deadline {
        assert!(alive.heartbeat(slow).await.unwrap());
        rescued += alive.rescue_expired().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rescued, 1, "only the abandoned job was rescued");
    assert_eq!(status_of(&database, slow).await.0, "running");
    let retaken = queue(&database, "other-node")
        .claim("default", 5)
        .await
        .unwrap();
    assert_eq!(retaken.len(), 1);
    assert_eq!((retaken[0].id, retaken[0].attempts), (abandoned, 2));
    assert_eq!(retaken[0].errors[0].code, ErrorCode::ShuttingDown);
    assert!(
        retaken[0].errors[0].message.contains("dead-node"),
        "{:?}",
        retaken[0].errors
    );
    assert!(
        !dead.complete(abandoned).await.unwrap(),
        "the dead node's claim is gone"
    );
}

#[tokio::test]
async fn release_and_cancel() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let first = jobs.enqueue(&new_job("1", 5)).await.unwrap().unwrap();
    let second = jobs.enqueue(&new_job("2", 5)).await.unwrap().unwrap();
    let claimed = jobs.claim("default", 1).await.unwrap().pop().unwrap();
    assert!(jobs.release(claimed.id).await.unwrap());
    assert_eq!(
        status_of(&database, claimed.id).await,
        ("pending".into(), 0),
        "a released job keeps its attempts"
    );
    let other = if claimed.id == first { second } else { first };
    assert!(jobs.cancel(other).await.unwrap());
    assert!(!jobs.cancel(other).await.unwrap());
    let running = jobs.claim("default", 1).await.unwrap().pop().unwrap();
    assert!(
        !jobs.cancel(running.id).await.unwrap(),
        "a running job is not cancelled under its worker"
    );
    assert!(jobs.complete(running.id).await.unwrap());
    assert_eq!(
        jobs.prune_finished(Duration::ZERO).await.unwrap(),
        2,
        "completed and cancelled jobs are pruned"
    );
    assert_eq!(jobs.prune_finished(Duration::ZERO).await.unwrap(), 0);
}

#[tokio::test]
async fn jobs_enqueued_in_a_transaction_exist_only_if_it_commits() {
    let database = TestDatabase::migrated().await;
    let mut crashed = database.pool.begin().await.unwrap();
    enqueue_batch(&mut *crashed, &[new_job("1", 5), new_job("2", 5)])
        .await
        .unwrap();
    crashed.rollback().await.unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fraiseql_observers.jobs")
            .fetch_one(&database.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 0);
    let mut committed = database.pool.begin().await.unwrap();
    assert_eq!(
        enqueue_batch(&mut *committed, &[new_job("1", 5), new_job("2", 5)])
            .await
            .unwrap()
            .len(),
        2
    );
    committed.commit().await.unwrap();
    assert_eq!(count().await, 2);
}

fn worker(database: &TestDatabase, receiver: &Receiver, node: &str) -> JobWorker {
    worker_with(receiver, "", queue(database, node))
}

/// A worker for the `orders` observer whose webhook (with `action_extra` settings) posts to the
/// receiver's `/jobs`, claiming from `jobs`.
fn worker_with(receiver: &Receiver, action_extra: &str, jobs: PostgresJobQueue) -> JobWorker {
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'{action_extra}}}]\n",
        receiver.url("/jobs")
    );
    let config = common::config_from_yaml(&yaml);
    JobWorker::new(
        jobs,
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_millis(100),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_the_action_with_the_jobs_idempotency_key() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/jobs",
        [Reply::status(503), Reply::status(200), Reply::status(400)],
    );
    let worker = worker(&database, &receiver, "w");
    let running = CancellationToken::new();
    let job = new_job("7", 5);
    let id = queue(&database, "w").enqueue(&job).await.unwrap().unwrap();

    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::Rescheduled(id)
    );
    sqlx::query("UPDATE fraiseql_observers.jobs SET run_at = now()")
        .execute(&database.pool)
        .await
        .unwrap();
    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::Completed(id)
    );
    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::Idle
    );
    let keys: Vec<String> = receiver
        .requests_to("/jobs")
        .iter()
        .map(|request| request.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        [job.idempotency_key(), job.idempotency_key()],
        "the same key on every attempt"
    );

    let rejected = queue(&database, "w")
        .enqueue(&new_job("8", 5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::DeadLettered(rejected)
    );
    let letters = PostgresDeadLetterQueue::new(database.pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.error_code, ErrorCode::RemoteRejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_releases_what_it_claimed_and_a_running_worker_drains_the_queue() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let worker = worker(&database, &receiver, "w");
    let id = queue(&database, "w")
        .enqueue(&new_job("1", 5))
        .await
        .unwrap()
        .unwrap();
    let stopping = CancellationToken::new();
    stopping.cancel();
    assert_eq!(
        worker.try_execute_one(&stopping).await.unwrap(),
        WorkOutcome::Released(id)
    );
    assert_eq!(status_of(&database, id).await, ("pending".into(), 0));
    assert!(receiver.requests().is_empty());

    let batch: Vec<NewJob> = (2..12)
        .map(|index| new_job(&index.to_string(), 5))
        .collect();
    enqueue_batch(&database.pool, &batch).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.clone().run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while receiver.request_count() < 11 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} jobs ran",
            receiver.request_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs_completed")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(completed, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_task_is_aborted_mid_action_runs_again_elsewhere() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    // The first call hangs (the worker is aborted while waiting); the second answers at once.
    let mut hang = Reply::status(200);
    hang.delay = Duration::from_secs(30);
    receiver.script("/jobs", [hang]);
    let make_worker = |node: &str| {
        let jobs = PostgresJobQueue::new(database.pool.clone(), node, Duration::from_millis(600));
        worker_with(&receiver, ", timeout: 60s", jobs)
    };
    let id = queue(&database, "x")
        .enqueue(&new_job("1", 5))
        .await
        .unwrap()
        .unwrap();
    let doomed = tokio::spawn(make_worker("doomed").run(CancellationToken::new()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while receiver.request_count() < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.abort();
    let _ = doomed.await;

    let survivor = make_worker("survivor");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(survivor.run(shutdown.clone()));
    while status_of(&database, id).await.0 != "completed" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned job was not run again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
    assert_eq!(status_of(&database, id).await, ("completed".into(), 2));
    let requests = receiver.requests_to("/jobs");
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].header("idempotency-key"),
        requests[1].header("idempotency-key")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_releases_prefetched_jobs_and_finishes_the_running_one_on_shutdown() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let mut slow = Reply::status(200);
    slow.delay = Duration::from_millis(800);
    receiver.script("/jobs", [slow]);
    // One attempt at a time: the first job runs, the second is claimed behind it and waits.
    let worker =
        worker_with(&receiver, ", timeout: 10s", queue(&database, "w")).with_claim_batch(1);
    let first = queue(&database, "w")
        .enqueue(&new_job("1", 9))
        .await
        .unwrap()
        .unwrap();
    let second = queue(&database, "w")
        .enqueue(&new_job("2", 1))
        .await
        .unwrap()
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status_of(&database, second).await.0 != "running" || receiver.request_count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second job was never claimed behind the running first one"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        receiver.request_count(),
        1,
        "only the first job has started"
    );
    shutdown.cancel();
    running.await.unwrap();

    assert_eq!(status_of(&database, first).await, ("completed".into(), 1));
    assert_eq!(
        status_of(&database, second).await,
        ("pending".into(), 0),
        "the unstarted job is given back without counting an attempt"
    );
    assert_eq!(receiver.request_count(), 1);
}

/// A job for change-log position `position` of order `entity_id`: it carries an ordering key.
fn ordered_job(entity_id: &str, position: i64, priority: i16) -> NewJob {
    let mut job = new_job(entity_id, priority);
    job.event.position = Some(position);
    job
}

fn entities(jobs: &[fraiseql_observers::jobs::Job]) -> Vec<(String, i64)> {
    let mut claimed: Vec<(String, i64)> = jobs
        .iter()
        .map(|job| (job.event.entity_id.clone(), job.event.position.unwrap()))
        .collect();
    claimed.sort();
    claimed
}

#[tokio::test]
async fn a_later_job_of_an_entity_waits_while_an_earlier_one_is_pending_or_running() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    // Order 1 has three changes in the queue, order 2 one; the later changes of order 1 even
    // have a higher priority.
    enqueue_batch(
        &database.pool,
        &[
            ordered_job("1", 10, 5),
            ordered_job("1", 11, 9),
            ordered_job("1", 12, 9),
            ordered_job("2", 13, 5),
        ],
    )
    .await
    .unwrap();
    let stored: Vec<(Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT ordering_key, ordinal FROM fraiseql_observers.jobs ORDER BY ordinal",
    )
    .fetch_all(&database.pool)
    .await
    .unwrap();
    assert_eq!(
        stored[0],
        (Some(r#"["orders",0,"Order","1"]"#.to_owned()), Some(10)),
        "enqueue stores the ordering key and the change-log position"
    );

    let first = jobs.claim("default", 10).await.unwrap();
    assert_eq!(
        entities(&first),
        [("1".to_owned(), 10), ("2".to_owned(), 13)],
        "one job per entity: the earliest; the other entity is not held back"
    );
    assert!(
        jobs.claim("default", 10).await.unwrap().is_empty(),
        "order 1's next change waits while its first one runs"
    );

    // The first change fails and is rescheduled: pending again, but not due. The next change
    // still waits (it is due, but an earlier job of its key is unfinished).
    let running = first.iter().find(|job| job.event.entity_id == "1").unwrap();
    let unavailable = AttemptError::new(ErrorCode::RemoteUnavailable, "HTTP 503: down");
    assert!(matches!(
        jobs.fail(running, &unavailable).await.unwrap(),
        FailOutcome::Rescheduled { .. }
    ));
    assert!(
        jobs.claim("default", 10).await.unwrap().is_empty(),
        "a rescheduled earlier change still holds the later ones back"
    );

    sqlx::query("UPDATE fraiseql_observers.jobs SET run_at = now() WHERE id = $1")
        .bind(running.id)
        .execute(&database.pool)
        .await
        .unwrap();
    let retried = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&retried), [("1".to_owned(), 10)]);

    // Completing it and claiming in one statement hands out the next change at once.
    let other = first.iter().find(|job| job.event.entity_id == "2").unwrap();
    let Step {
        completed,
        claimed: next,
        ..
    } = jobs
        .complete_and_claim(&[retried[0].id, other.id], "default", 10)
        .await
        .unwrap();
    assert_eq!(completed.len(), 2);
    assert_eq!(entities(&next), [("1".to_owned(), 11)]);
    let last = jobs
        .complete_and_claim(&[next[0].id], "default", 10)
        .await
        .unwrap()
        .claimed;
    assert_eq!(entities(&last), [("1".to_owned(), 12)]);
}

#[tokio::test]
async fn a_step_defers_a_held_job_another_statement_has_locked_instead_of_waiting_for_it() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    for entity in ["1", "2", "3"] {
        jobs.enqueue(&new_job(entity, 5)).await.unwrap().unwrap();
    }
    let claimed = jobs.claim("default", 2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let (locked, free) = (claimed[0].id, claimed[1].id);
    // A claim that ran beside this one and rechecked the job keeps a row lock on it until it
    // commits; another transaction holds one the same way.
    let mut other = database.pool.begin().await.unwrap();
    sqlx::query("SELECT FROM fraiseql_observers.jobs WHERE id = $1 FOR UPDATE")
        .bind(locked)
        .execute(&mut *other)
        .await
        .unwrap();

    let step = tokio::time::timeout(
        Duration::from_secs(5),
        jobs.complete_and_claim(&[locked, free], "default", 10),
    )
    .await
    .expect("the step does not wait for the lock")
    .unwrap();
    assert_eq!(step.completed, [free]);
    assert_eq!(step.deferred, [locked], "still held, to be sent again");
    assert_eq!(step.claimed.len(), 1, "the step claims as usual");
    assert_eq!(status_of(&database, locked).await.0, "running");
    assert_eq!(status_of(&database, free).await.0, "completed");

    // The last completions of a worker wait for the lock instead.
    let last = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.complete_many(&[locked]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!last.is_finished(), "complete_many waits for the lock");
    other.commit().await.unwrap();
    assert_eq!(last.await.unwrap().unwrap(), [locked]);
    assert_eq!(status_of(&database, locked).await.0, "completed");

    // Once the lock is gone, a step completes it like any other.
    let third = step.claimed[0].id;
    let step = jobs
        .complete_and_claim(&[third], "default", 10)
        .await
        .unwrap();
    assert_eq!(step.completed, [third]);
    assert!(step.deferred.is_empty());
}

#[tokio::test]
async fn a_completion_this_node_no_longer_holds_does_not_release_the_next_job() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    enqueue_batch(
        &database.pool,
        &[ordered_job("1", 1, 5), ordered_job("1", 2, 5)],
    )
    .await
    .unwrap();
    let claimed = jobs.claim("default", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Another node holds the first job now (this node's claim expired and was taken over).
    let Step {
        completed,
        deferred,
        claimed: next,
    } = queue(&database, "b")
        .complete_and_claim(&[claimed[0].id], "default", 10)
        .await
        .unwrap();
    assert!(deferred.is_empty(), "node b does not hold it either");
    assert!(completed.is_empty(), "node b did not hold it");
    assert!(
        next.is_empty(),
        "the first job is still running under node a: the second must wait"
    );
}

/// Enqueues `jobs` with a connection listening on the workers' channel, and takes the insert's
/// own notification: the listener hears only what comes after.
async fn enqueue_and_listen(
    database: &TestDatabase,
    jobs: &[NewJob],
) -> sqlx::postgres::PgListener {
    let mut notifications = sqlx::postgres::PgListener::connect_with(&database.pool)
        .await
        .unwrap();
    notifications
        .listen(fraiseql_observers::jobs::JOBS_CHANNEL)
        .await
        .unwrap();
    enqueue_batch(&database.pool, jobs).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("an enqueue notifies the workers")
        .unwrap();
    notifications
}

#[tokio::test]
async fn dead_lettered_and_cancelled_jobs_do_not_hold_later_ones_back() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let mut notifications = enqueue_and_listen(
        &database,
        &[
            ordered_job("poison", 1, 5),
            ordered_job("poison", 2, 5),
            ordered_job("cancelled", 3, 5),
            ordered_job("cancelled", 4, 5),
        ],
    )
    .await;

    let first = jobs.claim("default", 10).await.unwrap();
    assert_eq!(
        entities(&first),
        [("cancelled".to_owned(), 3), ("poison".to_owned(), 1)]
    );
    // The poison change is rejected for good: dead-lettered.
    let poison = first
        .iter()
        .find(|job| job.event.entity_id == "poison")
        .unwrap();
    let outcome = jobs
        .fail(
            poison,
            &AttemptError::new(ErrorCode::RemoteRejected, "HTTP 400"),
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, FailOutcome::DeadLettered { .. }),
        "{outcome:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("dead-lettering an ordered job wakes the workers for the next one")
        .unwrap();
    let after_poison = jobs.claim("default", 10).await.unwrap();
    assert_eq!(
        entities(&after_poison),
        [("poison".to_owned(), 2)],
        "the change after the dead-lettered one runs"
    );

    // The other entity's first job is given back and then cancelled before it runs again.
    let cancelled = first
        .iter()
        .find(|job| job.event.entity_id == "cancelled")
        .unwrap();
    assert!(jobs.release(cancelled.id).await.unwrap());
    let again = jobs.claim("default", 10).await.unwrap();
    assert_eq!(
        entities(&again),
        [("cancelled".to_owned(), 3)],
        "released, the first job is pending again and still first"
    );
    assert!(jobs.release(cancelled.id).await.unwrap());
    assert!(jobs.cancel(cancelled.id).await.unwrap());
    tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("cancelling an ordered job wakes the workers for the next one")
        .unwrap();
    assert_eq!(
        entities(&jobs.claim("default", 10).await.unwrap()),
        [("cancelled".to_owned(), 4)]
    );
}

#[tokio::test]
async fn jobs_without_a_change_log_position_are_not_ordered() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    // Same entity, no position (not from the change log, or enqueued before ordering existed).
    enqueue_batch(&database.pool, &[new_job("1", 5), new_job("1", 5)])
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO fraiseql_observers.jobs (id, queue, max_attempts, backoff_initial_ms, backoff_max_ms,
                idempotency_key, event_id, observer, action_index, action_type, event)
         SELECT gen_random_uuid(), 'default', 3, 0, 0, 'legacy:' || g, gen_random_uuid(), 'orders', 0,
                'webhook', (SELECT event FROM fraiseql_observers.jobs LIMIT 1)
           FROM generate_series(1, 2) AS g",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fraiseql_observers.jobs WHERE ordering_key IS NOT NULL",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(keys, 0);
    assert_eq!(
        jobs.claim("default", 10).await.unwrap().len(),
        4,
        "unordered jobs are claimed together, as before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_run_one_entitys_jobs_one_at_a_time_in_change_order() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    // The target fails now and then; a failed attempt is rescheduled (with backoff) and must
    // still come before the entity's later changes.
    receiver.script(
        "/jobs",
        [503, 200, 200, 503, 503, 200, 503, 200, 200, 200, 503]
            .into_iter()
            .map(Reply::status),
    );
    let mut batch = Vec::new();
    let mut position = 0;
    for _change in 0..8 {
        for entity in ["a", "b", "c"] {
            position += 1;
            let mut job = ordered_job(entity, position, 5);
            job.initial_delay = Duration::from_millis(5);
            job.max_delay = Duration::from_millis(50);
            job.max_attempts = 20;
            batch.push(job);
        }
    }
    enqueue_batch(&database.pool, &batch).await.unwrap();
    let shutdown = CancellationToken::new();
    let workers: Vec<_> = (0..4)
        .map(|index| {
            tokio::spawn(worker(&database, &receiver, &format!("w{index}")).run(shutdown.clone()))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fraiseql_observers.jobs WHERE status <> 'completed'",
        )
        .fetch_one(&database.pool)
        .await
        .unwrap();
        if unfinished == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unfinished} jobs did not complete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    for worker in workers {
        worker.await.unwrap();
    }

    let requests = receiver.requests_to("/jobs");
    for entity in ["a", "b", "c"] {
        let of_entity: Vec<&common::Recorded> = requests
            .iter()
            .filter(|request| request.json()["entity_id"] == entity)
            .collect();
        let delivered: Vec<i64> = of_entity
            .iter()
            .filter(|request| request.status == 200)
            .map(|request| position_of(&batch, request))
            .collect();
        let expected: Vec<i64> = batch
            .iter()
            .filter(|job| job.event.entity_id == entity)
            .map(|job| job.event.position.unwrap())
            .collect();
        assert_eq!(
            delivered, expected,
            "entity {entity}: delivered in change order, once each"
        );
        // One at a time: each attempt of the entity starts after the previous one was answered.
        for pair in of_entity.windows(2) {
            assert!(
                pair[1].arrived >= pair[0].answered.unwrap(),
                "entity {entity}: two attempts overlapped"
            );
        }
    }
    assert!(
        requests.iter().any(|request| request.status == 503),
        "the script's failures were used"
    );
}

/// The change-log position of the job a request delivered (found by its idempotency key).
fn position_of(batch: &[NewJob], request: &common::Recorded) -> i64 {
    let key = request.header("idempotency-key").unwrap();
    batch
        .iter()
        .find(|job| job.idempotency_key() == key)
        .and_then(|job| job.event.position)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_job_of_an_entity_does_not_wait_for_a_slow_job_of_another() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let yaml = format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'}}]\n  - name: slow\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}', timeout: 10s}}]\n",
        receiver.url("/jobs"),
        receiver.url("/delay/2000")
    );
    let config = common::config_from_yaml(&yaml);
    let worker = JobWorker::new(
        queue(&database, "w"),
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_secs(10),
    );
    let mut slow = ordered_job("other", 1, 5);
    slow.observer = "slow".into();
    enqueue_batch(
        &database.pool,
        &[slow, ordered_job("1", 2, 5), ordered_job("1", 3, 5)],
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while receiver.requests_to("/jobs").len() < 2 || receiver.requests_to("/delay/2000").is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the jobs did not run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slow_call = receiver.requests_to("/delay/2000").remove(0);
    let second_change = receiver.requests_to("/jobs").remove(1);
    assert!(
        slow_call
            .answered
            .is_none_or(|answered| second_change.arrived < answered),
        "the entity's second job was claimed only after the slow job of another finished"
    );
    shutdown.cancel();
    running.await.unwrap();
}

/// The statuses of the (ordered) jobs of `entity`, in change order, completed ones included.
async fn chain(database: &TestDatabase, entity: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT status
           FROM (SELECT status, ordering_key, ordinal FROM fraiseql_observers.jobs
                 UNION ALL
                 SELECT 'completed', ordering_key, ordinal FROM fraiseql_observers.jobs_completed) AS job
          WHERE ordering_key::jsonb ->> 3 = $1 ORDER BY ordinal",
    )
    .bind(entity)
    .fetch_all(&database.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn followers_wait_outside_the_ready_index_and_each_finish_promotes_the_next() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    // Two changes in one enqueue, a third later (behind the unfinished first two).
    enqueue_batch(
        &database.pool,
        &[ordered_job("1", 1, 5), ordered_job("1", 2, 5)],
    )
    .await
    .unwrap();
    enqueue_batch(
        &database.pool,
        &[ordered_job("1", 3, 5), ordered_job("1", 4, 5)],
    )
    .await
    .unwrap();
    assert_eq!(
        chain(&database, "1").await,
        ["pending", "waiting", "waiting", "waiting"],
        "only the entity's first unfinished job is pending"
    );
    let stats = jobs.stats().await.unwrap();
    assert_eq!(stats[0].pending, 4, "waiting jobs count as pending");

    // Completed (not through complete_and_claim): the statement promotes the next one.
    let first = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&first), [("1".to_owned(), 1)]);
    assert!(jobs.complete(first[0].id).await.unwrap());
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "pending", "waiting", "waiting"]
    );

    // Dead-lettered: the next one is promoted too.
    let second = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&second), [("1".to_owned(), 2)]);
    let outcome = jobs
        .fail(
            &second[0],
            &AttemptError::new(ErrorCode::RemoteRejected, "HTTP 400"),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, FailOutcome::DeadLettered { .. }));
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "failed", "pending", "waiting"]
    );

    // Rescheduled after a transient failure: still unfinished, the last one keeps waiting.
    let third = jobs.claim("default", 10).await.unwrap();
    assert!(matches!(
        jobs.fail(
            &third[0],
            &AttemptError::new(ErrorCode::RemoteUnavailable, "HTTP 503")
        )
        .await
        .unwrap(),
        FailOutcome::Rescheduled { .. }
    ));
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "failed", "pending", "waiting"]
    );

    // Cancelled: the last one is promoted.
    assert!(jobs.cancel(third[0].id).await.unwrap());
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "failed", "cancelled", "pending"]
    );
    // A waiting job can be cancelled as well.
    enqueue_batch(&database.pool, &[ordered_job("1", 5, 5)])
        .await
        .unwrap();
    let fifth: Uuid =
        sqlx::query_scalar("SELECT id FROM fraiseql_observers.jobs WHERE ordinal = 5")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(status_of(&database, fifth).await.0, "waiting");
    assert!(jobs.cancel(fifth).await.unwrap());
}

#[tokio::test]
async fn a_completion_promotes_the_next_job_it_does_not_claim_and_wakes_the_workers() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    let mut notifications = enqueue_and_listen(
        &database,
        &[
            ordered_job("1", 1, 5),
            ordered_job("1", 2, 5),
            ordered_job("1", 3, 5),
        ],
    )
    .await;
    let first = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&first), [("1".to_owned(), 1)]);

    // Completed by a worker of another queue: the successor is not its to claim, so the
    // statement promotes it and wakes the workers of its queue.
    let Step {
        completed, claimed, ..
    } = jobs
        .complete_and_claim(&[first[0].id], "elsewhere", 10)
        .await
        .unwrap();
    assert_eq!(completed, [first[0].id]);
    assert!(claimed.is_empty());
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "pending", "waiting"]
    );
    tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("promoting the next job wakes the workers")
        .unwrap();

    // Completed by a worker of its queue: the successor is claimed in the same statement
    // (running, not promoted to pending as well), and the one after it keeps waiting.
    let second = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&second), [("1".to_owned(), 2)]);
    let Step {
        completed, claimed, ..
    } = jobs
        .complete_and_claim(&[second[0].id], "default", 10)
        .await
        .unwrap();
    assert_eq!(completed, [second[0].id]);
    assert_eq!(entities(&claimed), [("1".to_owned(), 3)]);
    assert_eq!(
        chain(&database, "1").await,
        ["completed", "completed", "running"]
    );
}

#[tokio::test]
async fn a_waiting_job_left_with_nothing_ahead_is_promoted_by_the_sweep() {
    let database = TestDatabase::migrated().await;
    let jobs = queue(&database, "a");
    enqueue_batch(
        &database.pool,
        &[
            ordered_job("stranded", 1, 5),
            ordered_job("stranded", 2, 5),
            ordered_job("held", 3, 5),
            ordered_job("held", 4, 5),
        ],
    )
    .await
    .unwrap();
    // The predecessor finished where the finishing statement could not see its successor (it
    // finished between the successor's enqueue snapshot and commit): nothing promoted it.
    sqlx::raw_sql(
        "ALTER TABLE fraiseql_observers.jobs DISABLE TRIGGER jobs_promote_successor;
         UPDATE fraiseql_observers.jobs SET status = 'completed', finished_at = now() WHERE ordinal = 1;
         ALTER TABLE fraiseql_observers.jobs ENABLE TRIGGER jobs_promote_successor;",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let held = jobs.claim("default", 10).await.unwrap();
    assert_eq!(
        entities(&held),
        [("held".to_owned(), 3)],
        "a stranded waiting job is not claimable"
    );
    let key = fraiseql_observers::jobs::ordering_key("orders", 0, "Order", "stranded");
    let unfinished = fraiseql_observers::jobs::unfinished_ordering_keys(
        &database.pool,
        std::slice::from_ref(&key),
    )
    .await
    .unwrap();
    assert!(
        unfinished.contains(&key),
        "a waiting job holds later events of its entity back"
    );

    let promoted = fraiseql_observers::jobs::promote_stranded_on(&database.pool, 100)
        .await
        .unwrap();
    assert_eq!(
        promoted, 1,
        "only the stranded job; the held one is behind a running job"
    );
    assert_eq!(chain(&database, "stranded").await, ["completed", "pending"]);
    assert_eq!(chain(&database, "held").await, ["running", "waiting"]);
    let next = jobs.claim("default", 10).await.unwrap();
    assert_eq!(entities(&next), [("stranded".to_owned(), 2)]);
}

/// A worker on its own (no node, no coordinator) promotes a stranded waiting job itself when its
/// queue is empty, so it still runs — as when two replay runs enqueued the same change and both
/// copies completed at once, each completion seeing the other still unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_its_own_promotes_a_stranded_job_and_runs_it() {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    enqueue_batch(
        &database.pool,
        &[ordered_job("stranded", 1, 5), ordered_job("stranded", 2, 5)],
    )
    .await
    .unwrap();
    sqlx::query(
        "UPDATE fraiseql_observers.jobs SET status = 'completed', finished_at = now() WHERE ordinal = 1",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    assert_eq!(
        chain(&database, "stranded").await,
        ["completed", "waiting"],
        "nothing promoted the second job"
    );

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker(&database, &receiver, "alone").run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while chain(&database, "stranded").await != ["completed", "completed"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stranded job never ran: {:?}",
            chain(&database, "stranded").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
    assert_eq!(receiver.request_count(), 1);
}
