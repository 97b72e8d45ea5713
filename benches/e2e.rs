//! End-to-end numbers: real `fraiseql-observers run` processes (the binary this build made) on the
//! local PostgreSQL, a load generator writing through a tracked table, and a keep-alive webhook
//! receiver in this process that records when each event arrives.
//!
//! Scenarios (each on its own fresh database):
//! - latency: one node, single-row transactions at a fixed rate; commit-to-delivery p50…max;
//! - sustained: 1, 2 and 3 nodes, the generator writing at fixed rates stepped up by 1,000/s until
//!   delivery falls behind; a step is kept up when the median of `E2E_TRIALS` runs (default 3)
//!   delivered at least 99.5 % of what was written in the window, ended the window with no more
//!   undelivered events than it started with (± one second of writing), and had p99 ≤ 250 ms; the
//!   highest step kept up and the first missed (with what it missed), each with the measured
//!   delivered rate, latency, node RSS and CPU, checkpoint writes/s, machine CPU;
//! - overload: one node, the generator writing as fast as it can;
//! - backlog: a backlog of committed changes drained by one node; events/s and peak RSS;
//! - checkpoint store: fenced compare-and-swap saves on 16 partitions at once;
//! - cpu: one node at `E2E_CPU_RATE` events/s (default 3,000, a rate it keeps): the CPU its window
//!   used per delivered event, split by process — the node, PostgreSQL's backends serving it, those
//!   serving the writers (their INSERTs and the capture), PostgreSQL's background processes, this
//!   process (generator and receiver) and the rest of the machine — and the rates the machine's
//!   cores could give at that cost, with and without the service's own share;
//! - small receiver: a burst of changes to distinct orders, committed in one transaction, delivered
//!   by one node to a receiver of limited capacity (`E2E_SMALL_WORKERS` requests at once, default 4,
//!   each `E2E_SMALL_SERVICE_MS`, default 20, from an accept queue `E2E_SMALL_BACKLOG` long, default
//!   4, one request per connection); delivered events/s as a share of the receiver's capacity, and
//!   commit-to-delivery latency, with the adaptive concurrency limit on and off (fixed 256 in
//!   flight) side by side. `E2E_SMALL_EVENTS` sets the burst (default: `E2E_SECONDS` of capacity).
//!
//! Run: `cargo bench --bench e2e` (needs the local PostgreSQL; `TEST_DATABASE_URL` overrides).
//! Knobs: `E2E_RATE` (latency, events/s, default 1000), `E2E_SECONDS` (sustained window, default
//! 10), `E2E_RATES` (the sustained steps, default 3000 to 20000 by 1000; every other step is run
//! first, and the one skipped below the first rate missed decides between them), `E2E_TRIALS`
//! (runs per step, default 3), `E2E_BACKLOG` (default 1,000,000), `E2E_NODES` (default `1,2,3`), `E2E_ONLY` (`latency,sustained,overload,backlog,checkpoint,cpu,small`), `E2E_CAPTURE=row`
//! (capture with the per-row trigger instead of the statement triggers). The nodes inherit
//! the environment: `FRAISEQL_OBSERVERS_ADAPTIVE_CONCURRENCY=off` runs every other scenario with
//! the adaptive limit off. Prints a Markdown table and writes it to `target/e2e-report.md`.
//!
//! Every event is a new order, so the receiver counts **distinct events** (by entity id, at their
//! first arrival) and reports any repeated delivery in the `duplicates` column (counted until the
//! scenario's end, after the drain); a scenario whose latencies matched no commit fails instead of
//! printing zeros.

#[path = "../tests/common/postgres.rs"]
#[allow(dead_code, reason = "shared with the tests")]
mod postgres;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use fraiseql_observers::checkpoint::{BatchPosition, CheckpointStore, PostgresCheckpointStore};
use postgres::TestDatabase;
use sqlx::PgPool;
use tokio::net::TcpListener;

const BINARY: &str = env!("CARGO_BIN_EXE_fraiseql-observers");
/// Rows per commit of the as-fast-as-possible generator.
const ROWS_PER_COMMIT: i64 = 100;
/// Connections the as-fast-as-possible generator writes on.
const WRITERS: usize = 2;
/// Rows per commit while building a backlog.
const BACKLOG_ROWS_PER_COMMIT: i64 = 10_000;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |value| {
        value
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number"))
    })
}

