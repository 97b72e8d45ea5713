//! The audit trail against a fresh PostgreSQL database per test and a real HTTP receiver: every
//! outcome kind of an action lands in the event's history row, written with the page's checkpoint
//! (exactly once per committed page: a page read again after a restart adds nothing, a fenced-out
//! leader writes nothing); searches by each filter, time range and full text return exactly the
//! expected events; retention drops whole day partitions, never rows.

#![allow(clippy::too_many_lines)]

mod common;

use std::sync::Arc;

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::checkpoint::{ActionKey, CheckpointStore, PostgresCheckpointStore};
use fraiseql_observers::coordinator::{self, DutyRun};
use fraiseql_observers::dlq::PostgresDeadLetterQueue;
use fraiseql_observers::executor::Executor;
use fraiseql_observers::history::{self, HistoryOutcome, HistoryQuery};
use fraiseql_observers::listener::{Listener, ListenerSettings};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::ObserversConfig;
use serde_json::Value;
use uuid::Uuid;

fn observers(receiver: &Receiver) -> ObserversConfig {
    common::config_from_yaml(&format!(
        "observers:
  - name: paid
    entity: Order
    events: [insert]
    condition: 'data.total > 100'
    actions: [{{type: webhook, url: '{paid}'}}]
  - name: flaky
    entity: Order
    events: [insert]
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 20ms, jitter: false}}
    actions: [{{type: webhook, url: '{flaky}'}}]
  - name: broken
    entity: Order
    events: [update]
    retry: {{max_attempts: 1}}
    actions: [{{type: webhook, url: '{broken}'}}]
",
        paid = receiver.url("/paid"),
        flaky = receiver.url("/flaky"),
        broken = receiver.url("/broken"),
    ))
}

async fn listener(database: &TestDatabase, config: ObserversConfig, node_id: &str) -> Listener {
    let executor = Executor::new(
        Arc::new(Matcher::new(config.observers)),
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(database.pool.clone())),
        &config.executor,
    );
    Listener::start(
        database.pool.clone(),
        Arc::new(PostgresCheckpointStore::with_group_commit(
            database.pool.clone(),
        )),
        executor,
        ListenerSettings {
            node_id: node_id.into(),
            ..ListenerSettings::default()
        },
    )
    .await
    .unwrap()
}

/// Writes a change-log row for `Order` `object_id`; returns its event id.
async fn write_change(pool: &sqlx::PgPool, object_id: &str, kind: &str, data: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
         VALUES ('Order', $1, $2, $3::jsonb) RETURNING id",
    )
    .bind(object_id)
    .bind(kind)
    .bind(data)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn search(pool: &sqlx::PgPool, query: HistoryQuery) -> Vec<Uuid> {
    history::search(
        pool,
        &HistoryQuery {
            limit: 100,
            ..query
        },
    )
    .await
    .unwrap()
    .entries
    .into_iter()
    .map(|entry| entry.event_id)
    .collect()
}

/// The action of `observer` in an event's history row.
fn action_of(actions: &Value, observer: &str) -> Value {
    actions
        .as_array()
        .unwrap()
        .iter()
        .find(|action| action["observer"] == observer)
        .unwrap_or_else(|| panic!("no action of {observer} in {actions}"))
        .clone()
}

