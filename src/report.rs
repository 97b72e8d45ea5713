//! Human and JSON renderings of what the CLI shows: the `validate-config` report and the
//! `status` and `cluster status` trees.
//!
//! Every figure is computed from the loaded configuration; nothing here is sample output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::json;

use crate::config::{BackoffKind, ConfigErrors, FailurePolicy};
use crate::domain::EventKind;
use crate::escape::escape_control;
use crate::observers::ObserversConfig;

/// Counts of what a configuration defines.
struct Tally<'config> {
    entities: BTreeMap<&'config str, usize>,
    kinds: BTreeMap<EventKind, usize>,
    action_types: BTreeMap<&'static str, usize>,
    conditions: usize,
    actions: usize,
    secrets_from_env: usize,
    dead_lettering: usize,
    retry_policies: BTreeMap<String, usize>,
    /// What each action type needs besides its own settings (a server, a connection).
    needs: BTreeMap<&'static str, BTreeSet<String>>,
    /// The actions whose target URL is rendered from the event, where they are.
    urls_from_event: Vec<(String, crate::actions::UrlFromEvent)>,
}

fn tally(config: &ObserversConfig) -> Tally<'_> {
    let mut tally = Tally {
        entities: BTreeMap::new(),
        kinds: BTreeMap::new(),
        action_types: BTreeMap::new(),
        conditions: 0,
        actions: 0,
        secrets_from_env: 0,
        dead_lettering: 0,
        retry_policies: BTreeMap::new(),
        needs: BTreeMap::new(),
        urls_from_event: Vec::new(),
    };
    for observer in &config.observers {
        *tally.entities.entry(observer.entity.as_str()).or_default() += 1;
        for kind in &observer.events {
            *tally.kinds.entry(*kind).or_default() += 1;
        }
        tally.conditions += usize::from(observer.condition.is_some());
        tally.dead_lettering += usize::from(observer.on_failure == FailurePolicy::DeadLetter);
        let retry = &observer.retry;
        let policy = format!(
            "{} attempt{}, {} → {} {}{}",
            retry.max_attempts,
            if retry.max_attempts == 1 { "" } else { "s" },
            humantime::format_duration(retry.initial_delay),
            humantime::format_duration(retry.max_delay),
            match retry.backoff {
                BackoffKind::Exponential => "exponential",
                BackoffKind::Fixed => "fixed",
            },
            if retry.jitter { " with jitter" } else { "" }
        );
        *tally.retry_policies.entry(policy).or_default() += 1;
        for action in &observer.actions {
            tally.actions += 1;
            *tally
                .action_types
                .entry(action.kind.type_name())
                .or_default() += 1;
            tally.secrets_from_env += action.kind.secrets_from_env();
            if let Some(url) = action.kind.url_from_event() {
                let place = format!(
                    "{} actions[{}] ({})",
                    observer.name.as_str(),
                    action.index,
                    action.kind.type_name()
                );
                tally.urls_from_event.push((place, url));
            }
            if let Some(need) = action.kind.needs() {
                tally
                    .needs
                    .entry(action.kind.type_name())
                    .or_default()
                    .insert(need);
            }
        }
    }
    tally
}

