//! Micro-benchmarks of the per-event hot path: matcher lookup, condition-filtered matching, and
//! envelope construction + serialization.
//!
//! Run: `cargo bench --bench pipeline`

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::load_str;
use serde_json::json;

/// 20 entity types × 5 observers each, half of them with a condition.
fn large_config() -> Matcher {
    let mut yaml = String::from("observers:\n");
    for entity in 0..20 {
        for observer in 0..5 {
            let _ = writeln!(
                yaml,
                "  - name: e{entity}-o{observer}\n    entity: Entity{entity}\n    events: [insert, update]"
            );
            if observer % 2 == 0 {
                let _ = writeln!(
                    yaml,
                    "    condition: \"data.total > {} && field_changed('status')\"",
                    observer * 100
                );
            }
            let _ = writeln!(
                yaml,
                "    actions: [{{type: webhook, url: 'http://127.0.0.1:9/x'}}]"
            );
        }
    }
    let no_env = |_: &str| None;
    let options = LoadOptions {
        env: &no_env,
        missing_env: MissingEnv::Warn,
    };
    Matcher::new(
        load_str(&yaml, Format::Yaml, "bench.yaml", &options)
            .unwrap()
            .observers,
    )
}

fn order_event() -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Entity7",
        "ord-123",
        json!({"id": "ord-123", "status": "paid", "total": 250, "customer": {"email": "a@example.com", "tier": "gold"},
               "items": [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}]}),
        Some(
            json!({"id": "ord-123", "status": "new", "total": 250, "customer": {"email": "a@example.com", "tier": "gold"},
                    "items": [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}]}),
        ),
    )
}

fn matcher_benches(criterion: &mut Criterion) {
    let matcher = large_config();
    let event = order_event();
    criterion.bench_function("matcher/candidates (100 observers, 20 entities)", |bench| {
        bench.iter(|| {
            black_box(&matcher)
                .candidates(black_box("Entity7"), EventKind::Update)
                .count()
        });
    });
    criterion.bench_function("matcher/candidates miss", |bench| {
        bench.iter(|| {
            black_box(&matcher)
                .candidates(black_box("Nothing"), EventKind::Update)
                .count()
        });
    });
    criterion.bench_function("matcher/matching with conditions (5 candidates)", |bench| {
        bench.iter(|| black_box(&matcher).matching(black_box(&event)).count());
    });
}

fn envelope_benches(criterion: &mut Criterion) {
    let event = order_event();
    criterion.bench_function("envelope/build + serialize", |bench| {
        bench.iter(|| serde_json::to_vec(&black_box(&event).envelope("order-paid")).unwrap());
    });
}

criterion_group!(benches, matcher_benches, envelope_benches);
criterion_main!(benches);
