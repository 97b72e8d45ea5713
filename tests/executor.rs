//! The executor against a real HTTP server: concurrency across actions and entities, order
//! within an entity, the node-wide concurrency bound, and failure policies.

mod common;

use std::time::Duration;

use common::{Receiver, Reply, executor_from_yaml};
use fraiseql_observers::dlq::DeadLetterQueue;
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::ActionStatus;
use serde_json::json;

#[tokio::test]
async fn actions_of_one_event_run_at_the_same_time() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: fan-out
    entity: Order
    events: [insert]
    actions:
      - {{type: webhook, url: '{}'}}
      - {{type: webhook, url: '{}'}}
      - {{type: webhook, url: '{}'}}
",
        receiver.url("/delay/500"),
        receiver.url("/delay/10"),
        receiver.url("/delay/100")
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);
    let event = EntityEvent::new(EventKind::Insert, "Order", "1", json!({"total": 1}), None);

    let summary = executor.execute_event(&event).await;

    assert_eq!(summary.actions.len(), 3);
    assert!(
        summary
            .actions
            .iter()
            .all(fraiseql_observers::executor::ActionReport::succeeded),
        "{summary:?}"
    );
    let indexes: Vec<usize> = summary
        .actions
        .iter()
        .map(|report| report.action_index)
        .collect();
    assert_eq!(
        indexes,
        [0, 1, 2],
        "reports come back in configuration order"
    );
    // Every request reached the server before the slowest one was answered: none waited for another.
    let requests = receiver.requests();
    let slowest = requests
        .iter()
        .find(|request| request.path == "/delay/500")
        .unwrap();
    let slowest_answered = slowest.answered.unwrap();
    for request in &requests {
        assert!(
            request.arrived < slowest_answered,
            "{} waited for the slow action",
            request.path
        );
    }
    let fast = requests
        .iter()
        .find(|request| request.path == "/delay/10")
        .unwrap();
    assert!(
        fast.answered.unwrap() < slowest_answered,
        "the fast action finished first"
    );
    println!(
        "one event, actions of 500/10/100 ms: {:?} in all",
        summary.duration
    );
}

fn versioned_events(entities: &[&str], versions: u32) -> Vec<EntityEvent> {
    let mut events = Vec::new();
    for version in 1..=versions {
        for entity in entities {
            events.push(EntityEvent::new(
                EventKind::Update,
                "Order",
                *entity,
                json!({"version": version, "entity": entity}),
                Some(json!({"version": version - 1, "entity": entity})),
            ));
        }
    }
    events
}

#[tokio::test]
async fn events_of_one_entity_arrive_in_order_while_entities_run_concurrently() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: versions
    entity: Order
    events: [update]
    actions:
      - {{type: webhook, url: '{}'}}
",
        receiver.url("/delay/5")
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);
    let entities = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let events = versioned_events(&entities, 25);

    let summaries = executor.execute_batch(&events).await;

    assert_eq!(summaries.len(), events.len());
    for (summary, event) in summaries.iter().zip(&events) {
        assert_eq!(summary.event_id, event.id, "summaries are in batch order");
        assert!(summary.actions[0].succeeded());
    }
    let requests = receiver.requests();
    assert_eq!(requests.len(), events.len());
    for entity in entities {
        let versions: Vec<u64> = requests
            .iter()
            .map(common::Recorded::json)
            .filter(|body| body["entity_id"] == entity)
            .map(|body| body["data"]["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (1..=25).collect::<Vec<u64>>(),
            "entity {entity} out of order"
        );
    }
    assert!(
        receiver.max_in_flight() > 1,
        "different entities ran concurrently"
    );
}

#[tokio::test]
async fn a_slow_entity_does_not_hold_up_the_others() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: slow-one
    entity: Order
    events: [update]
    condition: 'entity_id == ''slow'''
    actions: [{{type: webhook, url: '{}'}}]
  - name: fast-ones
    entity: Order
    events: [update]
    condition: 'entity_id != ''slow'''
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/delay/400"),
        receiver.url("/fast")
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);
    let events = versioned_events(&["slow", "x", "y"], 3);

    executor.execute_batch(&events).await;

    let slow = receiver.requests_to("/delay/400");
    let fast = receiver.requests_to("/fast");
    assert_eq!(slow.len(), 3);
    assert_eq!(fast.len(), 6);
    let last_fast = fast.iter().map(|request| request.arrived).max().unwrap();
    assert!(
        last_fast < slow[1].arrived,
        "the other entities finished while the slow one was still on its first event"
    );
}

#[tokio::test]
async fn no_more_actions_run_at_once_than_the_node_allows() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
executor: {{max_concurrent_actions: 2}}
observers:
  - name: bounded
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/delay/50")
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);
    let events: Vec<EntityEvent> = (0..8)
        .map(|index| {
            EntityEvent::new(
                EventKind::Insert,
                "Order",
                index.to_string(),
                json!({}),
                None,
            )
        })
        .collect();

    executor.execute_batch(&events).await;

    assert_eq!(receiver.requests().len(), 8);
    assert_eq!(receiver.max_in_flight(), 2);
}

