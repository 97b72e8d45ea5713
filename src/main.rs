//! The `fraiseql-observers` command line: parses arguments, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fraiseql_observers::commands;
use fraiseql_observers::config::{self, LoadOptions, MissingEnv};
use fraiseql_observers::dlq::{DeadLetterFilter, PostgresDeadLetterQueue};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::escape::escape_control;
use fraiseql_observers::observers;
use fraiseql_observers::report;

#[derive(Parser)]
#[command(
    name = "fraiseql-observers",
    version,
    about = "Turns PostgreSQL changes into reliable side effects",
    after_help = exit_codes_help()
)]
struct Cli {
    /// Log line format. In `text`, control characters in logged values (event data, a target's
    /// error) are escaped, so every event is one line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FRAISEQL_OBSERVERS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The exit statuses, as `--help` lists them: from the error codes, so they cannot drift.
fn exit_codes_help() -> String {
    use std::fmt::Write as _;
    let mut text = String::from("Exit status:\n  0  success\n");
    let mut statuses: Vec<u8> = ErrorCode::ALL.iter().map(|code| code.exit_code()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    for status in statuses {
        let meaning = match status {
            1 => "any other failure".to_owned(),
            2 => "invalid configuration or command line".to_owned(),
            _ => ErrorCode::ALL
                .iter()
                .filter(|code| code.exit_code() == status)
                .map(|code| code.description())
                .collect::<Vec<_>>()
                .join("; "),
        };
        let _ = writeln!(text, "  {status}  {meaning}");
    }
    text
}

/// A setting given on the command line or in the environment is unusable: exits like an invalid
/// configuration (2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SettingError(String);

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Check an observers file (YAML, or TOML by extension) and report what it defines.
    ///
    /// Every problem is listed with `file:line:column` and path. Exits 2 when the file is invalid.
    ValidateConfig {
        /// The observers file.
        file: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Treat environment variables named by the file but not set as errors (as `run` does),
        /// rather than warnings.
        #[arg(long)]
        require_env: bool,
    },
    /// Run the service: apply migrations, claim the change log, deliver until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The observers file.
        #[arg(long, env = "FRAISEQL_OBSERVERS_CONFIG")]
        config: PathBuf,
        /// This node's name, unique in the cluster (recorded as its partitions' leader).
        #[arg(long, env = "FRAISEQL_OBSERVERS_NODE_ID")]
        node_id: Option<String>,
        /// Partitions the change log is split into; every node must use the same count.
        #[arg(long, env = "FRAISEQL_OBSERVERS_PARTITIONS", default_value_t = fraiseql_observers::cluster::DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=4096))]
        partitions: u32,
        /// A node silent for this long is considered gone and its partitions are taken over.
        #[arg(long, env = "FRAISEQL_OBSERVERS_NODE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
        node_timeout: std::time::Duration,
        /// Change-log rows per page.
        #[arg(long, env = "FRAISEQL_OBSERVERS_BATCH_SIZE", default_value_t = fraiseql_observers::listener::DEFAULT_BATCH_SIZE)]
        batch_size: u32,
        /// How often to look for changes when no notification arrives.
        #[arg(long, env = "FRAISEQL_OBSERVERS_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
        poll_interval: std::time::Duration,
        /// Largest change-log row accepted (bytes of JSON; `KiB`/`MiB` suffixes allowed); a
        /// larger row is dead-lettered with an excerpt.
        #[arg(long, env = "FRAISEQL_OBSERVERS_MAX_ROW_BYTES", default_value = "8MiB", value_parser = parse_row_bytes)]
        max_row_bytes: u32,
        /// Row text one page may hold (bytes; `KiB`/`MiB` suffixes allowed); a page always holds
        /// at least one row.
        #[arg(long, env = "FRAISEQL_OBSERVERS_MAX_PAGE_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
        max_page_bytes: u64,
        /// Change-log rows all partitions of the node may hold at once (read, not yet
        /// checkpointed): a node that falls behind holds no more events than this, however many
        /// partitions it leads. A page reads at most this many rows.
        #[arg(long, env = "FRAISEQL_OBSERVERS_MAX_ROWS_IN_FLIGHT", default_value_t = fraiseql_observers::listener::DEFAULT_MAX_ROWS_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(1..))]
        max_rows_in_flight: u32,
        /// Database connections the node may open.
        #[arg(long, env = "FRAISEQL_OBSERVERS_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(4..=1000))]
        db_pool_size: u32,
        /// How long a shutdown may take to finish in-flight work and save the checkpoint.
        #[arg(long, env = "FRAISEQL_OBSERVERS_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
        shutdown_timeout: std::time::Duration,
        #[command(flatten)]
        endpoints: EndpointArgs,
        #[command(flatten)]
        dedup: DedupArgs,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// This node's status, from its control plane (gRPC): listener, executor, job queue, Redis
    /// stores and endpoint limits, with rates over the last minute.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Print JSON (with --watch: one JSON document per line and frame).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// One node's Prometheus metrics (its HTTP endpoint's `/metrics`) as a readable summary:
    /// events and actions per second between two scrapes, actions by outcome, dead letters,
    /// jobs, leases, endpoint limits.
    Metrics {
        /// The node's HTTP endpoint (`host:port` or an http(s) URL); repeat (or separate with
        /// commas) for several nodes — nodes do not record their HTTP addresses, so list them.
        #[arg(
            long = "http-endpoint",
            env = "FRAISEQL_OBSERVERS_HTTP_ENDPOINT",
            default_value = "127.0.0.1:9090",
            value_delimiter = ','
        )]
        http_endpoints: Vec<String>,
        /// Print the scraped text as it is.
        #[arg(long)]
        raw: bool,
        /// Print JSON, one document per node and line.
        #[arg(long, conflicts_with = "raw")]
        json: bool,
        /// Time between the two scrapes the rates come from; `0s`: one scrape, totals only.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        sample_interval: std::time::Duration,
    },
    /// The cluster: status, hand-over of a partition, drain and resume of a node.
    Cluster {
        #[command(flatten)]
        control: ControlArgs,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Demo on the local database: creates `fraiseql_observers_demo`, a webhook receiver and an
    /// `orders` table, runs a node with examples/demo.yaml and prints the deliveries.
    Demo {
        /// PostgreSQL server to create the demo database on.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres",
            hide_env_values = true
        )]
        database_url: String,
    },
    /// Apply the database migrations (change log, capture trigger, the service's own schema).
    /// Safe to run from several nodes at once.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Only show every migration: applied (when), pending, or changed since applied.
        #[arg(long, conflicts_with = "dry_run")]
        status: bool,
        /// Only say which migrations would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --status or --dry-run: print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) on stdout: `fraiseql-observers man | man -l -`.
    Man,
    /// How an event was processed, from the history: what matched, each action's outcome,
    /// attempts and latency, the later outcomes of queued actions, the observers whose
    /// condition was false, the processing time. The entity's latest event unless --all.
    DebugEvent(DebugEventArgs),
    /// Search the history of processed events.
    Events {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Deliver the rows a table held before capture was attached: writes a synthetic INSERT
    /// change-log row (what capture writes) for every row whose entity has no change in the log
    /// yet, in primary-key order, one short transaction per batch. Resumes an interrupted run.
    Backfill(BackfillArgs),
    /// Deliver again changes already in the change log: each selected change (up to the log's
    /// last position when the run starts) is matched against the observers and every action of
    /// every matching observer is enqueued as a job, at a bounded rate; the nodes' workers
    /// deliver them with the idempotency key `<original key>:replay:<run id>`. Ctrl-C stops
    /// between batches; `--resume RUN` continues. `replay status` lists the runs.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Replay {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        arguments: ReplayArgs,
        #[command(subcommand)]
        command: Option<ReplayCommand>,
    },
    /// Inspect and act on the dead-letter queue.
    Dlq {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Args)]
