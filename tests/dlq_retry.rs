//! `dlq retry` without a letter id: the letters a filter selects handed back to the job queue —
//! failed jobs pending again in place, letters of inline failures as new jobs — each delivered
//! once more with its original idempotency key, and a job that fails again dead-lettered with
//! every attempt, old and new, numbered in one history.

mod common;

use std::collections::BTreeMap;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::dlq::{
    DeadLetterFilter, DeadLetterQueue, NewDeadLetter, PostgresDeadLetterQueue,
};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::jobs;
use fraiseql_observers::retry::{AttemptError, FailedAttempt, history_text};
use serde_json::json;

fn yaml(receiver: &Receiver) -> String {
    format!(
        "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 2, initial_delay: 10ms, max_delay: 20ms}}
    actions:
      - {{type: webhook, url: '{orders}'}}
  - name: audit
    entity: Invoice
    events: [insert]
    actions:
      - {{type: webhook, url: '{audit}'}}
",
        orders = receiver.url("/orders"),
        audit = receiver.url("/audit"),
    )
}

struct Setup {
    database: TestDatabase,
    receiver: Receiver,
    queue: PostgresDeadLetterQueue,
    _directory: tempfile::TempDir,
    config_path: String,
}

async fn setup() -> Setup {
    let database = TestDatabase::migrated().await;
    let receiver = Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("observers.yaml");
    std::fs::write(&path, yaml(&receiver)).unwrap();
    Setup {
        queue: PostgresDeadLetterQueue::new(database.pool.clone()),
        database,
        receiver,
        _directory: directory,
        config_path: path.to_str().unwrap().to_owned(),
    }
}

fn order(id: &str) -> EntityEvent {
    EntityEvent::new(EventKind::Insert, "Order", id, json!({"id": id}), None)
}

/// Enqueues a job for each event under `orders`, then lets a worker run them while the receiver
/// says 503 to each attempt: every one ends as a dead letter of 2 attempts with a failed job.
async fn dead_letters_from_the_queue(setup: &Setup, events: &[EntityEvent]) {
    let config = common::config_from_yaml(&yaml(&setup.receiver));
    let observer = &config.observers[0];
    let new_jobs: Vec<_> = events
        .iter()
        .map(|event| observer.job_for(event, &observer.actions[0], 2))
        .collect();
    jobs::enqueue_batch(&setup.database.pool, &new_jobs)
        .await
        .unwrap();
    setup
        .receiver
        .script("/orders", (0..events.len() * 2).map(|_| Reply::status(503)));
    deliver_jobs(setup).await;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs WHERE status = 'failed'")
            .fetch_one(&setup.database.pool)
            .await
            .unwrap();
    assert_eq!(failed, i64::try_from(events.len()).unwrap());
}

/// A letter as the inline path leaves it: 3 attempts made in the page, no job.
fn inline_letter(event: EntityEvent, observer: &str) -> NewDeadLetter {
    let history: Vec<FailedAttempt> = (1..=3)
        .map(|attempt| {
            FailedAttempt::now(
                attempt,
                &AttemptError::new(ErrorCode::RemoteUnavailable, "HTTP 503: busy"),
            )
        })
        .collect();
    NewDeadLetter {
        event,
        observer: observer.to_owned(),
        action_index: 0,
        action_type: "webhook".to_owned(),
        error_code: ErrorCode::RemoteUnavailable,
        error_message: history_text(&history),
        attempts: 3,
    }
}

/// Runs a job worker until no job is pending or running.
async fn deliver_jobs(setup: &Setup) {
    common::deliver_jobs(
        &setup.database.pool,
        common::config_from_yaml(&yaml(&setup.receiver)),
    )
    .await;
}

async fn letters_of(queue: &PostgresDeadLetterQueue) -> Vec<(String, String)> {
    queue
        .list(&DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|letter| (letter.letter.observer, letter.letter.event.entity_id))
        .collect()
}

