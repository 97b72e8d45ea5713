//! One event whose observer has three webhook actions answering in 500, 10 and 100 ms, against a
//! real local HTTP server: the concurrent executor versus the sequential design it replaces
//! (each action awaited before the next starts). Prints a Markdown table.
//!
//! Run: `cargo bench --bench concurrency`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fraiseql_observers::actions::{ActionContext, ActionRunner};
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::observers::load_str;
use serde_json::json;

const ROUNDS: u32 = 5;

#[tokio::main]
async fn main() {
    let receiver = common::Receiver::start().await;
    let yaml = format!(
        "observers:\n  - name: fan-out\n    entity: Order\n    events: [insert]\n    actions:\n      - {{type: webhook, url: '{}'}}\n      - {{type: webhook, url: '{}'}}\n      - {{type: webhook, url: '{}'}}\n",
        receiver.url("/delay/500"),
        receiver.url("/delay/10"),
        receiver.url("/delay/100")
    );
    let (executor, _) = common::executor_from_yaml(&yaml, &[]);
    let no_env = |_: &str| None;
    let options = LoadOptions {
        env: &no_env,
        missing_env: MissingEnv::Warn,
    };
    let config = load_str(&yaml, Format::Yaml, "bench.yaml", &options).unwrap();
    let runner = ActionRunner::new(Arc::new(config.templates)).unwrap();
    let observer = &config.observers[0];

    let mut concurrent = Duration::ZERO;
    let mut sequential = Duration::ZERO;
    for _ in 0..ROUNDS {
        let event = EntityEvent::new(EventKind::Insert, "Order", "1", json!({"total": 1}), None);
        let started = Instant::now();
        let summary = executor.execute_event(&event).await;
        concurrent += started.elapsed();
        assert!(
            summary
                .actions
                .iter()
                .all(fraiseql_observers::executor::ActionReport::succeeded)
        );

        let envelope = event.envelope(observer.name.as_str());
        let started = Instant::now();
        for action in &observer.actions {
            let context = ActionContext {
                event: &event,
                observer: &observer.name,
                action_index: action.index,
                envelope: &envelope,
                lease: None,
            };
            runner.attempt(action, &context).await.unwrap();
        }
        sequential += started.elapsed();
    }
    let concurrent = concurrent / ROUNDS;
    let sequential = sequential / ROUNDS;
    println!("| one event, webhook actions of 500 / 10 / 100 ms (mean of {ROUNDS}) | latency |");
    println!("|---|---|");
    println!(
        "| concurrent executor | {:.1} ms |",
        concurrent.as_secs_f64() * 1000.0
    );
    println!(
        "| sequential (one action after another) | {:.1} ms |",
        sequential.as_secs_f64() * 1000.0
    );
    println!(
        "| speed-up | {:.2}× |",
        sequential.as_secs_f64() / concurrent.as_secs_f64()
    );
}
