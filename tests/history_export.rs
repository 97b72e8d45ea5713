//! The history copied to a search backend (`history: {backend: search}`) against a real
//! OpenSearch-API server (osmem-server, one per test), a real node on a fresh PostgreSQL
//! database and a real HTTP receiver: the index template is applied, every history row becomes
//! one searchable document (its `_id` the history id, `data` and `changes` stored), a backend
//! that hangs for 10 s neither slows nor stops delivery and is caught up once it answers, and a
//! document the backend refuses is dropped and counted without stopping the rest; daily indices
//! past the retention are deleted.

#![allow(clippy::too_many_lines)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::nodes::{eventually, prepare_orders, write_orders};
use common::postgres::TestDatabase;
use common::search::SearchPeer;
use common::{Receiver, Reply, config_errors_from_yaml, config_from_yaml};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::metrics::{Metrics, ResultLabel};
use fraiseql_observers::node::Node;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "test-history";

fn config(
    receiver: &Receiver,
    search: &SearchPeer,
) -> fraiseql_observers::observers::ObserversConfig {
    config_from_yaml(&format!(
        "history:
  backend: search
  url: '{url}'
  index_prefix: {PREFIX}
  timeout: 1s
  batch_size: 50
observers:
  - name: orders
    entity: Order
    events: [insert, update]
    actions: [{{type: webhook, url: '{orders}'}}]
  - name: legacy
    entity: Order
    events: [insert]
    condition: 'data.id == 7'
    retry: {{max_attempts: 1}}
    actions: [{{type: webhook, url: '{legacy}'}}]
",
        url = search.url,
        orders = receiver.url("/orders"),
        legacy = receiver.url("/legacy"),
    ))
}

struct RunningNode {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: std::sync::Arc<Metrics>,
}

