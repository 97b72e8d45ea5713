//! `replay`: changes already in the change log delivered once more through the job queue —
//! exactly the selected ones, under concurrent writes, with keys receivers can tell from the
//! originals, resumable after an interrupt.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::Receiver;
use common::postgres::TestDatabase;
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::ObserversConfig;
use fraiseql_observers::replay::{self, ReplayError, ReplayRequest};
use tokio_util::sync::CancellationToken;

fn config(receiver: &Receiver) -> ObserversConfig {
    let yaml = format!(
        "observers:
  - name: orders
    entity: Order
    events: [insert, update]
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}}
    actions:
      - {{type: webhook, url: '{url}'}}
  - name: big-orders
    entity: Order
    events: [insert]
    condition: data.id > 10000
    actions:
      - {{type: webhook, url: '{url}'}}
",
        url = receiver.url("/orders")
    );
    common::config_from_yaml(&yaml)
}

async fn prepare(database: &TestDatabase) {
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    for id in 1..=20 {
        sqlx::query("INSERT INTO orders VALUES ($1, 'new')")
            .bind(id)
            .execute(&database.pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE orders SET note = 'paid' WHERE id = 3")
        .execute(&database.pool)
        .await
        .unwrap();
}

/// The change-log `id` of each change of Order `entity`, in log order.
async fn change_ids(database: &TestDatabase, entity: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT id::text FROM core.tb_entity_change_log
          WHERE object_type = 'Order' AND object_id = $1 ORDER BY pk_entity_change_log",
    )
    .bind(entity)
    .fetch_all(&database.pool)
    .await
    .unwrap()
}

/// Runs a job worker until no job is pending or running.
async fn deliver_jobs(database: &TestDatabase, receiver: &Receiver) {
    common::deliver_jobs(&database.pool, config(receiver)).await;
}

/// Idempotency key → (entity id, data.note) of every request the receiver got.
fn received(receiver: &Receiver) -> BTreeMap<String, (String, String)> {
    let mut seen = BTreeMap::new();
    for request in receiver.requests() {
        let key = request.header("idempotency-key").unwrap().to_owned();
        let body = request.json();
        let value = (
            body["entity_id"].as_str().unwrap().to_owned(),
            body["data"]["note"].as_str().unwrap_or_default().to_owned(),
        );
        assert!(
            seen.insert(key.clone(), value).is_none(),
            "delivered twice: {key}"
        );
    }
    seen
}

/// Writers that keep inserting and updating orders while replay runs go on (their changes after
/// a run's start are not part of it); the task ends with how many rounds they wrote.
fn start_writers(database: &TestDatabase) -> (CancellationToken, tokio::task::JoinHandle<i32>) {
    let pool = database.pool.clone();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let writer = tokio::spawn(async move {
        let mut id = 1_000;
        while !stopped.is_cancelled() {
            sqlx::query("INSERT INTO orders VALUES ($1, 'later')")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("UPDATE orders SET note = 'later' WHERE id = 5")
                .execute(&pool)
                .await
                .unwrap();
            id += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        id - 1_000
    });
    (stop, writer)
}

/// The last order the writers inserted at or before change-log position `upto` (999: none).
async fn last_order_inserted_upto(database: &TestDatabase, upto: i64) -> i32 {
    sqlx::query_scalar(
        "SELECT coalesce(max(object_id::int), 999) FROM core.tb_entity_change_log
          WHERE pk_entity_change_log <= $1 AND object_id::int >= 1000",
    )
    .bind(upto)
    .fetch_one(&database.pool)
    .await
    .unwrap()
}

/// Orders (only `entity_id`, when given), for every observer or only `observer`.
fn request(entity_id: Option<&str>, observer: Option<&str>) -> ReplayRequest {
    ReplayRequest {
        entity_type: Some("Order".into()),
        entity_id: entity_id.map(Into::into),
        observer: observer.map(Into::into),
        ..ReplayRequest::default()
    }
}

/// Starts a run of `request` at `rate` and runs it to its end.
async fn run_to_end(
    database: &TestDatabase,
    matcher: &Matcher,
    request: &ReplayRequest,
    rate: u32,
) -> replay::ReplayRun {
    let run = replay::start(&database.pool, matcher, request, rate)
        .await
        .unwrap();
    replay::run(
        &database.pool,
        matcher,
        run,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap()
}

/// The request of `run` carries a body that names the original event and the run.
fn assert_body_names_its_replay(receiver: &Receiver, run: uuid::Uuid, keys: &BTreeSet<String>) {
    let request = receiver
        .requests()
        .into_iter()
        .find(|request| {
            request
                .header("idempotency-key")
                .unwrap()
                .ends_with(&run.to_string())
        })
        .unwrap();
    assert_eq!(request.json()["replay"]["run"], run.to_string());
    assert!(keys.contains(&format!(
        "{}:orders:0:replay:{run}",
        request.json()["replay"]["of"].as_str().unwrap()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_exactly_the_selected_changes_once_more_under_concurrent_writes() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let matcher = Matcher::new(config(&receiver).observers);

    let (stop_writing, writer) = start_writers(&database);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // One entity, every observer; then every Order change for one observer, slowly (10/s in
    // batches of 10), so that the writers run during it.
    let one = request(Some("3"), None);
    let all = request(None, Some("orders"));
    let first = run_to_end(&database, &matcher, &one, 1_000).await;
    let second = run_to_end(&database, &matcher, &all, 10).await;
    let selected = second.total_changes;
    stop_writing.cancel();
    let written_meanwhile = writer.await.unwrap();
    assert!(
        written_meanwhile > 10,
        "the writers ran: {written_meanwhile}"
    );
    let last_selected = last_order_inserted_upto(&database, second.selection.upto).await;
    assert!(
        written_meanwhile > last_selected - 999,
        "the writers wrote after the run started ({written_meanwhile} rounds, {} before)",
        last_selected - 999
    );

    assert_eq!(
        (
            first.status.as_str(),
            first.changes_done,
            first.jobs_enqueued
        ),
        ("completed", 2, 2),
        "order 3's insert and update, for `orders` (big-orders' condition is false)"
    );
    assert_eq!(second.status, "completed");
    assert_eq!(second.changes_done, selected);
    assert!(
        selected >= 21,
        "the 21 changes written before, plus those the writers made before the run started"
    );
    deliver_jobs(&database, &receiver).await;

    let delivered = received(&receiver);
    let expected_first: BTreeSet<String> = change_ids(&database, "3")
        .await
        .into_iter()
        .take(2)
        .map(|id| format!("{id}:orders:0:replay:{}", first.id))
        .collect();
    let of_first: BTreeSet<String> = delivered
        .keys()
        .filter(|key| key.ends_with(&format!(":replay:{}", first.id)))
        .cloned()
        .collect();
    assert_eq!(of_first, expected_first);
    let of_second: Vec<&(String, String)> = delivered
        .iter()
        .filter(|(key, _)| key.ends_with(&format!(":replay:{}", second.id)))
        .map(|(_, value)| value)
        .collect();
    assert_eq!(
        u64::try_from(of_second.len()).unwrap(),
        second.jobs_enqueued
    );
    assert_eq!(
        of_second.len(),
        delivered.len() - 2,
        "nothing else was sent"
    );
    for entity in 1..=20 {
        let entity = entity.to_string();
        assert!(
            of_second
                .iter()
                .any(|(id, note)| *id == entity && note == "new"),
            "order {entity}'s insert replayed"
        );
    }
    assert!(
        of_second
            .iter()
            .any(|(id, note)| id == "3" && note == "paid"),
        "order 3's update replayed"
    );
    let later = of_second.iter().filter(|(_, note)| note == "later").count();
    assert!(
        of_second
            .iter()
            .all(|(id, _)| id.parse::<i32>().unwrap() <= last_selected),
        "no order inserted after the run started (past {last_selected}) was replayed"
    );
    assert_eq!(
        u64::try_from(of_second.len() - later).unwrap(),
        21,
        "the 21 changes written before the writers, each once"
    );
    assert_body_names_its_replay(&receiver, first.id, &expected_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_where_it_stopped_and_enqueues_nothing_twice() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let matcher = Matcher::new(config(&receiver).observers);
    let request = ReplayRequest {
        entity_type: Some("Order".into()),
        ..ReplayRequest::default()
    };
    let run = replay::start(&database.pool, &matcher, &request, 5)
        .await
        .unwrap();
    let id = run.id;

    // Interrupted after its first batch of 5.
    let cancel = CancellationToken::new();
    let interrupt = cancel.clone();
    let error = replay::run(&database.pool, &matcher, run, &cancel, |_| {
        interrupt.cancel();
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            ReplayError::Interrupted {
                changes_done: 5,
                total_changes: 21,
                jobs_enqueued: 5,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains(&format!("--resume {id}")),
        "{error}"
    );
    let stored = replay::runs(&database.pool, Some(id), 1).await.unwrap();
    assert_eq!(stored[0].status, "interrupted");

    let resumed = replay::resume(&database.pool, id).await.unwrap();
    assert_eq!(resumed.last_position, stored[0].last_position);
    let done = replay::run(
        &database.pool,
        &matcher,
        resumed,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (done.status.as_str(), done.changes_done, done.jobs_enqueued),
        ("completed", 21, 21)
    );
    let (jobs, keys): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key) FROM fraiseql_observers.jobs",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!((jobs, keys), (21, 21));
    assert!(matches!(
        replay::resume(&database.pool, id).await,
        Err(ReplayError::Completed(run)) if run == id
    ));
    assert!(matches!(
        replay::resume(&database.pool, uuid::Uuid::nil()).await,
        Err(ReplayError::UnknownRun(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_and_samples_and_enqueues_nothing() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let matcher = Matcher::new(config(&receiver).observers);
    let request = ReplayRequest {
        entity_type: Some("Order".into()),
        entity_id: Some("3".into()),
        ..ReplayRequest::default()
    };

    let preview = replay::preview(&database.pool, &matcher, &request, 5)
        .await
        .unwrap();

    assert_eq!(
        (
            preview.changes,
            preview.matching_changes,
            preview.jobs,
            preview.undecodable
        ),
        (2, 2, 2, 0)
    );
    let sample: Vec<(&str, &str, Vec<String>)> = preview
        .sample
        .iter()
        .map(|change| {
            (
                change.event,
                change.entity_id.as_str(),
                change.actions.clone(),
            )
        })
        .collect();
    assert_eq!(
        sample,
        [
            ("INSERT", "3", vec!["orders#0 (webhook)".to_owned()]),
            ("UPDATE", "3", vec!["orders#0 (webhook)".to_owned()])
        ]
    );
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.jobs")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
    assert!(
        replay::runs(&database.pool, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let unknown = ReplayRequest {
        observer: Some("nope".into()),
        ..request
    };
    assert!(matches!(
        replay::preview(&database.pool, &matcher, &unknown, 5).await,
        Err(ReplayError::UnknownObserver(name)) if name == "nope"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_previews_runs_and_reports_its_runs() {
    let database = TestDatabase::migrated().await;
    prepare(&database).await;
    let receiver = Receiver::start().await;
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions:\n      - {{type: webhook, url: '{}'}}\n",
            receiver.url("/orders")
        ),
    )
    .unwrap();
    let config = file.path().to_str().unwrap();

    let (status, preview, stderr) = database.cli(&[
        "replay",
        "--config",
        config,
        "--entity-type",
        "Order",
        "--entity-id",
        "3",
        "--dry-run",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    let lines: Vec<&str> = preview.lines().collect();
    assert_eq!(
        lines,
        [
            "dry run: replay of Order 3, every observer",
            "  2 changes selected, 2 matched by an observer → 2 jobs would be enqueued",
            "  sample: position 3 INSERT Order 3 → orders#0 (webhook)",
            "  sample: position 21 UPDATE Order 3 → orders#0 (webhook)",
            "nothing enqueued",
        ]
    );

    let (status, summary, progress) = database.cli(&[
        "replay",
        "--config",
        config,
        "--entity-type",
        "Order",
        "--json",
    ]);
    assert_eq!(status, Some(0), "{progress}");
    let run: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(run["status"], "completed");
    assert_eq!(run["changes_done"], 21);
    assert_eq!(run["jobs_enqueued"], 21);
    let id = run["id"].as_str().unwrap();
    assert!(
        progress.contains(&format!("replay {id}: 21 changes selected")),
        "{progress}"
    );

    let (status, listing, _) = database.cli(&["replay", "status", id]);
    assert_eq!(status, Some(0));
    assert!(
        listing.starts_with(&format!(
            "{id} completed   21/21 changes (100 %), 21 jobs, 0 skipped"
        )),
        "{listing}"
    );
    assert!(
        listing.contains("every Order, every observer; up to position 21, at most 500/s"),
        "{listing}"
    );

    let (status, _, stderr) = database.cli(&["replay", "--config", config, "--resume", id]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("replay run {id} has already completed")),
        "{stderr}"
    );
    let (status, _, stderr) = database.cli(&["replay", "--entity-type", "Order"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("--config <CONFIG>"), "{stderr}");
    let (status, _, stderr) = database.cli(&[
        "replay",
        "--config",
        config,
        "--observer",
        "nope",
        "--dry-run",
    ]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("no observer named \"nope\" in the observers file"),
        "{stderr}"
    );
}
