#!/usr/bin/env bash
# Tests for the SQL migrations, against a real PostgreSQL (13+).
#
#   migrations/tests/run.sh            # PGHOST/PGPORT/PGUSER default to 127.0.0.1 / 5432 / postgres
#
# Creates throwaway databases named fqo_sqltest_<unique>_*, applies the migrations the way the
# service does (each file in its own transaction, under an advisory lock), runs the scenarios and
# drops every database it created, whatever happens. Needs psql, pg_dump and pgbench on PATH and
# the dblink and auto_explain contrib modules on the server (a superuser, for LOAD auto_explain).
# Prints one line per test and "N passed, M failed"; exits non-zero if anything failed.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
MIGRATIONS=$(dirname "$HERE")
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
export PGDATABASE=postgres PGAPPNAME=fqo_sqltest
# Key of the advisory lock the runner takes around each migration (any constant works here).
MIGRATION_LOCK_KEY=7146210301
PREFIX="fqo_sqltest_$(date +%s)_$$_${RANDOM}"
WORK=$(mktemp -d)
PASSED=0
FAILED=0

psql_quiet() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
    local job database
    # Background processes started by tests (listed in a file: tests run in $(…) subshells).
    if [ -f "$WORK/jobs" ]; then
        while read -r job; do
            kill "$job" 2>/dev/null
        done <"$WORK/jobs"
    fi
    # Databases are listed in a file: create_database runs in $(…) subshells.
    if [ -f "$WORK/databases" ]; then
        while read -r database; do
            psql_quiet -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 \
                || echo "warning: could not drop database $database" >&2
        done <"$WORK/databases"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# create_database NAME [TEMPLATE]: a new empty database (or a copy of TEMPLATE), dropped at exit.
create_database() {
    local name="${PREFIX}_$1" template=${2:-template0}
    echo "$name" >>"$WORK/databases"
    psql_quiet -c "CREATE DATABASE \"$name\" TEMPLATE \"$template\"" >/dev/null || return 1
    echo "$name"
}

# apply_migrations DATABASE: every migration, in order, each in one transaction under the lock.
apply_migrations() {
    local database=$1 file
    for file in "$MIGRATIONS"/[0-9][0-9][0-9][0-9]_*.sql; do
        PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" \
            psql_quiet --single-transaction -d "$database" \
            -c "SELECT pg_advisory_xact_lock($MIGRATION_LOCK_KEY)" -f "$file" >/dev/null || {
            echo "migration $(basename "$file") failed on $database" >&2
            return 1
        }
    done
}

# connection string for dblink, to DATABASE
conninfo() { echo "host=$PGHOST port=$PGPORT user=$PGUSER dbname=$1 application_name=fqo_sqltest_peer"; }

# run_scenario FILE: a fresh copy of the migrated database, FILE run in it; fails on any error.
run_scenario() {
    local file=$1 database
    database=$(create_database "$(basename "$file" .sql)" "$BASE") || return 1
    psql_quiet -d "$database" -v conn="$(conninfo "$database")" -f "$HERE/$file" >/dev/null
}