/// The failed jobs `ids` are pending again in place, their 2 attempts counted as earlier ones.
async fn assert_pending_again_in_place(setup: &Setup, ids: &[uuid::Uuid]) {
    let requeued: Vec<(uuid::Uuid, String, i32, i32, i32)> = sqlx::query_as(
        "SELECT id, status, attempts, inline_attempts, jsonb_array_length(errors)
           FROM fraiseql_observers.jobs WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(&setup.database.pool)
    .await
    .unwrap();
    assert_eq!(requeued.len(), ids.len());
    for (_, status, attempts, inline_attempts, errors) in &requeued {
        assert_eq!(
            (status.as_str(), *attempts, *inline_attempts, *errors),
            ("pending", 0, 2, 2)
        );
    }
}

/// Idempotency key → how many requests to `/orders` carried it, from request `from` on.
fn keys_received(receiver: &Receiver, from: usize) -> BTreeMap<String, usize> {
    let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
    for request in &receiver.requests_to("/orders")[from..] {
        *delivered
            .entry(request.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
    }
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_retry_delivers_each_selected_letter_once_more_with_its_original_key() {
    let setup = setup().await;
    let from_queue: Vec<EntityEvent> = (1..=6).map(|id| order(&id.to_string())).collect();
    dead_letters_from_the_queue(&setup, &from_queue).await;
    let inline: Vec<EntityEvent> = (7..=9).map(|id| order(&id.to_string())).collect();
    let invoice = EntityEvent::new(EventKind::Insert, "Invoice", "I-1", json!({}), None);
    let others = [(order("10"), "gone"), (invoice, "audit")];
    for (event, observer) in inline
        .iter()
        .map(|event| (event.clone(), "orders"))
        .chain(others)
    {
        setup
            .queue
            .push(inline_letter(event, observer))
            .await
            .unwrap();
    }
    let failed_job_ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM fraiseql_observers.jobs WHERE status = 'failed' ORDER BY id",
    )
    .fetch_all(&setup.database.pool)
    .await
    .unwrap();
    let cli = |extra: &[&str]| {
        let mut arguments = vec!["dlq", "retry", "--config", &setup.config_path];
        arguments.extend_from_slice(extra);
        setup.database.cli(&arguments)
    };

    // Without an id, a filter or --all nothing is taken.
    let (status, _, stderr) = cli(&[]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("without --all"), "{stderr}");
    // An id and a filter do not mix.
    let id = setup
        .queue
        .list(&DeadLetterFilter::default())
        .await
        .unwrap()[0]
        .id;
    let (status, _, stderr) = cli(&[&id.to_string(), "--entity-type", "Order"]);
    assert_eq!(status, Some(2), "{stderr}");

    // A dry run counts by observer and error, and changes nothing.
    let (status, stdout, stderr) = cli(&["--entity-type", "Order", "--dry-run"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("10 dead letters in 2 groups\n"),
        "{stdout}"
    );
    assert!(stdout.contains("       9  orders[0]"), "{stdout}");
    assert!(stdout.contains("       1  gone[0]"), "{stdout}");
    assert_eq!(letters_of(&setup.queue).await.len(), 11);

    let requests_before = setup.receiver.requests_to("/orders").len();
    let (status, stdout, stderr) = cli(&["--entity-type", "Order"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("✓ 9 dead letters handed back to the job queue in "),
        "{stdout}"
    );
    assert!(
        stdout
            .contains(": 6 failed jobs pending again, 3 new jobs, 0 already queued or delivered\n"),
        "{stdout}"
    );
    assert!(stdout.contains("✗ 1 letter kept:\n"), "{stdout}");
    assert!(
        stdout.contains("observer \"gone\" is not in the observers file"),
        "{stdout}"
    );
    assert!(
        stderr.contains("dlq retry: 10/10 letters, 6 requeued, 3 new jobs, 1 kept"),
        "progress lines when stderr is not a terminal: {stderr}"
    );
    assert_eq!(
        letters_of(&setup.queue).await,
        [
            ("gone".to_owned(), "10".to_owned()),
            ("audit".to_owned(), "I-1".to_owned())
        ],
        "the kept letter and the one outside the filter stay"
    );
    assert_pending_again_in_place(&setup, &failed_job_ids).await;

    deliver_jobs(&setup).await;
    let delivered = keys_received(&setup.receiver, requests_before);
    let expected: BTreeMap<String, usize> = from_queue
        .iter()
        .chain(&inline)
        .map(|event| (format!("{}:orders:0", event.id), 1))
        .collect();
    assert_eq!(
        delivered, expected,
        "each letter delivered once more, with the key of its original attempts"
    );
    assert!(setup.receiver.requests_to("/audit").is_empty());

    // Nothing is left to hand back; the kept letter is said again.
    let (status, stdout, _) = cli(&["--entity-type", "Order"]);
    assert_eq!(status, Some(0));
    assert!(
        stdout.starts_with("✓ 0 dead letters handed back"),
        "{stdout}"
    );
    assert!(stdout.contains("✗ 1 letter kept:"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_that_fails_again_keeps_every_attempt_numbered_in_one_history() {
    let setup = setup().await;
    let from_queue = order("1");
    dead_letters_from_the_queue(&setup, std::slice::from_ref(&from_queue)).await;
    let inline = order("2");
    setup
        .queue
        .push(inline_letter(inline.clone(), "orders"))
        .await
        .unwrap();

    let (status, stdout, stderr) = setup.database.cli(&[
        "dlq",
        "retry",
        "--observer",
        "orders",
        "--json",
        "--config",
        &setup.config_path,
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (
            report["matching"].as_u64(),
            report["requeued"].as_u64(),
            report["enqueued"].as_u64(),
            report["kept"].as_u64()
        ),
        (Some(2), Some(1), Some(1), Some(0)),
        "{report}"
    );

    // Both fail twice more (the observer's budget, as the file says it now).
    setup
        .receiver
        .script("/orders", (0..4).map(|_| Reply::status(503)));
    deliver_jobs(&setup).await;
    let letters = setup
        .queue
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    let history = |event: &EntityEvent| {
        let letter = letters
            .iter()
            .find(|letter| letter.letter.event.id == event.id)
            .unwrap();
        let numbers: Vec<String> = letter
            .letter
            .error_message
            .lines()
            .map(|line| line.split(" (").next().unwrap().to_owned())
            .collect();
        (letter.letter.attempts, numbers)
    };
    let numbered = |count: u32| -> Vec<String> {
        (1..=count)
            .map(|attempt| format!("attempt {attempt}"))
            .collect()
    };
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(history(&from_queue), (4, numbered(4)));
    assert_eq!(history(&inline), (5, numbered(5)));
}
