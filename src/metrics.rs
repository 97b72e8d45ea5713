//! The node's Prometheus metrics: counters and histograms updated where the work happens
//! (listener pages, job workers, the lease supervisor), gauges read from the database by the
//! control façade's background refresh (never by a scrape). Rendered as OpenMetrics text by the
//! HTTP endpoint (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::outcome::{ActionReport, ActionStatus, EventSummary};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action_type: String,
    /// `succeeded`, `failed`, `enqueued`, `already_completed` (jobs: `rescheduled`, `dead_lettered`, `lost`)
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionTypeLabel {
    pub action_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// An HTTP endpoint as `scheme://host:port` (never a path, query or credentials), or
/// `env:<VARIABLE>` when its URL comes from the environment and its host may be secret.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

/// A circuit breaker's transition at an endpoint (see [`EndpointLabel`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerTransitionLabels {
    pub endpoint: String,
    /// `opened` or `closed`.
    pub transition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

/// The seed's catalog of trouble and retries: events no observer wanted, actions that needed
/// more than one attempt, dead letters added, page and checkpoint errors, and the age of the
/// oldest due job.
#[derive(Clone, Debug, Default)]
pub struct CatalogMetrics {
    /// Events that matched no observer.
    pub events_unmatched: Counter,
    /// Attempts after the first, made by the in-page retry, by action type.
    pub retry_attempts: Family<ActionTypeLabel, Counter>,
    /// Actions that needed more than one in-page attempt, by how they ended.
    pub retried_actions: Family<ActionLabels, Counter>,
    /// Dead letters this node added, from pages or job workers.
    pub dead_letters_added: Family<SourceLabel, Counter>,
    /// Pages that failed (retried after a pause), by error code.
    pub page_errors: Family<CodeLabel, Counter>,
    /// Checkpoint writes that failed (storage; a fenced write is not counted).
    pub checkpoint_save_errors: Counter,
    /// Pages in a row that failed, per partition led (0 after a delivered page).
    pub listener_consecutive_errors: Family<PartitionLabel, Gauge>,
    /// Seconds the oldest due pending job has waited, per queue (coordinator only).
    pub oldest_due_job_age: Family<QueueLabel, Gauge<f64, AtomicU64>>,
}

impl CatalogMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_unmatched",
            "Change-log events no observer matched (entity and kind)",
            self.events_unmatched.clone(),
        );
        registry.register(
            "action_retry_attempts",
            "Attempts after the first made by the in-page retry, by action type",
            self.retry_attempts.clone(),
        );
        registry.register(
            "retried_actions",
            "Actions of pages that needed more than one attempt, by type and outcome (succeeded: a retry succeeded; failed: exhausted, dead-lettered; enqueued: handed to the job queue)",
            self.retried_actions.clone(),
        );
        registry.register(
            "dead_letters_added",
            "Dead letters this node added, by source (page, job)",
            self.dead_letters_added.clone(),
        );
        registry.register(
            "listener_page_errors",
            "Pages that failed and were retried after a pause, by error code",
            self.page_errors.clone(),
        );
        registry.register(
            "checkpoint_save_errors",
            "Checkpoint writes that failed on storage (a fenced write is not counted)",
            self.checkpoint_save_errors.clone(),
        );
        registry.register(
            "listener_consecutive_errors",
            "Pages in a row that failed, per partition this node leads (0 after a delivered page)",
            self.listener_consecutive_errors.clone(),
        );
        registry.register(
            "jobs_oldest_due_age_seconds",
            "Seconds the oldest due pending job of each queue has waited, cluster-wide, read by the coordinator (as of the last database gauge refresh)",
            self.oldest_due_job_age.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DutyLabels {
    pub duty: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

/// A history row's kind: `event` (written with its page's checkpoint) or `job` (a queued
/// action's later outcome).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordKindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
    pub status: String,
}

/// This node's adaptive concurrency limits, per HTTP endpoint.
#[derive(Debug)]
pub struct EndpointMetrics {
    /// The limit.
    pub limit: Family<EndpointLabel, Gauge>,
    /// Calls in flight.
    pub in_flight: Family<EndpointLabel, Gauge>,
    /// Calls waiting for a slot.
    pub queued: Family<EndpointLabel, Gauge>,
    /// Time calls waited for a slot.
    pub queue_time: Family<EndpointLabel, Histogram, fn() -> Histogram>,
}

impl EndpointMetrics {
    /// `registry` with these metrics registered.
    fn registered_in(&self, mut registry: Registry) -> Registry {
        registry.register(
            "endpoint_concurrency_limit",
            "Adaptive concurrency limit of this node per HTTP endpoint",
            self.limit.clone(),
        );
        registry.register(
            "endpoint_in_flight",
            "Calls this node has in flight per HTTP endpoint",
            self.in_flight.clone(),
        );
        registry.register(
            "endpoint_queued",
            "Calls of this node waiting for a slot of their HTTP endpoint's concurrency limit",
            self.queued.clone(),
        );
        registry.register(
            "endpoint_queue_time_seconds",
            "Time calls waited for a slot of their HTTP endpoint's concurrency limit (not part of an attempt's timeout)",
            self.queue_time.clone(),
        );
        registry
    }
}

impl Default for EndpointMetrics {
    fn default() -> Self {
        EndpointMetrics {
            limit: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            queue_time: Family::new_with_constructor(queue_time_histogram as fn() -> Histogram),
        }
    }
}

/// The circuit breakers, per HTTP endpoint.
#[derive(Debug, Default)]
pub struct BreakerMetrics {
    /// State as this node last saw it: 0 closed, 1 open (calls refused), 2 half-open.
    pub state: Family<EndpointLabel, Gauge>,
    /// Circuits this node saw open or close.
    pub transitions: Family<BreakerTransitionLabels, Counter>,
    /// Jobs parked on an open circuit made due because the endpoint answered again.
    pub jobs_woken: Family<EndpointLabel, Counter>,
}

impl BreakerMetrics {
    /// `registry` with these metrics registered.
    fn registered_in(&self, mut registry: Registry) -> Registry {
        registry.register(
            "breaker_state",
            "Circuit breaker of each HTTP endpoint as this node last saw it: 0 closed, 1 open (calls refused), 2 half-open (probing)",
            self.state.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Circuit breakers this node saw open (failure rate over the window, or a failed probe) or close (a successful probe), per HTTP endpoint",
            self.transitions.clone(),
        );
        registry.register(
            "breaker_jobs_woken",
            "Jobs parked on an open circuit made due at once because their endpoint answered again, per HTTP endpoint",
            self.jobs_woken.clone(),
        );
        registry
    }
}

/// Every metric of one node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub events_processed: Counter,
    pub events_failed: Counter,
    pub actions: Family<ActionLabels, Counter>,
    pub action_duration: Family<ActionTypeLabel, Histogram, fn() -> Histogram>,
    pub jobs_run: Family<ActionLabels, Counter>,
    pub leases_held: Gauge,
    pub epoch_changes: Counter,
    pub draining: Gauge,
    pub partition_backlog: Family<PartitionLabel, Gauge>,
    pub partition_checkpoint_age: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
    pub dead_letters: Gauge,
    pub jobs: Family<QueueLabels, Gauge>,
    pub dedup: Family<OutcomeLabel, Counter>,
    pub cache: Family<OutcomeLabel, Counter>,
    /// Refreshes of the database-read gauges, `succeeded` or `failed`.
    pub gauge_refreshes: Family<OutcomeLabel, Counter>,
    /// Catalog of what went wrong or needed another try (`register_catalog`).
    pub catalog: CatalogMetrics,
    /// 1 while this node holds the coordinator role.
    pub coordinator: Gauge,
    /// Coordinator duty runs by duty and outcome.
    pub coordinator_duties: Family<DutyLabels, Counter>,
    /// Rows the coordinator's retention deleted, by table.
    pub pruned_rows: Family<TableLabel, Counter>,
    /// History rows written by this node, by kind.
    pub history_rows: Family<RecordKindLabel, Counter>,
    /// Job-outcome history rows this node failed to write (logged, not retried).
    pub history_write_failures: Counter,
    /// The copy of the history to a search backend (`history: {backend: search}`).
    pub history_export: HistoryExportMetrics,
    /// Job claims the coordinator put back to pending after their worker stopped.
    pub jobs_rescued: Counter,
    /// The adaptive concurrency limits per HTTP endpoint.
    pub endpoints: EndpointMetrics,
    /// The circuit breakers per HTTP endpoint.
    pub breakers: BreakerMetrics,
    /// Succeeded, failed, enqueued: plain totals for the status call.
    totals: [AtomicU64; 3],
    /// Samples of the event and action totals, for the status call's rates over the last minute.
    rate_samples: Mutex<VecDeque<RateSample>>,
}

