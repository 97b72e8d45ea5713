//! The change-log listener end to end: real PostgreSQL (a fresh database per test), the capture
//! trigger, the batch reader, the checkpoint store, the dead-letter queue and a real HTTP
//! receiver. Nothing here sleeps to synchronize: tests either step the listener page by page with
//! `deliver_page()` or poll for a condition with a deadline.

#![allow(clippy::too_many_lines)]

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use common::{Receiver, Recorded, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::checkpoint::{CheckpointStore, PostgresCheckpointStore};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue, PostgresDeadLetterQueue};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::listener::{
    DECODE_OBSERVER, DEFAULT_MAX_PAGE_BYTES, DEFAULT_MAX_ROW_BYTES, Listener, ListenerError,
    ListenerSettings, NodeReader, PageOutcome, PartitionWakes, ReaderSettings, RowBudget,
};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::node::Node;
use fraiseql_observers::observers::{ObserversConfig, load_str};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

// -------------------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------------------

fn load_config(yaml: &str) -> ObserversConfig {
    load_str(
        yaml,
        Format::Yaml,
        "test.yaml",
        &LoadOptions {
            env: &|_: &str| None,
            missing_env: MissingEnv::Error,
        },
    )
    .unwrap_or_else(|errors| panic!("{errors}"))
}

fn settings(batch_size: u32, node_id: &str) -> ListenerSettings {
    ListenerSettings {
        partition: 0,
        partition_count: None,
        batch_size,
        poll_interval: Duration::from_millis(50),
        node_id: node_id.to_owned(),
        ..ListenerSettings::default()
    }
}

/// One partition (every row), ticking fast.
fn one_partition() -> ClusterSettings {
    ClusterSettings {
        partitions: 1,
        tick: Duration::from_millis(100),
        ..ClusterSettings::default()
    }
}

fn executor_for(pool: &PgPool, config: ObserversConfig) -> Executor {
    Executor::new(
        Arc::new(Matcher::new(config.observers)),
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(pool.clone())),
        &config.executor,
    )
}

async fn start_listener(pool: &PgPool, yaml: &str, settings: ListenerSettings) -> Listener {
    Listener::start(
        pool.clone(),
        Arc::new(PostgresCheckpointStore::new(pool.clone())),
        executor_for(pool, load_config(yaml)),
        settings,
    )
    .await
    .unwrap()
}

/// Polls `condition` until it holds; fails the test after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A migrated database with `public.orders` tracked as `Order`.
async fn orders_database() -> TestDatabase {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, total numeric);
         SELECT core.observer_track_table('public.orders'::regclass, 'Order');",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    database
}

async fn insert_order(executor: impl sqlx::PgExecutor<'_>, id: i32, total: i32) {
    sqlx::query("INSERT INTO public.orders (id, status, total) VALUES ($1, 'new', $2)")
        .bind(id)
        .bind(total)
        .execute(executor)
        .await
        .unwrap();
}

/// One observer on `Order` inserts posting to `url`.
fn insert_observer_yaml(url: &str) -> String {
    format!(
        r"
observers:
  - name: order-created
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{url}'}}]
"
    )
}

