//! The `search` action against a real OpenSearch-API server (osmem-server, one per test): the
//! document indexed and deleted as the server stores it, a mapping conflict dead-lettered with the
//! engine's reason, a 429 read-only block rescheduled by the job queue and then indexed,
//! templates checked at load.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::search::SearchPeer;
use common::{config_errors_from_yaml, config_from_yaml, executor_from_yaml};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue, PostgresDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use fraiseql_observers::jobs::{NewJob, PostgresJobQueue};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::worker::{JobWorker, WorkOutcome};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Creates index `orders-acme` with `total` mapped as an integer.
async fn map_total_as_integer(search: &SearchPeer) {
    let (status, _) = search
        .request(
            reqwest::Method::PUT,
            "/orders-acme",
            Some(json!({"mappings": {"properties": {"total": {"type": "integer"}}}})),
        )
        .await;
    assert_eq!(status, 200);
}

fn order(kind: EventKind, id: &str, data: Value) -> EntityEvent {
    let mut event = EntityEvent::new(kind, "Order", id, data, None);
    event.tenant_id = Some("acme".into());
    event
}

const OBSERVER_YAML: &str = "
observers:
  - name: order-search
    entity: Order
    events: [insert, update, delete]
    actions:
      - type: search
        url_env: SEARCH_URL
        index: 'orders-{{ tenant_id }}'
    retry: {max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}
";

fn observer_yaml() -> String {
    OBSERVER_YAML.to_owned()
}

#[tokio::test]
async fn indexes_updates_and_deletes_the_entity_document() {
    let search = SearchPeer::start();
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(), &[("SEARCH_URL", &search.url)]);
    let document =
        json!({"id": "ord/7", "status": "new", "total": 250, "lines": [{"sku": "a", "qty": 2}]});

    let report = &executor
        .execute_event(&order(EventKind::Insert, "ord/7", document.clone()))
        .await
        .actions[0];

    assert_eq!(report.action_type, "search");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "index orders-acme/ord/7: HTTP 201 created".into()
        }
    );
    // The id is one path segment: the slash is percent-encoded.
    assert_eq!(
        search.document("orders-acme", "ord%2F7").await,
        Some(document)
    );

    let updated = json!({"id": "ord/7", "status": "paid", "total": 250});
    let report = &executor
        .execute_event(&order(EventKind::Update, "ord/7", updated.clone()))
        .await
        .actions[0];
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(
        search.document("orders-acme", "ord%2F7").await,
        Some(updated.clone())
    );

    let report = &executor
        .execute_event(&order(EventKind::Delete, "ord/7", updated.clone()))
        .await
        .actions[0];
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "delete orders-acme/ord/7: HTTP 200 deleted".into()
        }
    );
    assert_eq!(search.document("orders-acme", "ord%2F7").await, None);

    // Deleting again (a replay) finds nothing, which is what was wanted.
    let report = &executor
        .execute_event(&order(EventKind::Delete, "ord/7", updated))
        .await
        .actions[0];
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "delete orders-acme/ord/7: HTTP 404 not_found".into()
        }
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_mapping_conflict_is_permanent_with_the_engines_reason() {
    let search = SearchPeer::start();
    map_total_as_integer(&search).await;
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(), &[("SEARCH_URL", &search.url)]);

    let report = &executor
        .execute_event(&order(
            EventKind::Insert,
            "ord-7",
            json!({"total": "a lot"}),
        ))
        .await
        .actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert!(
        message.starts_with("index orders-acme/ord-7: HTTP 400: mapper_parsing_exception: failed to parse field [total]"),
        "{message}"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "search");
    assert_eq!(letters[0].letter.error_message, *message);
    assert_eq!(search.document("orders-acme", "ord-7").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_block_is_transient_and_the_job_is_indexed_once_it_lifts() {
    let search = SearchPeer::start();
    let database = TestDatabase::migrated().await;
    search
        .request(reqwest::Method::PUT, "/orders-acme", Some(json!({})))
        .await;
    let block = |blocked: bool| {
        search.request(
            reqwest::Method::PUT,
            "/orders-acme/_settings",
            Some(json!({"index.blocks.read_only_allow_delete": blocked})),
        )
    };
    assert_eq!(block(true).await.0, 200);
    let config = config_from_yaml(
        &observer_yaml().replace("url_env: SEARCH_URL", &format!("url: '{}'", search.url)),
    );
    let jobs = PostgresJobQueue::new(database.pool.clone(), "node-a", Duration::from_secs(30));
    let worker = JobWorker::new(
        jobs.clone(),
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_millis(100),
    );
    let event = order(EventKind::Insert, "ord-7", json!({"status": "new"}));
    let id = jobs
        .enqueue(&NewJob {
            queue: "default".into(),
            priority: 5,
            run_at: None,
            event,
            observer: "order-search".into(),
            action_index: 0,
            action_type: "search".into(),
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            parked_on: None,
            history: Vec::new(),
        })
        .await
        .unwrap()
        .unwrap();
    let running = CancellationToken::new();

    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::Rescheduled(id)
    );
    let errors: Value =
        sqlx::query_scalar("SELECT errors FROM fraiseql_observers.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(errors[0]["code"], "OB007", "{errors}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("TOO_MANY_REQUESTS/12"),
        "{errors}"
    );
    assert_eq!(search.document("orders-acme", "ord-7").await, None);

    assert_eq!(block(false).await.0, 200);
    sqlx::query("UPDATE fraiseql_observers.jobs SET run_at = now()")
        .execute(&database.pool)
        .await
        .unwrap();
    assert_eq!(
        worker.try_execute_one(&running).await.unwrap(),
        WorkOutcome::Completed(id)
    );
    assert_eq!(
        search.document("orders-acme", "ord-7").await,
        Some(json!({"status": "new"}))
    );
    let letters = PostgresDeadLetterQueue::new(database.pool.clone())
        .count()
        .await
        .unwrap();
    assert_eq!(letters, 0);
}