fn wanted(scenario: &str) -> bool {
    std::env::var("E2E_ONLY").map_or(true, |only| {
        only.split(',').any(|name| name.trim() == scenario)
    })
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// The receiver: records the arrival time of every delivered entity id.

/// What arrived: each event (a distinct entity id: every change of a run writes a new order)
/// counted once, at its first arrival; any later delivery of it counted as a duplicate.
#[derive(Default)]
struct Arrivals {
    /// Distinct events delivered.
    count: AtomicU64,
    /// Deliveries of an event that had arrived before.
    duplicates: AtomicU64,
    /// Requests whose body named no entity id (none expected).
    unmatched: AtomicU64,
    /// Entity id → first arrival.
    first: Mutex<HashMap<i64, Instant>>,
}

impl Arrivals {
    fn record(&self, id: Option<i64>, at: Instant) {
        let Some(id) = id else {
            self.unmatched.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut first = self.first.lock().expect("arrivals lock");
        if let std::collections::hash_map::Entry::Vacant(entry) = first.entry(id) {
            entry.insert(at);
            self.count.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// The latest first arrival.
    fn last(&self) -> Option<Instant> {
        self.first
            .lock()
            .expect("arrivals lock")
            .values()
            .max()
            .copied()
    }
}

struct Receiver {
    url: String,
    arrivals: Arc<Arrivals>,
    server: tokio::task::JoinHandle<()>,
}

/// The entity id of a webhook body without parsing the whole envelope: `"entity_id":"<digits>"`.
fn entity_id(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"entity_id\":\"";
    let start = body.windows(KEY.len()).position(|window| window == KEY)? + KEY.len();
    let digits = body[start..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    std::str::from_utf8(&body[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let address = listener.local_addr().expect("receiver address");
        let arrivals = Arc::new(Arrivals::default());
        let state = arrivals.clone();
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let state = state.clone();
            async move {
                state.record(entity_id(&body), Instant::now());
                axum::http::StatusCode::OK
            }
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Receiver {
            url: format!("http://{address}/events"),
            arrivals,
            server,
        }
    }

    fn count(&self) -> u64 {
        self.arrivals.count.load(Ordering::Relaxed)
    }

    async fn wait_for(&self, count: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.count() < count {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A receiver of limited capacity.

/// What the small receiver can take (see the module header).
#[derive(Clone, Copy, Debug)]
struct Capacity {
    workers: usize,
    service: Duration,
    backlog: u32,
}

impl Capacity {
    fn per_second(self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "a handful of workers")]
        let workers = self.workers as f64;
        workers / self.service.as_secs_f64()
    }
}

/// `workers` tasks, each accepting one connection, reading one request, waiting the service time,
/// answering 200 with `connection: close`; the rest wait in an accept queue `backlog` long, and
/// past it the kernel drops their SYN (the client retransmits it a second later). An arrival is
/// recorded once the answer is written.
struct SmallReceiver {
    url: String,
    arrivals: Arc<Arrivals>,
    /// Answered requests per entity id (each event of the burst is a distinct order).
    answered: Arc<Mutex<HashMap<i64, u32>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// The largest request (head and body) the small receiver reads.
const SMALL_MAX_REQUEST: usize = 1 << 20;

impl SmallReceiver {
    fn start(capacity: Capacity) -> SmallReceiver {
        let socket = tokio::net::TcpSocket::new_v4().expect("receiver socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind the small receiver");
        let listener = Arc::new(
            socket
                .listen(capacity.backlog)
                .expect("small receiver listens"),
        );
        let address = listener.local_addr().expect("receiver address");
        let arrivals = Arc::new(Arrivals::default());
        let answered = Arc::new(Mutex::new(HashMap::new()));
        let workers = (0..capacity.workers)
            .map(|_| {
                let listener = listener.clone();
                let arrivals = arrivals.clone();
                let answered = answered.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        if let Some(id) = answer_one(stream, capacity.service).await {
                            arrivals.record(Some(id), Instant::now());
                            *answered
                                .lock()
                                .expect("answered lock")
                                .entry(id)
                                .or_default() += 1;
                        }
                    }
                })
            })
            .collect();
        SmallReceiver {
            url: format!("http://{address}/events"),
            arrivals,
            answered,
            workers,
        }
    }

    /// Distinct entities answered.
    fn distinct(&self) -> u64 {
        self.answered.lock().expect("answered lock").len() as u64
    }

    /// Answers beyond the first per entity.
    fn repeated(&self) -> u64 {
        self.answered
            .lock()
            .expect("answered lock")
            .values()
            .map(|count| u64::from(count - 1))
            .sum()
    }
}

impl Drop for SmallReceiver {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}

/// Reads one request, waits `service`, answers and closes; the entity id once answered.
async fn answer_one(mut stream: tokio::net::TcpStream, service: Duration) -> Option<i64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > SMALL_MAX_REQUEST {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
        .min(SMALL_MAX_REQUEST);
    while buffer.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    tokio::time::sleep(service).await;
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
    let written = stream.write_all(answer).await.is_ok();
    let _ = stream.shutdown().await;
    if written {
        entity_id(&buffer[head_end..head_end + length])
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Node processes and what they cost.

struct Node {
    child: Child,
    pid: u32,
}

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn write_config(receiver: &Receiver) -> PathBuf {
    let path = scratch_dir().join("observers.yaml");
    std::fs::write(
        &path,
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    actions:\n      - type: webhook\n        url: {}\n",
            receiver.url
        ),
    )
    .expect("write the observers file");
    path
}

/// The node's connection string: without TLS unless `E2E_DATABASE_TLS=1` (the database is on
/// this host; TLS would cost both sides CPU for no protection here).
fn database_url(database: &TestDatabase) -> String {
    if std::env::var("E2E_DATABASE_TLS").is_ok_and(|value| value == "1") {
        database.url.clone()
    } else {
        format!("{}?sslmode=disable", database.url)
    }
}

impl Node {
    fn spawn(database: &TestDatabase, config: &std::path::Path, index: usize) -> Node {
        Node::spawn_with(database, config, index, &[])
    }

    /// A node with extra environment variables (e.g. its adaptive concurrency setting).
    fn spawn_with(
        database: &TestDatabase,
        config: &std::path::Path,
        index: usize,
        environment: &[(&str, &str)],
    ) -> Node {
        let log = std::fs::File::create(scratch_dir().join(format!("node-{index}.log")))
            .expect("node log");
        let child = Command::new(BINARY)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--node-id", &format!("e2e-{index}")])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("DATABASE_URL", database_url(database))
            .env_remove("REDIS_URL")
            .env(
                "RUST_LOG",
                // Info for the service's own target: the line naming its metrics address.
                std::env::var("E2E_RUST_LOG")
                    .unwrap_or_else(|_| "warn,fraiseql_observers=info".to_owned()),
            )
            .envs(environment.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {BINARY}: {error}"));
        let pid = child.id();
        Node { child, pid }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// Samples the nodes' RSS while running; CPU from the first to the last reading.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Usage>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    peak_rss: u64,
    /// CPU seconds used by all nodes together.
    node_cpu: f64,
    /// Share of the machine's CPU that was busy (0..=1).
    machine_busy: f64,
    elapsed: Duration,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let ticks = clock_ticks_per_second();
            let started = Instant::now();
            let cpu_at_start: u64 = pids.iter().filter_map(|pid| cpu_ticks(*pid)).sum();
            let machine_at_start = machine_ticks();
            let mut peak_rss = 0;
            let mut cpu_now = cpu_at_start;
            while !flag.load(Ordering::Relaxed) {
                let rss: u64 = pids
                    .iter()
                    .filter_map(|pid| rss_bytes(*pid))
                    .max()
                    .unwrap_or(0);
                peak_rss = peak_rss.max(rss);
                cpu_now = pids.iter().filter_map(|pid| cpu_ticks(*pid)).sum();
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            let machine_now = machine_ticks();
            #[allow(clippy::cast_precision_loss, reason = "tick counts")]
            let machine_busy = (machine_now.0 - machine_at_start.0) as f64
                / ((machine_now.1 - machine_at_start.1).max(1)) as f64;
            #[allow(clippy::cast_precision_loss, reason = "tick counts")]
            let node_cpu = (cpu_now - cpu_at_start) as f64 / ticks as f64;
            Usage {
                peak_rss,
                node_cpu,
                machine_busy,
                elapsed: started.elapsed(),
            }
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler")
    }
}

/// Per PostgreSQL process, its CPU ticks and whom it works for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serves {
    /// A connection of the load generator (the writes and their capture into the change log).
    Writers,
    /// Another connection to the scenario's database: the nodes' reads, checkpoints, ledger,
    /// leases and job queue.
    Nodes,
    /// Background processes (WAL writer, checkpointer, …), the postmaster, other databases.
    Rest,
}

/// A reading of every PostgreSQL process's CPU ticks, by [`Serves`].
struct PostgresTicks(HashMap<u32, (Serves, u64)>);

impl PostgresTicks {
    async fn read(pool: &PgPool, database: &str) -> PostgresTicks {
        let backends: Vec<(i32, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT pid, datname::text, application_name FROM pg_stat_activity")
                .fetch_all(pool)
                .await
                .unwrap_or_default();
        let mut ticks = HashMap::new();
        for (pid, datname, application) in backends {
            let Ok(pid) = u32::try_from(pid) else {
                continue;
            };
            let serves = match (datname.as_deref(), application.as_deref()) {
                (Some(name), Some(WRITER_APPLICATION)) if name == database => Serves::Writers,
                (Some(name), _) if name == database => Serves::Nodes,
                _ => Serves::Rest,
            };
            if let Some(cpu) = cpu_ticks(pid) {
                ticks.insert(pid, (serves, cpu));
            }
        }
        // The postmaster and any process pg_stat_activity does not list.
        for pid in postgres_pids() {
            if let (false, Some(cpu)) = (ticks.contains_key(&pid), cpu_ticks(pid)) {
                ticks.insert(pid, (Serves::Rest, cpu));
            }
        }
        PostgresTicks(ticks)
    }

    /// Ticks each kind of process used since `earlier` (a process that ended in between is lost;
    /// one that started counts from zero).
    fn since(&self, earlier: &PostgresTicks, serves: Serves) -> u64 {
        self.0
            .iter()
            .filter(|(_, (kind, _))| *kind == serves)
            .map(|(pid, (_, now))| {
                now.saturating_sub(earlier.0.get(pid).map_or(0, |(_, then)| *then))
            })
            .sum()
    }
}

/// Every process named `postgres` on this machine.
fn postgres_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|name| name.trim() == "postgres")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Where the machine's CPU went during a sustained window, in ticks.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSplit {
    node: u64,
    postgres_nodes: u64,
    postgres_writers: u64,
    postgres_rest: u64,
    /// This process: the load generator and the webhook receiver.
    harness: u64,
    machine_busy: u64,
}

/// Readings at a window's start, finished into a [`CpuSplit`] at its end.
struct CpuReading {
    postgres: PostgresTicks,
    nodes: u64,
    harness: u64,
    machine_busy: u64,
}

impl CpuReading {
    async fn take(pool: &PgPool, database: &str, nodes: &[u32]) -> CpuReading {
        CpuReading {
            postgres: PostgresTicks::read(pool, database).await,
            nodes: nodes.iter().filter_map(|pid| cpu_ticks(*pid)).sum(),
            harness: cpu_ticks(std::process::id()).unwrap_or(0),
            machine_busy: machine_ticks().0,
        }
    }

    fn split_since(&self, start: &CpuReading) -> CpuSplit {
        CpuSplit {
            node: self.nodes.saturating_sub(start.nodes),
            postgres_nodes: self.postgres.since(&start.postgres, Serves::Nodes),
            postgres_writers: self.postgres.since(&start.postgres, Serves::Writers),
            postgres_rest: self.postgres.since(&start.postgres, Serves::Rest),
            harness: self.harness.saturating_sub(start.harness),
            machine_busy: self.machine_busy.saturating_sub(start.machine_busy),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database and the load generator.

/// The generator's connections (no TLS, as for the nodes).
/// The load generator's connections call themselves this, so that their share of PostgreSQL's
/// CPU can be told from the nodes' ([`PostgresTicks`]).
const WRITER_APPLICATION: &str = "e2e-writer";

async fn writer_pool(database: &TestDatabase) -> PgPool {
    let url = database_url(database);
    let separator = if url.contains('?') { '&' } else { '?' };
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&format!(
            "{url}{separator}application_name={WRITER_APPLICATION}"
        ))
        .await
        .expect("connect the load generator")
}

/// The tracked table. `E2E_CAPTURE=row` captures it with the per-row trigger instead of what
/// `core.observer_track_table` attaches (statement triggers), to compare the two end to end.
async fn orders_database() -> TestDatabase {
    let database = TestDatabase::migrated().await;
    let capture = if std::env::var("E2E_CAPTURE").as_deref() == Ok("row") {
        "CREATE TRIGGER observer_capture AFTER INSERT OR UPDATE OR DELETE ON bench_orders
             FOR EACH ROW EXECUTE FUNCTION core.observer_capture('Order', 'id');"
    } else {
        "SELECT core.observer_track_table('bench_orders'::regclass, 'Order');"
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE bench_orders (id bigint PRIMARY KEY, status text NOT NULL, total int NOT NULL);
         {capture}"
    )))
    .execute(&database.pool)
    .await
    .expect("create the tracked table");
    database
}

/// Commit time of every entity id written, for latency.
#[derive(Default)]
struct Commits {
    at: Mutex<HashMap<i64, Instant>>,
}

impl Commits {
    fn note(&self, first: i64, count: i64, at: Instant) {
        let mut map = self.at.lock().expect("commits lock");
        for id in first..first + count {
            map.insert(id, at);
        }
    }
}

/// Inserts `count` orders with ids from `first` in one transaction.
async fn insert_orders(pool: &PgPool, first: i64, count: i64) {
    sqlx::query(
        "INSERT INTO bench_orders (id, status, total)
         SELECT n, 'new', (n % 500)::int FROM generate_series($1::bigint, $2::bigint) AS n",
    )
    .bind(first)
    .bind(first + count - 1)
    .execute(pool)
    .await
    .expect("insert orders");
}

/// Writes as fast as `WRITERS` connections can until `stop`; returns how many rows.
fn flood(
    pool: PgPool,
    commits: Arc<Commits>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    rate: Option<u64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let pool = pool.clone();
                let commits = commits.clone();
                let next_id = next_id.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut written = 0;
                    // At a fixed rate: each writer commits its share on a ticker.
                    let mut ticker = rate.map(|rate| {
                        #[allow(clippy::cast_precision_loss, reason = "small counts")]
                        let period =
                            (ROWS_PER_COMMIT.unsigned_abs() * WRITERS as u64) as f64 / rate as f64;
                        let mut ticker = tokio::time::interval(Duration::from_secs_f64(period));
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                        ticker
                    });
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(ticker) = ticker.as_mut() {
                            ticker.tick().await;
                        }
                        let first = i64::try_from(
                            next_id.fetch_add(ROWS_PER_COMMIT.unsigned_abs(), Ordering::Relaxed),
                        )
                        .expect("ids fit i64");
                        insert_orders(&pool, first, ROWS_PER_COMMIT).await;
                        commits.note(first, ROWS_PER_COMMIT, Instant::now());
                        written += ROWS_PER_COMMIT.unsigned_abs();
                    }
                    written
                })
            })
            .collect();
        let mut total = 0;
        for writer in writers {
            total += writer.await.expect("writer");
        }
        total
    })
}

