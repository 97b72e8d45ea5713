#!/usr/bin/env node
// Peer benchmark: graphile-worker on the local PostgreSQL.
//
// Measures, against a throw-away database `graphile_bench_<random>`:
//   * throughput  - N trivial jobs pre-enqueued in bulk (addJobs -> graphile_worker.add_jobs,
//                   in chunks of ENQUEUE_BATCH jobs, one transaction per chunk), then a runner
//                   with concurrency C and a no-op task is started; wall time from just before
//                   `run()` until all N jobs are deleted from graphile_worker._private_jobs.
//   * pickup      - with a concurrency-4 runner already running (default pollInterval,
//                   LISTEN "jobs:insert"), PICKUP_JOBS single add_job calls (one autocommit
//                   statement = one transaction each), ~PICKUP_SPACING_MS apart; the task records
//                   its own start time and compares it with the timestamp carried in the payload
//                   (pickup_ms); pickup_db_ms is the DB-side locked_at - created_at of the same
//                   jobs (the definition benches/jobs.rs uses for our own queue).
//   * throughput_batched - the throughput pass again with graphile-worker's batching
//                   (localQueue + completeJobBatchDelay) switched on; skip with BATCHED=0.
//
// stdout: exactly one JSON line at the end. stderr: human-readable progress.
// Exit code: 0 on success, 1 on any error (the database is dropped in every case).
//
// Env:
//   TEST_DATABASE_URL  server URL (default postgres://postgres@127.0.0.1:5432/postgres);
//                      only used to CREATE/DROP the bench database.
//   JOBS               jobs per throughput run (default 20000)
//   CONCURRENCY        comma list of concurrencies for throughput (default "1,4")
//   ENQUEUE_BATCH      jobs per addJobs call/transaction (default 2000)
//   PICKUP_JOBS        latency samples (default 500)
//   PICKUP_WARMUP      un-counted warm-up jobs before the latency samples (default 20)
//   PICKUP_SPACING_MS  sleep between single enqueues (default 5)
//   PHASE_TIMEOUT_S    per-phase timeout (default 120)
//   BATCHED, BATCH_LOCAL_QUEUE_SIZE, BATCH_COMPLETE_DELAY_MS  see below

import { EventEmitter } from "node:events";
import { randomBytes } from "node:crypto";
import { loadavg, cpus } from "node:os";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { performance } from "node:perf_hooks";
import pg from "pg";
import {
  Logger,
  makeWorkerUtils,
  run,
  runMigrations,
  WorkerPreset,
} from "graphile-worker";

// ---------------------------------------------------------------- config
const SERVER_URL =
  process.env.TEST_DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";
