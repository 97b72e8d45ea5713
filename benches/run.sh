#!/usr/bin/env bash
# Every benchmark of this repository on this machine, in one Markdown report:
#
#   benches/run.sh                 # writes target/bench-report.md, prints it beside the previous
#   BENCH_PREVIOUS=old.md benches/run.sh    # … beside another report
#
# The previous numbers are the newest report kept in benches/reports/ (copy a run's
# target/bench-report.md there as benches/reports/YYYY-MM-DD.md to keep it); every cell of the
# printed comparison that moved shows the previous value after it (benches/compare.py), and rows
# measured before but not now are listed, so a run shows what changed against the last one kept.
#
# End to end (cargo bench --bench e2e: real node processes, load generator, webhook receiver), the
# job queue beside graphile-worker (benches/run-jobs.sh; needs Node.js and npm), the concurrent
# executor beside the sequential design it replaces (cargo bench --bench concurrency), what change
# capture costs the writer (benches/capture.sh: untracked, per-row and statement triggers), heap
# allocations per event on the in-process path (cargo bench --bench allocations) and the
# criterion micro-benchmarks (condition evaluation, matching, envelope serialization). Needs the
# local PostgreSQL (TEST_DATABASE_URL overrides); the e2e knobs (E2E_*) pass through. The
# sustained steps (3 trials of 10 s each, per node count) run every other 1,000/s first and the
# skipped step below the first rate missed last, so their time grows with half the rates kept;
# E2E_RATES=8000,9000,… starts them higher.
set -euo pipefail
cd "$(dirname "$0")/.."
report=target/bench-report.md
comparison=target/bench-compare.md
mkdir -p target
previous=${BENCH_PREVIOUS:-}
if [ -z "$previous" ] && [ -d benches/reports ]; then
    previous=$(find benches/reports -name '*.md' | sort | tail -n 1)
fi

# "name  time: [low median high]" lines of criterion → Markdown rows with the median.
criterion_rows() {
    awk '
        /time:/ {
            line = $0
            sub(/^[ \t]+/, "", line)
            name = line; sub(/[ \t]*time:.*/, "", name)
            if (name == "") name = previous
            sub(/.*time:[ \t]*\[/, "", line); sub(/\].*/, "", line)
            split(line, parts, " ")
            printf "| %s | %s %s |\n", name, parts[3], parts[4]
        }
        { if ($0 !~ /time:/ && $0 ~ /[a-z]/ && $0 !~ /^(Benchmarking|Warning|Gnuplot|Found|  [0-9])/) previous = $0 }
    '
}

cpu=$(lscpu | awk -F: '/Model name/ {gsub(/^[ \t]+/, "", $2); print $2; exit}')
memory=$(free -g | awk '/^Mem:/ {print $2}')
postgres=$(psql -X -At "${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}" -c 'SHOW server_version' 2>/dev/null || echo unknown)

echo "building the benchmarks…" >&2
cargo bench --locked --no-run --quiet 2>/dev/null

{
    echo "# fraiseql-observers benchmarks"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores ($cpu), ${memory} GiB, PostgreSQL $postgres on the same machine, $(rustc --version | cut -d' ' -f1-2)."
    echo "Everything (PostgreSQL, nodes, load generator, receiver) shares these cores."
    echo
    echo "## End to end (\`cargo bench --bench e2e\`)"
    echo
    # The report file keeps the scenarios' table and the CPU split's table apart.
    cargo bench --locked --quiet --bench e2e >/dev/null 2>&1
    cat target/e2e-report.md
    echo
    echo "## Change capture, PostgreSQL alone (\`benches/capture.sh\`)"
    echo
    benches/capture.sh 2>/dev/null
    echo
    echo "## Job queue beside graphile-worker (\`benches/run-jobs.sh\`)"
    echo
    benches/run-jobs.sh
    echo
    echo "## Concurrent executor beside the sequential design (\`cargo bench --bench concurrency\`)"
    echo
    cargo bench --locked --quiet --bench concurrency 2>/dev/null | grep '^|'
    echo
    echo "## Allocations per event, in-process path (\`cargo bench --bench allocations\`)"
    echo
    cargo bench --locked --quiet --bench allocations 2>/dev/null | grep '^|'
    echo
    echo "## Micro-benchmarks (criterion, \`--quick\`; median)"
    echo
    echo "| benchmark | time |"
    echo "|---|---|"
    cargo bench --locked --quiet --bench condition -- --quick 2>/dev/null | criterion_rows
    cargo bench --locked --quiet --bench pipeline -- --quick 2>/dev/null | criterion_rows
} | tee "$report" >&2
if [ -n "$previous" ]; then
    benches/compare.py "$report" "$previous" > "$comparison"
    cat "$comparison"
    echo >&2
    echo "written to $report; beside $previous in $comparison" >&2
else
    cat "$report"
    echo >&2
    echo "written to $report (no previous report to compare with)" >&2
fi