/// The change log as `(pk, id, object_id, modification_type)`, in pk order.
async fn change_log(pool: &PgPool) -> Vec<(i64, Uuid, String, String)> {
    sqlx::query_as(
        "SELECT pk_entity_change_log, id, object_id, modification_type
           FROM core.tb_entity_change_log ORDER BY pk_entity_change_log",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The row of the change log for one entity and kind.
async fn change_of(pool: &PgPool, object_id: &str, kind: &str) -> (i64, Uuid) {
    change_log(pool)
        .await
        .into_iter()
        .find(|(_, _, id, modification)| id == object_id && modification == kind)
        .map_or_else(
            || panic!("no {kind} of {object_id} in the change log"),
            |(pk, id, _, _)| (pk, id),
        )
}

/// The completed-actions ledger as idempotency keys (`<event>:<observer>:<index>`).
async fn ledger(pool: &PgPool) -> HashSet<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT event_id::text || ':' || observer || ':' || action_index
           FROM fraiseql_observers.processed_actions",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn entity_id(request: &Recorded) -> String {
    request.json()["entity_id"]
        .as_str()
        .expect("entity_id is a string")
        .to_owned()
}

fn idempotency_key(request: &Recorded) -> String {
    request
        .header("idempotency-key")
        .expect("Idempotency-Key header")
        .to_owned()
}

/// How many requests each entity got.
fn per_entity(requests: &[Recorded]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in requests {
        *counts.entry(entity_id(request)).or_insert(0) += 1;
    }
    counts
}

// -------------------------------------------------------------------------------------------------
// 1. End to end through a Node
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_delivers_inserts_updates_and_deletes_end_to_end() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: order-created
    entity: Order
    events: [insert]
    condition: 'data.total > 100'
    actions: [{{type: webhook, url: '{}'}}]
  - name: order-updated
    entity: Order
    events: [update]
    actions: [{{type: webhook, url: '{}'}}]
  - name: order-deleted
    entity: Order
    events: [delete]
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/created"),
        receiver.url("/updated"),
        receiver.url("/deleted")
    );
    let node = Node::build(
        pool.clone(),
        load_config(&yaml),
        settings(100, "node-e2e"),
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));

    // Order 2 is below the condition's threshold; it commits before any change of order 1, so
    // it has been through the matcher by the time order 1's delete is delivered.
    insert_order(pool, 2, 50).await;
    insert_order(pool, 1, 250).await;
    sqlx::query("UPDATE public.orders SET status = 'paid' WHERE id = 1")
        .execute(pool)
        .await
        .unwrap();
    // An update that changes nothing writes no change-log row and so sends nothing.
    sqlx::query("UPDATE public.orders SET status = 'paid' WHERE id = 1")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM public.orders WHERE id = 1")
        .execute(pool)
        .await
        .unwrap();

    let receiver_ref = &receiver;
    eventually("the delete to reach the receiver", move || async move {
        !receiver_ref.requests_to("/deleted").is_empty()
    })
    .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("the node stops after its token is cancelled")
        .expect("the node task does not panic");
    assert!(stopped.is_ok(), "the node stops cleanly: {stopped:?}");

    let requests = receiver.requests();
    let paths: Vec<&str> = requests
        .iter()
        .map(|request| request.path.as_str())
        .collect();
    assert_eq!(
        paths,
        ["/created", "/updated", "/deleted"],
        "order 2 (total 50) is filtered out by the condition; order 1's changes come in order"
    );
    assert_eq!(
        change_log(pool).await.len(),
        4,
        "2 inserts, 1 update, 1 delete"
    );

    let expectations = [
        (
            "/created",
            "INSERT",
            "order-created",
            json!({"id": 1, "status": "new", "total": 250}),
            Value::Null,
            None,
        ),
        (
            "/updated",
            "UPDATE",
            "order-updated",
            json!({"id": 1, "status": "paid", "total": 250}),
            json!({"id": 1, "status": "new", "total": 250}),
            Some(json!({"status": {"old": "new", "new": "paid"}})),
        ),
        (
            "/deleted",
            "DELETE",
            "order-deleted",
            Value::Null,
            json!({"id": 1, "status": "paid", "total": 250}),
            None,
        ),
    ];
    for (path, kind, observer, data, before, changes) in expectations {
        let request = &receiver.requests_to(path)[0];
        let body = request.json();
        let (_, event_id) = change_of(pool, "1", kind).await;
        assert_eq!(body["event_type"], kind, "{path}: {body}");
        assert_eq!(body["entity_type"], "Order", "{path}: {body}");
        assert_eq!(body["entity_id"], "1", "{path}: {body}");
        assert_eq!(body["observer"], observer, "{path}: {body}");
        assert_eq!(body["data"], data, "{path}: {body}");
        assert_eq!(body["before"], before, "{path}: {body}");
        if let Some(changes) = changes {
            assert_eq!(body["changes"], changes, "{path}: {body}");
        }
        assert_eq!(
            body["id"],
            event_id.to_string(),
            "{path}: the event id is the change-log row's id"
        );
        assert_eq!(
            request.header("x-fraiseql-event-id"),
            Some(event_id.to_string().as_str()),
            "{path}"
        );
        assert_eq!(
            idempotency_key(request),
            format!("{event_id}:{observer}:0"),
            "{path}"
        );
    }
    let deleted = receiver.requests_to("/deleted")[0].json();
    assert_eq!(
        deleted["changes"]["status"],
        json!({"old": "paid", "new": null}),
        "a delete's changes list every old field: {deleted}"
    );

    let partition: i32 =
        sqlx::query_scalar("SELECT (core.observer_entity_hash('Order', '1') % 8)::int")
            .fetch_one(pool)
            .await
            .unwrap();
    let checkpoint = PostgresCheckpointStore::new(pool.clone())
        .load(partition)
        .await
        .unwrap()
        .expect("the node claimed order 1's partition");
    assert!(checkpoint.position.snapshot.is_some(), "{checkpoint:?}");
    assert_eq!(checkpoint.position.batch_upto, None, "{checkpoint:?}");
    // The checkpoint covers the delivered pages, so their saves wrote no ledger rows; only the
    // early writer may have stored a key of a page that took longer than its interval.
    let delivered: HashSet<String> = receiver.requests().iter().map(idempotency_key).collect();
    assert!(
        ledger(pool).await.is_subset(&delivered),
        "the ledger holds no key of an action that was not delivered"
    );
}

// -------------------------------------------------------------------------------------------------
// 2. Late commit
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_delivered_in_the_batch_after_its_commit() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let mut listener = start_listener(
        pool,
        &insert_observer_yaml(&receiver.url("/orders")),
        settings(100, "late"),
    )
    .await;
    assert_eq!(listener.checkpoint().position.snapshot, None);

    // Round 0 starts from an empty checkpoint (first start), round 1 from a saved snapshot.
    for round in 0..2 {
        let early = 10 * round + 1;
        let late = 10 * round + 2;
        let mut transaction_a = pool.begin().await.unwrap();
        insert_order(&mut *transaction_a, early, 1).await;
        insert_order(pool, late, 1).await;

        let first = listener.deliver_page().await.unwrap();
        assert_eq!(first.rows, 1, "round {round}: only B is committed");
        assert_eq!(first.summaries.len(), 1);
        let requests = receiver.requests();
        assert_eq!(
            requests.iter().map(entity_id).collect::<Vec<_>>().last(),
            Some(&late.to_string()),
            "round {round}: B arrived"
        );
        assert!(
            !requests
                .iter()
                .any(|request| entity_id(request) == early.to_string()),
            "round {round}: A is not committed yet"
        );

        transaction_a.commit().await.unwrap();
        let second = listener.deliver_page().await.unwrap();
        assert_eq!(second.rows, 1, "round {round}: A arrives after its commit");
        assert_eq!(
            receiver.requests().last().map(entity_id),
            Some(early.to_string())
        );
        let idle = listener.deliver_page().await.unwrap();
        assert_eq!(idle.rows, 0, "round {round}: nothing left");

        let (pk_a, id_a) = change_of(pool, &early.to_string(), "INSERT").await;
        let (pk_b, _) = change_of(pool, &late.to_string(), "INSERT").await;
        assert!(
            pk_a < pk_b,
            "round {round}: A's pk {pk_a} is below B's {pk_b}"
        );
        assert_eq!(second.summaries[0].event_id, id_a);
    }

    let counts = per_entity(&receiver.requests());
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(
        counts.values().all(|&count| count == 1),
        "each exactly once: {counts:?}"
    );
}

