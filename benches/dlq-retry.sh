#!/usr/bin/env bash
# `dlq retry` of many: N dead letters (default 100,000; half of them with the failed job they
# came from, half from inline failures, without a job) handed back to the job queue by one
# `dlq retry --all`. Prints the progress, the summary, the time and peak RSS, and the queue after.
# Needs a release build (cargo build --release) and the local PostgreSQL; uses database dlqbench.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/fraiseql-observers}
N=${N:-100000}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
psql -q -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS dlqbench" -c "CREATE DATABASE dlqbench"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/dlqbench
$BIN migrate >/dev/null
cat > "$WORK/observers.yaml" <<YAML
observers:
  - name: orders
    entity: Order
    events: [insert]
    actions:
      - {type: webhook, url: 'http://127.0.0.1:9/orders'}
YAML
psql -q -U postgres -h 127.0.0.1 -d dlqbench <<SQL
WITH e AS (
  SELECT g, gen_random_uuid() AS id FROM generate_series(1, $N) g)
, ev AS (
  SELECT g, id, jsonb_build_object('id', id, 'kind', 'INSERT', 'entity_type', 'Order', 'entity_id', g::text,
         'data', jsonb_build_object('id', g, 'total', 10.5, 'note', repeat('x', 200)), 'before', null, 'changes', '{}'::jsonb,
         'tenant_id', null, 'actor', null, 'timestamp', now(), 'position', null, 'trace_id', null) AS event FROM e)
, letters AS (
  INSERT INTO fraiseql_observers.dead_letters (observer, action_index, action_type, error_code, error_message, attempts, event, entity_type, event_id)
  SELECT 'orders', 0, 'webhook', 'OB006',
         'attempt 1 (2026-12-06T01:00:00+00:00): OB006 HTTP 503: busy' || chr(10) || 'attempt 2 (2026-12-06T01:00:01+00:00): OB006 HTTP 503: busy',
         2, event, 'Order', id FROM ev RETURNING 1)
INSERT INTO fraiseql_observers.jobs (id, queue, priority, run_at, max_attempts, backoff_initial_ms, backoff_max_ms,
       idempotency_key, event_id, observer, action_index, action_type, event, status, attempts, finished_at, errors, inline_attempts)
SELECT gen_random_uuid(), 'default', 5, now(), 2, 1000, 60000, id || ':orders:0', id, 'orders', 0, 'webhook', event, 'failed', 2, now(),
       '[]'::jsonb, 0
  FROM ev WHERE g % 2 = 0;
SQL
psql -q -U postgres -h 127.0.0.1 -d dlqbench -Atc "SELECT 'letters', count(*) FROM fraiseql_observers.dead_letters UNION ALL SELECT 'failed jobs', count(*) FROM fraiseql_observers.jobs"
/usr/bin/time -f "peak RSS %M KiB, %e s" $BIN dlq retry --all --config "$WORK/observers.yaml"
psql -q -U postgres -h 127.0.0.1 -d dlqbench -Atc "SELECT 'letters', count(*) FROM fraiseql_observers.dead_letters UNION ALL SELECT status, count(*) FROM fraiseql_observers.jobs GROUP BY status"