/// The totals at one moment, kept to compute rates over the last minute.
#[derive(Clone, Copy, Debug)]
struct RateSample {
    at: Instant,
    events: u64,
    actions: u64,
}

/// Rates are computed over at most this window.
pub const RATE_WINDOW: Duration = Duration::from_mins(1);
/// A new rate sample is kept at most this often, so the ring holds at most
/// `RATE_WINDOW / RATE_SAMPLE_EVERY + 2` samples.
pub const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RATE_SAMPLES_KEPT: usize = 14;

/// Events and actions per second over the last minute (or since the node started, if sooner).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Rates {
    pub events_per_second: f64,
    pub actions_per_second: f64,
    /// The span the rates were measured over.
    pub window_seconds: f64,
}

/// What the history export to a search backend did: `_bulk` latency, documents indexed and
/// dropped, rows waiting, failed requests.
#[derive(Clone, Debug)]
pub struct HistoryExportMetrics {
    /// Seconds per `_bulk` request (answered or not).
    pub bulk_seconds: Histogram,
    /// Documents by result: `indexed`, or `dropped` (the backend refused the document itself).
    pub documents: Family<ResultLabel, Counter>,
    /// History rows above the export cursor (waiting in PostgreSQL for the backend).
    pub waiting: Gauge,
    /// `_bulk` requests that failed as a whole (backend down, slow, or answering an error).
    pub failures: Counter,
}