// -------------------------------------------------------------------------------------------------
// 3. A long transaction elsewhere holds nothing back
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_does_not_hold_back_committed_changes() {
    let database = orders_database().await;
    let pool = &database.pool;
    sqlx::query("CREATE TABLE public.other (id int)")
        .execute(pool)
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    let mut listener = start_listener(
        pool,
        &insert_observer_yaml(&receiver.url("/orders")),
        settings(100, "long"),
    )
    .await;

    let mut long = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO public.other VALUES (1)")
        .execute(&mut *long)
        .await
        .unwrap();
    let long_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *long)
        .await
        .unwrap();

    // Several batches while the long transaction stays open: the first from an empty checkpoint,
    // the others from snapshots that list the long transaction as running.
    for id in 1..=3 {
        insert_order(pool, id, 1).await;
        let outcome = listener.deliver_page().await.unwrap();
        assert_eq!(
            outcome.rows, 1,
            "order {id} is delivered while the long transaction is open"
        );
        assert_eq!(
            receiver.requests().last().map(entity_id),
            Some(id.to_string())
        );
        let snapshot = listener
            .checkpoint()
            .position
            .snapshot
            .clone()
            .expect("a snapshot was saved");
        let long_visible: bool =
            sqlx::query_scalar("SELECT pg_visible_in_snapshot($1::text::xid8, $2::pg_snapshot)")
                .bind(&long_xid)
                .bind(&snapshot)
                .fetch_one(pool)
                .await
                .unwrap();
        assert!(
            !long_visible,
            "the saved snapshot {snapshot} still has the long transaction {long_xid} running"
        );
    }

    // The long transaction finally writes a tracked row too, and commits: delivered next.
    insert_order(&mut *long, 100, 1).await;
    long.commit().await.unwrap();
    let outcome = listener.deliver_page().await.unwrap();
    assert_eq!(outcome.rows, 1);
    assert_eq!(
        receiver.requests().last().map(entity_id),
        Some("100".to_owned())
    );
    let (pk_long, _) = change_of(pool, "100", "INSERT").await;
    let (pk_three, _) = change_of(pool, "3", "INSERT").await;
    assert!(pk_long > pk_three);
    assert_eq!(listener.deliver_page().await.unwrap().rows, 0);
    let counts = per_entity(&receiver.requests());
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
}

