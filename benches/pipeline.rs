//! Micro-benchmarks of the per-event hot path: decoding a change-log row, matcher lookup,
//! condition-filtered matching, and envelope construction + serialization.
//!
//! Run: `cargo bench --bench pipeline`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fraiseql_observers::actions::webhook::envelope_body;
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::listener::{
    DEFAULT_MAX_ROW_BYTES, decode_row_owned, decode_row_text, parse_row_text,
};
use serde_json::json;

#[path = "support/observers.rs"]
mod observers;
#[path = "support/rows.rs"]
mod rows;

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
    criterion.bench_function("envelope/build + webhook body (exact size)", |bench| {
        bench.iter(|| envelope_body(&black_box(&event).envelope("order-paid")).unwrap());
    });
}

/// The listener's path (columns read in place from the text) beside the parsed-row path it
/// falls back to (a `Value` tree of the row, then the checks).
fn decode_benches(criterion: &mut Criterion) {
    let text = rows::order_update_text(42);
    let size = text.len() as u64;
    criterion.bench_function("decode/row text → event (listener)", |bench| {
        bench.iter(|| decode_row_text(42, size, black_box(&text), DEFAULT_MAX_ROW_BYTES).unwrap());
    });
    criterion.bench_function("decode/row text → parsed row → event", |bench| {
        bench.iter(|| {
            let row = parse_row_text(42, size, black_box(&text), DEFAULT_MAX_ROW_BYTES).unwrap();
            decode_row_owned(42, row).unwrap()
        });
    });
}

criterion_group!(benches, decode_benches, matcher_benches, envelope_benches);
criterion_main!(benches);