/// A document's result in the history export: `indexed` or `dropped`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

impl Default for HistoryExportMetrics {
    fn default() -> Self {
        HistoryExportMetrics {
            bulk_seconds: duration_histogram(),
            documents: Family::default(),
            waiting: Gauge::default(),
            failures: Counter::default(),
        }
    }
}

impl HistoryExportMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "history_export_bulk_seconds",
            "Seconds per _bulk request of the history export to the search backend",
            self.bulk_seconds.clone(),
        );
        registry.register(
            "history_export_documents",
            "History documents sent to the search backend, by result (indexed; dropped: refused by the backend, logged with the history id)",
            self.documents.clone(),
        );
        registry.register(
            "history_export_waiting",
            "History rows not yet exported to the search backend (they wait in PostgreSQL while it is slow or down)",
            self.waiting.clone(),
        );
        registry.register(
            "history_export_failures",
            "_bulk requests of the history export that failed as a whole (retried with backoff)",
            self.failures.clone(),
        );
    }

    /// Counts `count` documents of `result`.
    pub fn record_documents(&self, result: &str, count: usize) {
        if count > 0 {
            self.documents
                .get_or_create(&ResultLabel {
                    result: result.to_owned(),
                })
                .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
        }
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn queue_time_histogram() -> Histogram {
    // 0.1 ms to ~3 s, and the rest above.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    #[must_use]
    #[allow(
        clippy::too_many_lines,
        reason = "one registration per metric, in catalog order"
    )]
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fraiseql_observers");
        let metrics = Metrics {
            registry: Registry::default(),
            events_processed: Counter::default(),
            events_failed: Counter::default(),
            actions: Family::default(),
            action_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            jobs_run: Family::default(),
            leases_held: Gauge::default(),
            epoch_changes: Counter::default(),
            draining: Gauge::default(),
            partition_backlog: Family::default(),
            partition_checkpoint_age: Family::default(),
            dead_letters: Gauge::default(),
            jobs: Family::default(),
            dedup: Family::default(),
            cache: Family::default(),
            gauge_refreshes: Family::default(),
            catalog: CatalogMetrics::default(),
            coordinator: Gauge::default(),
            coordinator_duties: Family::default(),
            pruned_rows: Family::default(),
            history_rows: Family::default(),
            history_write_failures: Counter::default(),
            history_export: HistoryExportMetrics::default(),
            jobs_rescued: Counter::default(),
            endpoints: EndpointMetrics::default(),
            breakers: BreakerMetrics::default(),
            totals: Default::default(),
            rate_samples: Mutex::new(VecDeque::with_capacity(RATE_SAMPLES_KEPT)),
        };
        registry.register(
            "events_processed",
            "Change-log events delivered to the executor",
            metrics.events_processed.clone(),
        );
        registry.register(
            "events_failed",
            "Events with at least one action that failed for good",
            metrics.events_failed.clone(),
        );
        registry.register(
            "actions",
            "Actions run from change-log pages, by type and outcome",
            metrics.actions.clone(),
        );
        registry.register(
            "action_duration_seconds",
            "Time an action took, retries included, by type",
            metrics.action_duration.clone(),
        );
        registry.register(
            "jobs_run",
            "Job attempts run by this node's workers, by action type and outcome",
            metrics.jobs_run.clone(),
        );
        registry.register(
            "leases_held",
            "Partitions this node leads",
            metrics.leases_held.clone(),
        );
        registry.register(
            "epoch_changes",
            "Partition leases taken by this node (each bumps the partition's epoch)",
            metrics.epoch_changes.clone(),
        );
        registry.register(
            "draining",
            "1 while this node is draining",
            metrics.draining.clone(),
        );
        registry.register(
            "partition_backlog_rows",
            "Change-log rows committed after the checkpoint, per partition this node leads (capped at 1,000,000; as of the last database gauge refresh)",
            metrics.partition_backlog.clone(),
        );
        registry.register(
            "partition_checkpoint_age_seconds",
            "Seconds since the checkpoint was written, per partition this node leads (as of the last database gauge refresh)",
            metrics.partition_checkpoint_age.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead letters waiting in the database, cluster-wide, read by the coordinator (0 on other nodes: take the max across nodes; counted up to 100,000; as of the last database gauge refresh)",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "jobs",
            "Jobs in the durable queue by queue and status, cluster-wide, read by the coordinator (no series on other nodes; as of the last database gauge refresh)",
            metrics.jobs.clone(),
        );
        registry.register(
            "dedup_checks",
            "Deduplication claims that did not simply acquire (duplicate_skipped, busy_elsewhere, claim_taken_over, store_unavailable) and renewals of held claims that did not succeed (claim_lost, renewal_failed)",
            metrics.dedup.clone(),
        );
        registry.register(
            "cache_operations",
            "Action result cache: hit, miss, store, invalidated, evicted (in-process cache at capacity or expired), error",
            metrics.cache.clone(),
        );
        registry.register(
            "database_gauge_refreshes",
            "Reads of the database-backed gauges (backlog, checkpoint age, dead letters, jobs) by the background refresh: succeeded, failed",
            metrics.gauge_refreshes.clone(),
        );
        metrics.register_coordinator(&mut registry);
        metrics.catalog.register(&mut registry);
        Metrics {
            registry: metrics
                .endpoints
                .registered_in(metrics.breakers.registered_in(registry)),
            ..metrics
        }
    }

    fn register_coordinator(&self, registry: &mut Registry) {
        registry.register(
            "coordinator",
            "1 while this node holds the coordinator role (the cluster-wide gauges dead_letters and jobs come from it)",
            self.coordinator.clone(),
        );
        registry.register(
            "coordinator_duty_runs",
            "Coordinator duty runs by duty (rescue, job_retention, ledger_retention, dead_letter_retention, change_log_retention, history_partitions) and outcome (succeeded, failed, fenced)",
            self.coordinator_duties.clone(),
        );
        registry.register(
            "pruned_rows",
            "Rows deleted by the coordinator's retention, by table (jobs, ledger, dead_letters, change_log)",
            self.pruned_rows.clone(),
        );
        registry.register(
            "history_rows",
            "History rows written by this node, by kind (event: with its page's checkpoint; job: a queued action's later outcome)",
            self.history_rows.clone(),
        );
        registry.register(
            "history_write_failures",
            "Job-outcome history rows this node could not write (logged at WARN, not retried)",
            self.history_write_failures.clone(),
        );
        self.history_export.register(registry);
        registry.register(
            "jobs_rescued",
            "Running jobs whose claim expired (worker stopped) put back to pending by the coordinator",
            self.jobs_rescued.clone(),
        );
    }

    /// Counts a delivered page's events and actions.
    /// `rows` history rows of `kind` (`event` or `job`) written.
    pub fn record_history_rows(&self, kind: &str, rows: usize) {
        self.history_rows
            .get_or_create(&RecordKindLabel {
                kind: kind.to_owned(),
            })
            .inc_by(u64::try_from(rows).unwrap_or(u64::MAX));
    }

    pub fn record_page(&self, summaries: &[EventSummary]) {
        self.events_processed
            .inc_by(u64::try_from(summaries.len()).unwrap_or(u64::MAX));
        for summary in summaries {
            if summary.matched_observers.is_empty() {
                self.catalog.events_unmatched.inc();
            }
            if summary
                .actions
                .iter()
                .any(|report| matches!(report.status, ActionStatus::Failed { .. }))
            {
                self.events_failed.inc();
            }
            for report in &summary.actions {
                self.record_action(report);
            }
        }
    }

    fn record_action(&self, report: &ActionReport) {
        let outcome = match report.status {
            ActionStatus::Succeeded { .. } => "succeeded",
            ActionStatus::AlreadyCompleted => "already_completed",
            ActionStatus::Enqueued { .. } => "enqueued",
            ActionStatus::Failed { .. } => "failed",
        };
        self.actions
            .get_or_create(&ActionLabels {
                action_type: report.action_type.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.count_total(outcome);
        if report.attempts > 1 {
            self.catalog
                .retry_attempts
                .get_or_create(&ActionTypeLabel {
                    action_type: report.action_type.to_owned(),
                })
                .inc_by(u64::from(report.attempts - 1));
            self.catalog
                .retried_actions
                .get_or_create(&ActionLabels {
                    action_type: report.action_type.to_owned(),
                    outcome: outcome.to_owned(),
                })
                .inc();
        }
        if let ActionStatus::Failed {
            dead_letter: Some(_),
            ..
        } = report.status
        {
            self.record_dead_letter("page");
        }
        if matches!(
            report.status,
            ActionStatus::Succeeded { .. } | ActionStatus::Failed { .. }
        ) {
            self.action_duration
                .get_or_create(&ActionTypeLabel {
                    action_type: report.action_type.to_owned(),
                })
                .observe(report.duration.as_secs_f64());
        }
    }

    /// Counts a deduplication outcome.
    pub fn record_dedup(&self, outcome: &str) {
        self.dedup
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a cache outcome.
    pub fn record_cache(&self, outcome: &str, how_many: u64) {
        self.cache
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc_by(how_many);
    }

    /// Counts one job attempt run by a worker.
    pub fn record_job(&self, action_type: &str, outcome: &str, duration: std::time::Duration) {
        self.count_total(outcome);
        if outcome == "dead_lettered" {
            self.record_dead_letter("job");
        }
        self.jobs_run
            .get_or_create(&ActionLabels {
                action_type: action_type.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.action_duration
            .get_or_create(&ActionTypeLabel {
                action_type: action_type.to_owned(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts a dead letter this node added (`page` or `job`).
    pub fn record_dead_letter(&self, source: &str) {
        self.catalog
            .dead_letters_added
            .get_or_create(&SourceLabel {
                source: source.to_owned(),
            })
            .inc();
    }

    /// Counts a failed page of `partition` (its error code; `checkpoint`: the checkpoint write
    /// failed) and sets the partition's run of failures.
    pub fn record_page_error(&self, partition: i32, code: &str, checkpoint: bool, in_a_row: u32) {
        self.catalog
            .page_errors
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
        if checkpoint {
            self.catalog.checkpoint_save_errors.inc();
        }
        self.set_consecutive_errors(partition, in_a_row);
    }

    /// Sets the run of failed pages of `partition` (0 after a delivered page).
    pub fn set_consecutive_errors(&self, partition: i32, in_a_row: u32) {
        if let Ok(partition) = u32::try_from(partition) {
            self.catalog
                .listener_consecutive_errors
                .get_or_create(&PartitionLabel { partition })
                .set(i64::from(in_a_row));
        }
    }

    /// Totals over every action type: (succeeded, failed, enqueued), pages and jobs together; a
    /// job rescheduled for another attempt is not enqueued again.
    #[must_use]
    pub fn action_totals(&self) -> (u64, u64, u64) {
        (
            self.totals[0].load(Ordering::Relaxed),
            self.totals[1].load(Ordering::Relaxed),
            self.totals[2].load(Ordering::Relaxed),
        )
    }

    fn count_total(&self, outcome: &str) {
        let index = match outcome {
            "succeeded" => 0,
            "failed" | "dead_lettered" => 1,
            "enqueued" => 2,
            _ => return,
        };
        self.totals[index].fetch_add(1, Ordering::Relaxed);
    }

    fn actions_total(&self) -> u64 {
        self.totals
            .iter()
            .map(|total| total.load(Ordering::Relaxed))
            .sum()
    }

    /// Keeps a sample of the event and action totals for [`Metrics::rates`], unless the last one
    /// is younger than [`RATE_SAMPLE_EVERY`]; samples older than [`RATE_WINDOW`] (but the newest
    /// such, the window's start) are dropped, and at most a fixed number are kept.
    pub fn sample_rates(&self) {
        self.sample_rates_at(Instant::now());
    }

    fn sample_rates_at(&self, now: Instant) {
        let mut samples = self
            .rate_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if samples
            .back()
            .is_some_and(|last| now.duration_since(last.at) < RATE_SAMPLE_EVERY)
        {
            return;
        }
        samples.push_back(RateSample {
            at: now,
            events: self.events_processed.get(),
            actions: self.actions_total(),
        });
        while samples.len() > RATE_SAMPLES_KEPT
            || samples
                .get(1)
                .is_some_and(|second| now.duration_since(second.at) >= RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Events and actions (succeeded, failed, enqueued) per second from the oldest sample of the
    /// last minute to now; `None` before a sample at least a second old exists.
    #[must_use]
    pub fn rates(&self) -> Option<Rates> {
        self.rates_at(Instant::now())
    }

    fn rates_at(&self, now: Instant) -> Option<Rates> {
        let samples = self
            .rate_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = samples
            .iter()
            .find(|sample| now.duration_since(sample.at) <= RATE_WINDOW + RATE_SAMPLE_EVERY)?;
        let window = now.duration_since(start.at).as_secs_f64();
        if window < 1.0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss, reason = "a rate")]
        let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / window;
        Some(Rates {
            events_per_second: per_second(self.events_processed.get(), start.events),
            actions_per_second: per_second(self.actions_total(), start.actions),
            window_seconds: window,
        })
    }

    /// The OpenMetrics text of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod rate_tests {
    use super::{Metrics, RATE_SAMPLES_KEPT};
    use std::time::{Duration, Instant};

    #[test]
    fn rates_cover_the_last_minute_from_a_bounded_ring() {
        let metrics = Metrics::new();
        let start = Instant::now();
        assert_eq!(metrics.rates_at(start), None, "no sample yet");
        // One sample every second for ten minutes, 10 events each second: only one in five is
        // kept (at most every 5 s), and only the last minute's.
        for second in 0..600_u64 {
            metrics.sample_rates_at(start + Duration::from_secs(second));
            metrics.events_processed.inc_by(10);
        }
        let now = start + Duration::from_mins(10);
        let kept = metrics.rate_samples.lock().unwrap().len();
        assert!(kept <= RATE_SAMPLES_KEPT, "{kept} samples kept");
        let rates = metrics.rates_at(now).expect("a rate");
        assert!((55.0..=65.0).contains(&rates.window_seconds), "{rates:?}");
        assert!((rates.events_per_second - 10.0).abs() < 1e-9, "{rates:?}");
        assert!(rates.actions_per_second.abs() < 1e-9, "{rates:?}");
    }
}

#[cfg(test)]
mod render_tests {
    #[test]
    fn every_registered_metric_renders() {
        let metrics = super::Metrics::new();
        let mut text = String::new();
        let result = prometheus_client::encoding::text::encode(&mut text, &metrics.registry);
        assert!(result.is_ok(), "{result:?}\n{text}");
        assert!(
            text.contains("fraiseql_observers_events_unmatched_total 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
