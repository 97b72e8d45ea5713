//! Change-log rows written by someone hostile (anyone who can write a tracked table can put any
//! JSON in it): rows nested deeper than the parser allows, rows just under that, rows and pages
//! over the byte bounds, and stored events that no longer decode. Each one is dead-lettered
//! alone, with its reason, while the rest of its partition flows on; the dead-letter queue and
//! the job queue keep working around it. Real PostgreSQL, real HTTP receiver, the real binary for
//! the memory bound.

#![allow(clippy::too_many_lines)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Receiver;
use common::postgres::TestDatabase;
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::checkpoint::PostgresCheckpointStore;
use fraiseql_observers::dlq::{
    DeadLetterFilter, DeadLetterQueue, EVENT_OMITTED, NewDeadLetter, PostgresDeadLetterQueue,
};
use fraiseql_observers::domain::{EntityEvent, EventKind, FieldChanges};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::Executor;
use fraiseql_observers::jobs::{NewJob, PostgresJobQueue};
use fraiseql_observers::listener::{
    DECODE_OBSERVER, Listener, ListenerSettings, MAX_ROW_DEPTH, ROW_EXCERPT_CHARS,
};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::ObserversConfig;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// `{"a":{"a":…{"a":1}…}}`, `depth` objects deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn observers(receiver: &Receiver) -> ObserversConfig {
    common::config_from_yaml(&format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions: [{{type: webhook, url: '{}'}}]\n",
        receiver.url("/orders")
    ))
}

async fn listener(
    database: &TestDatabase,
    config: ObserversConfig,
    settings: ListenerSettings,
) -> Listener {
    listener_with(database, config, settings, false).await
}

/// [`listener`], with job routing when `job_routing` (async actions enqueue with the checkpoint).
async fn listener_with(
    database: &TestDatabase,
    config: ObserversConfig,
    settings: ListenerSettings,
    job_routing: bool,
) -> Listener {
    let mut executor = Executor::new(
        Arc::new(Matcher::new(config.observers)),
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(database.pool.clone())),
        &config.executor,
    );
    if job_routing {
        executor = executor.with_job_routing();
    }
    Listener::start(
        database.pool.clone(),
        Arc::new(PostgresCheckpointStore::new(database.pool.clone())),
        executor,
        settings,
    )
    .await
    .unwrap()
}