/// Checkpoint writes so far, over every partition.
async fn checkpoint_writes(pool: &PgPool) -> u64 {
    let sum: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(checkpoint_version), 0)::bigint FROM fraiseql_observers.partitions",
    )
    .fetch_one(pool)
    .await
    .expect("read checkpoint versions");
    sum.unsigned_abs()
}

async fn wait_until_leading(pool: &PgPool, partitions: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let led: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fraiseql_observers.partitions WHERE leader IS NOT NULL",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        if led >= partitions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not lead all partitions within {limit:?} (led {led})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Latency statistics.

struct Latencies(Vec<Duration>);

impl Latencies {
    fn between(
        commits: &Commits,
        arrivals: &Arrivals,
        window: Option<(Instant, Instant)>,
    ) -> Latencies {
        let at = commits.at.lock().expect("commits lock");
        let first = arrivals.first.lock().expect("arrivals lock");
        let mut values: Vec<Duration> = first
            .iter()
            .filter_map(|(id, arrived)| {
                let committed = at.get(id)?;
                match window {
                    Some((from, to)) if *committed < from || *committed > to => None,
                    _ => Some(arrived.saturating_duration_since(*committed)),
                }
            })
            .collect();
        // An empty set would print p99 = 0: a run that matched no delivery measured nothing.
        assert!(
            !values.is_empty(),
            "no delivery matched a commit ({} commits, {} events arrived, {} requests without an entity id)",
            at.len(),
            first.len(),
            arrivals.unmatched.load(Ordering::Relaxed)
        );
        values.sort_unstable();
        Latencies(values)
    }

    fn percentile(&self, fraction: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into the vector"
        )]
        let index = ((self.0.len() as f64 - 1.0) * fraction).round() as usize;
        self.0[index]
    }

    fn summary(&self) -> String {
        format!(
            "{} · {} · {} · {}",
            millis(self.percentile(0.50)),
            millis(self.percentile(0.95)),
            millis(self.percentile(0.99)),
            millis(self.0.last().copied().unwrap_or_default())
        )
    }
}