#[tokio::test]
async fn an_index_name_the_engines_refuse_fails_without_a_request() {
    let search = SearchPeer::start();
    let yaml = observer_yaml().replace("'orders-{{ tenant_id }}'", "'Orders {{ tenant_id }}'");
    let (executor, _) = executor_from_yaml(&yaml, &[("SEARCH_URL", &search.url)]);

    let report = &executor
        .execute_event(&order(EventKind::Insert, "ord-7", json!({})))
        .await
        .actions[0];

    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::TemplateFailed);
    assert!(message.contains("\"Orders acme\""), "{message}");
    let (_, indices) = search
        .request(reqwest::Method::GET, "/_cat/indices?format=json", None)
        .await;
    assert_eq!(indices, json!([]));
}

#[tokio::test]
async fn basic_auth_credentials_come_from_the_environment() {
    // A plain HTTP server in place of the cluster, to see the request as sent.
    let receiver = common::Receiver::start().await;
    let yaml = observer_yaml().replace(
        "        index:",
        "        username_env: SEARCH_USER\n        password_env: SEARCH_PASSWORD\n        index:",
    );
    let (executor, _) = executor_from_yaml(
        &yaml,
        &[
            ("SEARCH_URL", &receiver.base_url),
            ("SEARCH_USER", "elastic"),
            ("SEARCH_PASSWORD", "changeme"),
        ],
    );

    let report = &executor
        .execute_event(&order(
            EventKind::Update,
            "ord-7",
            json!({"status": "paid"}),
        ))
        .await
        .actions[0];

    assert!(report.succeeded(), "{report:?}");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "PUT");
    assert_eq!(requests[0].path, "/orders-acme/_doc/ord-7");
    assert_eq!(
        requests[0].header("authorization").unwrap(),
        common::basic_auth("elastic", "changeme")
    );
    assert_eq!(requests[0].json(), json!({"status": "paid"}));
}

#[test]
fn template_errors_and_missing_settings_are_refused_at_load() {
    let yaml = observer_yaml().replace("'orders-{{ tenant_id }}'", "'orders-{{ tenant_id'");
    let errors = config_errors_from_yaml(&yaml, &[]);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(
        errors[0],
        "test.yaml:8:18: observers[0].actions[0].url_env: environment variable SEARCH_URL is not set (or is empty)"
    );
    assert!(
        errors[1].starts_with("test.yaml:9:16: observers[0].actions[0].index: invalid template (line 1 of the template): syntax error"),
        "{}",
        errors[1]
    );

    let yaml = observer_yaml().replace(
        "index: 'orders-{{ tenant_id }}'",
        "index: 'orders-{{ tenant_id }}'\n        bulk: {max_documents: 0, max_wait: 5s, size: 3}",
    );
    let errors = config_errors_from_yaml(&yaml, &[("SEARCH_URL", "http://127.0.0.1:9200")]);
    let text = errors.join("\n");
    assert!(
        text.contains("observers[0].actions[0].bulk.size: unknown key 'size'"),
        "{text}"
    );
    assert!(
        text.contains("observers[0].actions[0].bulk.max_documents"),
        "{text}"
    );
}