struct ReplayArgs {
    /// The observers file the nodes run (the observers changes are matched against).
    #[arg(long, env = "FRAISEQL_OBSERVERS_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Only changes of this entity type (e.g. Order).
    #[arg(long)]
    entity_type: Option<String>,
    /// Only changes of this entity id.
    #[arg(long)]
    entity_id: Option<String>,
    /// Only changes written since this moment: a duration ago (`2h`, `7d`) or RFC 3339.
    #[arg(long, value_parser = fraiseql_observers::domain::parse_moment)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only changes written before this moment: a duration ago (`2h`, `7d`) or RFC 3339.
    #[arg(long, value_parser = fraiseql_observers::domain::parse_moment)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this observer's actions.
    #[arg(long)]
    observer: Option<String>,
    /// At most this many changes per second.
    #[arg(long, default_value_t = fraiseql_observers::replay::DEFAULT_RATE)]
    rate: u32,
    /// Only count what would be enqueued and show a sample; enqueue nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted run (its selection and rate are the run's own).
    #[arg(long, value_parser = parse_run_id, conflicts_with_all = ["entity_type", "entity_id", "since", "until", "observer", "dry_run"])]
    resume: Option<uuid::Uuid>,
    /// Print the result as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Replay runs, newest first, with their progress (from any node).
    Status {
        /// Only this run.
        #[arg(value_parser = parse_run_id)]
        run: Option<uuid::Uuid>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct BackfillArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// The tracked table (`schema.table`).
    #[arg(long)]
    table: String,
    /// Rows per batch (one transaction each), 1 to 10000.
    #[arg(long, default_value_t = fraiseql_observers::backfill::DEFAULT_BATCH_SIZE)]
    batch_size: u32,
    /// At most this many rows per second (default: no limit).
    #[arg(long)]
    rate: Option<u32>,
    /// Only count what would be written and show a sample; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Scan the table again from its first row even if an earlier backfill finished.
    #[arg(long, conflicts_with = "dry_run")]
    restart: bool,
    /// Print the summary as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EndpointArgs {
    /// Where to serve the gRPC control plane (reflection and grpc.health.v1 included).
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_GRPC_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    grpc_listen: std::net::SocketAddr,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_HTTP_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    http_listen: std::net::SocketAddr,
    /// How often the /metrics gauges read from the database (backlog, checkpoint age, dead
    /// letters, jobs) are refreshed, at least 1s; a scrape shows the last refresh and runs no query.
    #[arg(long, env = "FRAISEQL_OBSERVERS_METRICS_REFRESH_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    metrics_refresh_interval: std::time::Duration,
    /// Serve mutating control calls on a non-loopback address without a token.
    #[arg(long)]
    insecure_control_plane: bool,
    /// Bearer token required by mutating control calls (hand-over, drain, resume).
    #[arg(long, env = "FRAISEQL_OBSERVERS_CONTROL_TOKEN", hide_env_values = true)]
    control_token: Option<String>,
    /// Serve the gRPC control plane over TLS with this certificate chain (PEM).
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_GRPC_TLS_CERT",
        requires = "grpc_tls_key"
    )]
    grpc_tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_GRPC_TLS_KEY",
        requires = "grpc_tls_cert"
    )]
    grpc_tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct DedupArgs {
    /// Redis shared by the nodes for deduplication; without it, claims are kept in process.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of every Redis key this deployment writes.
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_REDIS_PREFIX",
        default_value = "fraiseql_observers:"
    )]
    redis_prefix: String,
    /// How long a completed action is remembered against duplicate deliveries.
    #[arg(long, env = "FRAISEQL_OBSERVERS_DEDUP_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    dedup_window: std::time::Duration,
    /// When Redis is unreachable: `process` (run the action anyway) or `defer` (retry later).
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_DEDUP_UNAVAILABLE",
        default_value = "process"
    )]
    dedup_unavailable: fraiseql_observers::dedup::Unavailable,
    /// Deprecated and ignored (a warning at start): circuits open on a failure rate, see
    /// --breaker-failure-rate and --breaker-minimum-calls.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_FAILURES")]
    breaker_failures: Option<u32>,
    /// Percentage of an endpoint's calls in the window (connection failures, timeouts, 5xx, not
    /// counting those while its adaptive limit is shrinking) that opens its circuit.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_FAILURE_RATE", default_value_t = fraiseql_observers::breaker::DEFAULT_FAILURE_RATE_PERCENT, value_parser = clap::value_parser!(u8).range(1..=100))]
    breaker_failure_rate: u8,
    /// Least number of calls to an endpoint in the window before its failure rate can open the
    /// circuit.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_MINIMUM_CALLS", default_value_t = fraiseql_observers::breaker::DEFAULT_MINIMUM_CALLS, value_parser = clap::value_parser!(u32).range(1..))]
    breaker_minimum_calls: u32,
    /// The sliding window the failure rate is measured over.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_WINDOW", default_value = "10s", value_parser = parse_positive_duration)]
    breaker_window: std::time::Duration,
    /// The first open period of a circuit; it doubles with each failed probe, up to
    /// --breaker-open-for.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_FIRST_OPEN_FOR", default_value = "1s", value_parser = parse_positive_duration)]
    breaker_first_open_for: std::time::Duration,
    /// The longest an open circuit refuses calls before probes go through.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_OPEN_FOR", default_value = "30s", value_parser = parse_positive_duration)]
    breaker_open_for: std::time::Duration,
    /// Calls a half-open circuit lets through as probes; the first success closes it.
    #[arg(long, env = "FRAISEQL_OBSERVERS_BREAKER_HALF_OPEN_PROBES", default_value_t = fraiseql_observers::breaker::DEFAULT_HALF_OPEN_PROBES, value_parser = clap::value_parser!(u32).range(1..))]
    breaker_half_open_probes: u32,
    /// How long an HTTP call waits for a slot of its endpoint's adaptive concurrency limit
    /// before it goes to the job queue; overrides the observers file's
    /// `executor.endpoint_queue_wait` (default 10s). Not part of the attempt's timeout.
    #[arg(long, env = "FRAISEQL_OBSERVERS_ENDPOINT_QUEUE_WAIT", value_parser = humantime::parse_duration)]
    endpoint_queue_wait: Option<std::time::Duration>,
    /// `on` (default) or `off`: limit HTTP calls per endpoint adaptively; overrides the observers
    /// file's `executor.adaptive_concurrency`.
    #[arg(long, env = "FRAISEQL_OBSERVERS_ADAPTIVE_CONCURRENCY", value_parser = parse_on_off)]
    adaptive_concurrency: Option<bool>,
    /// Networks (CIDR, comma-separated: `10.20.0.0/16,fd00:1::/64`) that webhook URLs whose host
    /// comes from event data may reach although they are private, loopback or link-local.
    /// Without it such URLs reach public addresses only (OB017); literal URLs are never checked.
    #[arg(
        long,
        env = "FRAISEQL_OBSERVERS_ALLOW_PRIVATE_TARGETS_CIDR",
        value_delimiter = ','
    )]
    allow_private_targets_cidr: Vec<fraiseql_observers::config::Network>,
}

fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("expected a duration above zero".to_owned()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("expected on or off, found {text:?}")),
    }
}

#[derive(Args)]
struct ControlArgs {
    /// The node's gRPC control plane.
    #[arg(
        long,
        global = true,
        visible_alias = "peer",
        env = "FRAISEQL_OBSERVERS_ENDPOINT",
        default_value = "127.0.0.1:50051"
    )]
    endpoint: String,
    /// Bearer token for mutating calls (hand-over, drain, resume). Sent in plaintext unless the
    /// endpoint is `https://`: the CLI then warns on stderr when the host is not a loopback
    /// address, since anyone on the way can read and replay the token.
    #[arg(
        long,
        global = true,
        env = "FRAISEQL_OBSERVERS_CONTROL_TOKEN",
        hide_env_values = true
    )]
    control_token: Option<String>,
    /// CA certificate (PEM) to trust for an `https://` endpoint (default: the system's roots).
    #[arg(long, global = true, env = "FRAISEQL_OBSERVERS_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl ControlArgs {
    fn target(&self) -> anyhow::Result<fraiseql_observers::grpc::Target> {
        let ca_pem = self
            .tls_ca
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|error| anyhow::anyhow!("--tls-ca {}: {error}", path.display()))
            })
            .transpose()?;
        Ok(fraiseql_observers::grpc::Target {
            endpoint: self.endpoint.clone(),
            ca_pem,
        })
    }

    /// The target of a mutating call, which carries the token: warns on stderr when the token
    /// would cross the network in plaintext.
    fn mutation_target(&self) -> anyhow::Result<fraiseql_observers::grpc::Target> {
        let target = self.target()?;
        if self
            .control_token
            .as_deref()
            .is_some_and(|token| !token.is_empty())
            && let Some(host) = target.plaintext_host_beyond_loopback()
        {
            eprintln!(
                "warning: the control token is sent in plaintext to {host}, which is not a loopback address; anyone on the network path can read and reuse it. Use an https:// endpoint (the node's --grpc-tls-cert) or reach the node over a private network."
            );
        }
        Ok(target)
    }
}

/// `--watch [interval]` and `--count N` of the status commands.
#[derive(clap::Args, Clone, Copy)]
struct WatchArgs {
    /// Print again every interval (default 2s) until interrupted; the screen is cleared
    /// between frames only when stdout is a terminal.
    #[arg(long, num_args = 0..=1, default_missing_value = "2s", value_parser = humantime::parse_duration)]
    watch: Option<std::time::Duration>,
    /// With --watch: stop after this many frames.
    #[arg(long, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every live node (partitions, backlog, oldest checkpoint) and every partition: leader,
    /// epoch, backlog, checkpoint.
    Status {
        /// Print JSON (with --watch: one JSON document per line and frame).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Move a partition to a named node without loss; returns when that node leads it.
    Handover {
        #[arg(long)]
        partition: u32,
        /// The node to take it over.
        #[arg(long)]
        to: String,
        /// How long to wait for the target.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Drain a node: it gives back every lease (pages finished, checkpoints saved) and takes none.
    Drain {
        /// The node to drain (default: the node at --endpoint).
        #[arg(long)]
        node: Option<String>,
    },
    /// Let a drained node take its share again.
    Resume {
        /// The node to resume (default: the node at --endpoint).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL (before or after the subcommand).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl DatabaseArgs {
    /// Connects with a pool of at most `size` connections.
    async fn connect(&self, size: u32) -> anyhow::Result<sqlx::PgPool> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            SettingError("no database: set DATABASE_URL or pass --database-url".to_owned())
        })?;
        Ok(commands::connect_with_size(url, size).await?)
    }
}

#[derive(Args)]
struct DebugEventArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// The entity's type (with --entity-id).
    #[arg(long, requires = "entity_id", conflicts_with = "event_id")]
    entity_type: Option<String>,
    /// The entity's id (with --entity-type).
    #[arg(long, requires = "entity_type")]
    entity_id: Option<String>,
    /// One event, by its id (as `events search` shows it).
    #[arg(long, value_parser = parse_event_id)]
    event_id: Option<uuid::Uuid>,
    /// Every event of the entity in the history, latest first.
    #[arg(long)]
    all: bool,
    /// A hypothetical change instead of the history: a JSON change-log row (`object_type`,
    /// `object_id`, `modification_type`, `object_data`, …) from FILE, or `-` for stdin. Shows which
    /// observers of --config would match and what each action would send, rendered; sends
    /// nothing and needs no database.
    #[arg(
        long,
        value_name = "FILE|-",
        requires = "config",
        conflicts_with_all = ["entity_type", "entity_id", "event_id", "all"]
    )]
    explain: Option<PathBuf>,
    /// The observers file the nodes run: shows each observer's condition and its result on
    /// the event, and counts the observers watching other entities.
    #[arg(long, env = "FRAISEQL_OBSERVERS_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Default)]
struct DlqFilterArgs {
    /// Only letters of this observer.
    #[arg(long)]
    observer: Option<String>,
    /// Only letters of this action type (webhook, log, …).
    #[arg(long)]
    action_type: Option<String>,
    /// Only letters with this error code (e.g. OB006).
    #[arg(long)]
    code: Option<String>,
    /// Only letters about this entity type.
    #[arg(long, visible_alias = "entity-type")]
    entity: Option<String>,
    /// Only letters whose error contains this text (case-insensitive).
    #[arg(long)]
    error: Option<String>,
    /// Only letters created since this moment: a duration ago (`2h`, `7d`) or RFC 3339.
    #[arg(long, value_parser = fraiseql_observers::domain::parse_moment)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only letters older than this (e.g. 30d, 12h).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// At most this many (oldest first); `dlq list` shows the oldest 100 unless told.
    #[arg(long)]
    limit: Option<usize>,
}