async fn history_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.history")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_lands_in_history_once_and_every_filter_finds_exactly_its_events() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    // `flaky` answers 503 once, then 200: a transient failure, then success in place.
    receiver.script("/flaky", [Reply::status(503)]);
    receiver.script(
        "/broken",
        [Reply::with_body(400, "order rejected by ledger")],
    );
    let mut first = listener(&database, observers(&receiver), "history-node").await;

    let big = write_change(pool, "o1", "INSERT", r#"{"id": "o1", "total": 200}"#).await;
    let small = write_change(pool, "o2", "INSERT", r#"{"id": "o2", "total": 5}"#).await;
    let rejected = write_change(pool, "o1", "UPDATE", r#"{"id": "o1", "total": 201}"#).await;
    // Completed before (a replay): the ledger says so, the action is not run again.
    let replayed = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO core.tb_entity_change_log (id, object_type, object_id, modification_type, object_data)
         VALUES ($1, 'Order', 'o3', 'INSERT', '{\"id\": \"o3\", \"total\": 1}')",
    )
    .bind(replayed)
    .execute(pool)
    .await
    .unwrap();
    PostgresCheckpointStore::new(pool.clone())
        .record_completed(&[ActionKey::new(replayed, "flaky", 0)])
        .await
        .unwrap();

    let outcome = first.deliver_page().await.expect("the page is delivered");
    assert_eq!(outcome.rows, 4);
    assert_eq!(history_rows(pool).await, 4, "one row per event");

    let page = history::search(
        pool,
        &HistoryQuery {
            limit: 100,
            ..HistoryQuery::default()
        },
    )
    .await
    .unwrap();
    let row = |event_id: Uuid| {
        page.entries
            .iter()
            .find(|entry| entry.event_id == event_id)
            .unwrap_or_else(|| panic!("no history of {event_id}"))
            .clone()
    };

    let big_row = row(big);
    assert_eq!(big_row.record_kind, "event");
    assert_eq!(
        (big_row.entity_type.as_str(), big_row.entity_id.as_str()),
        ("Order", "o1")
    );
    assert_eq!(big_row.event_kind, "insert");
    assert!(big_row.change_log_id.is_some());
    assert_eq!(big_row.matched_observers, ["paid", "flaky"]);
    assert!(big_row.unmatched_observers.is_empty());
    assert_eq!(big_row.node_id.as_deref(), Some("history-node"));
    assert_eq!(big_row.partition, Some(0));
    assert_eq!(big_row.epoch, Some(first.checkpoint().epoch));
    assert!(big_row.processing_ms.is_some_and(|took| took > 0.0));
    let paid = action_of(&big_row.actions, "paid");
    assert_eq!(paid["outcome"], "succeeded");
    assert_eq!(paid["attempts"], 1);
    assert_eq!(paid["type"], "webhook");
    let small_row = row(small);
    assert_eq!(small_row.matched_observers, ["flaky"]);
    assert_eq!(
        small_row.unmatched_observers,
        ["paid"],
        "its condition was false"
    );

    let rejected_row = row(rejected);
    let broken = action_of(&rejected_row.actions, "broken");
    assert_eq!(broken["outcome"], "dead_lettered", "{broken}");
    assert_eq!(broken["error_code"], "OB008");
    assert!(broken["dead_letter_id"].is_string(), "{broken}");
    assert_eq!(rejected_row.outcomes, ["dead_lettered"]);

    let replayed_row = row(replayed);
    assert_eq!(
        action_of(&replayed_row.actions, "flaky")["outcome"],
        "already_completed"
    );

    // Every filter returns exactly its events (newest first).
    let by = |query: HistoryQuery| search(pool, query);
    assert_eq!(
        by(HistoryQuery {
            entity_type: Some("Order".into()),
            entity_id: Some("o1".into()),
            ..HistoryQuery::default()
        })
        .await,
        [rejected, big]
    );
    assert_eq!(
        by(HistoryQuery {
            event_kind: Some("update".into()),
            ..HistoryQuery::default()
        })
        .await,
        [rejected]
    );
    assert_eq!(
        by(HistoryQuery {
            observer: Some("paid".into()),
            ..HistoryQuery::default()
        })
        .await,
        [big]
    );
    assert_eq!(
        by(HistoryQuery {
            outcome: Some(HistoryOutcome::DeadLettered),
            ..HistoryQuery::default()
        })
        .await,
        [rejected]
    );
    assert_eq!(
        by(HistoryQuery {
            outcome: Some(HistoryOutcome::AlreadyCompleted),
            ..HistoryQuery::default()
        })
        .await,
        [replayed]
    );
    assert_eq!(
        by(HistoryQuery {
            event_id: Some(small),
            ..HistoryQuery::default()
        })
        .await,
        [small]
    );
    assert_eq!(
        by(HistoryQuery {
            text: Some("ledger".into()),
            ..HistoryQuery::default()
        })
        .await,
        [rejected],
        "full text in error messages"
    );
    assert!(
        by(HistoryQuery {
            text: Some("nowhere".into()),
            ..HistoryQuery::default()
        })
        .await
        .is_empty()
    );
    let now = chrono::Utc::now();
    assert_eq!(
        by(HistoryQuery {
            since: Some(now - chrono::Duration::hours(1)),
            until: Some(now + chrono::Duration::minutes(1)),
            ..HistoryQuery::default()
        })
        .await
        .len(),
        4
    );
    assert!(
        by(HistoryQuery {
            since: Some(now + chrono::Duration::minutes(1)),
            ..HistoryQuery::default()
        })
        .await
        .is_empty()
    );
    assert!(
        by(HistoryQuery {
            until: Some(now - chrono::Duration::hours(1)),
            ..HistoryQuery::default()
        })
        .await
        .is_empty()
    );

    // Paging: two at a time, newest first, every row once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = history::search(
            pool,
            &HistoryQuery {
                limit: 2,
                after,
                ..HistoryQuery::default()
            },
        )
        .await
        .unwrap();
        seen.extend(page.entries.iter().map(|entry| entry.event_id));
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(seen, [replayed, rejected, small, big]);

    // A restart reads from the checkpoint the page was committed with: nothing is doubled.
    drop(first);
    let mut restarted = listener(&database, observers(&receiver), "history-node-2").await;
    let outcome = restarted.deliver_page().await.unwrap();
    assert_eq!(outcome.rows, 0);
    assert_eq!(history_rows(pool).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_out_leader_writes_no_history_and_the_new_leader_writes_it_once() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let mut old_leader = listener(&database, observers(&receiver), "old").await;
    let mut new_leader = listener(&database, observers(&receiver), "new").await;
    let event = write_change(pool, "o9", "INSERT", r#"{"id": "o9", "total": 500}"#).await;

    assert!(old_leader.deliver_page().await.is_err(), "fenced out");
    assert_eq!(history_rows(pool).await, 0);
    new_leader.deliver_page().await.unwrap();
    let found = search(
        pool,
        HistoryQuery {
            event_id: Some(event),
            ..HistoryQuery::default()
        },
    )
    .await;
    assert_eq!(found, [event]);
    assert_eq!(history_rows(pool).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_day_partitions_and_is_fenced_by_the_coordinator_epoch() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    // A day 40 days ago with one row in it, and today's row.
    let old_day = (chrono::Utc::now() - chrono::Duration::days(40)).date_naive();
    let old_partition = format!("history_p{}", old_day.format("%Y%m%d"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE fraiseql_observers.{old_partition} PARTITION OF fraiseql_observers.history
             FOR VALUES FROM ('{old_day} 00:00:00+00') TO ('{next} 00:00:00+00');
         INSERT INTO fraiseql_observers.history (processed_at, record_kind, event_id, entity_type, entity_id, event_kind)
         VALUES ('{old_day} 12:00:00+00', 'event', gen_random_uuid(), 'Order', 'old', 'insert'),
                (now(), 'event', gen_random_uuid(), 'Order', 'new', 'insert');",
        next = old_day + chrono::Duration::days(1),
    )))
    .execute(pool)
    .await
    .unwrap();
    assert!(
        history::day_partitions(pool)
            .await
            .unwrap()
            .contains(&old_partition)
    );

    // An old coordinator epoch does nothing.
    let (run, _) = coordinator::maintain_history(pool, -1, history::DEFAULT_HISTORY_RETENTION)
        .await
        .unwrap();
    assert_eq!(run, DutyRun::Fenced);
    assert!(
        history::day_partitions(pool)
            .await
            .unwrap()
            .contains(&old_partition)
    );

    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM fraiseql_observers.coordinator")
        .fetch_one(pool)
        .await
        .unwrap();
    let (run, maintenance) =
        coordinator::maintain_history(pool, epoch, history::DEFAULT_HISTORY_RETENTION)
            .await
            .unwrap();
    assert!(matches!(run, DutyRun::Done(_)));
    assert_eq!(maintenance.dropped, 1);
    let partitions = history::day_partitions(pool).await.unwrap();
    assert!(!partitions.contains(&old_partition), "{partitions:?}");
    let today = format!("history_p{}", chrono::Utc::now().format("%Y%m%d"));
    let ahead = format!(
        "history_p{}",
        (chrono::Utc::now() + chrono::Duration::days(7)).format("%Y%m%d")
    );
    assert!(
        partitions.contains(&today) && partitions.contains(&ahead),
        "{partitions:?}"
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT entity_id FROM fraiseql_observers.history")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(left, ["new"], "the partition went, not today's rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_off_in_the_file_or_the_settings_records_nothing() {
    let config = common::config_from_yaml(
        "history: off\nobservers:\n  - name: o\n    entity: Order\n    events: [insert]\n    actions: [{type: log}]\n",
    );
    assert!(!config.history);
    assert!(common::config_from_yaml("history: on\nobservers: []\n").history);
    let errors = common::config_errors_from_yaml("history: maybe\nobservers: []\n", &[]);
    assert!(
        errors
            .iter()
            .any(|error| error.contains("history") && error.contains("on, off, or a mapping")),
        "{errors:?}"
    );

    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let executor = Executor::new(
        Arc::new(Matcher::new(config.observers)),
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(pool.clone())),
        &config.executor,
    );
    let mut listener = Listener::start(
        pool.clone(),
        Arc::new(PostgresCheckpointStore::new(pool.clone())),
        executor,
        ListenerSettings {
            record_history: false,
            ..ListenerSettings::default()
        },
    )
    .await
    .unwrap();
    write_change(pool, "o1", "INSERT", r#"{"id": "o1"}"#).await;
    assert_eq!(listener.deliver_page().await.unwrap().rows, 1);
    assert_eq!(history_rows(pool).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_search_on_the_command_line_filters_pages_and_refuses_bad_flags() {
    let database = TestDatabase::migrated().await;
    sqlx::raw_sql(
        "INSERT INTO fraiseql_observers.history (record_kind, event_id, entity_type, entity_id, event_kind, outcomes, errors, actions)
         VALUES ('event', '00000000-0000-0000-0000-000000000001', 'Order', 'a', 'insert', '{succeeded}', NULL,
                 '[{\"observer\": \"paid\", \"action_index\": 0, \"outcome\": \"succeeded\", \"attempts\": 1}]'),
                ('event', '00000000-0000-0000-0000-000000000002', 'Order', 'b', 'update', '{dead_lettered}', 'gateway refused card',
                 '[{\"observer\": \"paid\", \"action_index\": 0, \"outcome\": \"dead_lettered\", \"attempts\": 3}]'),
                ('event', '00000000-0000-0000-0000-000000000003', 'User', 'c', 'insert', '{succeeded}', NULL, '[]');",
    )
    .execute(&database.pool)
    .await
    .unwrap();

    let (status, out, err) =
        database.cli(&["events", "search", "--entity-type", "Order", "--limit", "1"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(
        out.contains("00000000-0000-0000-0000-000000000002"),
        "{out}"
    );
    assert!(out.contains("paid[0]=dead_letteredx3"), "{out}");
    let cursor = out
        .lines()
        .find_map(|line| line.strip_prefix("more: --after "))
        .unwrap_or_else(|| panic!("no next page in {out}"))
        .to_owned();
    let (_, out, _) = database.cli(&[
        "events",
        "search",
        "--entity-type",
        "Order",
        "--after",
        &cursor,
        "--json",
    ]);
    let page: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["00000000-0000-0000-0000-000000000001"]);
    assert!(page["next_cursor"].is_null());

    let (_, out, _) = database.cli(&[
        "events", "search", "--text", "card", "--since", "1h", "--json",
    ]);
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["entries"][0]["entity_id"], "b");

    let (status, _, err) = database.cli(&["events", "search", "--outcome", "ok"]);
    assert_ne!(status, Some(0));
    assert!(
        err.contains("unknown outcome \"ok\"") && err.contains("dead_lettered"),
        "{err}"
    );
    let (status, _, err) = database.cli(&["events", "search", "--since", "yesterday-ish"]);
    assert_ne!(status, Some(0));
    assert!(err.contains("RFC 3339"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_action_is_recorded_as_queued_and_its_job_appends_its_later_success() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    let config = common::config_from_yaml(&format!(
        "observers:\n  - name: later\n    entity: Order\n    events: [insert]\n    actions: [{{type: webhook, url: '{}', mode: async}}]\n",
        receiver.url("/later")
    ));
    let templates = Arc::new(config.templates);
    let executor = Executor::new(
        Arc::new(Matcher::new(config.observers.clone())),
        ActionRunner::new(templates.clone()).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(pool.clone())),
        &config.executor,
    )
    .with_job_routing();
    let mut listener = Listener::start(
        pool.clone(),
        Arc::new(PostgresCheckpointStore::new(pool.clone())),
        executor,
        ListenerSettings::default(),
    )
    .await
    .unwrap();
    let event = write_change(pool, "q1", "INSERT", r#"{"id": "q1"}"#).await;
    listener.deliver_page().await.unwrap();
    assert_eq!(receiver.request_count(), 0, "handed to the job queue");

    let worker = fraiseql_observers::worker::JobWorker::new(
        fraiseql_observers::jobs::PostgresJobQueue::new(
            pool.clone(),
            "worker-node",
            std::time::Duration::from_secs(30),
        ),
        "default",
        ActionRunner::new(templates).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        std::time::Duration::from_millis(100),
    )
    .with_history("worker-node");
    let stopping = tokio_util::sync::CancellationToken::new();
    worker.try_execute_one(&stopping).await.unwrap();
    assert_eq!(receiver.request_count(), 1);

    let page = history::search(
        pool,
        &HistoryQuery {
            event_id: Some(event),
            limit: 10,
            ..HistoryQuery::default()
        },
    )
    .await
    .unwrap();
    let kinds: Vec<&str> = page
        .entries
        .iter()
        .map(|entry| entry.record_kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["job", "event"],
        "the job's row is appended after the event's"
    );
    let queued = action_of(&page.entries[1].actions, "later");
    assert_eq!(queued["outcome"], "queued", "{queued}");
    let done = action_of(&page.entries[0].actions, "later");
    assert_eq!(done["outcome"], "succeeded", "{done}");
    assert!(done["job_id"].is_string(), "{done}");
    assert_eq!(page.entries[0].node_id.as_deref(), Some("worker-node"));
}

/// Masks of what differs between runs in `debug-event`'s tree.
fn debug_event_snapshot(name: &str, text: &str) {
    insta::with_settings!({
        filters => vec![
            (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "[uuid]"),
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", "[time]"),
            (r"\d+\.\d ms", "[ms]"),
            (r"Change-log row: \d+", "Change-log row: [position]"),
            (r"partition \d+, epoch \d+", "partition [p], epoch [e]"),
        ],
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, text);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_event_shows_each_event_as_a_tree_of_conditions_actions_and_later_outcomes() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let receiver = Receiver::start().await;
    receiver.script("/flaky", [Reply::status(503)]);
    receiver.script("/broken", [Reply::status(404)]);
    let yaml = format!(
        "observers:
  - name: paid
    entity: Order
    events: [insert]
    condition: 'data.total > 100'
    actions: [{{type: webhook, url: '{paid}'}}]
  - name: flaky
    entity: Order
    events: [insert]
    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 20ms, jitter: false}}
    actions: [{{type: webhook, url: '{flaky}'}}]
  - name: later
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{later}', mode: async}}]
  - name: broken
    entity: Order
    events: [update]
    retry: {{max_attempts: 1}}
    actions: [{{type: webhook, url: '{broken}'}}]
  - name: invoices
    entity: Invoice
    events: [insert]
    actions: [{{type: webhook, url: '{paid}'}}]
",
        paid = receiver.url("/paid"),
        flaky = receiver.url("/flaky"),
        later = receiver.url("/later"),
        broken = receiver.url("/broken"),
    );
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("observers.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let config = common::config_from_yaml(&yaml);
    let templates = Arc::new(config.templates);
    let executor = Executor::new(
        Arc::new(Matcher::new(config.observers.clone())),
        ActionRunner::new(templates.clone()).unwrap(),
        Arc::new(PostgresDeadLetterQueue::new(pool.clone())),
        &config.executor,
    )
    .with_job_routing();
    let mut listener = Listener::start(
        pool.clone(),
        Arc::new(PostgresCheckpointStore::new(pool.clone())),
        executor,
        ListenerSettings {
            node_id: "node-a".into(),
            ..ListenerSettings::default()
        },
    )
    .await
    .unwrap();
    let inserted = write_change(pool, "o1", "INSERT", r#"{"id": "o1", "total": 50}"#).await;
    listener.deliver_page().await.unwrap();
    let worker = fraiseql_observers::worker::JobWorker::new(
        fraiseql_observers::jobs::PostgresJobQueue::new(
            pool.clone(),
            "node-b",
            std::time::Duration::from_secs(30),
        ),
        "default",
        ActionRunner::new(templates).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        std::time::Duration::from_millis(100),
    )
    .with_history("node-b");
    worker
        .try_execute_one(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    write_change(pool, "o1", "UPDATE", r#"{"id": "o1", "total": 50}"#).await;
    listener.deliver_page().await.unwrap();
    let file = file.to_str().unwrap();

    let (status, every, stderr) = database.cli(&[
        "debug-event",
        "--entity-type",
        "Order",
        "--entity-id",
        "o1",
        "--all",
        "--config",
        file,
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    debug_event_snapshot("debug_event_all_with_config", &every);
    let (status, latest, _) =
        database.cli(&["debug-event", "--entity-type", "Order", "--entity-id", "o1"]);
    assert_eq!(status, Some(0));
    assert!(latest.starts_with("Event: Order UPDATE\n"), "{latest}");
    assert_eq!(latest.matches("Event: ").count(), 1, "the latest only");
    let (status, one, _) = database.cli(&["debug-event", "--event-id", &inserted.to_string()]);
    assert_eq!(status, Some(0));
    debug_event_snapshot("debug_event_one_without_config", &one);
    let (status, json, _) =
        database.cli(&["debug-event", "--event-id", &inserted.to_string(), "--json"]);
    assert_eq!(status, Some(0));
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json[0]["event"]["event_id"], inserted.to_string());
    assert_eq!(json[0]["jobs"].as_array().unwrap().len(), 1, "{json}");

    let (status, _, stderr) = database.cli(&[
        "debug-event",
        "--entity-type",
        "Order",
        "--entity-id",
        "nope",
    ]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("no history for Order nope"), "{stderr}");
    let (status, _, stderr) = database.cli(&["debug-event", "--entity-type", "Order"]);
    assert_eq!(status, Some(2), "{stderr}");
    let (status, _, stderr) = database.cli(&["debug-event"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("--entity-type and --entity-id, or --event-id"),
        "{stderr}"
    );
    let (status, _, stderr) = database.cli(&["debug-event", "--event-id", "garbage"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("expected an event's id, a UUID"),
        "{stderr}"
    );
}

/// History rows written straight into the table: `(history_id, errors)`, newest last.
async fn history_with_errors(pool: &sqlx::PgPool, rows: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO fraiseql_observers.history
             (history_id, record_kind, event_id, entity_type, entity_id, event_kind,
              matched_observers, outcomes, errors)
         SELECT id, 'event', gen_random_uuid(), 'Order', id::text, 'insert', ARRAY['orders'],
                ARRAY['failed'], errors
           FROM ({rows}) AS given (id, errors)"
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_text_search_finds_common_words_in_its_walk_and_rare_ones_beyond_it() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    let walk = history::TEXT_SEARCH_WALK;
    // One rare message, then more rows with a common one than the walk covers, then rows
    // without errors.
    history_with_errors(
        pool,
        &format!(
            "SELECT 1, 'HTTP 400: zebra field rejected'
             UNION ALL SELECT g, 'attempt timed out waiting for the gateway'
                         FROM generate_series(2, {}) AS g
             UNION ALL SELECT g, NULL FROM generate_series({}, {}) AS g",
            walk + 1,
            walk + 2,
            walk + 100
        ),
    )
    .await;
    let ids = |page: &history::HistoryPage| -> Vec<i64> {
        page.entries.iter().map(|entry| entry.history_id).collect()
    };
    let text = |words: &str, after: Option<i64>| HistoryQuery {
        text: Some(words.to_owned()),
        after,
        limit: 3,
        ..HistoryQuery::default()
    };

    let rare = history::search(pool, &text("zebra", None)).await.unwrap();
    assert_eq!(ids(&rare), [1], "found past the walk");
    assert_eq!(rare.next_cursor, None);

    let common = history::search(pool, &text("gateway timed out", None))
        .await
        .unwrap();
    assert_eq!(ids(&common), [walk + 1, walk, walk - 1]);
    assert_eq!(common.next_cursor, Some(walk - 1));
    let next = history::search(pool, &text("gateway timed out", common.next_cursor))
        .await
        .unwrap();
    assert_eq!(ids(&next), [walk - 2, walk - 3, walk - 4]);

    // The other filters hold in both parts of the search.
    let other_observer = HistoryQuery {
        observer: Some("nobody".to_owned()),
        ..text("zebra", None)
    };
    assert!(
        history::search(pool, &other_observer)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    let nothing = history::search(pool, &text("unicorn", None)).await.unwrap();
    assert!(nothing.entries.is_empty());
}

#[tokio::test]
async fn history_rows_keep_every_text_byte_for_byte_through_the_column_insert() {
    let database = TestDatabase::migrated().await;
    // Strings that a careless array literal or JSON rendering would change: quotes, backslashes,
    // commas, braces, blanks, the word NULL, an empty name, line breaks, non-ASCII.
    let awkward = [
        "say \"hi\"",
        "back\\slash",
        "a,b",
        "{braces}",
        " padded ",
        "NULL",
        "",
        "line\nbreak",
        "Ünïcödé ✓",
    ];
    let event_id = Uuid::new_v4();
    let record = history::HistoryRecord {
        partition: None,
        record_kind: "job",
        event_id,
        entity_type: "Order \"quoted\"".to_owned(),
        entity_id: "id,with\\odd{chars}".to_owned(),
        event_kind: "insert".to_owned(),
        change_log_id: Some(42),
        tenant_id: Some("NULL".to_owned()),
        actor_type: None,
        actor_id: Some(String::new()),
        event_at: chrono::Utc::now(),
        matched_observers: awkward.iter().map(|name| (*name).to_owned()).collect(),
        unmatched_observers: Vec::new(),
        outcomes: vec!["succeeded", "failed"],
        actions: vec![history::HistoryAction {
            observer: "say \"hi\"".to_owned(),
            action_index: 0,
            action_type: "webhook".to_owned(),
            outcome: HistoryOutcome::Failed,
            attempts: 2,
            latency_ms: 1.5,
            error_code: Some("OB001".to_owned()),
            error_message: Some("line one\nline \"two\" \\ end".to_owned()),
            dead_letter_id: None,
            queue: None,
            job_id: None,
        }],
        errors: Some("line one\nline \"two\" \\ end".to_owned()),
        node_id: "node-1".to_owned(),
        epoch: None,
        processing_ms: 2.25,
    };
    let written = history::insert_on(&database.pool, std::slice::from_ref(&record))
        .await
        .unwrap();
    assert_eq!(written, 1);
    #[allow(clippy::type_complexity, reason = "one row's columns, read once")]
    let row: (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Value,
        Option<String>,
        Option<i64>,
        Option<i32>,
        f64,
    ) = sqlx::query_as(
        "SELECT entity_type, entity_id, tenant_id, actor_type, actor_id, matched_observers,
                unmatched_observers, outcomes, actions, errors, change_log_id, partition,
                processing_ms
           FROM fraiseql_observers.history WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(row.0, record.entity_type);
    assert_eq!(row.1, record.entity_id);
    assert_eq!(row.2.as_deref(), Some("NULL"), "the text NULL, not a null");
    assert_eq!(row.3, None);
    assert_eq!(row.4.as_deref(), Some(""));
    assert_eq!(row.5, record.matched_observers);
    assert!(row.6.is_empty());
    assert_eq!(row.7, vec!["succeeded".to_owned(), "failed".to_owned()]);
    assert_eq!(row.8, serde_json::to_value(&record.actions).unwrap());
    assert_eq!(row.9, record.errors);
    assert_eq!(row.10, Some(42));
    assert_eq!(row.11, None);
    assert!((row.12 - 2.25).abs() < f64::EPSILON);
    // Each awkward observer name finds the row through the observers index.
    for name in awkward {
        let found = search(
            &database.pool,
            HistoryQuery {
                observer: Some(name.to_owned()),
                ..HistoryQuery::default()
            },
        )
        .await;
        assert_eq!(found, vec![event_id], "observer {name:?}");
    }
}