fn millis(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.1}")
    }
}

#[allow(clippy::cast_precision_loss, reason = "byte counts")]
fn mebibytes(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1024.0 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

struct Report {
    rows: Vec<String>,
    /// Tables of their own, printed after the scenarios' table.
    sections: Vec<String>,
}

impl Report {
    fn row(&mut self, row: String) {
        println!("{row}");
        self.rows.push(row);
    }
}

async fn latency(report: &mut Report, rate: u64) {
    let database = orders_database().await;
    let pool = writer_pool(&database).await;
    let receiver = Receiver::start().await;
    let config = write_config(&receiver);
    let node = Node::spawn(&database, &config, 1);
    wait_until_leading(&pool, 8, Duration::from_secs(30)).await;
    let commits = Arc::new(Commits::default());
    let seconds = 15;
    let sampler = Sampler::start(vec![node.pid]);
    let checkpoints_before = checkpoint_writes(&pool).await;
    // Single-row transactions on a ticker; a few connections so a slow commit does not hold back
    // the next one.
    let period =
        Duration::from_secs_f64(1.0 / f64::from(u32::try_from(rate).expect("rate fits u32")));
    let total = rate * seconds;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(8));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for id in 1..=i64::try_from(total).expect("fits i64") {
        ticker.tick().await;
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
        let pool = pool.clone();
        let commits = commits.clone();
        tokio::spawn(async move {
            insert_orders(&pool, id, 1).await;
            commits.note(id, 1, Instant::now());
            drop(permit);
        });
    }
    let delivered = receiver.wait_for(total, Duration::from_mins(2)).await;
    let usage = sampler.finish().await;
    let checkpoints = checkpoint_writes(&pool).await - checkpoints_before;
    node.stop();
    assert!(delivered, "only {} of {total} delivered", receiver.count());
    let latencies = Latencies::between(&commits, &receiver.arrivals, None);
    report.row(format!(
        "| latency: {rate} events/s, one row per transaction, {seconds} s, 1 node | {} | {} | {} | {:.0} % | {:.0}/s | {:.0} % | {} |",
        "—",
        latencies.summary(),
        mebibytes(usage.peak_rss),
        usage.node_cpu / usage.elapsed.as_secs_f64() * 100.0,
        per_second(checkpoints, usage.elapsed),
        usage.machine_busy * 100.0,
        receiver.arrivals.duplicates(),
    ));
}