/// How many dead letters `dlq list` shows without `--limit`: a listing stays a bounded read
/// however many letters a flood of bad rows or a long outage left.
const DEFAULT_DLQ_LIST_LIMIT: usize = 100;

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full (as JSON).
    Show {
        /// The letter's id, as `dlq list` shows it.
        #[arg(value_parser = parse_letter_id)]
        id: uuid::Uuid,
    },
    /// Deliver dead letters again. With a letter's id: run its action now, in this process, and
    /// remove the letter when it succeeds. Without one: hand every letter the filters select (or
    /// --all) back to the job queue, where the nodes' workers deliver them with the original
    /// idempotency keys; the letters are removed as their jobs are queued.
    Retry {
        /// One letter's id, as `dlq list` shows it.
        #[arg(value_parser = parse_letter_id)]
        id: Option<uuid::Uuid>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Every dead letter (without an id and without filters).
        #[arg(long)]
        all: bool,
        /// Count what would be handed back, by observer and error; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The summary as JSON.
        #[arg(long)]
        json: bool,
        /// The observers file that defines the letter's observer.
        #[arg(long, env = "FRAISEQL_OBSERVERS_CONFIG")]
        config: PathBuf,
        /// Networks (CIDR, comma-separated) a webhook URL whose host comes from event data may
        /// reach although they are non-public, as `run --allow-private-targets-cidr`.
        #[arg(
            long,
            env = "FRAISEQL_OBSERVERS_ALLOW_PRIVATE_TARGETS_CIDR",
            value_delimiter = ','
        )]
        allow_private_targets_cidr: Vec<fraiseql_observers::config::Network>,
    },
    /// Dead letters counted per observer action and error code, largest groups first.
    Stats {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters matching the filters (at least one filter, or --all).
    Purge {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// History rows matching every filter given, newest first.
    Search {
        /// Only events of this entity type (e.g. Order).
        #[arg(long)]
        entity_type: Option<String>,
        /// Only events of this entity id.
        #[arg(long)]
        entity_id: Option<String>,
        /// Only events of this kind: insert, update, delete or custom.
        #[arg(long, value_parser = ["insert", "update", "delete", "custom"])]
        event: Option<String>,
        /// Only events this observer matched.
        #[arg(long)]
        observer: Option<String>,
        /// Only rows with an action of this outcome (`succeeded`, `failed`, `dead_lettered`,
        /// `queued`, `skipped_duplicate`, `already_completed`).
        #[arg(long, value_parser = fraiseql_observers::history::HistoryOutcome::parse)]
        outcome: Option<fraiseql_observers::history::HistoryOutcome>,
        /// Processed since this moment: a duration ago (`2h`, `7d`) or RFC 3339.
        #[arg(long, value_parser = fraiseql_observers::domain::parse_moment)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Processed before this moment: a duration ago (`2h`, `7d`) or RFC 3339.
        #[arg(long, value_parser = fraiseql_observers::domain::parse_moment)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Only rows whose error messages hold all these words (full text).
        #[arg(long)]
        text: Option<String>,
        /// At most this many rows (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
        /// The next page: the cursor the previous page printed (`more: --after N`).
        #[arg(long)]
        after: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

/// A replay run's id: a UUID, said so when it is not one.
fn parse_run_id(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text.trim()).map_err(|_| {
        format!(
            "expected a replay run's id, a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8 (as `replay status` shows), found {:?}",
            text.chars().take(80).collect::<String>()
        )
    })
}

/// An event's id: a UUID, said so when it is not one.
fn parse_event_id(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text.trim()).map_err(|_| {
        format!(
            "expected an event's id, a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8 (as `events search` shows), found {:?}",
            escape_control(text)
        )
    })
}

/// A dead letter's id: a UUID, said so when it is not one.
fn parse_letter_id(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text.trim()).map_err(|_| {
        format!(
            "expected a dead letter's id, a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8 (as `dlq list` shows), found {:?}",
            escape_control(text)
        )
    })
}

impl DlqFilterArgs {
    fn is_empty(&self) -> bool {
        self.observer.is_none()
            && self.action_type.is_none()
            && self.code.is_none()
            && self.entity.is_none()
            && self.error.is_none()
            && self.since.is_none()
            && self.older_than.is_none()
            && self.limit.is_none()
    }

    fn into_filter(self) -> anyhow::Result<DeadLetterFilter> {
        let error_code = self
            .code
            .map(|code| {
                ErrorCode::ALL
                    .into_iter()
                    .find(|candidate| candidate.as_str().eq_ignore_ascii_case(&code))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--code: expected an error code OB001…OB017, found {code:?}"
                        )
                    })
            })
            .transpose()?;
        let created_before = self
            .older_than
            .map(|age| chrono::Duration::from_std(age).map(|age| chrono::Utc::now() - age))
            .transpose()?;
        Ok(DeadLetterFilter {
            observer: self.observer,
            action_type: self.action_type,
            error_code,
            entity_type: self.entity,
            error_contains: self.error,
            created_after: self.since,
            created_before,
            limit: self.limit,
        })
    }
}