const intEnv = (name, dflt) => {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return dflt;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`);
  return v;
};
const JOBS = intEnv("JOBS", 20000);
const CONCURRENCIES = (process.env.CONCURRENCY || "1,4")
  .split(",")
  .map((s) => Number(s.trim()))
  .filter((n) => Number.isInteger(n) && n > 0);
const ENQUEUE_BATCH = Math.max(1, intEnv("ENQUEUE_BATCH", 2000));
const PICKUP_JOBS = intEnv("PICKUP_JOBS", 500);
const PICKUP_WARMUP = intEnv("PICKUP_WARMUP", 20);
const PICKUP_SPACING_MS = intEnv("PICKUP_SPACING_MS", 5);
const PICKUP_CONCURRENCY = 4;
const PHASE_TIMEOUT_MS = intEnv("PHASE_TIMEOUT_S", 120) * 1000;
// graphile-worker's own defaults (WorkerPreset honours GRAPHILE_WORKER_SCHEMA / DATABASE_URL env).
const GW_DEFAULTS = WorkerPreset.worker;
const SCHEMA = GW_DEFAULTS.schema; // "graphile_worker" unless GRAPHILE_WORKER_SCHEMA is set
// Second throughput pass with graphile-worker's own batching switched on (the headline
// `throughput` always uses the defaults). BATCHED=0 skips it.
//   BATCH_LOCAL_QUEUE_SIZE      worker.localQueue.size: fetch+lock this many jobs per get_jobs
//                               round trip for the whole pool (default 16)
//   BATCH_COMPLETE_DELAY_MS     worker.completeJobBatchDelay: batch job deletions (default 0 =
//                               gather completions of the same event-loop tick)
const BATCHED = process.env.BATCHED !== "0";
const BATCH_TUNING = {
  localQueue: { size: Math.max(2, intEnv("BATCH_LOCAL_QUEUE_SIZE", 16)) },
  completeJobBatchDelay: intEnv("BATCH_COMPLETE_DELAY_MS", 0),
};
const TASK = "noop";

const GW_VERSION = JSON.parse(
  readFileSync(
    fileURLToPath(new URL("../package.json", import.meta.resolve("graphile-worker"))),
    "utf8",
  ),
).version;

const log = (...args) => console.error(`[graphile-bench ${new Date().toISOString().slice(11, 23)}]`, ...args);

// Epoch milliseconds with sub-ms resolution (same clock in producer and task: one process).
const nowMs = () => performance.timeOrigin + performance.now();

// graphile-worker logs every completed job at "info"; printing 20k lines would
// measure the terminal, not the queue. Keep warnings and errors only.
const quietLogger = new Logger((scope) => (level, message) => {
  if (level === "error" || level === "warning") {
    console.error(`[graphile-worker ${level}${scope.label ? ` ${scope.label}` : ""}] ${message}`);
  }
});

// ---------------------------------------------------------------- helpers
function withDatabase(url, dbName) {
  const u = new URL(url);
  u.pathname = `/${dbName}`;
  return u.toString();
}

function percentile(sorted, p) {
  // element at index round((n - 1) * p), as in benches/jobs.rs
  if (sorted.length === 0) return null;
  return sorted[Math.round((sorted.length - 1) * (p / 100))];
}
const round = (x, d = 3) => (x == null ? null : Math.round(x * 10 ** d) / 10 ** d);
function stats(values) {
  const s = [...values].sort((a, b) => a - b);
  const mean = s.reduce((a, b) => a + b, 0) / (s.length || 1);
  return {
    n: s.length,
    min: round(s[0]),
    p50: round(percentile(s, 50)),
    p90: round(percentile(s, 90)),
    p99: round(percentile(s, 99)),
    max: round(s[s.length - 1]),
    mean: round(mean),
  };
}

async function withTimeout(promise, ms, what) {
  let t;
  const timeout = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(t);
  }
}

async function countJobs(pool) {
  const { rows } = await pool.query(
    `select count(*)::int as n, count(*) filter (where last_error is not null)::int as errored from ${SCHEMA}._private_jobs`,
  );
  return rows[0];
}

// Poll graphile_worker._private_jobs until it is empty; returns the nowMs() at which that was seen.
async function waitForEmpty(pool, deadline, intervalMs = 2) {
  for (;;) {
    const { n, errored } = await countJobs(pool);
    if (errored > 0) throw new Error(`${errored} job(s) failed (last_error set)`);
    if (n === 0) return nowMs();
    if (nowMs() > deadline) throw new Error(`jobs table still has ${n} rows at deadline`);
    await sleep(intervalMs);
  }
}

// Wires job:complete / job:error / fatal events to a counter + a promise.
function makeTracker(events, target) {
  let completed = 0;
  let resolveDone;
  let rejectDone;
  const done = new Promise((res, rej) => {
    resolveDone = res;
    rejectDone = rej;
  });
  done.catch(() => {});
  const tracker = {
    get completed() {
      return completed;
    },
    target,
    done,
    fail(err) {
      rejectDone(err);
    },
  };
  events.on("job:complete", ({ error }) => {
    if (error) return; // job:error handles it
    completed += 1;
    if (completed >= tracker.target) resolveDone();
  });
  events.on("job:error", ({ job, error }) =>
    rejectDone(new Error(`job ${job.id} failed: ${error?.message ?? error}`)),
  );
  events.on("worker:fatalError", ({ error }) =>
    rejectDone(new Error(`worker fatal error: ${error?.message ?? error}`)),
  );
  events.on("pool:fatalError", ({ error }) =>
    rejectDone(new Error(`pool fatal error: ${error?.message ?? error}`)),
  );
  return tracker;
}

function runnerOptions(connectionString, concurrency, events, taskList, tuning = null) {
  // Everything not listed here is graphile-worker's default (see WorkerPreset):
  // pollInterval 2000 ms, preparedStatements on, maxPoolSize 10,
  // localQueue disabled, completeJobBatchDelay/failJobBatchDelay -1 (no batching).
  return {
    connectionString,
    concurrency,
    noHandleSignals: true,
    logger: quietLogger,
    events,
    taskList,
    parsedCronItems: [], // no cron (do not look for ./crontab)
    ...(tuning ? { preset: { worker: tuning } } : {}),
  };
}

// ---------------------------------------------------------------- phases
// Reference point for this machine: latency of a trivial single-row INSERT in its own
// (autocommit) transaction, i.e. mostly the WAL flush. Both queues pay this per commit.
async function commitBaseline(pool, n = 200) {
  const client = await pool.connect();
  try {
    await client.query("create table bench_commit_probe (id bigserial primary key, v int)");
    const lat = [];
    for (let i = 0; i < n; i++) {
      const t = nowMs();
      await client.query("insert into bench_commit_probe (v) values ($1)", [i]);
      lat.push(nowMs() - t);
    }
    await client.query("drop table bench_commit_probe");
    return stats(lat);
  } finally {
    client.release();
  }
}

async function throughputRun(connectionString, adminPool, utils, concurrency, tuning = null) {
  const label = `c=${concurrency}${tuning ? " batched" : ""}`;
  // 1. bulk enqueue
  const tEnq0 = nowMs();
  for (let i = 0; i < JOBS; i += ENQUEUE_BATCH) {
    const specs = [];
    for (let j = i; j < Math.min(JOBS, i + ENQUEUE_BATCH); j++) {
      specs.push({ identifier: TASK, payload: { i: j } });
    }
    await utils.addJobs(specs);
  }
  const enqMs = nowMs() - tEnq0;
  const { n } = await countJobs(adminPool);
  if (n !== JOBS) throw new Error(`expected ${JOBS} queued jobs, found ${n}`);
  log(
    `${label}: enqueued ${JOBS} jobs via addJobs (${Math.ceil(JOBS / ENQUEUE_BATCH)} calls of <=${ENQUEUE_BATCH}) in ${enqMs.toFixed(0)} ms (${Math.round((JOBS / enqMs) * 1000)} jobs/s)`,
  );
  await adminPool.query(`vacuum analyze ${SCHEMA}._private_jobs`);

  // 2. run
  const events = new EventEmitter();
  const tracker = makeTracker(events, JOBS);
  let lastReport = 0;
  events.on("job:complete", () => {
    const c = tracker.completed;
    if (c - lastReport >= 5000) {
      lastReport = c;
      log(`${label}: ${c}/${JOBS} completed`);
    }
  });
  const taskList = { [TASK]: async () => {} };

  const t0 = nowMs();
  const runner = await run(
    runnerOptions(connectionString, concurrency, events, taskList, tuning),
  );
  let stopped = false;
  try {
    runner.promise.catch((e) => tracker.fail(e));
    const tReady = nowMs();
    const deadline = t0 + PHASE_TIMEOUT_MS;
    await withTimeout(tracker.done, PHASE_TIMEOUT_MS, `throughput ${label}`);
    const tEnd = await waitForEmpty(adminPool, deadline, 1);
    const wallMs = tEnd - t0;
    const jobsPerSec = (JOBS / wallMs) * 1000;
    log(
      `${label}: ${JOBS} jobs in ${wallMs.toFixed(0)} ms (run() returned after ${(tReady - t0).toFixed(1)} ms) => ${jobsPerSec.toFixed(0)} jobs/s`,
    );
    await runner.stop();
    stopped = true;
    return { jobsPerSec, wallMs, enqueueMs: enqMs, startupMs: tReady - t0 };
  } finally {
    if (!stopped) await runner.stop().catch(() => {});
  }
}

// graphile-worker deletes a job when it completes. To read the database's own view of
// pickup (created_at = now() of the enqueueing transaction, locked_at = now() of the
// get_job transaction that claimed it) a BEFORE DELETE trigger copies both, with
// microsecond resolution, into a side table. Installed for the pickup phase only.
async function installPickupAudit(pool) {
  await pool.query(`
    create table public.bench_pickup_audit (
      job_id bigint primary key,
      seq int,
      created_at timestamptz not null,
      locked_at timestamptz
    );
    create function public.bench_pickup_audit_fn() returns trigger language plpgsql as $$
    begin
      insert into public.bench_pickup_audit (job_id, seq, created_at, locked_at)
      values (old.id, (old.payload->>'seq')::int, old.created_at, old.locked_at);
      return old;
    end $$;
    create trigger bench_pickup_audit before delete on ${SCHEMA}._private_jobs
      for each row execute function public.bench_pickup_audit_fn();`);
}
async function dropPickupAudit(pool) {
  await pool.query(`
    drop trigger if exists bench_pickup_audit on ${SCHEMA}._private_jobs;
    drop function if exists public.bench_pickup_audit_fn();
    drop table if exists public.bench_pickup_audit;`);
}

async function pickupRun(connectionString, adminPool, utils) {
  await installPickupAudit(adminPool);
  const events = new EventEmitter();
  const total = PICKUP_WARMUP + PICKUP_JOBS;
  const tracker = makeTracker(events, total);
  const taskStart = new Map(); // seq -> { start, sent }
  const taskList = {
    [TASK]: async (payload) => {
      const start = nowMs();
      taskStart.set(payload.seq, { start, sent: payload.t });
    },
  };
  const listening = new Promise((resolve) => events.once("pool:listen:success", resolve));

  const runner = await run(
    runnerOptions(connectionString, PICKUP_CONCURRENCY, events, taskList),
  );
  let stopped = false;
  try {
    runner.promise.catch((e) => tracker.fail(e));
    await withTimeout(listening, 10_000, "LISTEN established");
    // Let the workers do their initial (empty) get_job and go idle.
    await sleep(200);
    log(
      `pickup: runner up (concurrency ${PICKUP_CONCURRENCY}, LISTEN ok); enqueuing ${PICKUP_WARMUP} warm-up + ${PICKUP_JOBS} single jobs, ${PICKUP_SPACING_MS} ms apart`,
    );

    const acked = new Map(); // seq -> ms when add_job returned (commit acknowledged)
    const rtt = [];
    const deadline = nowMs() + PHASE_TIMEOUT_MS;
    for (let seq = 0; seq < total; seq++) {
      const t = nowMs();
      // utils.addJob == one `select graphile_worker.add_job(...)` statement, autocommit:
      // its own transaction, NOTIFY "jobs:insert" fires on commit.
      await utils.addJob(TASK, { seq, t });
      const ack = nowMs();
      acked.set(seq, ack);
      if (seq >= PICKUP_WARMUP) rtt.push(ack - t);
      if (nowMs() > deadline) throw new Error("pickup phase: enqueue deadline exceeded");
      if (PICKUP_SPACING_MS > 0) await sleep(PICKUP_SPACING_MS);
    }
    await withTimeout(tracker.done, PHASE_TIMEOUT_MS, "pickup jobs completion");
    await waitForEmpty(adminPool, deadline, 2);
    await runner.stop();
    stopped = true;

    const { rows: dbRows } = await adminPool.query(
      `select seq, extract(epoch from (locked_at - created_at)) * 1000 as ms
         from public.bench_pickup_audit where seq >= $1`,
      [PICKUP_WARMUP],
    );
    await dropPickupAudit(adminPool);
    if (dbRows.length !== PICKUP_JOBS)
      throw new Error(`pickup audit: expected ${PICKUP_JOBS} rows, got ${dbRows.length}`);
    const fromDb = dbRows.map((r) => Number(r.ms));

    const fromSend = [];
    const fromAck = [];
    for (let seq = PICKUP_WARMUP; seq < total; seq++) {
      const rec = taskStart.get(seq);
      if (!rec) throw new Error(`pickup: job seq=${seq} never started`);
      fromSend.push(rec.start - rec.sent);
      fromAck.push(rec.start - acked.get(seq));
    }
    const res = {
      fromSend: stats(fromSend),
      fromAck: stats(fromAck),
      enqueueRtt: stats(rtt),
      db: stats(fromDb),
    };
    log(
      `pickup (enqueue-call -> task start) ms: p50 ${res.fromSend.p50}  p99 ${res.fromSend.p99}  max ${res.fromSend.max}  (n=${res.fromSend.n})`,
    );
    log(
      `pickup (add_job returned -> task start) ms: p50 ${res.fromAck.p50}  p99 ${res.fromAck.p99}  max ${res.fromAck.max}; add_job round trip p50 ${res.enqueueRtt.p50} p99 ${res.enqueueRtt.p99}`,
    );
    log(
      `pickup (DB: locked_at - created_at) ms: p50 ${res.db.p50}  p99 ${res.db.p99}  max ${res.db.max}`,
    );
    return res;
  } finally {
    if (!stopped) await runner.stop().catch(() => {});
  }
}

// ---------------------------------------------------------------- main
const LOAD_AT_START = loadavg()[0];
const dbName = `graphile_bench_${randomBytes(6).toString("hex")}`;
const benchUrl = withDatabase(SERVER_URL, dbName);
let adminServer = null; // connection to the server DB (create/drop)
let created = false;
let cleaningUp = null;

async function cleanup() {
  if (cleaningUp) return cleaningUp;
  cleaningUp = (async () => {
    if (created) {
      try {
        if (!adminServer) {
          adminServer = new pg.Client({ connectionString: SERVER_URL });
          await adminServer.connect();
        }
        // Give pools that were just released a moment to disconnect, so that the
        // forced drop does not have to kill them (and make their pg clients emit errors).
        for (let i = 0; i < 60; i++) {
          const { rows } = await adminServer.query(
            "select count(*)::int as n from pg_stat_activity where datname = $1",
            [dbName],
          );
          if (rows[0].n === 0) break;
          await sleep(50);
        }
        await adminServer.query(`drop database if exists "${dbName}" with (force)`);
        log(`dropped database ${dbName}`);
        created = false;
      } catch (e) {
        log(`WARNING: could not drop database ${dbName}: ${e.message}`);
      }
    }
    if (adminServer) await adminServer.end().catch(() => {});
    adminServer = null;
  })();
  return cleaningUp;
}

for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    log(`received ${sig}, cleaning up`);
    cleanup().finally(() => process.exit(130));
  });
}

async function main() {
  if (CONCURRENCIES.length === 0) throw new Error("CONCURRENCY yields no valid value");
  log(
    `graphile-worker ${GW_VERSION}, node ${process.version}, jobs=${JOBS}, concurrency=${CONCURRENCIES.join(",")}, pickup=${PICKUP_JOBS}`,
  );
  adminServer = new pg.Client({ connectionString: SERVER_URL });
  await adminServer.connect();
  const { rows: verRows } = await adminServer.query("show server_version");
  const { rows: settingRows } = await adminServer.query(
    "select name, setting from pg_settings where name in ('fsync','synchronous_commit','wal_sync_method','max_connections') order by name",
  );
  const pgSettings = Object.fromEntries(settingRows.map((r) => [r.name, r.setting]));
  await adminServer.query(`create database "${dbName}"`);
  created = true;
  log(`created database ${dbName} (PostgreSQL ${verRows[0].server_version})`);

  const tMig = nowMs();
  await runMigrations({ connectionString: benchUrl, logger: quietLogger });
  log(`runMigrations done in ${(nowMs() - tMig).toFixed(0)} ms`);

  const adminPool = new pg.Pool({ connectionString: benchUrl, max: 2 });
  const utils = await makeWorkerUtils({ connectionString: benchUrl, logger: quietLogger });
  try {
    const { rows: schemaRows } = await adminPool.query(
      `select max(id) as id from ${SCHEMA}.migrations`,
    );
    const commit = await commitBaseline(adminPool);
    log(`commit baseline (1-row INSERT, autocommit) ms: p50 ${commit.p50} p99 ${commit.p99}`);
    const throughput = {};
    const details = {};
    for (const c of CONCURRENCIES) {
      const r = await throughputRun(benchUrl, adminPool, utils, c);
      throughput[String(c)] = Math.round(r.jobsPerSec);
      details[String(c)] = {
        wall_ms: round(r.wallMs, 1),
        runner_startup_ms: round(r.startupMs, 1),
        enqueue_ms: round(r.enqueueMs, 1),
        enqueue_jobs_per_s: Math.round((JOBS / r.enqueueMs) * 1000),
      };
    }
    let throughputBatched = null;
    if (BATCHED) {
      throughputBatched = {};
      for (const c of CONCURRENCIES) {
        const r = await throughputRun(benchUrl, adminPool, utils, c, BATCH_TUNING);
        throughputBatched[String(c)] = Math.round(r.jobsPerSec);
        details[`${c}_batched`] = {
          wall_ms: round(r.wallMs, 1),
          runner_startup_ms: round(r.startupMs, 1),
        };
      }
    }
    let pickup = null;
    if (PICKUP_JOBS > 0) pickup = await pickupRun(benchUrl, adminPool, utils);

    const out = {
      peer: "graphile-worker",
      version: GW_VERSION,
      throughput,
      pickup_ms: pickup
        ? { p50: pickup.fromSend.p50, p99: pickup.fromSend.p99, max: pickup.fromSend.max }
        : null,
      jobs: JOBS,
      // --- extra detail (not needed for the side-by-side table) ---
      // same definition as benches/jobs.rs: DB now() of the claim minus DB now() of the enqueue
      pickup_db_ms: pickup ? { p50: pickup.db.p50, p99: pickup.db.p99, max: pickup.db.max } : null,
      throughput_batched: throughputBatched,
      batched_config: BATCHED
        ? {
            local_queue_size: BATCH_TUNING.localQueue.size,
            complete_job_batch_delay_ms: BATCH_TUNING.completeJobBatchDelay,
          }
        : null,
      throughput_detail: details,
      pickup_detail: pickup
        ? {
            definition:
              "pickup_ms = task-start time minus timestamp taken right before the add_job call (includes the add_job insert+commit round trip); from_ack = task start minus time add_job returned (can be <= 0 when the worker starts before the producer sees the commit ack); db = locked_at - created_at of the job row (DB now() of the claiming get_job transaction minus DB now() of the enqueueing transaction)",
            samples: PICKUP_JOBS,
            warmup: PICKUP_WARMUP,
            spacing_ms: PICKUP_SPACING_MS,
            concurrency: PICKUP_CONCURRENCY,
            from_send: pickup.fromSend,
            from_ack: pickup.fromAck,
            add_job_rtt: pickup.enqueueRtt,
            db: pickup.db,
          }
        : null,
      config: {
        enqueue: `addJobs() -> ${SCHEMA}.add_jobs(job_spec[]), ${ENQUEUE_BATCH} jobs per call/transaction`,
        poll_interval_ms: GW_DEFAULTS.pollInterval,
        prepared_statements: GW_DEFAULTS.preparedStatements,
        max_pool_size: GW_DEFAULTS.maxPoolSize,
        local_queue: "disabled (default)",
        complete_job_batch_delay: -1,
        schema_migration: Number(schemaRows[0].id),
        node: process.version,
        postgres: verRows[0].server_version,
        postgres_settings: pgSettings,
        cpus: cpus().length,
        loadavg_1m_start: round(LOAD_AT_START, 2),
        loadavg_1m_end: round(loadavg()[0], 2),
        postgres_commit_baseline_ms: commit,
      },
    };
    return out;
  } finally {
    await utils.release().catch(() => {});
    await adminPool.end().catch(() => {});
  }
}

let exitCode = 0;
const unexpected = (e) => {
  // 57P01 admin_shutdown: a stray idle connection killed by DROP DATABASE ... WITH (FORCE)
  if (cleaningUp && e?.code === "57P01") {
    log(`ignoring connection terminated by the database drop: ${e.message}`);
    return;
  }
  log(`FATAL (unhandled): ${e?.stack ?? e}`);
  cleanup().finally(() => process.exit(1));
};
process.on("unhandledRejection", unexpected);
process.on("uncaughtException", unexpected);
try {
  const out = await main();
  await cleanup();
  process.stdout.write(JSON.stringify(out) + "\n");
} catch (e) {
  exitCode = 1;
  log(`ERROR: ${e?.stack ?? e}`);
  await cleanup();
}
// Do not wait for stray timers/sockets (e.g. graphile-worker's reset-locked timer).
process.exit(exitCode);