/// What one sustained run measured.
struct Sustained {
    /// Distinct events delivered per second in the window.
    delivered: f64,
    written: f64,
    p99: Duration,
    /// Events written but not yet delivered, at the window's start and end.
    lag_start: u64,
    lag_end: u64,
    row: String,
    /// Where the CPU went in the window.
    cpu: CpuSplit,
    /// Distinct events delivered in the window.
    delivered_in_window: u64,
}

/// The p99 a sustained rate may have.
const SUSTAINED_P99: Duration = Duration::from_millis(250);

impl Sustained {
    /// Delivery kept pace with the writers: at least 99.5 % of what was written in the window
    /// delivered in it, the backlog at the window's end no larger than at its start (give or
    /// take one second of writing), and p99 within [`SUSTAINED_P99`]. A backlog that grows by a
    /// steady 3 % is falling behind, however close the rates look.
    fn kept_up(&self) -> bool {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a rate of events per second"
        )]
        let one_second = self.written as u64;
        self.delivered >= self.written * 0.995
            && self.lag_end <= self.lag_start + one_second
            && self.p99 <= SUSTAINED_P99
    }

    fn verdict(&self) -> String {
        let mut missed = Vec::new();
        if self.delivered < self.written * 0.995 {
            missed.push(format!(
                "delivered {:.1} % of written",
                self.delivered / self.written * 100.0
            ));
        }
        if !self.kept_up() && self.lag_end > self.lag_start {
            missed.push(format!("backlog {} → {}", self.lag_start, self.lag_end));
        }
        if self.p99 > SUSTAINED_P99 {
            missed.push(format!("p99 {}", millis(self.p99)));
        }
        missed.join(", ")
    }
}