/// Colours only on a terminal, and never when `NO_COLOR` is set to anything (no-color.org).
fn colors_wanted() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Logs to stderr at INFO unless `RUST_LOG` says otherwise. A node warns of slow statements;
/// a one-shot command (`backfill`, `replay`, `dlq`, …) runs long statements by design, and its
/// progress and result are what its user reads, so its default leaves them out.
fn init_logging(format: LogFormat, serving: bool) {
    let default = if serving {
        "info,sqlx=warn"
    } else {
        "info,sqlx=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colors_wanted())
        .with_writer(std::io::stderr);
    match format {
        // Field values may hold event data or a receiver's words: escaped, one event per line.
        LogFormat::Text => builder
            .fmt_fields(fraiseql_observers::escape::EscapedLogFields)
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn validate_config(file: &std::path::Path, json: bool, require_env: bool) -> ExitCode {
    let missing_env = if require_env {
        MissingEnv::Error
    } else {
        MissingEnv::Warn
    };
    let result = observers::load_file(file, &LoadOptions::from_process_env(missing_env));
    if json {
        println!("{:#}", report::validation_json(&result));
    }
    match result {
        Ok(config) => {
            if !json {
                print!("{}", report::validation_report(&config));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            if !json {
                eprint!("{errors}");
                eprintln!(
                    "\n✗ Configuration is invalid ({})",
                    ErrorCode::ConfigInvalid
                );
            }
            ExitCode::from(ErrorCode::ConfigInvalid.exit_code())
        }
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the node");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Deduplication claims and circuit breakers: in Redis when `REDIS_URL` is set, else in process.
fn shared_state(dedup_args: &DedupArgs) -> anyhow::Result<fraiseql_observers::node::SharedState> {
    use fraiseql_observers::{breaker, cache, dedup, limits, node};
    use std::sync::Arc;
    let policy = breaker::BreakerPolicy {
        failure_rate_percent: dedup_args.breaker_failure_rate,
        minimum_calls: dedup_args.breaker_minimum_calls,
        window: dedup_args.breaker_window,
        first_open_for: dedup_args.breaker_first_open_for,
        open_for: dedup_args.breaker_open_for,
        half_open_probes: dedup_args.breaker_half_open_probes,
    };
    let Some(url) = &dedup_args.redis_url else {
        return Ok(node::SharedState {
            dedup_window: dedup_args.dedup_window,
            dedup_unavailable: dedup_args.dedup_unavailable,
            breakers: breaker::Breakers::new(
                Arc::new(breaker::InMemoryBreakerStore::default()),
                policy,
            ),
            ..node::SharedState::default()
        });
    };
    // One managed connection, shared by every store.
    let connection = redis_connection(url)?;
    let prefix = dedup_args.redis_prefix.as_str();
    Ok(node::SharedState {
        dedup_store: Arc::new(dedup::RedisDeduplicationStore::with_connection(
            connection.clone(),
            prefix,
        )),
        dedup_window: dedup_args.dedup_window,
        dedup_unavailable: dedup_args.dedup_unavailable,
        breakers: breaker::Breakers::new(
            Arc::new(breaker::RedisBreakerStore::with_connection(
                connection.clone(),
                prefix,
            )),
            policy,
        ),
        limits: Arc::new(limits::RedisLimitStore::with_connection(
            connection.clone(),
            prefix,
        )),
        cache: Arc::new(cache::RedisCache::with_connection(connection.clone())),
        cache_prefix: prefix.to_owned(),
        redis: Some(connection),
    })
}

/// A managed Redis connection; an unusable URL is a setting error (its text is not repeated: it may
/// hold a password).
fn redis_connection(
    url: &str,
) -> Result<fraiseql_observers::redis_client::SharedConnection, SettingError> {
    fraiseql_observers::redis_client::managed_connection(url).map_err(|error| {
        SettingError(format!(
            "REDIS_URL is not a Redis URL such as redis://host:6379/0 ({error})"
        ))
    })
}

/// Says where deduplication and breakers live, warning when that Redis does not answer.
async fn announce_shared_state(
    dedup_args: &DedupArgs,
    shared: &fraiseql_observers::node::SharedState,
) {
    if let (Some(url), Some(connection)) = (&dedup_args.redis_url, &shared.redis) {
        warn_if_redis_unreachable(
            url,
            connection,
            &format!("{:?}", dedup_args.dedup_unavailable).to_lowercase(),
        )
        .await;
    }
    if let Some(failures) = dedup_args.breaker_failures {
        tracing::warn!(
            breaker_failures = failures,
            "--breaker-failures is deprecated and ignored: circuits open on a failure rate (--breaker-failure-rate, --breaker-minimum-calls, --breaker-window)"
        );
    }
    tracing::info!(
        store = if dedup_args.redis_url.is_some() { "redis" } else { "in-process" },
        window = %humantime::format_duration(dedup_args.dedup_window),
        "deduplication and circuit breakers"
    );
}

/// Warns when Redis does not answer at start: the node runs on (each store falls back as its
/// setting says), but an operator should hear of it now, not from the first failed claim.
async fn warn_if_redis_unreachable(
    url: &str,
    connection: &fraiseql_observers::redis_client::SharedConnection,
    unavailable: &str,
) {
    use fraiseql_observers::redis_client;
    if let Err(error) = redis_client::ping(connection).await {
        let server = redis_client::server_of(url).unwrap_or_else(|_| "(REDIS_URL)".to_owned());
        tracing::warn!(
            %server,
            %error,
            dedup_unavailable = unavailable,
            "Redis does not answer at start: deduplication, circuit breakers, limits and cache fall back until it does"
        );
    }
}

/// The observers file as `run` uses it: variables from the process environment, except the Redis
/// prefix, which is the one this node really uses (flag included), so that the cache actions'
/// keyspace check sees it.
fn load_observers(
    path: &std::path::Path,
    redis_prefix: &str,
) -> Result<observers::ObserversConfig, config::ConfigErrors> {
    let lookup = |name: &str| {
        if name == config::REDIS_PREFIX_ENV {
            Some(redis_prefix.to_owned())
        } else {
            std::env::var(name).ok()
        }
    };
    observers::load_file(
        path,
        &LoadOptions {
            env: &lookup,
            missing_env: MissingEnv::Error,
        },
    )
}

/// What the coordinator deletes besides finished jobs and the completed-actions ledger.
#[derive(clap::Args, Debug, Clone, Copy)]
struct RetentionArgs {
    /// Delete change-log rows older than this that every partition has delivered (off unless
    /// given; other readers of the change log, and `replay`, lose those rows). At least 1m.
    #[arg(long, env = "FRAISEQL_OBSERVERS_CHANGE_LOG_RETENTION", value_parser = parse_retention)]
    change_log_retention: Option<std::time::Duration>,
    /// Delete dead letters older than this (off unless given: letters stay until retried or
    /// purged). At least 1m.
    #[arg(long, env = "FRAISEQL_OBSERVERS_DEAD_LETTER_RETENTION", value_parser = parse_retention)]
    dead_letter_retention: Option<std::time::Duration>,
    /// Drop history day partitions whose day ended longer ago than this. At least 1m.
    #[arg(long, env = "FRAISEQL_OBSERVERS_HISTORY_RETENTION", default_value = "30d", value_parser = parse_retention)]
    history_retention: std::time::Duration,
    /// Record every processed event in the history (`off` also when the observers file says
    /// `history: off`).
    #[arg(long, env = "FRAISEQL_OBSERVERS_HISTORY", default_value = "on", value_parser = parse_switch)]
    history: bool,
}

fn parse_switch(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, found {other:?}")),
    }
}

fn parse_retention(text: &str) -> Result<std::time::Duration, String> {
    let retention = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if retention < std::time::Duration::from_mins(1) {
        return Err(format!(
            "a retention must be at least 1m, found {}",
            humantime::format_duration(retention)
        ));
    }
    Ok(retention)
}

/// The observers file with the node's settings applied over it (queue wait, adaptive concurrency,
/// private-target allow-list); its warnings logged; a cache action without Redis refused.
fn observers_to_run(
    config_path: &std::path::Path,
    dedup_args: &DedupArgs,
) -> anyhow::Result<fraiseql_observers::observers::ObserversConfig> {
    let mut config = load_observers(config_path, &dedup_args.redis_prefix)?;
    if let Some(wait) = dedup_args.endpoint_queue_wait {
        config.executor.endpoint_queue_wait = wait;
    }
    if let Some(adaptive) = dedup_args.adaptive_concurrency {
        config.executor.adaptive_concurrency = adaptive;
    }
    config
        .executor
        .private_targets_allowed
        .clone_from(&dedup_args.allow_private_targets_cidr);
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration warning");
    }
    if dedup_args.redis_url.is_none()
        && let Some(place) = config.actions_of_type("cache").next()
    {
        anyhow::bail!(
            "{}: {place} is a cache action, which needs Redis: set REDIS_URL (or --redis-url)",
            config.origin
        );
    }
    Ok(config)
}

async fn run_node(
    database: DatabaseArgs,
    config_path: PathBuf,
    (settings, cluster, endpoints, dedup_args): (
        fraiseql_observers::listener::ListenerSettings,
        fraiseql_observers::cluster::ClusterSettings,
        EndpointArgs,
        DedupArgs,
    ),
    (db_pool_size, shutdown_timeout, retention): (u32, std::time::Duration, RetentionArgs),
) -> anyhow::Result<String> {
    let config = observers_to_run(&config_path, &dedup_args)?;
    anyhow::ensure!(
        endpoints.metrics_refresh_interval >= std::time::Duration::from_secs(1),
        "--metrics-refresh-interval must be at least 1s, found {}",
        humantime::format_duration(endpoints.metrics_refresh_interval)
    );
    let pool = database.connect(db_pool_size).await?;
    let bind = |address: std::net::SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|error| anyhow::anyhow!("cannot listen on {address} for {what}: {error}"))
    };
    let grpc = bind(
        endpoints.grpc_listen,
        "the gRPC control plane (--grpc-listen)",
    )
    .await?;
    let http = bind(
        endpoints.http_listen,
        "HTTP metrics and health (--http-listen)",
    )
    .await?;
    let tls = match (&endpoints.grpc_tls_cert, &endpoints.grpc_tls_key) {
        (Some(certificate), Some(key)) => Some(fraiseql_observers::grpc::TlsIdentity::from_files(
            certificate,
            key,
        )?),
        _ => None,
    };
    let policy = fraiseql_observers::grpc::MutationPolicy::for_address(
        endpoints.control_token,
        endpoints.grpc_listen,
        endpoints.insecure_control_plane,
    );
    if policy.token.is_none() && !policy.open_without_token {
        tracing::warn!(address = %endpoints.grpc_listen, "no FRAISEQL_OBSERVERS_CONTROL_TOKEN: mutating control calls (hand-over, drain) are refused on this address");
    }
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "control plane and HTTP endpoints listening");
    let shared = shared_state(&dedup_args)?;
    announce_shared_state(&dedup_args, &shared).await;
    let node = fraiseql_observers::node::Node::build_with_shared_state(
        pool, config, settings, cluster, shared,
    )
    .await?
    .with_gauge_refresh_interval(endpoints.metrics_refresh_interval)
    .with_retention(
        retention.dead_letter_retention,
        retention.change_log_retention,
    )
    .with_history_retention(retention.history_retention)
    .with_endpoints(fraiseql_observers::node::Endpoints {
        grpc: Some(fraiseql_observers::grpc::GrpcEndpoint {
            listener: grpc,
            policy,
            tls,
        }),
        http: Some(http),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut running = tokio::spawn(node.run_until_stopped(shutdown.clone()));
    tracing::info!("node running");
    tokio::select! {
        finished = &mut running => {
            finished??;
            anyhow::bail!("the node stopped on its own");
        }
        () = shutdown_signal() => {}
    }
    tracing::info!(timeout = %humantime::format_duration(shutdown_timeout), "shutting down: finishing in-flight work");
    shutdown.cancel();
    match tokio::time::timeout(shutdown_timeout, running).await {
        Ok(finished) => {
            finished??;
            Ok("stopped cleanly\n".to_owned())
        }
        Err(_) => Err(anyhow::anyhow!(
            "{}: in-flight work did not finish within {}; it will be redelivered",
            ErrorCode::ShuttingDown,
            humantime::format_duration(shutdown_timeout)
        )),
    }
}

/// A size in bytes: a number with an optional `B`, `KiB`, `MiB` or `GiB` suffix (`KB`, `MB`,
/// `GB` are read as the same powers of two).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a size such as 8MiB or 1048576, found {text:?}"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    number
        .checked_mul(scale)
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("{text:?} must be at least 1 byte and fit in 64 bits"))
}

fn parse_row_bytes(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    u32::try_from(bytes)
        .ok()
        .filter(|bytes| *bytes <= 1 << 30)
        .ok_or_else(|| format!("{text:?} is over the largest row limit, 1GiB"))
}

async fn database_command(command: Command) -> anyhow::Result<String> {
    match command {
        Command::ValidateConfig { .. } => anyhow::bail!("validate-config needs no database"),
        Command::Run {
            database,
            config,
            node_id,
            partitions,
            node_timeout,
            batch_size,
            poll_interval,
            max_row_bytes,
            max_page_bytes,
            max_rows_in_flight,
            db_pool_size,
            shutdown_timeout,
            endpoints,
            dedup,
            retention,
        } => {
            anyhow::ensure!(batch_size > 0, "--batch-size must be at least 1");
            let settings = fraiseql_observers::listener::ListenerSettings {
                batch_size,
                poll_interval,
                max_row_bytes,
                max_page_bytes,
                node_id: node_id.unwrap_or_else(fraiseql_observers::listener::default_node_id),
                record_history: retention.history,
                row_budget: fraiseql_observers::listener::RowBudget::new(max_rows_in_flight),
                ..fraiseql_observers::listener::ListenerSettings::default()
            };
            let cluster = fraiseql_observers::cluster::ClusterSettings {
                partitions,
                node_timeout,
                ..fraiseql_observers::cluster::ClusterSettings::default()
            };
            run_node(
                database,
                config,
                (settings, cluster, endpoints, dedup),
                (db_pool_size, shutdown_timeout, retention),
            )
            .await
        }
        Command::Status {
            control,
            json,
            watch,
        } => {
            let target = control.target()?;
            watched(watch, json, || async {
                let status = fraiseql_observers::grpc::fetch_status(target.clone()).await?;
                Ok((
                    serde_json::to_value(&status)?,
                    report::node_status_text(&status),
                ))
            })
            .await
        }
        Command::Metrics {
            http_endpoints,
            raw,
            json,
            sample_interval,
        } => commands::metrics(&http_endpoints, raw, json, sample_interval).await,
        Command::Cluster { control, command } => cluster_command(control, command).await,
        Command::Demo { database_url } => {
            fraiseql_observers::demo::run(&database_url).await?;
            Ok(String::new())
        }
        Command::Migrate {
            database,
            status,
            dry_run,
            json,
        } => {
            let pool = database.connect(4).await?;
            if status || dry_run {
                commands::migrate_status(&pool, dry_run, json).await
            } else {
                commands::migrate(&pool).await
            }
        }
        Command::Completions { .. } | Command::Man => {
            anyhow::bail!("completions and the manual need no database")
        }
        Command::Dlq { database, command } => dlq_command(database, command).await,
        Command::Events { database, command } => events_command(database, command).await,
        Command::DebugEvent(arguments) => debug_event_command(arguments).await,
        Command::Backfill(arguments) => backfill_command(arguments).await,
        Command::Replay {
            database,
            arguments,
            command,
        } => replay_command(database, arguments, command).await,
    }
}

/// One frame of a status command (without --watch: the output), or every frame printed as it
/// comes, every `interval`, until `--count` frames or an interrupt. On a terminal the screen is
/// cleared before each frame; otherwise frames follow each other (JSON: one document per line).
async fn watched<Frame, Fetch>(watch: WatchArgs, json: bool, fetch: Frame) -> anyhow::Result<String>
where
    Frame: Fn() -> Fetch,
    Fetch: std::future::Future<Output = anyhow::Result<(serde_json::Value, String)>>,
{
    use std::io::Write as _;
    let Some(interval) = watch.watch else {
        let (value, text) = fetch().await?;
        return Ok(if json { format!("{value:#}\n") } else { text });
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut frames = 0_u64;
    loop {
        let (value, text) = fetch().await?;
        let frame = if json {
            format!("{value}\n")
        } else if terminal {
            // Home and clear: the frame replaces the previous one.
            format!("\u{1b}[H\u{1b}[2J{text}")
        } else {
            format!("{text}\n")
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(frame.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        frames += 1;
        if watch.count.is_some_and(|count| frames >= count) {
            return Ok(String::new());
        }
        tokio::time::sleep(interval).await;
    }
}

async fn backfill_command(arguments: BackfillArgs) -> anyhow::Result<String> {
    let pool = arguments.database.connect(4).await?;
    if arguments.dry_run {
        return commands::backfill_preview(&pool, &arguments.table, arguments.json).await;
    }
    let settings = fraiseql_observers::backfill::BackfillSettings {
        batch_size: arguments.batch_size,
        rows_per_second: arguments.rate,
        restart: arguments.restart,
    };
    let style = progress_style();
    // Ctrl-C stops the backfill between batches; what was committed stays, a new run resumes.
    let cancel = cancelled_by_interrupt();
    commands::backfill(
        &pool,
        &arguments.table,
        &settings,
        style,
        arguments.json,
        &cancel,
    )
    .await
}

/// A bar on a terminal, plain lines otherwise (stderr).
fn progress_style() -> commands::ProgressStyle {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        commands::ProgressStyle::Bar
    } else {
        commands::ProgressStyle::Lines
    }
}

/// A token cancelled by the first Ctrl-C.
fn cancelled_by_interrupt() -> tokio_util::sync::CancellationToken {
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.cancel();
        }
    });
    cancel
}

