//! One scenario's world: servers, nodes, load, the partition sampler, and the final check.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row as _};

use crate::load::{self, Load};
use crate::node::{NodeProcess, NodeSettings, NodeSpec};
use crate::postgres::PrivatePostgres;
use crate::proxy::FaultProxy;
use crate::receiver::{Capacity, Delivery, Receiver};
use crate::redis::PrivateRedis;
use crate::report::{self, Row};
use crate::verify::{self, Change, Fence, Sample};

/// First key of the partition advisory locks (the service's `LEASE_NAMESPACE`).
const LEASE_NAMESPACE: i64 = 0x4651_4F42;
/// Changes per second the load writes, one per transaction.
pub const LOAD_PER_SECOND: u32 = 400;
/// A delivery answered this long before a fault may not have been recorded as done yet.
pub const IN_FLIGHT: Duration = Duration::from_millis(100);
/// How long the backlog may take to drain after the load stops.
const DRAIN_DEADLINE: Duration = Duration::from_mins(2);

/// Scenarios share the machine's two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fault as it happened, for the recovery time: from `at` to the first delivery of a later
/// change on each of `partitions`.
pub type Fault = (SystemTime, Vec<i32>);

/// What a scenario allows and measures.
#[derive(Default)]
pub struct Expectations {
    /// Nodes struck by a fault while delivering, and when: the duplicates allowed are the
    /// deliveries each made in the [`IN_FLIGHT`] before (a request it sent but may not have
    /// recorded as done). Empty: no duplicate is allowed.
    pub struck: Vec<(String, SystemTime)>,
    pub faults: Vec<Fault>,
    /// Nodes that must be silent for partitions they lost.
    pub fences: Vec<Fence>,
    /// A check of the scenario's own (e.g. Redis holds claims again): `Err(problem)` fails it.
    pub extra: Vec<Result<(), String>>,
    /// The longest recovery allowed (none: any, as long as every affected partition recovers).
    pub recovery_within: Option<Duration>,
}

/// Fields drop in this order: nodes first, the servers they use after them.
pub struct World {
    nodes: Vec<NodeProcess>,
    load: Option<Load>,
    sampler: Option<Sampler>,
    proxies: Vec<FaultProxy>,
    receiver: Receiver,
    redis: PrivateRedis,
    admin: PgPool,
    postgres: PrivatePostgres,
    name: String,
    dir: PathBuf,
    settings: NodeSettings,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl World {
    /// Private PostgreSQL (migrated, with the tracked `orders` table), private Redis, receiver,
    /// `nodes` nodes each behind its own proxy, balanced; then the load starts.
    pub async fn start(name: &str, nodes: usize) -> World {
        World::start_with(name, nodes, None).await
    }

    /// As [`World::start`], the webhook receiver of limited `capacity` when one is given.
    pub async fn start_with(name: &str, nodes: usize, capacity: Option<Capacity>) -> World {
        let serial = SERIAL.lock().await;
        let binary = crate::node::binary();
        let dir = crate::target_dir().join("chaos").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scenario directory");
        let postgres = PrivatePostgres::start();
        let migrated = tokio::process::Command::new(binary)
            .arg("migrate")
            .env("DATABASE_URL", postgres.url())
            .output()
            .await
            .expect("fraiseql-observers migrate");
        assert!(
            migrated.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        let admin = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&postgres.url())
            .await
            .expect("admin connection to the private PostgreSQL");
        load::prepare(&admin).await;
        let redis = PrivateRedis::start().await;
        let receiver = match capacity {
            Some(capacity) => Receiver::start_small(capacity),
            None => Receiver::start().await,
        };
        let settings = NodeSettings::default();
        let mut world = World {
            name: name.to_owned(),
            _serial: serial,
            dir,
            settings,
            sampler: Some(Sampler::start(admin.clone())),
            postgres,
            redis,
            receiver,
            proxies: Vec::new(),
            nodes: Vec::new(),
            admin,
            load: None,
        };
        for index in 0..nodes {
            world.add_node(index).await;
        }
        world.wait_balanced(Duration::from_secs(30)).await;
        load::insert_orders(&world.admin).await;
        let writer = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(1))
            .connect(&world.postgres.url())
            .await
            .expect("writer connection");
        world.load = Some(Load::start(writer, LOAD_PER_SECOND));
        world
    }