async fn sustained(nodes: usize, seconds: u64, rate: Option<u64>) -> Sustained {
    let database = orders_database().await;
    let pool = writer_pool(&database).await;
    let receiver = Receiver::start().await;
    let config = write_config(&receiver);
    let running: Vec<Node> = (1..=nodes)
        .map(|index| Node::spawn(&database, &config, index))
        .collect();
    wait_until_leading(&pool, 8, Duration::from_secs(30)).await;
    // Let the cluster settle its leases before measuring.
    tokio::time::sleep(Duration::from_secs(if nodes > 1 { 6 } else { 1 })).await;
    let commits = Arc::new(Commits::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let generator = flood(
        pool.clone(),
        commits.clone(),
        next_id.clone(),
        stop.clone(),
        rate,
    );
    // Warm-up, then the measured window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window_start = Instant::now();
    let delivered_before = receiver.count();
    let written_before = next_id.load(Ordering::Relaxed);
    let lag_start = (written_before - 1).saturating_sub(delivered_before);
    let checkpoints_before = checkpoint_writes(&pool).await;
    // The first node's adaptive limit for the receiver, through the window.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let limits = node_http_address(1, Duration::from_secs(5))
        .await
        .map(|http| {
            sample_limit(
                format!("http://{http}/metrics"),
                receiver.url.trim_end_matches("/events").to_owned(),
                stop_sampling.clone(),
            )
        });
    let node_pids: Vec<u32> = running.iter().map(|node| node.pid).collect();
    let sampler = Sampler::start(node_pids.clone());
    let cpu_start = CpuReading::take(&pool, &database.name, &node_pids).await;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = CpuReading::take(&pool, &database.name, &node_pids)
        .await
        .split_since(&cpu_start);
    let usage = sampler.finish().await;
    stop_sampling.store(true, Ordering::Relaxed);
    if let Some(limits) = limits {
        // Progress only.
        eprintln!(
            "adaptive limit of node 1 in the window, min · median · max: {}",
            limit_summary(limits.await.unwrap_or_default())
        );
    }
    let delivered_at_end = receiver.count();
    let written_at_end = next_id.load(Ordering::Relaxed);
    let lag_end = (written_at_end - 1).saturating_sub(delivered_at_end);
    let delivered = delivered_at_end - delivered_before;
    let written = written_at_end - written_before;
    let checkpoints = checkpoint_writes(&pool).await - checkpoints_before;
    let window_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let total = generator.await.expect("generator");
    let drained = receiver.wait_for(total, Duration::from_mins(5)).await;
    for node in running {
        node.stop();
    }
    assert!(drained, "only {} of {total} delivered", receiver.count());
    let latencies = Latencies::between(
        &commits,
        &receiver.arrivals,
        Some((window_start, window_end)),
    );
    let load = match rate {
        Some(rate) => format!("{rate} events/s"),
        None => "as fast as they can".to_owned(),
    };
    let row = format!(
        "| sustained: {nodes} node(s); {WRITERS} writers × {ROWS_PER_COMMIT} rows per commit, {load}; {seconds} s | **{:.0}** (written {:.0}) | {} | {} | {:.0} % | {:.0}/s | {:.0} % | {} |",
        per_second(delivered, usage.elapsed),
        per_second(written, usage.elapsed),
        latencies.summary(),
        mebibytes(usage.peak_rss),
        usage.node_cpu / usage.elapsed.as_secs_f64() * 100.0,
        per_second(checkpoints, usage.elapsed),
        usage.machine_busy * 100.0,
        receiver.arrivals.duplicates(),
    );
    // Progress only: the report keeps the rows that matter.
    eprintln!("{row}");
    Sustained {
        delivered: per_second(delivered, usage.elapsed),
        written: per_second(written, usage.elapsed),
        p99: latencies.percentile(0.99),
        lag_start,
        lag_end,
        row,
        cpu,
        delivered_in_window: delivered,
    }
}

/// The median (by delivered rate) of `trials` runs at `rate`, each on a fresh database.
async fn median_run(nodes: usize, seconds: u64, rate: u64, trials: usize) -> Sustained {
    let mut runs = Vec::with_capacity(trials);
    for _ in 0..trials.max(1) {
        runs.push(sustained(nodes, seconds, Some(rate)).await);
    }
    runs.sort_by(|a, b| a.delivered.total_cmp(&b.delivered));
    let middle = runs.len() / 2;
    let mut median = runs.swap_remove(middle);
    median.row = median.row.replacen(
        "| sustained:",
        &format!("| sustained (median of {}):", trials.max(1)),
        1,
    );
    median
}

/// The highest fixed rate `nodes` keep pace with ([`Sustained::kept_up`], on the median of
/// `trials` runs per step), stepping up from `rates[0]`: reports that step and the first one that
/// fell behind, with what it missed.
async fn highest_sustained(
    report: &mut Report,
    nodes: usize,
    seconds: u64,
    rates: &[u64],
    trials: usize,
) {
    // Every other step first; at the first rate missed, the step skipped below it decides
    // between them, so the answer has the steps' resolution at about half the runs.
    let mut best: Option<(usize, Sustained)> = None;
    let mut index = 0;
    while index < rates.len() {
        let run = median_run(nodes, seconds, rates[index], trials).await;
        if run.kept_up() {
            best = Some((index, run));
            index += 2;
            if index >= rates.len()
                && best
                    .as_ref()
                    .is_some_and(|(kept, _)| kept + 1 < rates.len())
            {
                // The last step was skipped: try it too.
                index = rates.len() - 1;
            }
            continue;
        }
        let mut missed = run;
        let skipped = index.checked_sub(1).filter(|below| {
            best.as_ref()
                .map_or(*below == 0, |(kept, _)| kept + 1 == *below)
        });
        if let Some(below) = skipped {
            let run = median_run(nodes, seconds, rates[below], trials).await;
            if run.kept_up() {
                best = Some((below, run));
            } else {
                missed = run;
            }
        }
        if let Some((_, best)) = best.take() {
            report.row(best.row.replace("| sustained (", "| sustained, kept up ("));
        }
        let verdict = missed.verdict();
        report.row(missed.row.replace(
            "| sustained (",
            &format!("| sustained, fell behind ({verdict}; "),
        ));
        return;
    }
    if let Some((_, best)) = best {
        report.row(best.row.replace("| sustained (", "| sustained, kept up ("));
    }
}

async fn backlog(report: &mut Report, rows: u64) {
    let database = orders_database().await;
    let pool = writer_pool(&database).await;
    let receiver = Receiver::start().await;
    let config = write_config(&receiver);
    // A node that ran once and stopped: the backlog is read the way a restarted or lagging node
    // reads it, as batches after a saved snapshot.
    let first_run = Node::spawn(&database, &config, 1);
    wait_until_leading(&pool, 8, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    first_run.stop();
    let writing = Instant::now();
    let rows = i64::try_from(rows).expect("fits i64");
    let mut first = 1;
    while first <= rows {
        let count = BACKLOG_ROWS_PER_COMMIT.min(rows - first + 1);
        insert_orders(&pool, first, count).await;
        first += count;
    }
    let written_in = writing.elapsed();
    sqlx::query("VACUUM ANALYZE core.tb_entity_change_log")
        .execute(&pool)
        .await
        .expect("vacuum the change log");
    let started = Instant::now();
    let node = Node::spawn(&database, &config, 1);
    let sampler = Sampler::start(vec![node.pid]);
    let total = rows.unsigned_abs();
    let delivered = receiver.wait_for(total, Duration::from_mins(30)).await;
    let drained_in = started.elapsed();
    let usage = sampler.finish().await;
    let checkpoints = checkpoint_writes(&pool).await;
    node.stop();
    assert!(delivered, "only {} of {total} delivered", receiver.count());
    report.row(format!(
        "| backlog: {total} changes committed first ({:.0} s to write, {BACKLOG_ROWS_PER_COMMIT} per commit), then drained by 1 node | **{:.0}** ({:.1} s) | — | {} | {:.0} % | {:.0}/s | {:.0} % | {} |",
        written_in.as_secs_f64(),
        per_second(total, drained_in),
        drained_in.as_secs_f64(),
        mebibytes(usage.peak_rss),
        usage.node_cpu / usage.elapsed.as_secs_f64() * 100.0,
        per_second(checkpoints, usage.elapsed),
        usage.machine_busy * 100.0,
        receiver.arrivals.duplicates(),
    ));
}

async fn checkpoint_store(report: &mut Report) {
    let database = TestDatabase::migrated().await;
    let pool = writer_pool(&database).await;
    let store = Arc::new(PostgresCheckpointStore::with_group_commit(pool.clone()));
    let partitions = 16;
    let seconds = 5;
    let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&pool)
        .await
        .expect("snapshot");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for partition in 0..partitions {
        let store = store.clone();
        let snapshot = snapshot.clone();
        tasks.push(tokio::spawn(async move {
            let mut checkpoint = store.claim(partition, "bench").await.expect("claim");
            let mut own = 0_u64;
            while Instant::now() < deadline {
                let next = BatchPosition {
                    snapshot: Some(snapshot.clone()),
                    batch_upto: None,
                    batch_position: None,
                };
                checkpoint = store.save(&checkpoint, next, &[]).await.expect("save");
                own += 1;
            }
            own
        }));
    }
    let mut saves = 0;
    for task in tasks {
        saves += task.await.expect("saver");
    }
    let elapsed = started.elapsed();
    let written = checkpoint_writes(&pool).await;
    assert_eq!(written, saves, "every save moved a checkpoint version");
    report.row(format!(
        "| checkpoint store: fenced saves on {partitions} partitions at once (group commit, as in a node), {seconds} s | **{:.0} writes/s** | — | — | — | — | — | — |",
        per_second(saves, elapsed)
    ));
}

/// Rows of the dead-letter queue, and jobs the queue holds or completed.
async fn dead_letters_and_jobs(pool: &PgPool) -> (u64, u64) {
    let (dead, jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM fraiseql_observers.dead_letters),
                (SELECT count(*) FROM fraiseql_observers.jobs)
                    + (SELECT count(*) FROM fraiseql_observers.jobs_completed)",
    )
    .fetch_one(pool)
    .await
    .unwrap_or((0, 0));
    (dead.unsigned_abs(), jobs.unsigned_abs())
}