async fn start_node(
    database: &TestDatabase,
    receiver: &Receiver,
    search: &SearchPeer,
) -> RunningNode {
    let node = Node::build(
        database.pool.clone(),
        config(receiver, search),
        ListenerSettings {
            node_id: "export-node".to_owned(),
            poll_interval: Duration::from_millis(100),
            ..ListenerSettings::default()
        },
        ClusterSettings {
            partitions: 2,
            node_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    let metrics = node.metrics();
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    let task = tokio::spawn(async move {
        node.run_until_stopped(stopping).await.unwrap();
    });
    RunningNode {
        stop,
        task,
        metrics,
    }
}

async fn history_ids(pool: &sqlx::PgPool) -> BTreeSet<String> {
    sqlx::query_scalar::<_, i64>("SELECT history_id FROM fraiseql_observers.history")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

fn documents_of(metrics: &Metrics, result: &str) -> u64 {
    metrics
        .history_export
        .documents
        .get_or_create(&ResultLabel {
            result: result.to_owned(),
        })
        .get()
}

async fn search(search: &SearchPeer, query: Value) -> Vec<Value> {
    let (status, body) = search
        .request(
            reqwest::Method::POST,
            &format!("/{PREFIX}-*/_search"),
            Some(json!({"size": 100, "query": query})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hit| hit["_source"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_searchable_in_the_backend_and_a_hung_backend_neither_slows_delivery_nor_loses_a_document()
 {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    prepare_orders(pool).await;
    let receiver = Receiver::start().await;
    receiver.script("/legacy", [Reply::with_body(410, "gone for good")]);
    let peer = SearchPeer::start();
    let node = start_node(&database, &receiver, &peer).await;

    write_orders(pool, 0..20, 1).await;
    eventually(
        "20 orders delivered and 20 history documents indexed",
        || async {
            receiver.requests_to("/orders").len() == 20
                && peer.documents(&format!("{PREFIX}-*")).await.len() == 20
        },
    )
    .await;

    // The template carries the audit trail's mapping.
    let (status, template) = peer
        .request(
            reqwest::Method::GET,
            &format!("/_index_template/{PREFIX}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let mapping =
        &template["index_templates"][0]["index_template"]["template"]["mappings"]["properties"];
    assert_eq!(mapping["entity_id"]["type"], "keyword", "{template}");
    assert_eq!(mapping["processed_at"]["type"], "date");
    assert_eq!(mapping["data"]["enabled"], false);
    assert_eq!(mapping["changes"]["enabled"], false);
    assert_eq!(mapping["processing_errors"]["type"], "text");

    // One document per history row, by history id, with the event's data stored.
    assert_eq!(
        peer.documents(&format!("{PREFIX}-*"))
            .await
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        history_ids(pool).await
    );
    let order = search(&peer, json!({"term": {"entity_id": "3"}})).await;
    assert_eq!(order.len(), 1, "{order:?}");
    assert_eq!(order[0]["data"]["version"], 1);
    assert_eq!(order[0]["event_type"], "insert");
    assert_eq!(order[0]["matching_observers"], json!(["orders"]));
    assert_eq!(order[0]["successful_actions"], 1);
    // Full text on the error messages finds the dead-lettered action's event, and only it.
    let refused = search(&peer, json!({"match": {"processing_errors": "gone"}})).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["entity_id"], "7");
    assert_eq!(
        refused[0]["outcomes"],
        json!(["succeeded", "dead_lettered"])
    );

    // The backend hangs for 10 s: delivery goes on at once, the history waits in PostgreSQL.
    peer.pause();
    let paused = Instant::now();
    write_orders(pool, 20..60, 1).await;
    write_orders(pool, 0..20, 2).await;
    eventually("80 orders delivered while the backend hangs", || async {
        receiver.requests_to("/orders").len() == 80
    })
    .await;
    let delivered_in = paused.elapsed();
    assert!(
        delivered_in < Duration::from_secs(10),
        "delivery waited for the search backend: {delivered_in:?}"
    );
    eventually("the history rows of the pages delivered", || async {
        history_ids(pool).await.len() == 80
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(paused.elapsed())).await;
    assert!(
        node.metrics.history_export.failures.get() > 0,
        "the hung backend was not noticed"
    );
    assert!(
        node.metrics.history_export.waiting.get() > 0,
        "nothing counted as waiting"
    );
    peer.resume();

    eventually(
        "every history row indexed after the backend came back",
        || async {
            peer.documents(&format!("{PREFIX}-*"))
                .await
                .keys()
                .cloned()
                .collect::<BTreeSet<_>>()
                == history_ids(pool).await
        },
    )
    .await;
    assert_eq!(documents_of(&node.metrics, "dropped"), 0);
    assert!(documents_of(&node.metrics, "indexed") >= 80);
    let versions = search(&peer, json!({"term": {"entity_id": "3"}})).await;
    assert_eq!(versions.len(), 2, "both changes of order 3: {versions:?}");
    eventually("nothing left waiting", || async {
        node.metrics.history_export.waiting.get() == 0
    })
    .await;
    let cursor: i64 = sqlx::query_scalar(
        "SELECT cursor FROM fraiseql_observers.history_export WHERE target = $1",
    )
    .bind(PREFIX)
    .fetch_one(pool)
    .await
    .unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(history_id) FROM fraiseql_observers.history")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(cursor, last, "the saved cursor is the last row exported");

    node.stop.cancel();
    node.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_document_is_dropped_and_counted_the_rest_go_on_and_old_days_are_deleted() {
    let database = TestDatabase::migrated().await;
    let pool = &database.pool;
    prepare_orders(pool).await;
    let receiver = Receiver::start().await;
    let peer = SearchPeer::start();
    // Today's index exists with entity_id as an integer: an entity id that is not a number is
    // refused by the backend (a mapping error, permanent).
    let today = fraiseql_observers::history_export::index_name(PREFIX, chrono::Utc::now());
    let (status, body) = peer
        .request(
            reqwest::Method::PUT,
            &format!("/{today}"),
            Some(json!({"mappings": {"properties": {"entity_id": {"type": "integer"}}}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A daily index long past the 30-day retention, and an index that is not a day's.
    for index in [format!("{PREFIX}-2020.01.01"), format!("{PREFIX}-archive")] {
        let (status, body) = peer
            .request(reqwest::Method::PUT, &format!("/{index}"), Some(json!({})))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let node = start_node(&database, &receiver, &peer).await;

    write_orders(pool, 0..5, 1).await;
    sqlx::query(
        "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
         VALUES ('Order', 'not-a-number', 'INSERT', '{\"id\": \"not-a-number\"}')",
    )
    .execute(pool)
    .await
    .unwrap();
    write_orders(pool, 5..10, 1).await;

    eventually("10 documents indexed and 1 dropped", || async {
        documents_of(&node.metrics, "indexed") == 10 && documents_of(&node.metrics, "dropped") == 1
    })
    .await;
    let documents = peer.documents(&format!("{PREFIX}-*")).await;
    assert_eq!(documents.len(), 10);
    assert!(
        documents
            .values()
            .all(|document| document["entity_id"] != "not-a-number"),
        "{documents:?}"
    );
    assert_eq!(
        history_ids(pool).await.len(),
        11,
        "the refused row stays in PostgreSQL"
    );
    // Retention deleted the old day's index and left the others alone.
    let (_, indices) = peer
        .request(reqwest::Method::GET, "/_cat/indices?format=json", None)
        .await;
    let names: BTreeSet<&str> = indices
        .as_array()
        .unwrap()
        .iter()
        .map(|index| index["index"].as_str().unwrap())
        .collect();
    let archive = format!("{PREFIX}-archive");
    assert_eq!(names, BTreeSet::from([today.as_str(), archive.as_str()]));
    node.stop.cancel();
    node.task.await.unwrap();
}

#[test]
fn a_misspelt_or_misplaced_history_setting_is_refused_naming_the_key() {
    let observers = "observers: []\n";
    let errors = config_errors_from_yaml(
        &format!("history: {{backend: postgres, url: 'http://search:9200'}}\n{observers}"),
        &[],
    );
    assert!(
        errors
            .iter()
            .any(|error| error.contains("history.url")
                && error.contains("only with backend: search")),
        "{errors:?}"
    );
    let errors = config_errors_from_yaml(
        &format!(
            "history: {{backend: search, url_env: SEARCH_URL, index_prefix: Audit}}\n{observers}"
        ),
        &[("SEARCH_URL", "http://search:9200")],
    );
    assert!(
        errors
            .iter()
            .any(|error| error.contains("history.index_prefix") && error.contains("lowercase")),
        "{errors:?}"
    );
    let errors =
        config_errors_from_yaml(&format!("history: {{backend: elastic}}\n{observers}"), &[]);
    assert!(
        errors
            .iter()
            .any(|error| error.contains("history.backend") && error.contains("postgres, search")),
        "{errors:?}"
    );
    let errors =
        config_errors_from_yaml(&format!("history: {{backend: search}}\n{observers}"), &[]);
    assert!(
        errors
            .iter()
            .any(|error| error.contains("'url' (or 'url_env')")),
        "{errors:?}"
    );
    let errors = config_errors_from_yaml(
        &format!("history: {{backend: search, url_env: SEARCH_URL, retention: 2h}}\n{observers}"),
        &[("SEARCH_URL", "http://user:hunter2@search:9200")],
    );
    assert!(
        errors
            .iter()
            .any(|error| error.contains("history.retention") && error.contains("1d")),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|error| !error.contains("hunter2")),
        "{errors:?}"
    );
}
