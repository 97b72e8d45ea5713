//! Micro-benchmarks of the per-event hot path: matcher lookup, condition-filtered matching, and
//! envelope construction + serialization.
//!
//! Run: `cargo bench --bench pipeline`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use serde_json::json;

#[path = "support/observers.rs"]
mod observers;

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
    let matcher = observers::large_config("");
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