/// The node's HTTP address (`127.0.0.1:port`) from its log, waiting for the line.
async fn node_http_address(index: usize, limit: Duration) -> Option<String> {
    let path = scratch_dir().join(format!("node-{index}.log"));
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(address) = log.lines().find_map(|line| {
            let start = line.find(" http=")? + " http=".len();
            line[start..].split_whitespace().next().map(str::to_owned)
        }) {
            return Some(address);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Reads the node's adaptive limit for `endpoint` every 100 ms until `stop`.
fn sample_limit(
    metrics_url: String,
    endpoint: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let prefix =
            format!("fraiseql_observers_endpoint_concurrency_limit{{endpoint=\"{endpoint}\"}} ");
        let mut values = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(response) = client.get(&metrics_url).send().await
                && let Ok(text) = response.text().await
                && let Some(value) = text
                    .lines()
                    .find_map(|line| line.strip_prefix(prefix.as_str()))
                    .and_then(|value| value.trim().parse::<f64>().ok())
            {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a limit of at most 10,000"
                )]
                values.push(value.max(0.0) as u64);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        values
    })
}

/// `min · median · max` of the sampled limits, `—` when none was read (the limiter off).
fn limit_summary(mut values: Vec<u64>) -> String {
    if values.is_empty() {
        return "—".to_owned();
    }
    values.sort_unstable();
    format!(
        "{} · {} · {}",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1]
    )
}

/// One burst to a small receiver, the adaptive limit `adaptive` (`on`/`off`).
async fn small_receiver(report: &mut Report, capacity: Capacity, events: u64, adaptive: &str) {
    let database = orders_database().await;
    let pool = writer_pool(&database).await;
    let receiver = SmallReceiver::start(capacity);
    // The webhook a new user writes (as in the issue that asked for the limit).
    let config = scratch_dir().join("observers-small.yaml");
    std::fs::write(
        &config,
        format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    \
             retry: {{max_attempts: 5, initial_delay: 100ms, max_delay: 2s}}\n    \
             actions:\n      - type: webhook\n        url: {}\n        timeout: 5s\n",
            receiver.url
        ),
    )
    .expect("write the observers file");
    let node = Node::spawn_with(
        &database,
        &config,
        1,
        &[
            ("FRAISEQL_OBSERVERS_ADAPTIVE_CONCURRENCY", adaptive),
            // The line naming the metrics address.
            ("RUST_LOG", "warn,fraiseql_observers=info"),
        ],
    );
    wait_until_leading(&pool, 8, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let http = node_http_address(1, Duration::from_secs(10))
        .await
        .expect("the node logs its HTTP address");
    let endpoint = receiver.url.trim_end_matches("/events").to_owned();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let limits = sample_limit(
        format!("http://{http}/metrics"),
        endpoint,
        stop_sampling.clone(),
    );
    let sampler = Sampler::start(vec![node.pid]);
    let commits = Commits::default();
    insert_orders(&pool, 1, i64::try_from(events).expect("fits i64")).await;
    let committed = Instant::now();
    commits.note(1, i64::try_from(events).expect("fits i64"), committed);
    // At full capacity the burst takes events / capacity; give it five times that (at least a
    // minute), and stop early once every event is delivered or dead-lettered.
    #[allow(clippy::cast_precision_loss, reason = "a few thousand events")]
    let ideal = Duration::from_secs_f64(events as f64 / capacity.per_second());
    let deadline = committed + (ideal * 5).max(Duration::from_mins(1));
    let mut dead = 0;
    let mut next_dead_check = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_dead_check {
            dead = dead_letters_and_jobs(&pool).await.0;
            next_dead_check = Instant::now() + Duration::from_secs(1);
        }
        if receiver.distinct() + dead >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let usage = sampler.finish().await;
    stop_sampling.store(true, Ordering::Relaxed);
    let limits = limits.await.expect("limit sampler");
    if !limits.is_empty() {
        // Progress only: how the limit moved, one reading per 100 ms.
        let trace: Vec<String> = limits.iter().map(u64::to_string).collect();
        eprintln!("adaptive limit every 100 ms: {}", trace.join(" "));
    }
    let limits = limit_summary(limits);
    let (dead, queued) = dead_letters_and_jobs(&pool).await;
    node.stop();
    let delivered = receiver.distinct();
    let last = receiver.arrivals.last().unwrap_or(committed);
    let took = last.saturating_duration_since(committed);
    let rate = per_second(delivered, took.max(Duration::from_millis(1)));
    let latencies = Latencies::between(&commits, &receiver.arrivals, None);
    report.row(format!(
        "| small receiver ({} at once × {} ms = {:.0}/s, accept queue {}): burst of {events} in one transaction, 1 node, adaptive limit **{adaptive}** | **{:.0}** = **{:.0} %** of capacity ({delivered}/{events} delivered in {:.1} s; {} repeated, {dead} dead letters, {queued} via the job queue; limit min · median · max {limits}) | {} | {} | {:.0} % | — | {:.0} % | {} |",
        capacity.workers,
        capacity.service.as_millis(),
        capacity.per_second(),
        capacity.backlog,
        rate,
        rate / capacity.per_second() * 100.0,
        took.as_secs_f64(),
        receiver.repeated(),
        latencies.summary(),
        mebibytes(usage.peak_rss),
        usage.node_cpu / usage.elapsed.as_secs_f64() * 100.0,
        usage.machine_busy * 100.0,
        receiver.arrivals.duplicates(),
    ));
}