#[tokio::test]
async fn failure_policy_decides_between_the_dead_letter_queue_and_the_log() {
    let receiver = Receiver::start().await;
    receiver.script("/to-dlq", [Reply::status(400)]);
    receiver.script("/to-log", [Reply::status(400)]);
    let yaml = format!(
        r"
observers:
  - name: parked
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{}'}}]
  - name: logged
    entity: Order
    events: [insert]
    on_failure: log
    actions: [{{type: webhook, url: '{}'}}, {{type: log, message: 'still runs: {{{{ entity_id }}}}'}}]
",
        receiver.url("/to-dlq"),
        receiver.url("/to-log")
    );
    let (executor, dead_letters) = executor_from_yaml(&yaml, &[]);
    let event = EntityEvent::new(EventKind::Insert, "Order", "9", json!({}), None);

    let summary = executor.execute_event(&event).await;

    assert_eq!(summary.matched_observers, ["parked", "logged"]);
    assert_eq!(summary.failed_actions(), 2);
    let parked = &summary.actions[0];
    assert!(
        matches!(
            parked.status,
            ActionStatus::Failed {
                dead_letter: Some(_),
                ..
            }
        ),
        "{parked:?}"
    );
    let logged = &summary.actions[1];
    assert!(
        matches!(
            logged.status,
            ActionStatus::Failed {
                dead_letter: None,
                ..
            }
        ),
        "{logged:?}"
    );
    let ActionStatus::Succeeded { detail } = &summary.actions[2].status else {
        panic!("{summary:?}")
    };
    assert_eq!(detail, "still runs: 9");
    assert_eq!(dead_letters.count().await.unwrap(), 1);
}

#[tokio::test]
async fn events_nobody_observes_do_nothing() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: orders
    entity: Order
    events: [insert]
    condition: 'data.total > 100'
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/x")
    );
    let (executor, _) = executor_from_yaml(&yaml, &[]);
    let events = [
        EntityEvent::new(EventKind::Insert, "User", "1", json!({"total": 500}), None),
        EntityEvent::new(EventKind::Delete, "Order", "1", json!({"total": 500}), None),
        EntityEvent::new(EventKind::Insert, "Order", "1", json!({"total": 5}), None),
    ];

    let summaries = executor.execute_batch(&events).await;

    assert!(
        summaries
            .iter()
            .all(|summary| summary.actions.is_empty() && summary.matched_observers.is_empty())
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(receiver.requests().is_empty());
}

#[tokio::test]
async fn a_node_whose_leases_are_unconfirmed_dispatches_nothing_and_settles_nothing() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: parked
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{}'}}]
  - name: logged
    entity: Order
    events: [insert]
    on_failure: log
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/parked"),
        receiver.url("/logged")
    );
    let (executor, dead_letters) = executor_from_yaml(&yaml, &[]);
    // Never confirmed by a heartbeat: as after a pause or a cut past the node timeout.
    let fenced = executor.with_lease(fraiseql_observers::cluster::LeaseValidity::default());
    let event = EntityEvent::new(EventKind::Insert, "Order", "9", json!({}), None);

    let summary = fenced.execute_event(&event).await;

    assert_eq!(summary.actions.len(), 2);
    for report in &summary.actions {
        assert!(
            matches!(
                report.status,
                ActionStatus::Failed {
                    code: ErrorCode::FencedOut,
                    dead_letter: None,
                    ..
                }
            ),
            "{report:?}"
        );
        assert!(!report.settled, "left to the next leader: {report:?}");
        assert!(
            report.job.is_none(),
            "no job for a fenced action: {report:?}"
        );
    }
    assert!(!summary.settled());
    assert!(receiver.requests_to("/parked").is_empty());
    assert!(receiver.requests_to("/logged").is_empty());
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn leases_that_lapse_while_calls_wait_for_an_endpoint_slot_send_nothing_more() {
    let receiver = Receiver::start().await;
    let yaml = format!(
        r"
observers:
  - name: slow
    entity: Order
    events: [insert]
    actions: [{{type: webhook, url: '{}'}}]
",
        receiver.url("/delay/800")
    );
    let (executor, dead_letters) = executor_from_yaml(&yaml, &[]);
    // Confirmed for 300 ms: the first calls take the endpoint's initial slots and are answered
    // after 800 ms; the rest get their slots only after the leases lapsed.
    let lapses = std::time::Instant::now() + Duration::from_millis(300);
    let fenced = executor.with_lease(fraiseql_observers::cluster::LeaseValidity::confirmed_until(
        lapses,
    ));
    let entities: Vec<String> = (0..40).map(|entity| format!("order-{entity}")).collect();
    let events: Vec<EntityEvent> = entities
        .iter()
        .map(|entity| EntityEvent::new(EventKind::Insert, "Order", entity, json!({}), None))
        .collect();

    let summaries = fenced.execute_batch(&events).await;

    let requests = receiver.requests();
    assert!(
        !requests.is_empty() && requests.len() < events.len(),
        "some calls went out at once, not all: {}",
        requests.len()
    );
    for request in &requests {
        assert!(
            request.arrived < lapses,
            "a call was sent {:?} after the leases lapsed",
            request.arrived - lapses
        );
    }
    let fenced_out = summaries
        .iter()
        .flat_map(|summary| &summary.actions)
        .filter(|report| {
            matches!(
                report.status,
                ActionStatus::Failed {
                    code: ErrorCode::FencedOut,
                    dead_letter: None,
                    ..
                }
            ) && !report.settled
                && report.job.is_none()
        })
        .count();
    assert_eq!(
        fenced_out + requests.len(),
        events.len(),
        "every call not sent is left to the next leader"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}