async fn replay_command(
    database: DatabaseArgs,
    arguments: ReplayArgs,
    command: Option<ReplayCommand>,
) -> anyhow::Result<String> {
    let pool = database.connect(4).await?;
    if let Some(ReplayCommand::Status { run, limit, json }) = command {
        return commands::replay_status(&pool, run, limit, json).await;
    }
    let Some(config_path) = &arguments.config else {
        anyhow::bail!(
            "replay needs the observers file the nodes run: --config FILE (or FRAISEQL_OBSERVERS_CONFIG)"
        );
    };
    let config = observers::load_file(
        config_path,
        &LoadOptions::from_process_env(MissingEnv::Warn),
    )?;
    let matcher = fraiseql_observers::matcher::Matcher::new(config.observers);
    let request = fraiseql_observers::replay::ReplayRequest {
        entity_type: arguments.entity_type,
        entity_id: arguments.entity_id,
        since: arguments.since,
        until: arguments.until,
        observer: arguments.observer,
    };
    if arguments.dry_run {
        return commands::replay_preview(&pool, &matcher, &request, arguments.json).await;
    }
    let style = progress_style();
    // Ctrl-C stops the run between batches; what was committed stays, --resume continues.
    let cancel = cancelled_by_interrupt();
    let start = match arguments.resume {
        Some(run) => commands::ReplayStart::Resume(run),
        None => commands::ReplayStart::New {
            request: &request,
            rate: arguments.rate,
        },
    };
    commands::replay(&pool, &matcher, start, style, arguments.json, &cancel).await
}

