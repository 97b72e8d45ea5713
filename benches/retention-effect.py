#!/usr/bin/env python3
"""Does change-log retention slow delivery? The same steady load, with and without pruning.

For each mode (`off`, then `on`): a fresh database whose change log already holds OLD_ROWS
delivered rows a day old (every partition's checkpoint past them), one node started with or
without `--change-log-retention 1m` — with it, the coordinator starts deleting those rows as soon
as it takes the role, 5,000 per transaction — and a writer committing RATE rows/s in 5 statements
per second while a receiver records, for every delivery, the time since its row was written.
Reports per mode: rows written and delivered, delivery latency p50/p99/max, and change-log rows
pruned during the run.

    benches/retention-effect.py [--old-rows 500000] [--rate 500] [--seconds 30] [--binary PATH]

Needs the local PostgreSQL (DATABASE_URL_BASE, default postgres://postgres@127.0.0.1:5432) and a
built binary (default target/release/fraiseql-observers).
"""

import argparse
import datetime
import http.server
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid

BASE_URL = os.environ.get("DATABASE_URL_BASE", "postgres://postgres@127.0.0.1:5432")


def psql(database, sql):
    return subprocess.run(
        ["psql", f"{BASE_URL}/{database}", "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.latencies = {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
        written = datetime.datetime.fromisoformat(body["data"]["written_at"])
        latency = (datetime.datetime.now(datetime.timezone.utc) - written).total_seconds()
        with self.server.lock:
            self.server.latencies.setdefault(self.headers.get("idempotency-key", ""), latency)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def one_mode(binary, retention, old_rows, rate, seconds):
    database = f"retention_{uuid.uuid4().hex[:12]}"
    psql("postgres", f"CREATE DATABASE {database}")
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n"
            f"    actions: [{{type: webhook, url: 'http://127.0.0.1:{receiver.server_address[1]}/orders'}}]\n"
        )
    env = dict(os.environ, DATABASE_URL=f"{BASE_URL}/{database}", RUST_LOG="warn")
    env.pop("REDIS_URL", None)
    subprocess.run([binary, "migrate"], env=env, check=True, capture_output=True)
    psql(
        database,
        "CREATE TABLE orders (id bigint PRIMARY KEY, written_at timestamptz NOT NULL);"
        "SELECT core.observer_track_table('orders'::regclass, 'Order');"
        f"INSERT INTO orders SELECT id, clock_timestamp() FROM generate_series(1, {old_rows}) AS id;"
        "UPDATE core.tb_entity_change_log SET created_at = now() - interval '1 day';",
    )
    # In a transaction of its own, after the rows committed: every partition is past them.
    psql(
        database,
        "INSERT INTO fraiseql_observers.partitions (partition, snapshot)"
        " SELECT partition, pg_current_snapshot() FROM generate_series(0, 7) AS partition",
    )
    psql(database, "VACUUM ANALYZE core.tb_entity_change_log")
    flags = ["--change-log-retention", "1m"] if retention else []
    node = subprocess.Popen(
        [binary, "run", "--config", config.name, "--grpc-listen", f"127.0.0.1:{free_port()}",
         "--http-listen", f"127.0.0.1:{free_port()}", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)
        per_statement = max(1, rate // 5)
        next_id, written, started = old_rows + 1, 0, time.monotonic()
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            psql(
                database,
                f"INSERT INTO orders SELECT id, clock_timestamp() FROM generate_series({next_id}, "
                f"{next_id + per_statement - 1}) AS id",
            )
            next_id += per_statement
            written += per_statement
            time.sleep(max(0.0, 0.2 - (time.monotonic() - tick)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with receiver.lock:
                if len(receiver.latencies) >= written:
                    break
            time.sleep(0.1)
        with receiver.lock:
            latencies = list(receiver.latencies.values())
        left = int(psql(database, "SELECT count(*) FROM core.tb_entity_change_log").strip())
        return {
            "retention": "on" if retention else "off",
            "written": written,
            "delivered": len(latencies),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
            "old_rows": old_rows,
            "pruned": old_rows + written - left,
        }
    finally:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        receiver.shutdown()
        os.unlink(config.name)
        psql("postgres", f"DROP DATABASE {database} WITH (FORCE)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--old-rows", type=int, default=500_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--binary", default="target/release/fraiseql-observers")
    arguments = parser.parse_args()
    for retention in (False, True):
        result = one_mode(arguments.binary, retention, arguments.old_rows, arguments.rate,
                          arguments.seconds)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
