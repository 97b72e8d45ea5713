#!/usr/bin/env bash
# What change capture costs the writer, measured with PostgreSQL alone (no node running):
#
#   benches/capture.sh                 # PGHOST/PGPORT/PGUSER default to 127.0.0.1 / 5432 / postgres
#   CAPTURE_ROWS=100000 CAPTURE_TRIALS=3 CAPTURE_SECONDS=10 benches/capture.sh
#
# One throwaway database with every migration applied and a table shaped like an order
# (bench_orders: id, status, total, customer, updated_at). For each way of capturing —
#   none        the table untracked: PostgreSQL's own cost, the floor
#   row         the per-row capture trigger (core.observer_capture(), FOR EACH ROW)
#   statement   what core.observer_track_table() attaches now, if it differs from row
# — it times a bulk INSERT, UPDATE and DELETE of CAPTURE_ROWS rows (one statement each, median of
# CAPTURE_TRIALS) and runs pgbench for CAPTURE_SECONDS with 2 clients writing 100 rows per
# transaction (what benches/e2e.rs writes) and 1 row per transaction. Prints a Markdown table of
# rows/s and each mode's ratio to none; checks that every mode wrote one change-log row per change.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
MIGRATIONS=$(dirname "$HERE")/migrations
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
ROWS=${CAPTURE_ROWS:-100000}
TRIALS=${CAPTURE_TRIALS:-3}
SECONDS_PER_RUN=${CAPTURE_SECONDS:-10}
PGBENCH=$(command -v pgbench || echo /usr/lib/postgresql/15/bin/pgbench)
DATABASE="fqo_capture_bench_$$"
WORK=$(mktemp -d)

cleanup() {
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS \"$DATABASE\" WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$DATABASE" "$@"; }

psql -X -q -d postgres -c "CREATE DATABASE \"$DATABASE\"" >/dev/null
for file in "$MIGRATIONS"/[0-9][0-9][0-9][0-9]_*.sql; do
    PGOPTIONS="-c client_min_messages=warning" sql --single-transaction -f "$file" >/dev/null
done
sql -c "CREATE TABLE bench_orders (id bigint PRIMARY KEY, status text NOT NULL, total int NOT NULL,
                                   customer text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"

# attach MODE: the capture the next measurements run under.
attach() {
    sql -c "SELECT core.observer_untrack_table('bench_orders'::regclass)" >/dev/null
    case $1 in
        none) ;;
        row) sql -c "CREATE TRIGGER observer_capture AFTER INSERT OR UPDATE OR DELETE ON bench_orders
                     FOR EACH ROW EXECUTE FUNCTION core.observer_capture('Order', 'id')" ;;
        statement) sql -c "SELECT core.observer_track_table('bench_orders'::regclass, 'Order')" >/dev/null ;;
    esac
}

# reset: an empty table and change log, vacuumed, so every trial starts alike.
reset() {
    sql -c "TRUNCATE bench_orders, core.tb_entity_change_log" -c "VACUUM ANALYZE bench_orders" \
        -c "VACUUM ANALYZE core.tb_entity_change_log"
}

# timed SQL: seconds the statement took (client clock, one round trip).
timed() {
    local start end
    start=$(date +%s%N)
    sql -c "$1" >/dev/null
    end=$(date +%s%N)
    echo "$(( (end - start) / 1000 ))"  # microseconds
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

rate() { awk -v rows="$1" -v us="$2" 'BEGIN { printf "%.0f", rows / (us / 1e6) }'; }

# measure MODE: prints "insert update delete batch100 single" rows/s and checks the log.
measure() {
    local mode=$1 insert=() update=() delete=() trial expected logged
    attach "$mode"
    for trial in $(seq "$TRIALS"); do
        reset
        insert+=("$(timed "INSERT INTO bench_orders (id, status, total, customer)
                           SELECT n, 'new', (n % 500)::int, 'customer-' || (n % 977)
                             FROM generate_series(1, $ROWS) AS n")")
        sql -c "VACUUM ANALYZE bench_orders"
        update+=("$(timed "UPDATE bench_orders SET status = 'paid', updated_at = now()")")
        delete+=("$(timed "DELETE FROM bench_orders")")
        logged=$(sql -c "SELECT count(*) FROM core.tb_entity_change_log")
        [ "$mode" = none ] && expected=0 || expected=$(( 3 * ROWS ))
        if [ "$logged" != "$expected" ]; then
            echo "capture $mode: $logged change-log rows for $(( 3 * ROWS )) changes" >&2
            exit 1
        fi
    done
    reset
    cat >"$WORK/batch.sql" <<'EOF'
INSERT INTO bench_orders (id, status, total, customer)
SELECT nextval('bench_ids'), 'new', 1, 'customer-1' FROM generate_series(1, 100);
EOF
    cat >"$WORK/single.sql" <<'EOF'
INSERT INTO bench_orders (id, status, total, customer) VALUES (nextval('bench_ids'), 'new', 1, 'customer-1');
EOF
    sql -c "DROP SEQUENCE IF EXISTS bench_ids" -c "CREATE SEQUENCE bench_ids"
    local batch single
    : >"$WORK/pgbench.err"
    batch=$("$PGBENCH" -n -c 2 -j 2 -T "$SECONDS_PER_RUN" -f "$WORK/batch.sql" "$DATABASE" 2>"$WORK/pgbench.err" \
        | awk '/^tps/ { printf "%.0f", $3 * 100 }')
    reset
    single=$("$PGBENCH" -n -c 2 -j 2 -T "$SECONDS_PER_RUN" -f "$WORK/single.sql" "$DATABASE" 2>"$WORK/pgbench.err" \
        | awk '/^tps/ { printf "%.0f", $3 }')
    echo "$(rate "$ROWS" "$(printf '%s\n' "${insert[@]}" | median)")" \
         "$(rate "$ROWS" "$(printf '%s\n' "${update[@]}" | median)")" \
         "$(rate "$ROWS" "$(printf '%s\n' "${delete[@]}" | median)")" \
         "$batch" "$single"
}

# The statement mode exists only where core.observer_track_table() attaches something other than
# the per-row trigger.
modes="none row"
sql -c "SELECT core.observer_track_table('bench_orders'::regclass, 'Order')" >/dev/null
if [ "$(sql -c "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'bench_orders'::regclass
                 AND NOT tgisinternal AND tgtype & 1 = 0")" != 0 ]; then
    modes="$modes statement"
fi

declare -A results
for mode in $modes; do
    echo "measuring capture: $mode…" >&2
    results[$mode]=$(measure "$mode")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf " (%.2f×)", a / b }'; }

echo "| rows/s ($ROWS rows; pgbench ${SECONDS_PER_RUN} s, 2 clients) | $(for m in $modes; do printf '%s | ' "$m"; done)"
echo "|---|$(for _ in $modes; do printf -- '---:|'; done)"
labels=("bulk INSERT, one statement" "bulk UPDATE, one statement" "bulk DELETE, one statement"
        "INSERT, 100 rows per transaction" "INSERT, 1 row per transaction")
read -r -a none <<<"${results[none]}"
for column in 0 1 2 3 4; do
    printf '| %s |' "${labels[$column]}"
    for mode in $modes; do
        read -r -a values <<<"${results[$mode]}"
        if [ "$mode" = none ]; then
            printf ' %s |' "${values[$column]}"
        else
            printf ' %s%s |' "${values[$column]}" "$(ratio "${values[$column]}" "${none[$column]}")"
        fi
    done
    echo
done
