#!/usr/bin/env bash
# Job-queue comparison on this machine: fraiseql-observers' queue (cargo bench --bench jobs) and
# graphile-worker (benches/graphile) with the same number of trivial jobs enqueued first, then
# claimed and completed by 1 and 4 workers — one job per claim on both sides, then both sides
# batched —, our ordered backlog drain (no counterpart there) and pickup latency; prints a
# Markdown table. Needs the local PostgreSQL and Node.js with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
export JOBS="${JOBS:-20000}"

ours=$(cargo bench --quiet --bench jobs 2>/dev/null | tail -n 1)
(cd benches/graphile && npm ci --silent --no-audit --no-fund >/dev/null)
theirs=$(cd benches/graphile && node bench.mjs 2>/dev/null | tail -n 1)

python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
name = f"graphile-worker {theirs.get('version', '')}".strip()
batched = theirs.get("throughput_batched") or {}
claims = ours.get("claim_batch", 16)
# Enqueueing is outside the timer on both sides: the rows time claiming and completing.
print(f"| {ours['jobs']:,} trivial jobs, local PostgreSQL, plain TCP on both sides | fraiseql-observers | {name} | ratio |")
print("|---|---|---|---|")
for workers in ("1", "4"):
    a, b = ours["throughput_single"][workers], theirs["throughput"][workers]
    print(f"| claim + complete, {workers} worker(s), one job per claim (theirs: defaults) | {a:,.0f} jobs/s | {b:,.0f} jobs/s | {a / b:.2f}× |")
for workers in ("1", "4"):
    a, c = ours["throughput"][workers], batched.get(workers)
    theirs_cell = f"{c:,.0f} jobs/s | {a / c:.2f}×" if c else "– | –"
    print(f"| claim + complete, {workers} worker(s), batched (ours: claims of {claims}; theirs: local queue 16, batched completion) | {a:,.0f} jobs/s | {theirs_cell} |")
ordered = ours.get("ordered_drain")
if ordered:
    # graphile-worker has no per-entity order across one queue's jobs to compare with.
    backlog = ours.get("ordered_backlog", {"entities": 200, "per_entity": 60})
    entities, jobs = backlog["entities"], backlog["entities"] * backlog["per_entity"]
    print(f"| ordered backlog drain, 1 worker, claims of {claims} ({jobs:,} jobs over {entities:,} entities, one at a time per entity) | {ordered:,.0f} jobs/s | – | |")
pickup = theirs.get("pickup_db_ms") or theirs["pickup_ms"]
for key in ("p50", "p99", "max"):
    print(f"| pickup {key} (enqueue commit → claim, in the database) | {ours['pickup_ms'][key]:.1f} ms | {pickup[key]:.1f} ms | |")
PY