// -------------------------------------------------------------------------------------------------
// 4. Restart in the middle of a batch
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_batch_repeats_only_the_unfinished_action() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    // The first request for order 6 hangs (it will be in flight when the node is killed); the
    // next one is answered at once.
    receiver.script(
        "/slow",
        [Reply {
            delay: Duration::from_secs(20),
            ..Reply::status(200)
        }],
    );
    let yaml = format!(
        r"
observers:
  - name: fast
    entity: Order
    events: [insert]
    condition: 'entity_id != ''6'''
    actions: [{{type: webhook, url: '{}'}}]
  - name: slow
    entity: Order
    events: [insert]
    condition: 'entity_id == ''6'''
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/fast"),
        receiver.url("/slow")
    );
    // Twelve orders in one transaction: one batch, three pages of four; order 6 is on page 2.
    sqlx::query("INSERT INTO public.orders SELECT i, 'new', i FROM generate_series(1, 12) AS i")
        .execute(pool)
        .await
        .unwrap();
    let store = PostgresCheckpointStore::new(pool.clone());

    let first = Node::build(
        pool.clone(),
        load_config(&yaml),
        settings(4, "node-1"),
        one_partition(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(first.run_until_stopped(shutdown.clone()));

    // Page 1 done (saved: its checkpoint covers it), page 2's fast actions (orders 5, 7, 8)
    // answered and recorded by the early writer, order 6 in flight.
    let receiver_ref = &receiver;
    eventually(
        "page 2 to be in flight with its fast actions done",
        move || async move {
            let answered: Vec<Recorded> = receiver_ref
                .requests_to("/fast")
                .into_iter()
                .filter(|request| request.answered.is_some())
                .collect();
            let page_two: HashSet<String> = answered
                .iter()
                .filter(|request| ["5", "7", "8"].contains(&entity_id(request).as_str()))
                .map(idempotency_key)
                .collect();
            answered.len() == 7
                && page_two.len() == 3
                && !receiver_ref.requests_to("/slow").is_empty()
                && ledger(pool).await.is_superset(&page_two)
        },
    )
    .await;
    let killed_at = Instant::now();
    running.abort();
    let aborted = running.await;
    assert!(
        aborted
            .as_ref()
            .is_err_and(tokio::task::JoinError::is_cancelled),
        "the first node was still busy with order 6: {aborted:?}"
    );
    let answered_before_kill: HashSet<String> = receiver
        .requests()
        .iter()
        .filter(|request| {
            request
                .answered
                .is_some_and(|answered| answered < killed_at)
        })
        .map(idempotency_key)
        .collect();
    let requests_before_kill = receiver.requests().len();

    let (pk_four, _) = change_of(pool, "4", "INSERT").await;
    let interrupted = store.load(0).await.unwrap().unwrap();
    assert!(
        interrupted.position.batch_upto.is_some(),
        "killed inside a batch: {interrupted:?}"
    );
    assert_eq!(
        interrupted.position.batch_position,
        Some(pk_four),
        "page 1 was checkpointed, page 2 was not: {interrupted:?}"
    );

    let first_epoch = interrupted.epoch;
    let second = Node::build(
        pool.clone(),
        load_config(&yaml),
        settings(4, "node-2"),
        one_partition(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(second.run_until_stopped(shutdown.clone()));
    let store_ref = &store;
    eventually("the new node to claim the partition", move || async move {
        store_ref.load(0).await.unwrap().unwrap().epoch > first_epoch
    })
    .await;
    eventually(
        "every order to be answered and the batch finished",
        move || async move {
            let answered: HashSet<String> = receiver_ref
                .requests()
                .iter()
                .filter(|request| request.answered.is_some())
                .map(entity_id)
                .collect();
            let checkpoint = store_ref.load(0).await.unwrap().unwrap();
            answered.len() == 12 && checkpoint.position.batch_upto.is_none()
        },
    )
    .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("the second node stops")
        .expect("no panic");
    assert!(stopped.is_ok(), "{stopped:?}");

    let requests = receiver.requests();
    let mut sent: HashMap<String, usize> = HashMap::new();
    for request in &requests {
        *sent.entry(idempotency_key(request)).or_insert(0) += 1;
    }
    let repeated_after_answer: Vec<&String> = answered_before_kill
        .iter()
        .filter(|key| sent[*key] > 1)
        .collect();
    let repeated: Vec<(&String, &usize)> = sent.iter().filter(|(_, count)| **count > 1).collect();
    println!(
        "restart mid-batch: {} requests before the kill ({} answered 2xx), {} in all, {} distinct \
         actions, repeated: {repeated:?}",
        requests_before_kill,
        answered_before_kill.len(),
        requests.len(),
        sent.len()
    );
    assert_eq!(sent.len(), 12, "every order's action was sent: {sent:?}");
    assert!(
        repeated_after_answer.is_empty(),
        "actions answered 2xx before the kill were sent again: {repeated_after_answer:?}"
    );
    let (_, slow_event) = change_of(pool, "6", "INSERT").await;
    let slow_key = format!("{slow_event}:slow:0");
    assert_eq!(
        repeated,
        [(&slow_key, &2)],
        "only the action in flight at the kill is repeated"
    );
    assert_eq!(requests.len(), 13);
}

// -------------------------------------------------------------------------------------------------
// 5. A thousand updates to one entity, in order, across pages
// -------------------------------------------------------------------------------------------------

const UPDATES: i32 = 1000;

async fn counter_setup() -> (TestDatabase, Receiver, Listener) {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE public.counters (id int PRIMARY KEY, version int NOT NULL);
         SELECT core.observer_track_table('public.counters'::regclass, 'Counter');
         INSERT INTO public.counters VALUES (1, 0);",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: counter-updated
    entity: Counter
    events: [update]
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/counter")
    );
    let mut listener = start_listener(&database.pool, &yaml, settings(64, "counter")).await;
    // The insert is read (and observed by nobody) before the updates start.
    assert_eq!(listener.deliver_page().await.unwrap().rows, 1);
    assert!(receiver.requests().is_empty());
    (database, receiver, listener)
}

fn assert_versions_in_order(receiver: &Receiver) {
    let requests = receiver.requests_to("/counter");
    let versions: Vec<i64> = requests
        .iter()
        .map(|request| request.json()["data"]["version"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=i64::from(UPDATES)).collect();
    if versions != expected {
        let first_wrong = versions
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want);
        panic!(
            "{} updates arrived, first out of order at {first_wrong:?}",
            versions.len()
        );
    }
    for request in &requests {
        let body = request.json();
        let version = body["data"]["version"].as_i64().unwrap();
        assert_eq!(
            body["before"]["version"].as_i64(),
            Some(version - 1),
            "{body}"
        );
    }
    let keys: HashSet<String> = requests.iter().map(idempotency_key).collect();
    assert_eq!(
        keys.len(),
        requests.len(),
        "every update is a distinct event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_updates_in_one_transaction_arrive_in_order_across_pages() {
    let (database, receiver, mut listener) = counter_setup().await;
    let pool = &database.pool;
    let mut transaction = pool.begin().await.unwrap();
    for version in 1..=UPDATES {
        sqlx::query("UPDATE public.counters SET version = $1 WHERE id = 1")
            .bind(version)
            .execute(&mut *transaction)
            .await
            .unwrap();
    }
    transaction.commit().await.unwrap();

    let started = Instant::now();
    let mut pages = Vec::new();
    loop {
        let outcome = listener.deliver_page().await.unwrap();
        if outcome.rows == 0 && !outcome.more {
            break;
        }
        pages.push((outcome.rows, outcome.more));
        assert!(pages.len() < 100, "runaway paging: {pages:?}");
    }
    println!(
        "1000 updates in one transaction: {} pages in {:?}",
        pages.len(),
        started.elapsed()
    );
    let mut expected = vec![(64, true); 15];
    expected.push((40, false));
    assert_eq!(
        pages, expected,
        "one batch of 1000 rows walked in pages of 64"
    );
    assert_versions_in_order(&receiver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_autocommit_updates_arrive_in_order_while_the_listener_runs() {
    let (database, receiver, mut listener) = counter_setup().await;
    let writer_pool = database.pool.clone();
    let writer = tokio::spawn(async move {
        for version in 1..=UPDATES {
            sqlx::query("UPDATE public.counters SET version = $1 WHERE id = 1")
                .bind(version)
                .execute(&writer_pool)
                .await
                .unwrap();
        }
    });

    let started = Instant::now();
    let mut delivered = 0;
    let mut pages = 0;
    let mut full_pages = 0;
    while delivered < 1000 {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "only {delivered} updates delivered"
        );
        let outcome = listener.deliver_page().await.unwrap();
        delivered += outcome.rows;
        if outcome.rows > 0 {
            pages += 1;
        }
        if outcome.more {
            full_pages += 1;
        }
        if outcome.rows == 0 {
            // Polling for the writer's next commits.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    writer.await.unwrap();
    assert_eq!(delivered, 1000);
    assert_eq!(listener.deliver_page().await.unwrap().rows, 0);
    println!(
        "1000 autocommit updates: {pages} non-empty pages ({full_pages} full) in {:?}",
        started.elapsed()
    );
    assert!(pages > 1);
    assert_versions_in_order(&receiver);
}

// -------------------------------------------------------------------------------------------------
// 6. Malformed change-log rows go to the dead-letter queue
// -------------------------------------------------------------------------------------------------

/// A change-log row written by hand: `(object_id, modification_type, object_data,
/// object_data_before, the column that makes it malformed)`.
type RawRow = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_dead_lettered_and_the_rest_flows() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: orders
    entity: Order
    events: [insert, update]
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/orders")
    );
    let mut listener = start_listener(pool, &yaml, settings(100, "malformed")).await;

    // object_id is NOT NULL in the change log, so an empty one stands for "no id".
    let rows: [RawRow; 9] = [
        ("g1", "INSERT", Some(r#"{"id": "g1"}"#), None, None),
        (
            "b1",
            "UPSERT",
            Some(r#"{"id": "b1"}"#),
            None,
            Some("modification_type"),
        ),
        ("g2", "INSERT", Some(r#"{"id": "g2"}"#), None, None),
        ("b2", "INSERT", Some("[1, 2]"), None, Some("object_data")),
        (
            "g3",
            "UPDATE",
            Some(r#"{"id": "g3", "v": 2}"#),
            Some(r#"{"id": "g3", "v": 1}"#),
            None,
        ),
        (
            "",
            "INSERT",
            Some(r#"{"id": null}"#),
            None,
            Some("object_id"),
        ),
        ("g4", "insert", Some(r#"{"id": "g4"}"#), None, None),
        (
            "b4",
            "UPDATE",
            Some(r#"{"id": "b4"}"#),
            Some(r#""text""#),
            Some("object_data_before"),
        ),
        ("g5", "INSERT", Some(r#"{"id": "g5"}"#), None, None),
    ];
    let mut transaction = pool.begin().await.unwrap();
    let mut bad_rows: HashMap<i64, (&str, &str)> = HashMap::new();
    for (object_id, kind, after, before, culprit) in rows {
        let pk: i64 = sqlx::query_scalar(
            "INSERT INTO core.tb_entity_change_log
                    (object_type, object_id, modification_type, object_data, object_data_before)
             VALUES ('Order', $1, $2, $3::jsonb, $4::jsonb)
             RETURNING pk_entity_change_log",
        )
        .bind(object_id)
        .bind(kind)
        .bind(after)
        .bind(before)
        .fetch_one(&mut *transaction)
        .await
        .unwrap();
        if let Some(column) = culprit {
            bad_rows.insert(pk, (column, object_id));
        }
    }
    transaction.commit().await.unwrap();

    let outcome = listener.deliver_page().await.unwrap();
    assert_eq!(outcome.rows, 9);
    assert_eq!(outcome.malformed, 4);
    assert_eq!(outcome.summaries.len(), 5);
    assert!(!outcome.more);

    let mut delivered: Vec<String> = receiver.requests().iter().map(entity_id).collect();
    delivered.sort();
    assert_eq!(delivered, ["g1", "g2", "g3", "g4", "g5"]);
    let g3 = &receiver
        .requests()
        .into_iter()
        .find(|request| entity_id(request) == "g3")
        .unwrap()
        .json();
    assert_eq!(g3["changes"], json!({"v": {"old": 1, "new": 2}}), "{g3}");

    let letters = PostgresDeadLetterQueue::new(pool.clone())
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 4, "{letters:#?}");
    let mut seen = HashSet::new();
    for letter in &letters {
        let letter = &letter.letter;
        let position = letter
            .event
            .position
            .expect("the letter keeps the row's position");
        let (column, object_id) = bad_rows
            .get(&position)
            .unwrap_or_else(|| panic!("a dead letter for a good row {position}: {letter:?}"));
        seen.insert(position);
        assert_eq!(letter.observer, DECODE_OBSERVER);
        assert_eq!(letter.error_code, ErrorCode::MalformedEvent);
        assert_eq!(letter.error_code.as_str(), "OB009");
        assert_eq!(letter.action_type, "decode");
        assert!(
            letter.error_message.contains(&format!("column {column}:")),
            "the message names {column}: {}",
            letter.error_message
        );
        assert_eq!(
            letter.event.data["object_id"], *object_id,
            "the raw row is kept: {}",
            letter.event.data
        );
        assert_eq!(letter.event.data["pk_entity_change_log"], position);
    }
    assert_eq!(seen.len(), 4, "one letter per bad row");

    // Read once: a further page neither re-delivers nor re-dead-letters.
    assert_eq!(listener.deliver_page().await.unwrap().rows, 0);
    assert_eq!(
        PostgresDeadLetterQueue::new(pool.clone())
            .count()
            .await
            .unwrap(),
        4
    );
    assert_eq!(receiver.requests().len(), 5);
}

// -------------------------------------------------------------------------------------------------
// 7. Fencing
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_partition_was_claimed_is_fenced_out() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = insert_observer_yaml(&receiver.url("/orders"));
    let store = PostgresCheckpointStore::new(pool.clone());

    let mut first = start_listener(pool, &yaml, settings(100, "node-1")).await;
    assert_eq!(first.checkpoint().epoch, 1);
    insert_order(pool, 1, 1).await;
    assert_eq!(first.deliver_page().await.unwrap().rows, 1);

    let mut second = start_listener(pool, &yaml, settings(100, "node-2")).await;
    assert_eq!(second.checkpoint().epoch, 2);
    let claimed = store.load(0).await.unwrap().unwrap();
    assert_eq!(claimed.epoch, 2);

    insert_order(pool, 2, 1).await;
    let fenced = first.deliver_page().await;
    let Err(error @ ListenerError::FencedOut(_)) = &fenced else {
        panic!("the old holder must be fenced out, got {fenced:?}");
    };
    assert_eq!(error.code(), ErrorCode::FencedOut);
    assert_eq!(
        store.load(0).await.unwrap().unwrap(),
        claimed,
        "the fenced-out listener did not move the checkpoint"
    );
    assert_eq!(first.checkpoint().epoch, 1);
    let (_, event_two) = change_of(pool, "2", "INSERT").await;
    assert!(
        !ledger(pool)
            .await
            .iter()
            .any(|key| key.starts_with(&event_two.to_string())),
        "the fenced-out listener's completions are not recorded"
    );
    let sent_by_fenced = receiver
        .requests()
        .iter()
        .filter(|request| entity_id(request) == "2")
        .count();
    assert_eq!(
        sent_by_fenced, 0,
        "the old holder checks its epoch before a page and dispatches nothing more"
    );

    let delivered = second.deliver_page().await.unwrap();
    assert_eq!(delivered.rows, 1);
    assert_eq!(delivered.summaries[0].event_id, event_two);
    assert!(delivered.summaries[0].actions[0].succeeded());
    let moved = store.load(0).await.unwrap().unwrap();
    assert_eq!(moved.epoch, 2);
    assert_eq!(moved.version, claimed.version + 1);
    assert_ne!(moved.position, claimed.position);
    let leader: Option<String> =
        sqlx::query_scalar("SELECT leader FROM fraiseql_observers.partitions WHERE partition = 0")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(leader.as_deref(), Some("node-2"));
}

// -------------------------------------------------------------------------------------------------
// 8. Effectively-once on replay
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_page_does_not_repeat_completed_actions() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: order-created
    entity: Order
    events: [insert]
    actions:
      - {{type: webhook, url: '{}'}}
      - {{type: webhook, url: '{}'}}
",
        receiver.url("/a"),
        receiver.url("/b")
    );
    let mut first = start_listener(pool, &yaml, settings(100, "node-1")).await;
    insert_order(pool, 1, 1).await;
    let outcome = first.deliver_page().await.unwrap();
    assert_eq!(outcome.rows, 1);
    assert!(
        outcome.summaries[0]
            .actions
            .iter()
            .all(|report| matches!(report.status, ActionStatus::Succeeded { .. })),
        "{outcome:?}"
    );
    assert_eq!(receiver.requests().len(), 2);

    // A crash after the early writer stored the page's settled actions and before the save: the
    // keys in the ledger and the checkpoint back at the start. (A saved page needs no keys: its
    // checkpoint covers it.)
    let settled: Vec<_> = outcome.summaries[0].settled_keys().collect();
    assert_eq!(settled.len(), 2);
    PostgresCheckpointStore::new(pool.clone())
        .record_completed(&settled)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE fraiseql_observers.partitions
            SET snapshot = NULL, batch_upto = NULL, batch_position = NULL,
                checkpoint_version = checkpoint_version + 1
          WHERE partition = 0",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut second = start_listener(pool, &yaml, settings(100, "node-2")).await;
    assert_eq!(second.checkpoint().position.snapshot, None);

    let replay = second.deliver_page().await.unwrap();
    assert_eq!(replay.rows, 1, "the page is read again");
    assert_eq!(replay.summaries.len(), 1);
    assert_eq!(replay.summaries[0].event_id, outcome.summaries[0].event_id);
    let statuses: Vec<&ActionStatus> = replay.summaries[0]
        .actions
        .iter()
        .map(|report| &report.status)
        .collect();
    assert_eq!(
        statuses,
        [
            &ActionStatus::AlreadyCompleted,
            &ActionStatus::AlreadyCompleted
        ]
    );
    assert!(
        replay.summaries[0]
            .actions
            .iter()
            .all(|report| report.attempts == 0)
    );
    assert_eq!(receiver.requests().len(), 2, "no second request");
    assert!(
        second.checkpoint().position.snapshot.is_some(),
        "the replayed page was checkpointed"
    );
    assert_eq!(second.deliver_page().await.unwrap().rows, 0);
}

// -------------------------------------------------------------------------------------------------
// Extra: a late commit while a batch is being paged; partitions
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committing_while_a_batch_is_paged_lands_in_the_next_batch() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let mut listener = start_listener(
        pool,
        &insert_observer_yaml(&receiver.url("/orders")),
        settings(4, "paging"),
    )
    .await;
    insert_order(pool, 1000, 1).await;
    assert_eq!(listener.deliver_page().await.unwrap().rows, 1);

    // A writes the smallest pk and stays open; ten others commit.
    let mut transaction_a = pool.begin().await.unwrap();
    insert_order(&mut *transaction_a, 1, 1).await;
    for id in 2..=11 {
        insert_order(pool, id, 1).await;
    }
    let page = listener.deliver_page().await.unwrap();
    assert_eq!((page.rows, page.more), (4, true));
    // A commits in the middle of the batch: its pk is below the batch position.
    transaction_a.commit().await.unwrap();
    let mut rows = page.rows;
    loop {
        let page = listener.deliver_page().await.unwrap();
        rows += page.rows;
        if !page.more {
            break;
        }
    }
    assert_eq!(
        rows, 10,
        "the batch holds the ten that committed before it started"
    );
    assert!(
        !receiver
            .requests()
            .iter()
            .any(|request| entity_id(request) == "1"),
        "A was not committed when the batch was cut"
    );
    let next = listener.deliver_page().await.unwrap();
    assert_eq!(next.rows, 1, "A comes in the next batch");
    assert_eq!(
        receiver.requests().last().map(entity_id),
        Some("1".to_owned())
    );
    let counts = per_entity(&receiver.requests());
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_listeners_split_entities_by_hash() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = insert_observer_yaml(&receiver.url("/orders"));
    let partitioned = |partition| ListenerSettings {
        partition,
        partition_count: Some(2),
        ..settings(3, &format!("node-{partition}"))
    };
    let mut zero = start_listener(pool, &yaml, partitioned(0)).await;
    let mut one = start_listener(pool, &yaml, partitioned(1)).await;
    sqlx::query("INSERT INTO public.orders SELECT i, 'new', i FROM generate_series(1, 20) AS i")
        .execute(pool)
        .await
        .unwrap();

    let mut seen: [HashSet<String>; 2] = [HashSet::new(), HashSet::new()];
    for (index, listener) in [&mut zero, &mut one].into_iter().enumerate() {
        loop {
            let before = receiver.requests().len();
            let page = listener.deliver_page().await.unwrap();
            seen[index].extend(receiver.requests()[before..].iter().map(entity_id));
            if !page.more {
                break;
            }
        }
    }
    let expected: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i::text, core.observer_entity_hash('Order', i::text) % 2
           FROM generate_series(1, 20) AS i",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, partition) in expected {
        let partition = usize::try_from(partition).unwrap();
        assert!(
            seen[partition].contains(&id),
            "order {id} belongs to partition {partition}"
        );
        assert!(
            !seen[1 - partition].contains(&id),
            "order {id} delivered by both partitions"
        );
    }
    assert!(
        !seen[0].is_empty() && !seen[1].is_empty(),
        "twenty entities land in both partitions: {seen:?}"
    );
    assert_eq!(receiver.requests().len(), 20);
}

/// Delivers pages until one comes back empty; the rows it delivered.
async fn drain(mut listener: Listener) -> usize {
    let mut rows = 0;
    loop {
        let page = listener.deliver_page().await.unwrap();
        if page.rows == 0 {
            return rows;
        }
        rows += page.rows;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_sharing_a_row_budget_hold_no_more_rows_than_it_between_them() {
    let database = orders_database().await;
    let pool = &database.pool;
    // Every delivery takes 300 ms: the two partitions' pages overlap unless a budget keeps them
    // apart.
    let run = |budgets: [RowBudget; 2], ids: std::ops::Range<i32>| async move {
        let receiver = Receiver::start().await;
        let yaml = insert_observer_yaml(&receiver.url("/delay/300"));
        let [budget_zero, budget_one] = budgets;
        let partitioned = |partition, row_budget| ListenerSettings {
            partition,
            partition_count: Some(2),
            row_budget,
            ..settings(6, &format!("node-{partition}"))
        };
        let zero = start_listener(pool, &yaml, partitioned(0, budget_zero)).await;
        let one = start_listener(pool, &yaml, partitioned(1, budget_one)).await;
        sqlx::query(
            "INSERT INTO public.orders SELECT i, 'new', i FROM generate_series($1, $2) AS i",
        )
        .bind(ids.start)
        .bind(ids.end - 1)
        .execute(pool)
        .await
        .unwrap();
        let (rows_zero, rows_one) = tokio::join!(drain(zero), drain(one));
        assert!(rows_zero > 0 && rows_one > 0, "both partitions have rows");
        assert_eq!(rows_zero + rows_one, ids.len());
        assert_eq!(
            receiver.requests().len(),
            ids.len(),
            "each order delivered once"
        );
        receiver.max_in_flight()
    };

    let shared = RowBudget::new(6);
    let in_flight = run([shared.clone(), shared.clone()], 1..25).await;
    assert!(
        (1..=6).contains(&in_flight),
        "one budget of 6 rows: at most 6 deliveries at once, saw {in_flight}"
    );
    assert_eq!(shared.available(), 6, "every page gave its share back");

    // The same with a budget each: the pages overlap.
    let in_flight = run([RowBudget::new(6), RowBudget::new(6)], 25..49).await;
    assert!(
        in_flight > 6,
        "two budgets of 6 rows let both pages run at once, saw {in_flight}"
    );
}

// -------------------------------------------------------------------------------------------------
// The node's reader: partitions at one position read together
// -------------------------------------------------------------------------------------------------

/// Four partitioned listeners reading through one node reader (running until the returned token
/// is cancelled), sharing `budget`.
async fn reading_together(
    pool: &PgPool,
    yaml: &str,
    batch_size: u32,
    budget: &RowBudget,
) -> (NodeReader, Vec<Listener>, CancellationToken) {
    let (reader, task) = NodeReader::new(
        pool.clone(),
        ReaderSettings {
            partition_count: 4,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
            max_page_bytes: DEFAULT_MAX_PAGE_BYTES,
        },
    );
    let stop = CancellationToken::new();
    tokio::spawn(task.run(stop.clone()));
    let mut listeners = Vec::new();
    for partition in 0..4 {
        let settings = ListenerSettings {
            partition,
            partition_count: Some(4),
            row_budget: budget.clone(),
            ..settings(batch_size, "node-a")
        };
        listeners.push(
            start_listener(pool, yaml, settings)
                .await
                .with_reader(reader.clone()),
        );
    }
    (reader, listeners, stop)
}

/// One page of each listener, asked at the same moment.
async fn page_of_each(listeners: &mut [Listener]) -> Vec<PageOutcome> {
    futures::future::join_all(listeners.iter_mut().map(Listener::deliver_page))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Orders `ids` per partition of four (by the change log's entity hash).
async fn orders_per_partition(pool: &PgPool, ids: std::ops::RangeInclusive<i32>) -> Vec<usize> {
    let counts: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT core.observer_entity_hash('Order', i::text) % 4, count(*)
           FROM generate_series($1, $2) AS i GROUP BY 1",
    )
    .bind(ids.start())
    .bind(ids.end())
    .fetch_all(pool)
    .await
    .unwrap();
    let mut per_partition = vec![0; 4];
    for (partition, count) in counts {
        per_partition[usize::try_from(partition).unwrap()] = usize::try_from(count).unwrap();
    }
    per_partition
}

async fn insert_orders(pool: &PgPool, ids: std::ops::RangeInclusive<i32>) {
    sqlx::query("INSERT INTO public.orders SELECT i, 'new', i FROM generate_series($1, $2) AS i")
        .bind(ids.start())
        .bind(ids.end())
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_asking_at_one_position_are_read_in_one_statement_each_getting_its_own_rows() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = insert_observer_yaml(&receiver.url("/orders"));
    let budget = RowBudget::new(4000);
    let (reader, mut listeners, stop) = reading_together(pool, &yaml, 1000, &budget).await;

    insert_orders(pool, 1..=40).await;
    let pages = page_of_each(&mut listeners).await;
    let rows: Vec<usize> = pages.iter().map(|page| page.rows).collect();
    assert_eq!(rows, orders_per_partition(pool, 1..=40).await);
    assert_eq!(reader.counts(), (1, 4), "four pages from one statement");
    assert_eq!(receiver.requests().len(), 40);

    // Partition 0 reads on its own and moves past the others: two positions, two statements,
    // both ending at one snapshot — after which the four read together again.
    insert_orders(pool, 41..=48).await;
    let alone = listeners[0].deliver_page().await.unwrap();
    assert_eq!(alone.rows, orders_per_partition(pool, 41..=48).await[0]);
    assert_eq!(reader.counts(), (2, 5));
    insert_orders(pool, 49..=56).await;
    let pages = page_of_each(&mut listeners).await;
    let expected: Vec<usize> = {
        let (earlier, later) = (
            orders_per_partition(pool, 41..=56).await,
            orders_per_partition(pool, 49..=56).await,
        );
        vec![later[0], earlier[1], earlier[2], earlier[3]]
    };
    assert_eq!(
        pages.iter().map(|page| page.rows).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(reader.counts(), (4, 9), "one statement per position");
    insert_orders(pool, 57..=64).await;
    let pages = page_of_each(&mut listeners).await;
    assert_eq!(
        pages.iter().map(|page| page.rows).collect::<Vec<_>>(),
        orders_per_partition(pool, 57..=64).await
    );
    assert_eq!(
        reader.counts(),
        (5, 13),
        "together again after one batch end"
    );

    let counts = per_entity(&receiver.requests());
    assert_eq!(counts.len(), 64, "{counts:?}");
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    assert_eq!(budget.available(), 4000, "every share went back");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_read_together_page_through_a_large_batch_in_step_exactly_once() {
    let database = orders_database().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = insert_observer_yaml(&receiver.url("/orders"));
    // Three rows per partition: twelve per shared page, against sixty rows in one transaction.
    let budget = RowBudget::new(100);
    let (reader, mut listeners, stop) = reading_together(pool, &yaml, 3, &budget).await;
    insert_orders(pool, 1..=60).await;

    let mut delivered = vec![0; 4];
    let mut rounds = 0;
    loop {
        let pages = page_of_each(&mut listeners).await;
        rounds += 1;
        for (partition, page) in pages.iter().enumerate() {
            delivered[partition] += page.rows;
        }
        if pages.iter().all(|page| page.rows == 0 && !page.more) {
            break;
        }
        assert!(rounds < 50, "the batch never ended: {delivered:?}");
    }
    assert_eq!(delivered, orders_per_partition(pool, 1..=60).await);
    let (statements, pages) = reader.counts();
    assert_eq!(
        statements, rounds,
        "the four stay at one position through the batch: one statement per round"
    );
    assert_eq!(pages, 4 * rounds);
    assert!(rounds >= 5, "sixty rows need at least five pages of twelve");
    let counts = per_entity(&receiver.requests());
    assert_eq!(counts.len(), 60, "{counts:?}");
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    assert_eq!(budget.available(), 100, "every share went back");
    stop.cancel();
}

#[test]
fn a_notification_wakes_only_the_partitions_it_names() {
    let wakes = PartitionWakes::new(4);
    let mut receivers: Vec<_> = (0..4).map(|partition| wakes.receiver(partition)).collect();
    let mut woken = |payload: &str| -> Vec<bool> {
        wakes.wake(payload);
        receivers
            .iter_mut()
            .map(|receiver| {
                let changed = receiver.has_changed().unwrap();
                receiver.borrow_and_update();
                changed
            })
            .collect()
    };
    assert_eq!(woken("1,3"), [false, true, false, true]);
    assert_eq!(woken("2"), [false, false, true, false]);
    assert_eq!(woken(""), [true; 4], "an empty payload wakes everyone");
    assert_eq!(
        woken("1,9"),
        [true; 4],
        "a partition this node does not know: everyone"
    );
    assert_eq!(woken("x"), [true; 4], "an unreadable payload: everyone");
}

// -------------------------------------------------------------------------------------------------
// Known problem
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_page_does_not_dead_letter_an_undecodable_row_twice() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let yaml = insert_observer_yaml(&receiver.url("/orders"));
    let dead_letters = PostgresDeadLetterQueue::new(pool.clone());
    let mut first = start_listener(pool, &yaml, settings(100, "node-1")).await;
    sqlx::query(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
         VALUES ('Order', 'bad', 'UPSERT', '{}')",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(first.deliver_page().await.unwrap().malformed, 1);
    assert_eq!(dead_letters.count().await.unwrap(), 1);

    // The same replay as a crash before the checkpoint save would cause, after the row's dead
    // letter was noted as settled in the ledger (by the early writer, or by a page that did not
    // settle).
    let event_id: Uuid = sqlx::query_scalar("SELECT event_id FROM fraiseql_observers.dead_letters")
        .fetch_one(pool)
        .await
        .unwrap();
    PostgresCheckpointStore::new(pool.clone())
        .record_completed(&[fraiseql_observers::checkpoint::ActionKey::new(
            event_id,
            fraiseql_observers::listener::DECODE_OBSERVER,
            0,
        )])
        .await
        .unwrap();
    sqlx::query(
        "UPDATE fraiseql_observers.partitions
            SET snapshot = NULL, batch_upto = NULL, batch_position = NULL,
                checkpoint_version = checkpoint_version + 1
          WHERE partition = 0",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut second = start_listener(pool, &yaml, settings(100, "node-2")).await;
    let replay = second.deliver_page().await.unwrap();
    assert_eq!(replay.rows, 1);
    assert_eq!(
        dead_letters.count().await.unwrap(),
        1,
        "one bad row, one dead letter, however often its page is read"
    );
}
