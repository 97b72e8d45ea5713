//! Heap allocations per event on the node's in-process path, stage by stage: parsing the change-log
//! row's JSON text (as the batch read returns it), decoding it into an event, matching it against
//! the observers, building its envelope, and serializing the default webhook body. Counted with
//! dhat's allocator over `ALLOC_EVENTS` events (default 2,000) of an order-shaped row: an UPDATE
//! with before and after images, one matching observer with a condition among 100.
//!
//! Not counted: reading the page from PostgreSQL (sqlx) and the HTTP request (reqwest/hyper), which
//! need a server; and everything per page rather than per event (checkpoint, ledger, history).
//!
//! Run: `cargo bench --bench allocations`. Prints a Markdown table.

use std::hint::black_box;

use fraiseql_observers::listener::{DEFAULT_MAX_ROW_BYTES, decode_row_owned, parse_row_text};
use fraiseql_observers::matcher::Matcher;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[path = "support/observers.rs"]
mod observers;

/// The 100 observers of the other benchmarks and `order-paid`, the one that matches.
fn matcher() -> Matcher {
    observers::large_config(
        "  - name: order-paid\n    entity: Order\n    events: [update]\n    condition: \"data.status == 'paid' && field_changed('status')\"\n    actions: [{type: webhook, url: 'http://127.0.0.1:9/orders'}]\n",
    )
}

/// The JSON text of a change-log row, as `to_jsonb(change)::text` gives it.
fn row_text(position: i64) -> String {
    format!(
        r#"{{"id": "0194f8a2-7c1e-7b3a-9c1d-{position:012x}", "txid": "{txid}", "actor_id": "42", "trace_id": null, "tenant_id": "tenant-a", "object_id": "{position}", "actor_type": "user", "created_at": "2026-12-06T20:00:00.123456+00:00", "entity_hash": 123456789, "object_data": {{"id": {position}, "total": 250, "status": "paid", "customer": {{"tier": "gold", "email": "a@example.com"}}, "items": [{{"sku": "A", "qty": 2}}, {{"sku": "B", "qty": 1}}]}}, "object_type": "Order", "extra_metadata": {{"captured_from": "public.orders"}}, "updated_fields": ["status"], "modification_type": "UPDATE", "object_data_before": {{"id": {position}, "total": 250, "status": "new", "customer": {{"tier": "gold", "email": "a@example.com"}}, "items": [{{"sku": "A", "qty": 2}}, {{"sku": "B", "qty": 1}}]}}, "pk_entity_change_log": {position}}}"#,
        txid = 1000 + position
    )
}

#[derive(Default, Clone, Copy)]
struct Counted {
    blocks: u64,
    bytes: u64,
}

fn counted(work: impl FnOnce()) -> Counted {
    let before = dhat::HeapStats::get();
    work();
    let after = dhat::HeapStats::get();
    Counted {
        blocks: after.total_blocks - before.total_blocks,
        bytes: after.total_bytes - before.total_bytes,
    }
}

fn main() {
    let events: i64 = std::env::var("ALLOC_EVENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000);
    let observers = matcher();
    let texts: Vec<String> = (1..=events).map(row_text).collect();
    let _profiler = dhat::Profiler::builder()
        .testing()
        .trim_backtraces(Some(4))
        .build();

    let mut stages = [Counted::default(); 5];
    let mut bodies = 0_usize;
    for (position, text) in (1..=events).zip(&texts) {
        let size = u64::try_from(text.len()).unwrap();
        let mut row = None;
        let parse = counted(|| {
            row = Some(parse_row_text(position, size, text, DEFAULT_MAX_ROW_BYTES).unwrap());
        });
        let row = row.unwrap();
        let mut event = None;
        let decode = counted(|| event = Some(decode_row_owned(position, row).unwrap()));
        let event = event.unwrap();
        let mut matched = Vec::new();
        let matching = counted(|| {
            matched = observers.matching(&event).collect();
        });
        assert_eq!(matched.len(), 1, "the order-paid observer matches");
        let mut envelope = None;
        let build = counted(|| envelope = Some(event.envelope(matched[0].name.as_str())));
        let envelope = envelope.unwrap();
        let serialize =
            counted(|| bodies += black_box(serde_json::to_vec(&envelope).unwrap()).len());
        for (total, stage) in stages
            .iter_mut()
            .zip([parse, decode, matching, build, serialize])
        {
            total.blocks += stage.blocks;
            total.bytes += stage.bytes;
        }
    }
    assert!(bodies > 0);
    let per_event = |total: u64| {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let value = total as f64 / events as f64;
        value
    };
    println!("| stage (per event, {events} events) | allocations | bytes allocated |");
    println!("|---|---:|---:|");
    let names = [
        "parse the row's JSON text",
        "decode into an event",
        "match (100 observers, one condition)",
        "build the envelope",
        "serialize the default webhook body",
    ];
    let mut all = Counted::default();
    for (name, stage) in names.iter().zip(stages) {
        println!(
            "| {name} | {:.1} | {:.0} |",
            per_event(stage.blocks),
            per_event(stage.bytes)
        );
        all.blocks += stage.blocks;
        all.bytes += stage.bytes;
    }
    println!(
        "| **in-process total** | **{:.1}** | **{:.0}** |",
        per_event(all.blocks),
        per_event(all.bytes)
    );
}
