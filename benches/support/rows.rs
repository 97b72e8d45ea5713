//! Change-log rows as the benchmarks' node reads them.

/// The JSON text of the change-log row at `position`, as the page read sends it: an order's
/// UPDATE with both images.
pub fn order_update_text(position: i64) -> String {
    format!(
        r#"{{"id": "0194f8a2-7c1e-7b3a-9c1d-{position:012x}", "txid": "{txid}", "actor_id": "42", "trace_id": null, "tenant_id": "tenant-a", "object_id": "{position}", "actor_type": "user", "created_at": "2026-12-06T20:00:00.123456+00:00", "entity_hash": 123456789, "object_data": {{"id": {position}, "total": 250, "status": "paid", "customer": {{"tier": "gold", "email": "a@example.com"}}, "items": [{{"sku": "A", "qty": 2}}, {{"sku": "B", "qty": 1}}]}}, "object_type": "Order", "extra_metadata": {{"captured_from": "public.orders"}}, "updated_fields": ["status"], "modification_type": "UPDATE", "object_data_before": {{"id": {position}, "total": 250, "status": "new", "customer": {{"tier": "gold", "email": "a@example.com"}}, "items": [{{"sku": "A", "qty": 2}}, {{"sku": "B", "qty": 1}}]}}, "pk_entity_change_log": {position}}}"#,
        txid = 1000 + position
    )
}