#[tokio::test]
async fn with_bulk_concurrent_events_share_requests_and_each_gets_its_items_outcome() {
    let search = SearchPeer::start();
    map_total_as_integer(&search).await;
    let yaml = OBSERVER_YAML.replace(
        "index: 'orders-{{ tenant_id }}'",
        "index: 'orders-{{ tenant_id }}'\n        bulk: {max_documents: 50, max_wait: 100ms}",
    );
    let (executor, dead_letters) = executor_from_yaml(&yaml, &[("SEARCH_URL", &search.url)]);
    let mut events: Vec<EntityEvent> = (0..20)
        .map(|n| {
            order(
                EventKind::Insert,
                &format!("ord-{n}"),
                json!({"id": n, "total": n * 10}),
            )
        })
        .collect();
    // In the same requests: a delete of a document that is not there (already gone: success)
    // and a document the index's mapping refuses (permanent, dead-lettered with the reason).
    events.push(order(EventKind::Delete, "ord-gone", json!({"id": "gone"})));
    events.push(order(
        EventKind::Insert,
        "ord-bad",
        json!({"id": "bad", "total": "a lot"}),
    ));

    let summaries = executor.execute_batch(&events).await;

    let details: Vec<String> = summaries
        .iter()
        .map(|summary| match &summary.actions[0].status {
            ActionStatus::Succeeded { detail } => detail.clone(),
            ActionStatus::Failed { message, .. } => message.clone(),
            other => panic!("unexpected outcome: {other:?}"),
        })
        .collect();
    let shared = details
        .iter()
        .filter(|detail| {
            detail.contains("in a _bulk request of") && !detail.contains("in a _bulk request of 1)")
        })
        .count();
    assert!(
        shared >= 2,
        "operations went in one request each: {details:#?}"
    );
    for (n, summary) in summaries.iter().take(20).enumerate() {
        assert!(summary.actions[0].succeeded(), "{:?}", summary.actions[0]);
        assert_eq!(
            search.document("orders-acme", &format!("ord-{n}")).await,
            Some(json!({"id": n, "total": n * 10}))
        );
    }
    let gone = &summaries[20].actions[0];
    assert!(gone.succeeded(), "{gone:?}");
    assert!(details[20].contains("HTTP 404"), "{}", details[20]);
    let bad = &summaries[21].actions[0];
    let ActionStatus::Failed { code, message, .. } = &bad.status else {
        panic!("expected a failure: {bad:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(bad.attempts, 1, "a refused document is not retried");
    assert!(message.contains("index orders-acme/ord-bad"), "{message}");
    assert!(message.contains("mapper_parsing_exception"), "{message}");
    assert_eq!(dead_letters.count().await.unwrap(), 1);
    assert_eq!(search.document("orders-acme", "ord-bad").await, None);
}

#[tokio::test]
async fn a_redirect_is_permanent_and_names_its_location() {
    // A plain HTTP server in place of the cluster, answering the document's PUT with a redirect.
    let receiver = common::Receiver::start().await;
    receiver.script(
        "/orders-acme/_doc/ord-7",
        [common::Reply::status(308).header("location", "https://other-cluster.example/")],
    );
    let (executor, dead_letters) =
        executor_from_yaml(&observer_yaml(), &[("SEARCH_URL", &receiver.base_url)]);

    let report = &executor
        .execute_event(&order(
            EventKind::Update,
            "ord-7",
            json!({"status": "paid"}),
        ))
        .await
        .actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("a redirect is not an indexed document: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert_eq!(
        message,
        "index orders-acme/ord-7: HTTP 308: redirected to \"https://other-cluster.example/\"; redirects are not followed"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 1);
    assert_eq!(receiver.request_count(), 1);
}