/// The CPU a sustained run's window used, per delivered event, by where it went; and the rates
/// this machine's cores could give at that cost, all of it and without the service's own share.
fn cpu_section(run: &Sustained) -> String {
    let ticks = clock_ticks_per_second();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let events = run.delivered_in_window.max(1);
    #[allow(clippy::cast_precision_loss, reason = "tick and event counts")]
    let micros = |spent: u64| spent as f64 * 1e6 / ticks as f64 / events as f64;
    let split = run.cpu;
    let accounted = split.node
        + split.postgres_nodes
        + split.postgres_writers
        + split.postgres_rest
        + split.harness;
    let busy = micros(split.machine_busy);
    let share = |value: f64| value / busy.max(f64::MIN_POSITIVE) * 100.0;
    let mut table = format!(
        "| where the CPU went, 1 node at {:.0} events/s delivered (written {:.0}/s) | CPU µs per delivered event | share of busy CPU |\n|---|---|---|\n",
        run.delivered, run.written
    );
    let parts = [
        (
            "the node process (read, decode, match, deliver, checkpoint)",
            split.node,
        ),
        (
            "PostgreSQL for the node (batch reads, checkpoints, ledger, leases)",
            split.postgres_nodes,
        ),
        (
            "PostgreSQL for the writers (INSERTs and their capture into the change log)",
            split.postgres_writers,
        ),
        (
            "PostgreSQL background (WAL writer, checkpointer, …)",
            split.postgres_rest,
        ),
        (
            "load generator + webhook receiver (the bench process)",
            split.harness,
        ),
    ];
    for (what, spent) in parts {
        let value = micros(spent);
        let _ = writeln!(table, "| {what} | {value:.1} | {:.0} % |", share(value));
    }
    let rest = busy - micros(accounted);
    let _ = writeln!(
        table,
        "| other (kernel work outside these processes, the rest of the machine) | {rest:.1} | {:.0} % |",
        share(rest)
    );
    let _ = writeln!(
        table,
        "| **machine busy, all of it** | **{busy:.1}** | 100 % |"
    );
    let service = micros(split.node + split.postgres_nodes);
    #[allow(clippy::cast_precision_loss, reason = "a core count")]
    let capacity = cores as f64 * 1e6;
    let _ = writeln!(
        table,
        "\nAt this cost {cores} cores give at most **{:.0} events/s**; the service's own share (node + PostgreSQL for it) is {service:.1} µs, and without it the writers, their capture, PostgreSQL's background work and the receiver alone would cap at **{:.0} events/s**.",
        capacity / busy.max(f64::MIN_POSITIVE),
        capacity / (busy - service).max(f64::MIN_POSITIVE),
    );
    table
}

#[tokio::main]
async fn main() {
    let rate = env_number("E2E_RATE", 1000);
    let seconds = env_number("E2E_SECONDS", 10);
    let rates: Vec<u64> = std::env::var("E2E_RATES").map_or_else(
        // Steps of 1,000/s.
        |_| (3..=20).map(|thousands| thousands * 1000).collect(),
        |rates| {
            rates
                .split(',')
                .map(|rate| {
                    rate.trim()
                        .parse()
                        .expect("E2E_RATES: comma-separated events/s")
                })
                .collect()
        },
    );
    let trials = usize::try_from(env_number("E2E_TRIALS", 3)).expect("fits usize");
    let backlog_rows = env_number("E2E_BACKLOG", 1_000_000);
    let nodes: Vec<usize> = std::env::var("E2E_NODES")
        .unwrap_or_else(|_| "1,2,3".to_owned())
        .split(',')
        .map(|count| {
            count
                .trim()
                .parse()
                .expect("E2E_NODES: comma-separated counts")
        })
        .collect();
    let mut report = Report {
        rows: Vec::new(),
        sections: Vec::new(),
    };
    let header = "| scenario | events/s | commit → delivery p50 · p95 · p99 · max (ms) | node RSS (peak) | node CPU | checkpoint writes | machine CPU busy | duplicates |\n|---|---|---|---|---|---|---|---|";
    println!("{header}");
    if wanted("latency") {
        latency(&mut report, rate).await;
    }
    if wanted("sustained") {
        for count in &nodes {
            highest_sustained(&mut report, *count, seconds, &rates, trials).await;
        }
    }
    if wanted("overload") {
        let run = sustained(1, seconds, None).await;
        report.row(run.row);
    }
    if wanted("backlog") {
        backlog(&mut report, backlog_rows).await;
    }
    if wanted("checkpoint") {
        checkpoint_store(&mut report).await;
    }
    if wanted("cpu") {
        let run = sustained(1, seconds, Some(env_number("E2E_CPU_RATE", 3000))).await;
        report.sections.push(cpu_section(&run));
    }
    if wanted("small") {
        let capacity = Capacity {
            workers: usize::try_from(env_number("E2E_SMALL_WORKERS", 4)).expect("fits usize"),
            service: Duration::from_millis(env_number("E2E_SMALL_SERVICE_MS", 20)),
            backlog: u32::try_from(env_number("E2E_SMALL_BACKLOG", 4)).expect("fits u32"),
        };
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a few thousand events"
        )]
        let default_events = (capacity.per_second() * seconds as f64) as u64;
        let events = env_number("E2E_SMALL_EVENTS", default_events);
        for adaptive in ["on", "off"] {
            small_receiver(&mut report, capacity, events, adaptive).await;
        }
    }
    let mut markdown = String::new();
    let _ = writeln!(markdown, "{header}");
    for row in &report.rows {
        let _ = writeln!(markdown, "{row}");
    }
    for section in &report.sections {
        println!("\n{section}");
        let _ = write!(markdown, "\n{section}");
    }
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../e2e-report.md");
    std::fs::write(&path, markdown).expect("write the report");
    println!("\nwritten to {}", path.display());
}