# check NAME COMMAND...: runs one test, records pass/fail, shows the output of a failure.
check() {
    local name=$1 output
    shift
    if output=$("$@" 2>&1); then
        PASSED=$((PASSED + 1))
        echo "ok     $name"
        [ -n "${VERBOSE:-}" ] && [ -n "$output" ] && sed 's/^/       /' <<<"$output"
    else
        FAILED=$((FAILED + 1))
        echo "FAILED $name"
        sed 's/^/       /' <<<"$output"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# Tests that need the shell (several sessions, pg_dump, pgbench, psql output)
# ---------------------------------------------------------------------------------------------

# (\restrict lines carry a random key per dump.)
schema_dump() { pg_dump --schema-only --no-owner -d "$1" | grep -Ev '^(--|$|\\(un)?restrict )'; }

# Applying the migrations a second time changes nothing.
test_idempotent() {
    local database
    database=$(create_database idempotent) || return 1
    apply_migrations "$database" || return 1
    schema_dump "$database" >"$WORK/once.sql" || return 1
    apply_migrations "$database" || return 1
    schema_dump "$database" >"$WORK/twice.sql" || return 1
    diff -u "$WORK/once.sql" "$WORK/twice.sql"
}

# One NOTIFY on fraiseql_observers_change_log per committed writing transaction, none on rollback,
# none when the session (or database, or role) sets fraiseql_observers.notify = off.
test_notify() {
    local database output count
    database=$(create_database notify "$BASE") || return 1
    output=$(psql -X -v ON_ERROR_STOP=1 -d "$database" \
        -c "CREATE TABLE public.orders (id int PRIMARY KEY, status text)" \
        -c "SELECT core.observer_track_table('public.orders'::regclass, 'Order')" \
        -c "LISTEN fraiseql_observers_change_log" \
        -c "INSERT INTO public.orders SELECT g, 'new' FROM generate_series(1, 5) AS g" \
        -c "SELECT 'after first insert'" \
        -c "BEGIN" -c "INSERT INTO public.orders VALUES (10, 'x')" -c "ROLLBACK" \
        -c "SELECT 'after rollback'" \
        -c "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type) VALUES ('Order', '7', 'CUSTOM')" \
        -c "SELECT 'after direct insert'" \
        -c "SET fraiseql_observers.notify = off" \
        -c "INSERT INTO public.orders VALUES (11, 'quiet')" \
        -c "SELECT 'after insert with notify off'" 2>&1) || { echo "$output"; return 1; }
    count=$(grep -c 'Asynchronous notification "fraiseql_observers_change_log" received' <<<"$output")
    if [ "$count" != 2 ]; then
        echo "expected 2 notifications (5-row insert, direct insert; none for the rollback or with notify = off), got $count"
        echo "$output"
        return 1
    fi
}

# The payload names the partitions of the inserted rows (entity_hash % the recorded count, in
# order), also for a writer that cannot see the service's schema; empty before a count is recorded.
test_notify_partitions() {
    local database output status expected role="${PREFIX}_writer"
    database=$(create_database notifyparts "$BASE") || return 1
    psql_quiet -d "$database" \
        -c "CREATE TABLE public.orders (id int PRIMARY KEY, status text)" \
        -c "SELECT core.observer_track_table('public.orders'::regclass, 'Order')" \
        -c "CREATE ROLE \"$role\"" \
        -c "GRANT USAGE ON SCHEMA core TO \"$role\"" \
        -c "GRANT INSERT ON core.tb_entity_change_log, public.orders TO \"$role\"" >/dev/null || return 1
    output=$(psql -X -v ON_ERROR_STOP=1 -d "$database" \
        -c "LISTEN fraiseql_observers_change_log" \
        -c "INSERT INTO public.orders VALUES (1, 'before the count')" \
        -c "SELECT fraiseql_observers.register_partition_count(4)" \
        -c "SET ROLE \"$role\"" \
        -c "INSERT INTO public.orders SELECT g, 'new' FROM generate_series(2, 6) AS g" \
        -c "INSERT INTO public.orders VALUES (7, 'one')" \
        -c "RESET ROLE" 2>&1)
    status=$?
    psql_quiet -d "$database" -c "DROP OWNED BY \"$role\"" -c "DROP ROLE \"$role\"" >/dev/null
    [ "$status" -eq 0 ] || { echo "$output"; return 1; }
    expected=$(psql_quiet -At -d "$database" -c "
        SELECT string_agg(payload, '|' ORDER BY batch) FROM (
            SELECT batch, string_agg(DISTINCT partition::text, ',') AS payload
              FROM (SELECT CASE WHEN g = 7 THEN 2 ELSE 1 END AS batch,
                           core.observer_entity_hash('Order', g::text) % 4 AS partition
                      FROM generate_series(2, 7) AS g) AS row_partition
             GROUP BY batch) AS per_statement") || return 1
    local got
    got=$(grep -o 'Asynchronous notification "fraiseql_observers_change_log"[^.]*' <<<"$output" \
        | sed -E 's/.*with payload "([^"]*)".*/\1/; t; s/.*/(empty)/' | paste -sd'|')
    if [ "$got" != "(empty)|$expected" ]; then
        echo "expected payloads (empty)|$expected, got $got"
        echo "$output"
        return 1
    fi
}

# Re-applying the migrations on a live database does not wait for (or block) FraiseQL's writers:
# with a write transaction open on the change log, they complete under a 2 s lock_timeout —
# where a plain CREATE INDEX IF NOT EXISTS on the change log would time out.
test_migrations_do_not_block_writers() {
    local database holder_pid deadline result status=0 holder="${PREFIX}_holder"
    database=$(create_database noblock "$BASE") || return 1
    PGAPPNAME=$holder psql -X -q -d "$database" \
        -c "BEGIN" \
        -c "INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type) VALUES ('Order', '1', 'INSERT')" \
        -c "SELECT pg_sleep(120)" >/dev/null 2>&1 &
    holder_pid=$!
    echo "$holder_pid" >>"$WORK/jobs"
    deadline=$((SECONDS + 15))
    until [ "$(psql_quiet -At -d "$database" -c "SELECT count(*) FROM pg_locks AS lock
                JOIN pg_stat_activity AS activity USING (pid)
               WHERE activity.application_name = '$holder' AND lock.granted
                 AND activity.datname = current_database()
                 AND lock.relation = 'core.tb_entity_change_log'::regclass
                 AND lock.mode = 'RowExclusiveLock'")" = 1 ]; do
        [ $SECONDS -lt $deadline ] || { echo "the holder never took its lock"; status=1; break; }
        sleep 0.1
    done
    if [ $status -eq 0 ]; then
        PGOPTIONS="-c lock_timeout=2s" apply_migrations "$database" || {
            echo "re-applying the migrations waited for the open writer"; status=1; }
        result=$(PGOPTIONS="-c lock_timeout=1s" psql -X -q -d "$database" \
            -c "CREATE INDEX IF NOT EXISTS tb_entity_change_log_txid_idx ON core.tb_entity_change_log (txid)" 2>&1)
        grep -q 'lock timeout' <<<"$result" || {
            echo "control failed: CREATE INDEX IF NOT EXISTS was expected to wait for the writer: $result"; status=1; }
    fi
    psql_quiet -d "$database" -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                   WHERE application_name = '$holder' AND datname = current_database()" >/dev/null
    wait "$holder_pid" 2>/dev/null
    return $status
}

# First install on an existing change log while a long transaction holds it: the migration gives
# up after its 5 s lock_timeout instead of queueing FraiseQL's writers behind it indefinitely, and
# succeeds once the transaction is gone.
test_first_install_gives_up_on_busy_log() {
    local database holder_pid deadline started elapsed output status=0 holder="${PREFIX}_busy"
    database=$(create_database busy) || return 1
    psql_quiet -d "$database" -f "$HERE/legacy_setup.sql" >/dev/null || return 1
    PGAPPNAME=$holder psql -X -q -d "$database" \
        -c "BEGIN" -c "SELECT count(*) FROM core.tb_entity_change_log" -c "SELECT pg_sleep(120)" >/dev/null 2>&1 &
    holder_pid=$!
    echo "$holder_pid" >>"$WORK/jobs"
    deadline=$((SECONDS + 15))
    until [ "$(psql_quiet -At -d "$database" -c "SELECT count(*) FROM pg_locks AS lock
                JOIN pg_stat_activity AS activity USING (pid)
               WHERE activity.application_name = '$holder' AND activity.datname = current_database()
                 AND lock.granted AND lock.relation = 'core.tb_entity_change_log'::regclass")" = 1 ]; do
        [ $SECONDS -lt $deadline ] || { echo "the holder never took its lock"; status=1; break; }
        sleep 0.1
    done
    if [ $status -eq 0 ]; then
        started=$SECONDS
        if output=$(apply_migrations "$database" 2>&1); then
            echo "the first install did not wait for the open transaction"; status=1
        elif ! grep -q 'lock timeout' <<<"$output"; then
            echo "expected a lock timeout, got: $output"; status=1
        fi
        elapsed=$((SECONDS - started))
        [ $elapsed -le 12 ] || { echo "gave up only after ${elapsed}s"; status=1; }
    fi
    psql_quiet -d "$database" -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                   WHERE application_name = '$holder' AND datname = current_database()" >/dev/null
    wait "$holder_pid" 2>/dev/null
    [ $status -eq 0 ] || return 1
    apply_migrations "$database" || { echo "the retry failed"; return 1; }
    psql_quiet -d "$database" -f "$HERE/legacy.sql" >/dev/null
}

# Several nodes migrating a fresh database at once, each under the advisory lock: all succeed.
test_concurrent_migrations() {
    local database pids=() pid status=0
    database=$(create_database concurrent) || return 1
    for _ in 1 2 3; do
        apply_migrations "$database" >"$WORK/concurrent.$_.log" 2>&1 &
        pids+=($!)
        echo "$!" >>"$WORK/jobs"
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || status=1
    done
    [ $status -eq 0 ] || { cat "$WORK"/concurrent.*.log; return 1; }
    psql_quiet -At -d "$database" -c "SELECT count(*) FROM pg_trigger
        WHERE tgrelid = 'core.tb_entity_change_log'::regclass AND NOT tgisinternal" | grep -qx 2 \
        || { echo "expected exactly 2 triggers on the change log"; return 1; }
}

# Installing on an existing FraiseQL change log with history.
test_legacy_change_log() {
    local database
    database=$(create_database legacy) || return 1
    psql_quiet -d "$database" -f "$HERE/legacy_setup.sql" >/dev/null || return 1
    apply_migrations "$database" || return 1
    apply_migrations "$database" || return 1
    psql_quiet -d "$database" -f "$HERE/legacy.sql" >/dev/null
}

# Concurrent writers (pgbench: late commits, aborts, savepoints) and two crashing readers sharing
# 4 partitions; then a final drain. Every row exactly once, per-entity order kept.
test_stress() {
    local database readers=() pid status=0 stop_at
    database=$(create_database stress "$BASE") || return 1
    psql_quiet -d "$database" -f "$HERE/stress_setup.sql" >/dev/null || return 1
    stop_at=$(psql_quiet -At -d "$database" -c "SELECT now() + interval '${STRESS_SECONDS:-4} seconds' + interval '1 second'")
    for partitions in '{0,1}' '{2,3}'; do
        # (statement_timeout: a reader that never stops fails the test instead of hanging it.)
        PGOPTIONS="-c statement_timeout=60s" psql_quiet -d "$database" \
            -c "CALL public.consume('$partitions', 4, '$stop_at', 13, 0.05)" >"$WORK/reader.$partitions.log" 2>&1 &
        readers+=($!)
        echo "$!" >>"$WORK/jobs"
    done
    pgbench -n -c 4 -j 2 -T "${STRESS_SECONDS:-4}" -f "$HERE/stress_writer.sql" "$database" \
        >"$WORK/pgbench.log" 2>&1 || { echo "pgbench failed:"; cat "$WORK/pgbench.log"; status=1; }
    for pid in "${readers[@]}"; do
        wait "$pid" || status=1
    done
    [ $status -eq 0 ] || { cat "$WORK"/reader.*.log; return 1; }
    # Final drain, no crashes: picks up whatever the readers had not reached when they stopped.
    PGOPTIONS="-c statement_timeout=60s" psql_quiet -d "$database" \
        -c "CALL public.consume('{0,1,2,3}', 4, now(), 13, 0)" || return 1
    grep -E 'number of transactions actually processed|number of failed' "$WORK/pgbench.log"
    psql_quiet -d "$database" -f "$HERE/stress_check.sql" >/dev/null
}

main() {
    BASE=$(create_database base) || { echo "cannot create databases" >&2; exit 1; }
    apply_migrations "$BASE" && apply_migrations "$BASE" || { echo "migrations failed" >&2; exit 1; }
    psql_quiet -d "$BASE" -c "CREATE EXTENSION IF NOT EXISTS dblink" >/dev/null || exit 1

    check "migrations are idempotent (second run leaves the schema identical)" test_idempotent
    check "tracking: images, updated_fields, no-op updates, re-track, untrack, refusals" \
        run_scenario tracking.sql
    check "direct FraiseQL-style inserts get txid and entity_hash; notify trigger per statement" \
        run_scenario direct_insert.sql
    check "service tables: fenced checkpoints (epoch + version CAS), processed_actions, dead_letters" \
        run_scenario checkpoint.sql
    check "reader: first start, keyset paging, partition filter, refuses unsafe snapshots" \
        run_scenario reader.sql
    check "read_page: read_batch's rows as JSON text, row and byte bounds, empty and cut pages" \
        run_scenario read_page.sql
    check "late commit: a transaction committing after later rows were read is delivered next" \
        run_scenario late_commit.sql
    check "long transaction: an open old xid does not hold back rows committed after it" \
        run_scenario long_transaction.sql
    check "cost: a small or empty batch after 200k processed rows reads only the txid index" \
        run_scenario cost.sql

    check "notify: one wake-up per committed writing transaction, none on rollback or when off" \
        test_notify
    check "notify payload: the partitions of the inserted rows, for a writer without the service's schema" \
        test_notify_partitions
    check "re-applying migrations on a live database does not block FraiseQL's writers" \
        test_migrations_do_not_block_writers
    check "three nodes migrating a fresh database at once (advisory lock) all succeed" \
        test_concurrent_migrations
    check "existing FraiseQL change log: additive, no rewrite, history not delivered" \
        test_legacy_change_log
    check "first install on a busy existing log gives up after 5 s (lock_timeout), then succeeds" \
        test_first_install_gives_up_on_busy_log
    check "stress: concurrent writers + crashing partitioned readers, exactly once, in order" \
        test_stress

    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

main "$@"