    async fn add_node(&mut self, index: usize) {
        let id = format!("n{}", index + 1);
        let upstream = ([127, 0, 0, 1], self.postgres.port()).into();
        let proxy = FaultProxy::start(upstream).await;
        let config = self.dir.join(format!("{id}.yaml"));
        std::fs::write(
            &config,
            format!(
                "observers:\n  - name: orders\n    entity: Order\n    events: [insert, update]\n    \
                 retry: {{max_attempts: 100, initial_delay: 100ms, max_delay: 2s}}\n    \
                 actions:\n      - type: webhook\n        url: '{}'\n        timeout: 5s\n        \
                 headers: {{x-chaos-node: {id}}}\n",
                self.receiver.url()
            ),
        )
        .expect("observers file");
        let spec = NodeSpec {
            database_url: format!("postgres://postgres@{}/postgres", proxy.address()),
            redis_url: self.redis.url(),
            config,
            log: self.dir.join(format!("{id}.log")),
            id,
        };
        self.proxies.push(proxy);
        self.nodes.push(NodeProcess::spawn(spec, &self.settings));
    }

    #[must_use]
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    #[must_use]
    pub fn node_id(&self, index: usize) -> String {
        self.nodes[index].id().to_owned()
    }

    /// Partition → node ids whose lease session holds its lock (from `pg_locks`).
    pub async fn leases(&self) -> Result<BTreeMap<i32, Vec<String>>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT p.partition, coalesce(array_agg(coalesce(n.node_id, 'pid ' || l.pid))
                                          FILTER (WHERE l.pid IS NOT NULL), '{}') AS holders
               FROM generate_series(0, $1 - 1) AS p (partition)
               LEFT JOIN pg_locks AS l
                      ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND l.classid = $2::oid AND l.objid = p.partition::oid
               LEFT JOIN fraiseql_observers.nodes AS n ON n.lease_pid = l.pid
              GROUP BY p.partition ORDER BY p.partition",
        )
        .bind(i32::try_from(self.settings.partitions).unwrap_or(i32::MAX))
        .bind(LEASE_NAMESPACE)
        .fetch_all(&self.admin)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("partition")?, row.try_get("holders")?)))
            .collect()
    }

    /// The partitions node `index` leads now.
    pub async fn partitions_of(&self, index: usize) -> Vec<i32> {
        let id = self.node_id(index);
        self.leases()
            .await
            .expect("lease table")
            .into_iter()
            .filter(|(_, holders)| holders.contains(&id))
            .map(|(partition, _)| partition)
            .collect()
    }

    /// The running node leading the most partitions.
    pub async fn busiest(&self) -> usize {
        let mut best = (0, 0);
        for index in 0..self.nodes.len() {
            if self.nodes[index].is_running() {
                let count = self.partitions_of(index).await.len();
                if count > best.1 {
                    best = (index, count);
                }
            }
        }
        best.0
    }

    /// Every partition held by exactly one running node, and (when there are enough partitions)
    /// every running node holding one.
    pub async fn wait_balanced(&mut self, within: Duration) {
        let running: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.id().to_owned())
            .collect();
        self.wait_for_leases(
            "every partition led by one running node, every node leading",
            within,
            |leases| {
                leases
                    .values()
                    .all(|holders| holders.len() == 1 && running.contains(&holders[0]))
                    && running
                        .iter()
                        .all(|node| leases.values().any(|holders| holders.contains(node)))
            },
        )
        .await;
    }

    /// Every partition held by exactly one node other than node `index`.
    pub async fn wait_taken_over_from(&mut self, index: usize, within: Duration) {
        let gone = self.node_id(index);
        self.wait_for_leases(
            "every partition led by exactly one other node",
            within,
            |leases| {
                leases
                    .values()
                    .all(|holders| holders.len() == 1 && holders[0] != gone)
            },
        )
        .await;
    }

    async fn wait_for_leases(
        &mut self,
        what: &str,
        within: Duration,
        mut holds: impl FnMut(&BTreeMap<i32, Vec<String>>) -> bool,
    ) {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            self.check_alive();
            if let Ok(leases) = self.leases().await {
                if holds(&leases) {
                    return;
                }
                last = Some(leases);
            }
            assert!(
                Instant::now() < deadline,
                "{}: not reached within {within:?}: {what}; leases: {last:?}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lets the load run for `duration`, failing if a node crashes meanwhile.
    pub async fn run_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
    }

    /// Polls `check` until it holds.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, within: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        while !check().await {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{}: not within {within:?}: {what}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn check_alive(&mut self) {
        for node in &mut self.nodes {
            if let Some(status) = node.exited() {
                panic!(
                    "{}: node {} exited by itself ({status}); log:\n{}",
                    self.name,
                    node.id(),
                    node.log_tail()
                );
            }
        }
    }

    // Faults.

    pub async fn kill(&mut self, index: usize) -> SystemTime {
        let at = SystemTime::now();
        self.nodes[index].kill().await;
        at
    }

    /// SIGSTOP (`"STOP"`), SIGCONT (`"CONT"`).
    pub fn signal(&self, index: usize, signal: &str) -> SystemTime {
        let at = SystemTime::now();
        self.nodes[index].signal(signal);
        at
    }

    /// SIGTERM and wait for a clean exit (status 0).
    pub async fn terminate(&mut self, index: usize) -> SystemTime {
        let at = SystemTime::now();
        let status = self.nodes[index].terminate(Duration::from_secs(40)).await;
        assert!(
            status.success(),
            "{}: {} exited with {status} after SIGTERM:\n{}",
            self.name,
            self.node_id(index),
            self.nodes[index].log_tail()
        );
        at
    }

    pub fn restart_node(&mut self, index: usize) {
        self.nodes[index].start();
    }

    /// Cuts node `index` off from PostgreSQL (its proxy holds every byte, closes nothing).
    pub fn cut(&self, index: usize) -> SystemTime {
        self.proxies[index].cut();
        SystemTime::now()
    }

    pub fn heal(&self, index: usize) -> SystemTime {
        self.proxies[index].heal();
        SystemTime::now()
    }

    pub fn restart_postgres(&self) -> SystemTime {
        let at = SystemTime::now();
        self.postgres.restart_fast();
        at
    }

    pub fn receiver_down(&mut self) -> SystemTime {
        self.receiver.stop();
        SystemTime::now()
    }

    pub async fn receiver_up(&mut self) -> SystemTime {
        self.receiver.start_again().await;
        SystemTime::now()
    }

    pub async fn kill_redis(&mut self) -> SystemTime {
        let at = SystemTime::now();
        self.redis.kill().await;
        at
    }

    pub async fn restart_redis(&mut self) -> SystemTime {
        self.redis.restart().await;
        SystemTime::now()
    }

    #[must_use]
    pub fn redis(&self) -> &PrivateRedis {
        &self.redis
    }

    #[must_use]
    pub fn deliveries(&self) -> usize {
        self.receiver.delivery_count()
    }

    /// Every delivery so far, in arrival order.
    #[must_use]
    pub fn delivery_log(&self) -> Vec<Delivery> {
        self.receiver.deliveries()
    }

    /// Stops the load, waits for the backlog, checks every invariant, records the row, and
    /// fails the test on any break.
    pub async fn finish(mut self, expect: Expectations) -> Row {
        let load_ended = Instant::now();
        if let Some(load) = self.load.take() {
            load.finish().await;
        }
        let changes = self.changes().await;
        let deadline = Instant::now() + DRAIN_DEADLINE;
        loop {
            self.check_alive();
            if verify::lost(&changes, &self.receiver.deliveries()).is_empty()
                || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drain = load_ended.elapsed();
        // Late redeliveries, if any, land now.
        self.run_for(Duration::from_secs(1)).await;
        self.wait_balanced(Duration::from_secs(30)).await;
        self.stop_nodes().await;
        let deliveries = self.receiver.deliveries();
        let samples = match self.sampler.take() {
            Some(sampler) => sampler.finish().await,
            None => Vec::new(),
        };

        let lost = verify::lost(&changes, &deliveries);
        let duplicates = verify::duplicates(&deliveries);
        let out_of_order = verify::out_of_order(&deliveries);
        let regressions = verify::checkpoint_regressions(&samples);
        let fenced = verify::fenced_deliveries(&changes, &deliveries, &samples, &expect.fences);
        let recovery = verify::recovery(&changes, &deliveries, &expect.faults);
        let duplicate_bound: usize = expect
            .struck
            .iter()
            .map(|(node, at)| {
                deliveries
                    .iter()
                    .filter(|delivery| {
                        delivery.node == *node
                            && delivery.at <= *at
                            && at.duration_since(delivery.at).unwrap_or_default() <= IN_FLIGHT
                    })
                    .count()
            })
            .sum();
        let mut problems: Vec<String> = Vec::new();
        if !lost.is_empty() {
            problems.push(format!(
                "{} changes never delivered, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        if duplicates > duplicate_bound {
            problems.push(format!(
                "{duplicates} duplicate deliveries, more than the {duplicate_bound} in flight at the faults"
            ));
        }
        problems.extend(out_of_order.iter().take(10).cloned());
        problems.extend(regressions.iter().take(10).cloned());
        problems.extend(fenced.iter().take(10).cloned());
        if let Err(missing) = &recovery {
            problems.extend(missing.iter().cloned());
        }
        if let (Some(limit), Ok(Some(took))) = (expect.recovery_within, &recovery)
            && *took > limit
        {
            problems.push(format!(
                "recovery took {} ms, more than the {} ms allowed",
                took.as_millis(),
                limit.as_millis()
            ));
        }
        problems.extend(expect.extra.iter().filter_map(|check| check.clone().err()));
        let row = Row {
            scenario: self.name.clone(),
            events: changes.len(),
            lost: lost.len(),
            duplicates,
            duplicate_bound,
            out_of_order: out_of_order.len(),
            checkpoint_regressions: regressions.len(),
            fenced_deliveries: fenced.len(),
            recovery: recovery.clone().ok().flatten(),
            drain,
            passed: problems.is_empty(),
        };
        report::record(row.clone());
        assert!(
            problems.is_empty(),
            "{}: invariants broken:\n- {}\n{}",
            self.name,
            problems.join("\n- "),
            self.logs()
        );
        row
    }

    /// Stops every running node (SIGTERM, as Kubernetes does): deliveries, and so duplicates,
    /// are counted to the scenario's end, with nothing left to land after the count.
    async fn stop_nodes(&mut self) {
        for node in &mut self.nodes {
            if node.is_running() {
                node.terminate(Duration::from_secs(30)).await;
            }
        }
    }

    /// Every committed change the observer matches, from the change log.
    async fn changes(&self) -> Vec<Change> {
        let rows = sqlx::query(
            "SELECT object_id, (object_data ->> 'version')::bigint AS version, created_at,
                    (entity_hash % $1)::int AS partition
               FROM core.tb_entity_change_log
              WHERE object_type = 'Order' AND modification_type IN ('INSERT', 'UPDATE')",
        )
        .bind(i64::from(self.settings.partitions))
        .fetch_all(&self.admin)
        .await
        .expect("change log");
        rows.iter()
            .map(|row| Change {
                entity_id: row.get("object_id"),
                version: row.get("version"),
                created_at: row
                    .get::<chrono::DateTime<chrono::Utc>, _>("created_at")
                    .into(),
                partition: row.get("partition"),
            })
            .collect()
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let _ = writeln!(
                text,
                "--- {} (last lines) ---\n{}",
                node.id(),
                node.log_tail()
            );
        }
        let _ = write!(
            text,
            "--- postgres ---\n{}\n(full node logs: {})",
            self.postgres.log_tail(),
            self.dir.display()
        );
        text
    }
}

/// Reads every partition row every 50 ms; keeps each change of a row.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pool: PgPool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples: Vec<Sample> = Vec::new();
            let mut last: BTreeMap<i32, (i64, i64, Option<i64>)> = BTreeMap::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(rows) = sqlx::query(
                    "SELECT partition, epoch, checkpoint_version,
                            pg_snapshot_xmax(snapshot)::text::bigint AS position, leader, leased_at
                       FROM fraiseql_observers.partitions",
                )
                .fetch_all(&pool)
                .await
                {
                    for row in &rows {
                        let sample = Sample {
                            partition: row.get("partition"),
                            epoch: row.get("epoch"),
                            checkpoint_version: row.get("checkpoint_version"),
                            position: row.get("position"),
                            leader: row.get("leader"),
                            leased_at: row
                                .get::<Option<chrono::DateTime<chrono::Utc>>, _>("leased_at")
                                .map(Into::into),
                        };
                        let key = (sample.epoch, sample.checkpoint_version, sample.position);
                        if last.insert(sample.partition, key) != Some(key) {
                            samples.push(sample);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// `HH:MM:SS.mmm` (UTC), for messages.
#[must_use]
pub fn clock(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at)
        .format("%H:%M:%S%.3f")
        .to_string()
}