/// Writes a change-log row for `Order` `object_id` with `object_data` given as JSON text;
/// returns its position.
async fn write_change(pool: &sqlx::PgPool, object_id: &str, object_data: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
         VALUES ('Order', $1, 'INSERT', $2::jsonb) RETURNING pk_entity_change_log",
    )
    .bind(object_id)
    .bind(object_data)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn delivered_ids(receiver: &Receiver) -> Vec<String> {
    receiver
        .requests_to("/orders")
        .iter()
        .map(|request| request.json()["entity_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_nested_past_the_bound_are_dead_lettered_alone_and_the_partition_flows_on() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let mut listener = listener(
        &database,
        observers(&receiver),
        ListenerSettings {
            node_id: "hostile".into(),
            ..ListenerSettings::default()
        },
    )
    .await;

    // 200 levels: past serde_json's own recursion limit (128), which used to fail the whole page
    // forever. 125 levels: under it, but the event built from it adds levels that its dead
    // letter or job could no longer be read back with. The deepest accepted row sits exactly at
    // the bound (the row object itself is one level, object_data one more).
    let deepest_accepted = MAX_ROW_DEPTH - 2;
    write_change(pool, "g1", r#"{"id": "g1"}"#).await;
    let deep_200 = write_change(pool, "deep-200", &nested(200)).await;
    write_change(pool, "g2", r#"{"id": "g2"}"#).await;
    let deep_125 = write_change(pool, "deep-125", &nested(125)).await;
    write_change(pool, "edge", &nested(deepest_accepted)).await;
    write_change(pool, "g3", r#"{"id": "g3"}"#).await;

    let outcome = listener
        .deliver_page()
        .await
        .expect("the page is delivered");
    assert_eq!(outcome.rows, 6);
    assert_eq!(outcome.malformed, 2);
    let mut delivered = delivered_ids(&receiver);
    delivered.sort();
    assert_eq!(delivered, ["edge", "g1", "g2", "g3"]);
    let edge = receiver
        .requests_to("/orders")
        .into_iter()
        .find(|request| request.json()["entity_id"] == "edge")
        .unwrap()
        .json();
    assert_eq!(
        edge["data"].to_string(),
        nested(deepest_accepted),
        "a row at the bound arrives whole"
    );

    // The dead-letter queue lists both refused rows (and every other letter) without trouble.
    let queue = PostgresDeadLetterQueue::new(pool.clone());
    let letters = queue.list(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for letter in &letters {
        let position = letter.letter.event.position.unwrap();
        assert!(position == deep_200 || position == deep_125, "{letter:?}");
        assert_eq!(letter.letter.observer, DECODE_OBSERVER);
        assert_eq!(letter.letter.error_code, ErrorCode::MalformedEvent);
        assert!(
            letter
                .letter
                .error_message
                .contains(&format!("deeper than {MAX_ROW_DEPTH} levels")),
            "{}",
            letter.letter.error_message
        );
        let data = &letter.letter.event.data;
        let expected_id = if position == deep_200 {
            "deep-200"
        } else {
            "deep-125"
        };
        assert_eq!(data["object_id"], expected_id, "{data}");
        assert_eq!(letter.letter.event.entity_id, expected_id);
        let excerpt = data["row_excerpt"].as_str().expect("an excerpt of the row");
        assert!(excerpt.contains(r#"{"a": {"a": {"a""#), "{excerpt}");
        assert!(excerpt.chars().count() <= ROW_EXCERPT_CHARS);
        assert!(data["row_bytes"].as_u64().unwrap() > 600);
        let shown = queue
            .get(letter.id)
            .await
            .unwrap()
            .expect("the letter shows");
        assert_eq!(shown.letter.event.data, *data);
    }

    // Read again: nothing is dead-lettered twice or delivered again.
    assert_eq!(listener.deliver_page().await.unwrap().rows, 0);
    assert_eq!(queue.count().await.unwrap(), 2);
    assert_eq!(receiver.requests_to("/orders").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_pages_over_their_byte_bounds_are_cut_not_read_whole() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let mut listener = listener(
        &database,
        observers(&receiver),
        ListenerSettings {
            node_id: "bounded".into(),
            max_row_bytes: 8 * 1024,
            max_page_bytes: 4 * 1024,
            ..ListenerSettings::default()
        },
    )
    .await;
    let padding = "x".repeat(1000);
    for index in 0..10 {
        write_change(
            pool,
            &format!("small-{index}"),
            &json!({"pad": padding}).to_string(),
        )
        .await;
    }
    let huge = write_change(
        pool,
        "huge",
        &json!({"pad": "y".repeat(100_000)}).to_string(),
    )
    .await;
    write_change(pool, "last", r#"{"id": "last"}"#).await;

    let mut pages = Vec::new();
    let started = Instant::now();
    loop {
        let outcome = listener.deliver_page().await.unwrap();
        if outcome.rows == 0 {
            break;
        }
        pages.push((outcome.rows, outcome.malformed, outcome.more));
        assert!(started.elapsed() < DEADLINE, "pages never ended: {pages:?}");
    }
    // ~1.1 KB per row and 4 KiB per page: pages of 4 rows (the fourth starts under the bound),
    // the oversized row alone, then the rest.
    assert!(
        pages.iter().all(|(rows, ..)| *rows <= 4),
        "no page holds more than the byte bound allows: {pages:?}"
    );
    assert!(pages.len() >= 4, "{pages:?}");
    assert!(
        pages[0].2,
        "a page cut by bytes says more follows: {pages:?}"
    );
    let mut expected: Vec<String> = (0..10).map(|index| format!("small-{index}")).collect();
    expected.push("last".into());
    expected.sort();
    let mut delivered = delivered_ids(&receiver);
    delivered.sort();
    assert_eq!(delivered, expected, "every row once");

    let letters = PostgresDeadLetterQueue::new(pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].letter;
    assert_eq!(letter.event.position, Some(huge));
    assert!(
        letter
            .error_message
            .contains("over the limit of 8192 (--max-row-bytes)"),
        "{}",
        letter.error_message
    );
    assert_eq!(letter.event.data["object_id"], "huge");
    let row_bytes = letter.event.data["row_bytes"].as_u64().unwrap();
    assert!(row_bytes > 100_000, "{row_bytes}");
    let excerpt = letter.event.data["row_excerpt"].as_str().unwrap();
    assert_eq!(
        excerpt.chars().count(),
        ROW_EXCERPT_CHARS,
        "only an excerpt is kept"
    );
}

/// An event with a payload of `size` characters in both images (random, so that PostgreSQL's
/// compression does not hide the size) and one changed field.
fn large_event(size: usize) -> EntityEvent {
    let payload = random_text(size);
    let before = json!({"id": 1, "status": "new", "payload": payload});
    let data = json!({"id": 1, "status": "paid", "payload": payload});
    EntityEvent {
        id: Uuid::now_v7(),
        kind: EventKind::Update,
        entity_type: "Order".into(),
        entity_id: "1".into(),
        changes: FieldChanges::derive(
            EventKind::Update,
            Some(&before),
            &data,
            Some(&["payload".to_owned()]),
        ),
        data,
        before: Some(before),
        tenant_id: None,
        actor: None,
        timestamp: chrono::Utc::now(),
        position: Some(1),
        trace_id: None,
        replay: None,
    }
}

fn rand_byte() -> u8 {
    Uuid::new_v4().as_bytes()[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_dead_letters_are_stored_once_and_listed_abbreviated() {
    let database = TestDatabase::migrated().await;
    let queue = PostgresDeadLetterQueue::new(database.pool.clone());
    let event = large_event(700_000);
    let whole = serde_json::to_vec(&event).unwrap().len();
    let id = queue
        .push(NewDeadLetter {
            event: event.clone(),
            observer: "orders".into(),
            action_index: 0,
            action_type: "webhook".into(),
            error_code: ErrorCode::RemoteRejected,
            error_message: "receiver said 400".into(),
            attempts: 1,
        })
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT octet_length(event::text)::bigint FROM fraiseql_observers.dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&database.pool)
    .await
    .unwrap();
    // The images once each (2 × 700 KB), not a third and fourth time inside `changes`.
    assert!(whole > 2_700_000, "{whole}");
    assert!(
        stored < 1_500_000,
        "stored {stored} bytes of a {whole}-byte event"
    );

    let shown = queue.get(id).await.unwrap().unwrap();
    assert_eq!(
        shown.letter.event, event,
        "changes are rebuilt exactly from the images"
    );
    assert!(!shown.event_is_unreadable());

    let listed = queue.list(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    let note = listed[0].letter.event.data[EVENT_OMITTED].as_str().unwrap();
    assert!(
        note.contains("bytes stored; dlq show prints it whole"),
        "{note}"
    );
    assert_eq!(listed[0].letter.event.entity_id, "1");
    assert_eq!(listed[0].letter.error_message, "receiver said 400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_event_that_no_longer_decodes_fails_alone() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let queue = PostgresDeadLetterQueue::new(pool.clone());
    let good = large_event(10);
    let good_id = queue
        .push(NewDeadLetter {
            event: good.clone(),
            observer: "orders".into(),
            action_index: 0,
            action_type: "webhook".into(),
            error_code: ErrorCode::RemoteRejected,
            error_message: "400".into(),
            attempts: 1,
        })
        .await
        .unwrap();
    // A letter as an older version could have stored it: an event nested past the parser's
    // recursion limit. It used to make every listing fail.
    let bad_event_id = Uuid::now_v7();
    let bad_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO fraiseql_observers.dead_letters
             (id, observer, action_index, action_type, error_code, error_message, attempts, event, entity_type, event_id)
         VALUES ($1, 'orders', 0, 'webhook', 'OB009', 'old', 1, $2::jsonb, 'Order', $3)",
    )
    .bind(bad_id)
    .bind(format!(r#"{{"data": {}}}"#, nested(140)))
    .bind(bad_event_id)
    .execute(pool)
    .await
    .unwrap();

    let listed = queue.list(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    let good_letter = listed.iter().find(|letter| letter.id == good_id).unwrap();
    assert_eq!(good_letter.letter.event, good);
    let bad = queue.get(bad_id).await.unwrap().unwrap();
    assert!(bad.event_is_unreadable());
    assert_eq!(bad.letter.event.id, bad_event_id);
    assert_eq!(bad.letter.event.entity_type, "Order");
    assert!(
        bad.letter.event.data[EVENT_OMITTED]
            .as_str()
            .unwrap()
            .contains("recursion limit"),
        "{}",
        bad.letter.event.data
    );

    // The same for a job: a claimed batch holding one unreadable job runs the others, and the
    // unreadable one is failed with a dead letter instead of failing every claim forever.
    let jobs = PostgresJobQueue::new(pool.clone(), "node-a", Duration::from_secs(30));
    let deep_but_accepted = large_event(1);
    let mut deep_but_accepted = EntityEvent {
        data: serde_json::from_str(&nested(MAX_ROW_DEPTH - 2)).unwrap(),
        ..deep_but_accepted.clone()
    };
    deep_but_accepted.changes.clear();
    let new_job = |event: EntityEvent, index: usize| NewJob {
        queue: "default".into(),
        priority: 0,
        run_at: None,
        max_attempts: 3,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        event,
        observer: "orders".into(),
        action_index: index,
        action_type: "webhook".into(),
        parked_on: None,
        history: Vec::new(),
    };
    let good_job = jobs
        .enqueue(&new_job(deep_but_accepted.clone(), 0))
        .await
        .unwrap()
        .unwrap();
    let broken_job = jobs
        .enqueue(&new_job(large_event(1), 1))
        .await
        .unwrap()
        .unwrap();
    sqlx::query("UPDATE fraiseql_observers.jobs SET event = $2::jsonb WHERE id = $1")
        .bind(broken_job)
        .bind(format!(r#"{{"data": {}}}"#, nested(140)))
        .execute(pool)
        .await
        .unwrap();
    let claimed = jobs.claim("default", 10).await.expect("the claim succeeds");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].id, good_job);
    assert_eq!(claimed[0].event.data, deep_but_accepted.data);
    let (status, letters): (String, i64) = sqlx::query_as(
        "SELECT status, (SELECT count(*) FROM fraiseql_observers.dead_letters WHERE action_index = 1)
           FROM fraiseql_observers.jobs WHERE id = $1",
    )
    .bind(broken_job)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), letters), ("failed", 1));
    assert!(jobs.claim("default", 10).await.unwrap().is_empty());
}

/// Peak resident memory of a process, from `/proc/<pid>/status` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_megabyte_row_does_not_reach_the_nodes_memory() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("observers.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}'}}]\n",
            receiver.url("/orders")
        ),
    )
    .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, notes text);
         SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    .execute(pool)
    .await
    .unwrap();
    let log = std::fs::File::create(directory.path().join("node.log")).unwrap();
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--poll-interval",
            "200ms",
        ])
        .args([
            "--node-id",
            "rss",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    sqlx::query("INSERT INTO orders VALUES (1, 'small')")
        .execute(pool)
        .await
        .unwrap();
    let started = Instant::now();
    while receiver.requests_to("/orders").is_empty() {
        assert!(
            started.elapsed() < DEADLINE,
            "the first row was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = peak_rss_kib(node.id());

    // 50 MB of notes: the captured row is 50 MB of JSON, over the default 8 MiB row limit.
    sqlx::query("INSERT INTO orders VALUES (2, repeat('n', 50 * 1024 * 1024))")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders VALUES (3, 'after')")
        .execute(pool)
        .await
        .unwrap();
    let queue = PostgresDeadLetterQueue::new(pool.clone());
    while receiver.requests_to("/orders").len() < 2 || queue.count().await.unwrap() < 1 {
        assert!(
            started.elapsed() < DEADLINE * 2,
            "the row after the large one was not delivered: {}",
            std::fs::read_to_string(directory.path().join("node.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = peak_rss_kib(node.id());
    node.kill().unwrap();
    node.wait().unwrap();

    eprintln!("node peak RSS: {before} KiB before the 50 MB row, {after} KiB after");
    assert_eq!(delivered_ids(&receiver), ["1", "3"]);
    let letters = queue.list(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].letter.error_message.contains("--max-row-bytes"));
    assert_eq!(letters[0].letter.event.data["object_id"], "2");
    // The row never entered the node whole: its peak grew by far less than the row's size.
    assert!(
        after < before + 20 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    let stored: Value = sqlx::query_scalar(
        "SELECT to_jsonb(octet_length(event::text)) FROM fraiseql_observers.dead_letters",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        stored.as_i64().unwrap() < 200 * 1024,
        "the letter holds an excerpt: {stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_with_a_nul_byte_does_not_stall_the_partition() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    // A 400 whose body holds a NUL byte: PostgreSQL stores no NUL in text or jsonb, so the dead
    // letter quoting it used to fail, leaving the page unsettled and read again forever.
    receiver.script("/orders", [common::Reply::with_body(400, "bad\0request")]);
    let mut listener = listener(
        &database,
        observers(&receiver),
        ListenerSettings {
            node_id: "nul".into(),
            ..ListenerSettings::default()
        },
    )
    .await;
    write_change(pool, "n1", r#"{"id": "n1"}"#).await;
    write_change(pool, "n2", r#"{"id": "n2"}"#).await;

    let outcome = listener
        .deliver_page()
        .await
        .expect("the page settles: its dead letter is stored");
    assert_eq!(outcome.rows, 2);
    let letters = PostgresDeadLetterQueue::new(pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert!(
        letters[0]
            .letter
            .error_message
            .contains("bad\u{fffd}request"),
        "{}",
        letters[0].letter.error_message
    );
    assert_eq!(receiver.requests_to("/orders").len(), 2);
    assert_eq!(listener.deliver_page().await.unwrap().rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_with_a_nul_in_its_error_is_rescheduled_and_dead_lettered() {
    let database = TestDatabase::migrated().await;
    let jobs = PostgresJobQueue::new(database.pool.clone(), "node-a", Duration::from_secs(30));
    let job = NewJob {
        queue: "default".into(),
        priority: 0,
        run_at: None,
        max_attempts: 2,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        event: large_event(1),
        observer: "orders".into(),
        action_index: 0,
        action_type: "webhook".into(),
        parked_on: None,
        history: Vec::new(),
    };
    jobs.enqueue(&job).await.unwrap().unwrap();
    let receiver_said = fraiseql_observers::retry::AttemptError::new(
        ErrorCode::RemoteUnavailable,
        "HTTP 503: down\0for maintenance",
    );

    let claimed = jobs.claim("default", 1).await.unwrap();
    let outcome = jobs.fail(&claimed[0], &receiver_said).await;
    assert!(
        matches!(
            outcome,
            Ok(fraiseql_observers::jobs::FailOutcome::Rescheduled { .. })
        ),
        "{outcome:?}"
    );
    let started = Instant::now();
    let claimed = loop {
        let claimed = jobs.claim("default", 1).await.unwrap();
        if !claimed.is_empty() {
            break claimed;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the rescheduled job never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let outcome = jobs.fail(&claimed[0], &receiver_said).await;
    assert!(
        matches!(
            outcome,
            Ok(fraiseql_observers::jobs::FailOutcome::DeadLettered { .. })
        ),
        "{outcome:?}"
    );
    let letters = PostgresDeadLetterQueue::new(database.pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert!(
        letters[0]
            .letter
            .error_message
            .contains("down\u{fffd}for maintenance"),
        "{}",
        letters[0].letter.error_message
    );
}

/// `length` random lowercase letters (little for PostgreSQL to compress).
fn random_text(length: usize) -> String {
    (0..length)
        .map(|_| char::from(b'a' + rand_byte() % 26))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_ids_and_types_too_long_for_an_index_are_dead_lettered_alone() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    // An async action: its job's ordering key holds the entity id, and the key is indexed.
    let config = common::config_from_yaml(&format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}', mode: async}}]\n",
        receiver.url("/orders")
    ));
    let mut listener = listener_with(
        &database,
        config,
        ListenerSettings {
            node_id: "long-ids".into(),
            ..ListenerSettings::default()
        },
        true,
    )
    .await;
    let long_id = random_text(6000);
    write_change(pool, "short", r#"{"id": "short"}"#).await;
    let long_position = write_change(pool, &long_id, r#"{"id": "long"}"#).await;
    // A row that is malformed anyway (unknown kind) whose type alone is too long for the dead
    // letters' entity-type index.
    let long_type = random_text(9000);
    let malformed: i64 = sqlx::query_scalar(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
         VALUES ($1, 'x', 'UPSERT', '{}') RETURNING pk_entity_change_log",
    )
    .bind(&long_type)
    .fetch_one(pool)
    .await
    .unwrap();
    write_change(pool, "after", r#"{"id": "after"}"#).await;

    let outcome = listener
        .deliver_page()
        .await
        .expect("the page settles and its checkpoint (with jobs) is saved");
    assert_eq!((outcome.rows, outcome.malformed), (4, 2));
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM fraiseql_observers.jobs ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(keys.len(), 2, "the jobs of the two good rows: {keys:?}");
    let letters = PostgresDeadLetterQueue::new(pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for letter in &letters {
        let event = &letter.letter.event;
        assert!(
            event.entity_type.chars().count() <= 256,
            "{}",
            event.entity_type.len()
        );
        assert!(
            event.entity_id.chars().count() <= 256,
            "{}",
            event.entity_id.len()
        );
        if event.position == Some(long_position) {
            assert!(
                letter
                    .letter
                    .error_message
                    .contains("column object_id: 6000 characters, over the limit of 512"),
                "{}",
                letter.letter.error_message
            );
        } else {
            assert_eq!(event.position, Some(malformed));
            assert!(letter.letter.error_message.contains("column object_type"));
        }
    }
}
