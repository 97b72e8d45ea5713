#!/usr/bin/env python3
"""A burst against a modest receiver, as a new user meets it.

One node with the default settings, one webhook observer (timeout 5s, max_attempts 5, delays
100 ms-2 s) pointing at Python's standard-library HTTP server (ThreadingHTTPServer: a thread per
connection, an accept backlog of 5), then N inserts of N different entities in one transaction.
Reports, per run, how many distinct changes the receiver saw within the window, when the last
one arrived, the receiver's broken pipes (requests the node gave up on while they were being
answered) and the node's dead letters.

    benches/small-receiver-burst.py [--runs 4] [--changes 200] [--window 30] [--binary PATH] \
        [-- --adaptive-concurrency off]

Needs the local PostgreSQL (DATABASE_URL base, default postgres://postgres@127.0.0.1:5432) and a
built binary (default target/debug/fraiseql-observers).
"""

import argparse
import http.server
import json
import os
import socket
import subprocess
import sys
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
    request_queue_size = 5  # the standard library's default backlog

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.keys = {}
        self.broken_pipes = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        time.sleep(0.02)  # a modest handler
        key = self.headers.get("idempotency-key", "")
        with self.server.lock:
            self.server.keys.setdefault(key, time.monotonic())
        try:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except (BrokenPipeError, ConnectionResetError):
            with self.server.lock:
                self.server.broken_pipes += 1


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_run(binary, changes, window, node_args):
    database = f"burst_{uuid.uuid4().hex[:12]}"
    psql("postgres", f"CREATE DATABASE {database}")
    url = f"{BASE_URL}/{database}"
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            "observers:\n"
            "  - name: orders\n    entity: Order\n    events: [insert]\n"
            "    retry: {max_attempts: 5, initial_delay: 100ms, max_delay: 2s}\n"
            f"    actions: [{{type: webhook, url: 'http://127.0.0.1:{receiver.server_address[1]}/orders',"
            " timeout: 5s}]\n"
        )
    env = dict(os.environ, DATABASE_URL=url, RUST_LOG="warn")
    env.pop("REDIS_URL", None)
    subprocess.run([binary, "migrate"], env=env, check=True, capture_output=True)
    psql(
        database,
        "CREATE TABLE orders (id int PRIMARY KEY, total int);"
        "SELECT core.observer_track_table('orders'::regclass, 'Order');",
    )
    node = subprocess.Popen(
        [binary, "run", "--config", config.name, "--grpc-listen", f"127.0.0.1:{free_port()}",
         "--http-listen", f"127.0.0.1:{free_port()}", *node_args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(os.environ.get("BURST_NODE_LOG", os.devnull), "a"),
    )
    try:
        time.sleep(2)  # leases taken
        started = time.monotonic()
        psql(database, f"INSERT INTO orders SELECT id, id FROM generate_series(1, {changes}) AS id")
        while time.monotonic() - started < window:
            with receiver.lock:
                if len(receiver.keys) >= changes:
                    break
            time.sleep(0.05)
        with receiver.lock:
            seen = len(receiver.keys)
            last = max(receiver.keys.values(), default=started) - started
            broken = receiver.broken_pipes
        dead = int(psql(database, "SELECT count(*) FROM fraiseql_observers.dead_letters").strip())
        return {"delivered": seen, "of": changes, "last_delivery_s": round(last, 2),
                "broken_pipes": broken, "dead_letters": dead}
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
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--binary", default="target/debug/fraiseql-observers")
    parser.add_argument("node_args", nargs="*", help="more flags for `run` (after --)")
    arguments = parser.parse_args()
    for run in range(1, arguments.runs + 1):
        result = one_run(arguments.binary, arguments.changes, arguments.window, arguments.node_args)
        print(json.dumps({"run": run, **result}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
