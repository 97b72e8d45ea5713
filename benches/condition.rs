//! Benchmarks of the condition language: the one-off parse cost of a typical condition and the
//! per-event evaluation cost of a simple, a typical and a larger condition.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fraiseql_observers::condition::Condition;
use fraiseql_observers::domain::{EntityEvent, EventKind};
use serde_json::json;

const TYPICAL_CONDITION: &str = "data.total > 100 && field_changed_to('status', 'paid')";

const LARGER_CONDITION: &str = "event_type in ['INSERT', 'UPDATE'] \
     && data.customer.address.country in ['FR', 'DE', 'ES', 'IT', 'NL', 'BE'] \
     && data.items[0].sku not in ['GIFT-CARD', 'SAMPLE', 'VOID'] \
     && (data.tags contains 'vip' || data.total >= 1000) \
     && changes.status.old in ['new', 'pending'] \
     && data.customer.email contains '@'";

/// A paid order: an UPDATE whose `status` went from `pending` to `paid`.
fn paid_order_event() -> EntityEvent {
    let after = json!({
        "id": 4217,
        "status": "paid",
        "total": 249.9,
        "currency": "EUR",
        "customer": {
            "id": 88,
            "email": "ada@example.com",
            "address": {"city": "Lyon", "country": "FR"}
        },
        "items": [
            {"sku": "BOOK-1", "quantity": 2, "price": 19.95},
            {"sku": "PEN-7", "quantity": 10, "price": 2.5}
        ],
        "tags": ["returning", "vip"]
    });
    let mut before = after.clone();
    before["status"] = json!("pending");
    EntityEvent::new(EventKind::Update, "Order", "4217", after, Some(before))
}

fn parse_benchmarks(criterion: &mut Criterion) {
    criterion.bench_function("condition/parse/typical", |bencher| {
        bencher.iter(|| Condition::parse(black_box(TYPICAL_CONDITION)));
    });
    criterion.bench_function("condition/parse/larger", |bencher| {
        bencher.iter(|| Condition::parse(black_box(LARGER_CONDITION)));
    });
}

fn evaluate_benchmarks(criterion: &mut Criterion) {
    let event = paid_order_event();
    for (name, source) in [
        ("condition/evaluate/simple", "data.total > 100"),
        ("condition/evaluate/typical", TYPICAL_CONDITION),
        ("condition/evaluate/larger", LARGER_CONDITION),
    ] {
        let condition = Condition::parse(source).expect("benchmark conditions parse");
        assert!(
            condition.evaluate(&event),
            "{name} should match the benchmark event"
        );
        criterion.bench_function(name, |bencher| {
            bencher.iter(|| black_box(&condition).evaluate(black_box(&event)));
        });
    }
}

criterion_group!(benches, parse_benchmarks, evaluate_benchmarks);
criterion_main!(benches);