fn counted<K: std::fmt::Display>(counts: &BTreeMap<K, usize>) -> String {
    counts
        .iter()
        .map(|(key, count)| format!("{key} ({count})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tree-shaped report `validate-config` prints for a valid file.
#[must_use]
pub fn validation_report(config: &ObserversConfig) -> String {
    let tally = tally(config);
    let mut out = String::new();
    let observers = config.observers.len();
    let _ = writeln!(out, "Configuration Validation Report: {}", config.origin);
    let _ = writeln!(out, "├── Observers: {observers}");
    let _ = writeln!(out, "│   ├── Names: ✓ unique");
    let _ = writeln!(
        out,
        "│   ├── Entities: {}",
        or_none(&counted(&tally.entities))
    );
    let _ = writeln!(out, "│   ├── Events: {}", or_none(&counted(&tally.kinds)));
    let _ = writeln!(out, "│   ├── Conditions: ✓ {} compiled", tally.conditions);
    let _ = writeln!(
        out,
        "│   └── On failure: {} to the dead-letter queue, {} logged",
        tally.dead_lettering,
        observers - tally.dead_lettering
    );
    let _ = writeln!(out, "├── Actions: {}", tally.actions);
    let types: Vec<_> = tally.action_types.iter().collect();
    for (position, (kind, count)) in types.iter().enumerate() {
        let branch = if position + 1 == types.len() {
            "└──"
        } else {
            "├──"
        };
        let needs = tally
            .needs
            .get(*kind)
            .map(|needs| {
                format!(
                    " — needs {}",
                    needs.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .unwrap_or_default();
        let _ = writeln!(out, "│   {branch} {kind}: {count}{needs}");
    }
    let _ = writeln!(
        out,
        "├── Secrets from environment: {}",
        tally.secrets_from_env
    );
    write_urls_from_event(&mut out, &tally.urls_from_event);
    let _ = writeln!(out, "├── Retry policies:");
    let policies: Vec<_> = tally.retry_policies.iter().collect();
    for (position, (policy, count)) in policies.iter().enumerate() {
        let branch = if position + 1 == policies.len() {
            "└──"
        } else {
            "├──"
        };
        let _ = writeln!(out, "│   {branch} {policy} ({count})");
    }
    let _ = writeln!(
        out,
        "└── Executor: at most {} actions and {} entities at once",
        config.executor.max_concurrent_actions, config.executor.max_concurrent_entities
    );
    if !config.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings ({}):", config.warnings.len());
        for warning in &config.warnings {
            let _ = writeln!(out, "  ⚠ {warning}");
        }
    }
    let _ = writeln!(
        out,
        "\n✓ Configuration is valid: {observers} observer{}, {} action{}",
        if observers == 1 { "" } else { "s" },
        tally.actions,
        if tally.actions == 1 { "" } else { "s" }
    );
    out
}

/// Which actions render their target URL from event data, and whether the SSRF guard checks
/// the addresses those URLs reach.
fn write_urls_from_event(out: &mut String, urls: &[(String, crate::actions::UrlFromEvent)]) {
    if urls.is_empty() {
        let _ = writeln!(out, "├── URLs rendered from event data: none");
        return;
    }
    let _ = writeln!(out, "├── URLs rendered from event data: {}", urls.len());
    for (position, (place, url)) in urls.iter().enumerate() {
        let branch = if position + 1 == urls.len() {
            "└──"
        } else {
            "├──"
        };
        let what = match (url.host_from_event_data, url.guarded) {
            (true, true) => {
                "host from event data; private, loopback and link-local addresses refused"
            }
            (true, false) => "host from event data; allow_private_targets: any address",
            (false, _) => "path from event data; host fixed in the file",
        };
        let reads = if url.reads.is_empty() {
            "no variable".to_owned()
        } else {
            url.reads.join(", ")
        };
        let _ = writeln!(out, "│   {branch} {place}: reads {reads} — {what}");
    }
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}

/// The machine-readable form of a validation (valid or not), for `validate-config --json`.
#[must_use]
pub fn validation_json(result: &Result<ObserversConfig, ConfigErrors>) -> serde_json::Value {
    let problem = |error: &crate::config::ConfigError| {
        json!({
            "file": error.file,
            "line": error.position.map(|position| position.line),
            "column": error.position.map(|position| position.column),
            "path": error.path,
            "message": error.message,
        })
    };
    match result {
        Ok(config) => {
            let tally = tally(config);
            json!({
                "valid": true,
                "file": config.origin,
                "observers": config.observers.iter().map(|observer| json!({
                    "name": observer.name.as_str(),
                    "entity": observer.entity,
                    "events": observer.events.iter().map(|kind| kind.as_str()).collect::<Vec<_>>(),
                    "condition": observer.condition.as_ref().map(crate::condition::Condition::source),
                    "actions": observer.actions.iter().map(|action| action.kind.type_name()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "action_types": tally.action_types,
                "urls_from_event_data": tally.urls_from_event.iter().map(|(place, url)| json!({
                    "action": place,
                    "reads": url.reads,
                    "host_from_event_data": url.host_from_event_data,
                    "guarded": url.guarded,
                })).collect::<Vec<_>>(),
                "errors": [],
                "warnings": config.warnings.iter().map(problem).collect::<Vec<_>>(),
            })
        }
        Err(errors) => json!({
            "valid": false,
            "errors": errors.errors.iter().map(problem).collect::<Vec<_>>(),
            "warnings": [],
        }),
    }
}

fn seconds(age: Option<f64>) -> String {
    age.map_or_else(|| "never".to_owned(), |age| format!("{age:.1}s ago"))
}

/// `status`: one node, as the seed's tree (listener, executor, job queue, Redis stores, endpoints).
/// Every figure comes from the node's answer; every string the node sent is escaped: the answer
/// comes over the network and its checkpoints, queue names and endpoints from the database or
/// event data. (The audit trail's branch joins once the trail exists; nothing is shown for it
/// until then.)
#[must_use]
pub fn node_status_text(status: &crate::control::NodeStatus) -> String {
    let mut out = String::new();
    let figures = &status.figures;
    let counters = &status.counters;
    let window = figures.rates.map_or(String::new(), |rates| {
        format!(" over the last {:.0}s", rates.window_seconds)
    });
    let _ = writeln!(
        out,
        "Observer System Status — node {} (fraiseql-observers {}), up {}s{}",
        escape_control(&status.node_id),
        escape_control(&status.version),
        status.uptime_seconds,
        if status.draining { ", DRAINING" } else { "" }
    );
    write_listener(&mut out, status, &window);
    let _ = writeln!(out, "├── Executor");
    let _ = writeln!(out, "│   ├── Observers: {}", figures.observers);
    let _ = writeln!(
        out,
        "│   ├── Actions/s{window}: {}",
        rate_text(figures.rates.map(|rates| rates.actions_per_second))
    );
    let _ = writeln!(
        out,
        "│   ├── Action time (p99): {}",
        p99_text(figures.action_duration_p99_seconds)
    );
    let _ = writeln!(
        out,
        "│   ├── Actions: {} succeeded, {} failed, {} enqueued",
        counters.actions_succeeded, counters.actions_failed, counters.actions_enqueued
    );
    let dead_letters = if figures.dead_letters >= crate::control::DEAD_LETTER_COUNT_CAP {
        format!("{}+", crate::control::DEAD_LETTER_COUNT_CAP)
    } else {
        figures.dead_letters.to_string()
    };
    let _ = writeln!(out, "│   └── DLQ items: {dead_letters} (cluster-wide)");
    let _ = writeln!(
        out,
        "├── Job queue:{}",
        if status.queues.is_empty() {
            " empty"
        } else {
            ""
        }
    );
    for (index, queue) in status.queues.iter().enumerate() {
        let _ = writeln!(
            out,
            "│   {} {}: {} pending, {} running, oldest due {}, {} completed (24h), {} failed",
            branch(index, status.queues.len()),
            escape_control(&queue.queue),
            queue.pending,
            queue.running,
            queue
                .oldest_due_age_seconds
                .map_or_else(|| "none".to_owned(), |age| format!("{age:.1}s ago")),
            queue.completed_last_day,
            queue.failed
        );
    }
    let _ = writeln!(out, "├── Redis stores (this node)");
    let _ = writeln!(
        out,
        "│   ├── Dedup checks not simply acquired: {}",
        or_none(&counted_u64(&figures.dedup))
    );
    let hits = figures.cache.get("hit").copied().unwrap_or(0);
    let misses = figures.cache.get("miss").copied().unwrap_or(0);
    let hit_rate = if hits + misses == 0 {
        "no lookup yet".to_owned()
    } else {
        #[allow(clippy::cast_precision_loss, reason = "a percentage")]
        let rate = hits as f64 * 100.0 / (hits + misses) as f64;
        format!("{rate:.0}% ({hits} hits, {misses} misses)")
    };
    let _ = writeln!(out, "│   └── Cache hit rate: {hit_rate}");
    write_history(&mut out, figures.history.as_ref());
    write_endpoints(&mut out, &figures.endpoints);
    out
}

/// The history branch of `status`: the rows this node wrote, and its export to a search backend.
fn write_history(out: &mut String, history: Option<&crate::control::HistoryFigures>) {
    let Some(history) = history else {
        let _ = writeln!(out, "├── History: off");
        return;
    };
    let _ = writeln!(
        out,
        "├── History ({}, this node)",
        escape_control(&history.backend)
    );
    let searched = history.backend.contains("search");
    let _ = writeln!(
        out,
        "│   {} Rows written: {} events, {} job outcomes, {} job-outcome write failures",
        if searched { "├──" } else { "└──" },
        history.event_rows,
        history.job_rows,
        history.write_failures
    );
    if searched {
        let _ = writeln!(
            out,
            "│   └── Search export: {} indexed, {} dropped, {} waiting, {} failed requests",
            history.exported, history.dropped, history.waiting, history.export_failures
        );
    }
}

/// The listener branch of `status`: partitions led, rate, backlog, each checkpoint.
fn write_listener(out: &mut String, status: &crate::control::NodeStatus, window: &str) {
    let figures = &status.figures;
    let counters = &status.counters;
    let _ = writeln!(out, "├── Listener");
    let _ = writeln!(
        out,
        "│   ├── Partitions led: {} of {}",
        status.leases.len(),
        status.partition_count
    );
    let _ = writeln!(
        out,
        "│   ├── Events/s{window}: {}",
        rate_text(figures.rates.map(|rates| rates.events_per_second))
    );
    let _ = writeln!(
        out,
        "│   ├── Processed events: {}",
        counters.events_processed
    );
    let backlog: u64 = status.leases.iter().map(|lease| lease.backlog).sum();
    let _ = writeln!(out, "│   ├── Backlog: {backlog} rows");
    let _ = writeln!(
        out,
        "│   └── Checkpoints:{}",
        if status.leases.is_empty() {
            " none (no partition led)"
        } else {
            ""
        }
    );
    for (index, lease) in status.leases.iter().enumerate() {
        let _ = writeln!(
            out,
            "│       {} partition {}: epoch {}, backlog {}, saved {} ({})",
            branch(index, status.leases.len()),
            lease.partition,
            lease.epoch,
            lease.backlog,
            seconds(lease.checkpoint_age_seconds),
            escape_control(&lease.checkpoint)
        );
    }
}

fn rate_text(rate: Option<f64>) -> String {
    rate.map_or_else(
        || "not known yet (first minute)".to_owned(),
        |rate| format!("{rate:.1}"),
    )
}

/// The last branch of `status` and `metrics`: every endpoint's adaptive limit.
fn write_endpoints(out: &mut String, endpoints: &[crate::metrics_text::EndpointFigures]) {
    let _ = writeln!(
        out,
        "└── Endpoints (adaptive limits):{}",
        if endpoints.is_empty() {
            " none called yet"
        } else {
            ""
        }
    );
    for (index, endpoint) in endpoints.iter().enumerate() {
        let _ = writeln!(
            out,
            "    {} {}: limit {}, {} in flight, {} queued",
            branch(index, endpoints.len()),
            escape_control(&endpoint.endpoint),
            endpoint.limit,
            endpoint.in_flight,
            endpoint.queued
        );
    }
}

/// The p99 of action durations as a histogram can tell it: at most its bucket's upper bound.
fn p99_text(seconds: Option<f64>) -> String {
    match seconds {
        None => "no action yet".to_owned(),
        Some(seconds) if seconds.is_finite() => format!("≤ {:.0}ms", seconds * 1000.0),
        Some(_) => "over the largest bucket (33s)".to_owned(),
    }
}

fn branch(index: usize, count: usize) -> &'static str {
    if index + 1 == count {
        "└──"
    } else {
        "├──"
    }
}

fn counted_u64(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(key, count)| format!("{} {count}", escape_control(key)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Events and actions per second between two scrapes of one node.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ScrapeRates {
    pub events_per_second: f64,
    pub actions_per_second: f64,
    pub over_seconds: f64,
}

impl ScrapeRates {
    /// The rates from `before` to `after`, `seconds` apart (a restarted node's counters, lower
    /// than before, count from zero).
    #[must_use]
    pub fn between(
        before: &crate::metrics_text::MetricsSummary,
        after: &crate::metrics_text::MetricsSummary,
        seconds: f64,
    ) -> ScrapeRates {
        let actions = |summary: &crate::metrics_text::MetricsSummary| -> u64 {
            summary.actions.values().sum::<u64>() + summary.jobs_run.values().sum::<u64>()
        };
        let delta = |now: u64, then: u64| if now >= then { now - then } else { now };
        #[allow(clippy::cast_precision_loss, reason = "a rate")]
        let per_second = |count: u64| count as f64 / seconds.max(f64::EPSILON);
        ScrapeRates {
            events_per_second: per_second(delta(after.events_processed, before.events_processed)),
            actions_per_second: per_second(delta(actions(after), actions(before))),
            over_seconds: seconds,
        }
    }
}

/// `metrics`: one node's scraped metrics as a readable tree. The labels came from the node
/// (queue names, endpoints): escaped.
#[must_use]
pub fn metrics_summary_text(
    endpoint: &str,
    summary: &crate::metrics_text::MetricsSummary,
    rates: Option<&ScrapeRates>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Metrics of {}{}{}",
        escape_control(endpoint),
        if summary.coordinator {
            " (coordinator)"
        } else {
            ""
        },
        if summary.draining { ", DRAINING" } else { "" }
    );
    match rates {
        Some(rates) => {
            let _ = writeln!(
                out,
                "├── Rates over {:.1}s: {:.1} events/s, {:.1} actions/s",
                rates.over_seconds, rates.events_per_second, rates.actions_per_second
            );
        }
        None => {
            let _ = writeln!(out, "├── Rates: not sampled (totals only)");
        }
    }
    let _ = writeln!(
        out,
        "├── Events: {} processed, {} with a failed action, {} unmatched",
        summary.events_processed, summary.events_failed, summary.events_unmatched
    );
    let _ = writeln!(
        out,
        "├── Actions by outcome: {}",
        or_none(&counted_u64(&summary.actions))
    );
    let _ = writeln!(
        out,
        "├── Job attempts by outcome: {}",
        or_none(&counted_u64(&summary.jobs_run))
    );
    let _ = writeln!(
        out,
        "├── Dead letters: {} added by this node ({}), {} waiting{}",
        summary.dead_letters_added.values().sum::<u64>(),
        or_none(&counted_u64(&summary.dead_letters_added)),
        summary
            .dead_letters_waiting
            .map_or_else(|| "?".to_owned(), |count| count.to_string()),
        if summary.coordinator {
            ""
        } else {
            " (only the coordinator counts them)"
        }
    );
    let _ = writeln!(
        out,
        "├── Jobs:{}",
        if summary.jobs.is_empty() {
            if summary.coordinator {
                " none"
            } else {
                " (only the coordinator counts them)"
            }
        } else {
            ""
        }
    );
    for (index, (queue, statuses)) in summary.jobs.iter().enumerate() {
        let _ = writeln!(
            out,
            "│   {} {}: {}",
            branch(index, summary.jobs.len()),
            escape_control(queue),
            counted_u64(statuses)
        );
    }
    let _ = writeln!(out, "├── Leases held: {}", summary.leases_held);
    let _ = writeln!(
        out,
        "├── Action time (p99): {}",
        p99_text(summary.action_duration_p99_seconds)
    );
    write_endpoints(&mut out, &summary.endpoints);
    out
}

/// `cluster status`: every node and every partition, strings escaped as in [`node_status_text`].
#[must_use]
pub fn cluster_status_text(cluster: &crate::control::ClusterState) -> String {
    let mut out = String::new();
    let dead_letters = if cluster.dead_letters >= crate::control::DEAD_LETTER_COUNT_CAP {
        format!("{}+", crate::control::DEAD_LETTER_COUNT_CAP)
    } else {
        cluster.dead_letters.to_string()
    };
    let coordinator = match &cluster.coordinator {
        Some(coordinator) => format!(
            "coordinator {} (epoch {}, for {:.0}s)",
            escape_control(&coordinator.node_id),
            coordinator.epoch,
            coordinator.held_for_seconds
        ),
        None => "no coordinator (a live node takes the role at its next tick)".to_owned(),
    };
    let _ = writeln!(
        out,
        "Cluster: {} live node(s), {} partitions, {dead_letters} dead letter(s), {coordinator}",
        cluster.nodes.len(),
        cluster.partition_count,
    );
    for node in &cluster.nodes {
        let partitions: Vec<String> = node.partitions.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "├── {} (v{}, up {}s, heartbeat {:.1}s ago{}): partitions [{}], backlog {}, oldest checkpoint {}",
            escape_control(&node.node_id),
            escape_control(&node.version),
            node.uptime_seconds,
            node.heartbeat_age_seconds,
            if node.draining { ", draining" } else { "" },
            partitions.join(", "),
            node.backlog,
            seconds(node.oldest_checkpoint_age_seconds)
        );
    }
    let _ = writeln!(
        out,
        "│   (per-node figures from the database; rates and actions: `status --endpoint` on each node)"
    );
    let _ = writeln!(out, "└── Partitions");
    let _ = writeln!(
        out,
        "    {:>9}  {:<24} {:>6} {:>9}  {:<14} checkpoint",
        "partition", "leader", "epoch", "backlog", "saved"
    );
    for partition in &cluster.partitions {
        let _ = writeln!(
            out,
            "    {:>9}  {:<24} {:>6} {:>9}  {:<14} {}",
            partition.partition,
            escape_control(partition.leader.as_deref().unwrap_or("(none)")),
            partition.epoch,
            partition.backlog,
            seconds(partition.checkpoint_age_seconds),
            escape_control(&partition.checkpoint)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClusterState, NodeState, PartitionState};

    #[test]
    fn cluster_status_shows_what_nodes_report_escaped_one_line_each() {
        let hostile = "node-a\n├── node-z (v9, up 0s, heartbeat 0.0s ago): partitions [0]\u{1b}[2K";
        let cluster = ClusterState {
            partition_count: 1,
            nodes: vec![NodeState {
                node_id: hostile.to_owned(),
                version: "0.1.0\r".to_owned(),
                draining: false,
                heartbeat_age_seconds: 0.1,
                uptime_seconds: 5,
                partitions: vec![0],
                backlog: 0,
                oldest_checkpoint_age_seconds: None,
            }],
            partitions: vec![PartitionState {
                partition: 0,
                leader: Some(hostile.to_owned()),
                epoch: 1,
                checkpoint: "1:2:\u{202e}".to_owned(),
                backlog: 0,
                checkpoint_age_seconds: None,
            }],
            dead_letters: crate::control::DEAD_LETTER_COUNT_CAP,
            coordinator: Some(crate::control::CoordinatorState {
                node_id: "node-\u{1b}[2K".to_owned(),
                epoch: 3,
                held_for_seconds: 12.4,
            }),
        };
        let text = cluster_status_text(&cluster);
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(!text.contains(['\u{1b}', '\r', '\u{202e}']), "{text}");
        assert!(
            text.contains(r"├── node-a\n├── node-z (v9, up 0s, heartbeat 0.0s ago): partitions [0]\u{1b}[2K (v0.1.0\r,"),
            "{text}"
        );
        assert!(
            text.starts_with("Cluster: 1 live node(s), 1 partitions, 100000+ dead letter(s), coordinator node-\\u{1b}[2K (epoch 3, for 12s)\n"),
            "{text}"
        );
    }

    #[test]
    fn the_status_tree_escapes_what_the_node_sent_one_line_each() {
        use crate::control::{Counters, NodeFigures, NodeStatus};
        let hostile = "x\n└── forged\u{1b}[2K\u{202e}";
        let status = NodeStatus {
            node_id: hostile.to_owned(),
            version: "0.1.0".to_owned(),
            uptime_seconds: 3,
            draining: false,
            partition_count: 1,
            leases: vec![PartitionState {
                partition: 0,
                leader: None,
                epoch: 2,
                checkpoint: hostile.to_owned(),
                backlog: 7,
                checkpoint_age_seconds: Some(1.0),
            }],
            counters: Counters {
                events_processed: 9,
                actions_succeeded: 8,
                actions_failed: 1,
                actions_enqueued: 0,
                epoch_changes: 1,
            },
            queues: vec![crate::jobs::QueueStats {
                queue: hostile.to_owned(),
                pending: 4,
                ..crate::jobs::QueueStats::default()
            }],
            figures: NodeFigures {
                observers: 2,
                cache: [("hit".to_owned(), 3), ("miss".to_owned(), 1)].into(),
                dedup: [(hostile.to_owned(), 1)].into(),
                endpoints: vec![crate::metrics_text::EndpointFigures {
                    endpoint: hostile.to_owned(),
                    limit: 4,
                    in_flight: 1,
                    queued: 0,
                }],
                ..NodeFigures::default()
            },
        };
        let text = node_status_text(&status);
        assert_eq!(text.lines().count(), 22, "{text}");
        assert!(!text.contains(['\u{1b}', '\u{202e}']), "{text}");
        assert!(!text.contains("\n└── forged"), "{text}");
        for expected in [
            "│   ├── Backlog: 7 rows",
            "│   ├── Events/s: not known yet (first minute)",
            "│   ├── Action time (p99): no action yet",
            "│   └── Cache hit rate: 75% (3 hits, 1 misses)",
            "│   └── DLQ items: 0 (cluster-wide)",
        ] {
            assert!(text.contains(expected), "{expected:?} in:\n{text}");
        }
    }
}