/// Largest change `--explain` reads.
const MAX_EXPLAIN_BYTES: u64 = 8 * 1024 * 1024;

/// The JSON change of `debug-event --explain` from `path` (`-`: stdin), bounded.
fn read_change(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    use std::io::Read as _;
    let mut text = Vec::new();
    let what = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_EXPLAIN_BYTES + 1)
            .read_to_end(&mut text)
            .context("--explain: read the change from stdin")?;
        "stdin".to_owned()
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_EXPLAIN_BYTES + 1).read_to_end(&mut text))
            .with_context(|| format!("--explain: read {}", path.display()))?;
        path.display().to_string()
    };
    if text.len() as u64 > MAX_EXPLAIN_BYTES {
        return Err(SettingError(format!(
            "--explain: the change in {what} is larger than {MAX_EXPLAIN_BYTES} bytes"
        ))
        .into());
    }
    serde_json::from_slice(&text)
        .map_err(|error| SettingError(format!("--explain: {what} is not JSON: {error}")).into())
}

async fn debug_event_command(arguments: DebugEventArgs) -> anyhow::Result<String> {
    let DebugEventArgs {
        database,
        entity_type,
        entity_id,
        event_id,
        all,
        explain,
        config,
        json,
    } = arguments;
    if let Some(change) = explain {
        let path = config.ok_or_else(|| SettingError("--explain needs --config".to_owned()))?;
        let config = observers::load_file(&path, &LoadOptions::from_process_env(MissingEnv::Warn))?;
        let change = read_change(&change)?;
        let explanation = commands::explain_change(&config, &change)
            .map_err(|error| SettingError(format!("--explain: {error}")))?;
        return Ok(if json {
            format!("{:#}\n", serde_json::to_value(&explanation)?)
        } else {
            commands::explanation_text(&explanation)
        });
    }
    let target = match (entity_type, entity_id, event_id) {
        (Some(entity_type), Some(entity_id), None) => commands::DebugTarget::Entity {
            entity_type,
            entity_id,
        },
        (None, None, Some(id)) => commands::DebugTarget::Event(id),
        _ => {
            return Err(SettingError(
                "debug-event needs --entity-type and --entity-id, or --event-id".to_owned(),
            )
            .into());
        }
    };
    let config = config
        .map(|path| observers::load_file(&path, &LoadOptions::from_process_env(MissingEnv::Warn)))
        .transpose()?;
    let pool = database.connect(2).await?;
    commands::debug_event(&pool, &target, all, config.as_ref(), json).await
}

async fn events_command(database: DatabaseArgs, command: EventsCommand) -> anyhow::Result<String> {
    let EventsCommand::Search {
        entity_type,
        entity_id,
        event,
        observer,
        outcome,
        since,
        until,
        text,
        limit,
        after,
        json,
    } = command;
    let pool = database.connect(2).await?;
    let query = fraiseql_observers::history::HistoryQuery {
        entity_type,
        entity_id,
        event_id: None,
        event_kind: event,
        observer,
        outcome,
        since,
        until,
        text,
        after,
        limit,
    };
    commands::events_search(&pool, &query, json).await
}

async fn dlq_command(database: DatabaseArgs, command: DlqCommand) -> anyhow::Result<String> {
    let pool = database.connect(4).await?;
    let queue = PostgresDeadLetterQueue::new(pool);
    match command {
        DlqCommand::List { filter, json } => {
            let mut filter = filter.into_filter()?;
            filter.limit.get_or_insert(DEFAULT_DLQ_LIST_LIMIT);
            commands::dlq_list(&queue, &filter, json).await
        }
        DlqCommand::Show { id } => commands::dlq_show(&queue, id).await,
        DlqCommand::Stats { filter, json } => {
            commands::dlq_stats(queue.pool(), &filter.into_filter()?, json).await
        }
        DlqCommand::Retry {
            id,
            filter,
            all,
            dry_run,
            json,
            config,
            allow_private_targets_cidr,
        } => {
            let Some(id) = id else {
                if filter.is_empty() && !all {
                    return Err(SettingError(
                        "refusing to retry every dead letter without --all; give a letter's id or a filter such as --observer NAME".to_owned(),
                    )
                    .into());
                }
                let filter = filter.into_filter()?;
                if dry_run {
                    return commands::dlq_stats(queue.pool(), &filter, json).await;
                }
                // The workers run the actions: only the observers' definitions are needed here,
                // not their secrets.
                let config = observers::load_file(
                    &config,
                    &LoadOptions::from_process_env(MissingEnv::Warn),
                )?;
                return commands::dlq_requeue(
                    queue.pool(),
                    &config.observers,
                    &filter,
                    progress_style(),
                    json,
                    &cancelled_by_interrupt(),
                )
                .await;
            };
            if !(filter.is_empty() && !all && !dry_run && !json) {
                return Err(SettingError(
                    "a letter's id runs that one letter now; filters, --all, --dry-run and --json belong to a retry without an id".to_owned(),
                )
                .into());
            }
            let mut config =
                observers::load_file(&config, &LoadOptions::from_process_env(MissingEnv::Error))?;
            config.executor.private_targets_allowed = allow_private_targets_cidr;
            // Cache actions remove keys through the Redis the nodes use.
            let redis = std::env::var("REDIS_URL")
                .ok()
                .filter(|url| !url.is_empty())
                .map(|url| redis_connection(&url))
                .transpose()?;
            commands::dlq_retry(&queue, config, id, redis).await
        }
        DlqCommand::Purge { filter, all } => {
            if filter.is_empty() && !all {
                return Err(SettingError(
                    "refusing to purge every dead letter without --all; give a filter such as --older-than 30d".to_owned(),
                )
                .into());
            }
            commands::dlq_purge(&queue, &filter.into_filter()?).await
        }
    }
}

async fn cluster_command(control: ControlArgs, command: ClusterCommand) -> anyhow::Result<String> {
    use fraiseql_observers::grpc;
    match command {
        ClusterCommand::Status { json, watch } => {
            let target = control.target()?;
            watched(watch, json, || async {
                let cluster = grpc::fetch_cluster_status(target.clone()).await?;
                Ok((
                    serde_json::to_value(&cluster)?,
                    report::cluster_status_text(&cluster),
                ))
            })
            .await
        }
        ClusterCommand::Handover {
            partition,
            to,
            timeout,
        } => {
            let moved = grpc::request_handover(
                control.mutation_target()?,
                control.control_token.as_deref(),
                partition,
                &to,
                timeout,
            )
            .await?;
            Ok(format!(
                "partition {partition}: {} → {} (epoch {}) in {:.2} s\n",
                escape_control(moved.previous_leader.as_deref().unwrap_or("(none)")),
                escape_control(&moved.leader),
                moved.epoch,
                moved.took.as_secs_f64()
            ))
        }
        ClusterCommand::Drain { node } => {
            grpc::request_drain(
                control.mutation_target()?,
                control.control_token.as_deref(),
                node.as_deref(),
                true,
            )
            .await?;
            Ok(format!(
                "{}: draining (leases are given back as their pages finish)\n",
                node.as_deref().unwrap_or(&control.endpoint)
            ))
        }
        ClusterCommand::Resume { node } => {
            grpc::request_drain(
                control.mutation_target()?,
                control.control_token.as_deref(),
                node.as_deref(),
                false,
            )
            .await?;
            Ok(format!(
                "{}: resumed\n",
                node.as_deref().unwrap_or(&control.endpoint)
            ))
        }
    }
}

fn exit_code_for(error: &anyhow::Error) -> ErrorCode {
    for cause in error.chain() {
        if cause.downcast_ref::<config::ConfigErrors>().is_some()
            || cause.downcast_ref::<SettingError>().is_some()
        {
            return ErrorCode::ConfigInvalid;
        }
        if let Some(connect) = cause.downcast_ref::<fraiseql_observers::database::ConnectError>() {
            return if connect.is_malformed_url() {
                ErrorCode::ConfigInvalid
            } else {
                ErrorCode::StorageUnavailable
            };
        }
        if cause.downcast_ref::<sqlx::Error>().is_some()
            || cause
                .downcast_ref::<fraiseql_observers::migrate::MigrateError>()
                .is_some()
        {
            return ErrorCode::StorageUnavailable;
        }
        if let Some(listener) = cause.downcast_ref::<fraiseql_observers::listener::ListenerError>()
        {
            return listener.code();
        }
        if let Some(cluster) = cause.downcast_ref::<fraiseql_observers::cluster::ClusterError>() {
            return cluster.code();
        }
        if let Some(backfill) = cause.downcast_ref::<fraiseql_observers::backfill::BackfillError>()
        {
            return backfill.code();
        }
        if let Some(replay) = cause.downcast_ref::<fraiseql_observers::replay::ReplayError>() {
            return replay.code();
        }
        if let Some(requeue) = cause.downcast_ref::<fraiseql_observers::requeue::RequeueError>() {
            return requeue.code();
        }
    }
    ErrorCode::Internal
}

/// jemalloc rather than glibc's allocator: the node allocates per event (decoded images, request
/// buffers) across its worker threads, where glibc's malloc/free took a quarter of the node's CPU.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    init_logging(log_format, matches!(cli.command, Command::Run { .. }));
    if let Command::ValidateConfig {
        file,
        json,
        require_env,
    } = &cli.command
    {
        return validate_config(file, *json, *require_env);
    }
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "fraiseql-observers",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if matches!(cli.command, Command::Man) {
        let manual = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
        return match manual.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: write the manual: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(database_command(cli.command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let code = exit_code_for(&error);
            match log_format {
                LogFormat::Text => eprintln!("error: {error:#}"),
                // One JSON line, like every other log line of the process.
                LogFormat::Json => tracing::error!(
                    error = %format!("{error:#}"),
                    code = %code,
                    exit_status = code.exit_code(),
                    "fatal"
                ),
            }
            ExitCode::from(code.exit_code())
        }
    }
}
