//! Reading the node's own `/metrics` text back: a parser for the Prometheus/OpenMetrics text
//! exposition (sample lines only; comments skipped) and [`MetricsSummary`], the figures an
//! operator asks for first (events, actions by outcome, dead letters, jobs, leases, limits per
//! endpoint, the p99 of action durations). Used by the `metrics` subcommand, on text scraped from
//! a node, and by the control façade's `status`, on the text the node renders itself.
//!
//! Pure: no I/O. Bounded: a text over [`MAX_SAMPLES`] samples is refused.

use std::collections::BTreeMap;

use serde::Serialize;

/// More samples than this in one text is refused (a node renders a few hundred).
pub const MAX_SAMPLES: usize = 200_000;

const PREFIX: &str = "fraiseql_observers_";

/// One sample line: metric name (with its `_total`/`_bucket`/… suffix), labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(label, _)| label == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A line of the text that is not a sample, or a text too large.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricsTextError {
    #[error("metrics text line {line}: {problem}")]
    Malformed { line: usize, problem: &'static str },
    #[error("metrics text holds more than {MAX_SAMPLES} samples")]
    TooManySamples,
}

/// Every sample of an exposition text, in order.
///
/// # Errors
/// A sample line does not parse (the line number says where), or the text holds more than
/// [`MAX_SAMPLES`] samples.
pub fn parse(text: &str) -> Result<Vec<Sample>, MetricsTextError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if samples.len() == MAX_SAMPLES {
            return Err(MetricsTextError::TooManySamples);
        }
        samples.push(
            parse_line(line).map_err(|problem| MetricsTextError::Malformed {
                line: index + 1,
                problem,
            })?,
        );
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|character: char| character == '{' || character.is_whitespace())
        .ok_or("no value after the metric name")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remainder;
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value after the metric name")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().map_err(|_| "the value is not a number")?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Labels up to the closing brace, and what follows it.
/// Label names and values, in order.
type Labels = Vec<(String, String)>;

fn parse_labels(mut text: &str) -> Result<(Labels, &str), &'static str> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let equals = text.find('=').ok_or("a label without a value")?;
        let name = text[..equals].trim().to_owned();
        let quoted = text[equals + 1..]
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut characters = quoted.char_indices();
        let end = loop {
            match characters.next() {
                None => return Err("a label value without its closing quote"),
                Some((index, '"')) => break index,
                Some((_, '\\')) => match characters.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return Err("a label value without its closing quote"),
                },
                Some((_, other)) => value.push(other),
            }
        };
        labels.push((name, value));
        text = &quoted[end + 1..];
    }
}

/// One HTTP endpoint's adaptive concurrency limit as this node last set it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EndpointFigures {
    /// `scheme://host:port`, or `env:<VARIABLE>` when the URL comes from the environment.
    pub endpoint: String,
    pub limit: i64,
    pub in_flight: i64,
    pub queued: i64,
}

/// What one node's metrics say, summed over the labels an operator does not ask about first.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetricsSummary {
    pub events_processed: u64,
    pub events_failed: u64,
    pub events_unmatched: u64,
    /// Actions run from pages, by outcome.
    pub actions: BTreeMap<String, u64>,
    /// Job attempts run by this node's workers, by outcome.
    pub jobs_run: BTreeMap<String, u64>,
    /// Dead letters this node added, by source (page, job).
    pub dead_letters_added: BTreeMap<String, u64>,
    /// Dead letters waiting, cluster-wide; only the coordinator reports them.
    pub dead_letters_waiting: Option<u64>,
    /// Jobs by queue and status, cluster-wide; only the coordinator reports them.
    pub jobs: BTreeMap<String, BTreeMap<String, u64>>,
    pub leases_held: u64,
    pub coordinator: bool,
    pub draining: bool,
    /// Deduplication outcomes other than a plain acquire.
    pub dedup: BTreeMap<String, u64>,
    /// Action result cache operations by outcome.
    pub cache: BTreeMap<String, u64>,
    pub endpoints: Vec<EndpointFigures>,
    /// The upper bound of the histogram bucket holding the 99th percentile of action durations
    /// (seconds, every action type); `None` before any action ran.
    pub action_duration_p99_seconds: Option<f64>,
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counters and gauges of whole things"
)]
fn whole(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value as u64
    } else {
        0
    }
}

#[allow(clippy::cast_possible_truncation, reason = "gauges of whole things")]
fn signed(value: f64) -> i64 {
    if value.is_finite() { value as i64 } else { 0 }
}

/// The summary of a node's samples (see [`parse`]).
#[must_use]
pub fn summarize(samples: &[Sample]) -> MetricsSummary {
    let mut summary = MetricsSummary::default();
    let mut endpoints: BTreeMap<String, EndpointFigures> = BTreeMap::new();
    // Cumulative count per bucket bound, every action type together.
    let mut duration_buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut duration_count = 0.0;
    let label = |sample: &Sample, name: &str| sample.label(name).unwrap_or("").to_owned();
    for sample in samples {
        let Some(name) = sample.name.strip_prefix(PREFIX) else {
            continue;
        };
        let value = sample.value;
        match name {
            "events_processed_total" => summary.events_processed = whole(value),
            "events_failed_total" => summary.events_failed = whole(value),
            "events_unmatched_total" => summary.events_unmatched = whole(value),
            "actions_total" => {
                *summary.actions.entry(label(sample, "outcome")).or_default() += whole(value);
            }
            "jobs_run_total" => {
                *summary
                    .jobs_run
                    .entry(label(sample, "outcome"))
                    .or_default() += whole(value);
            }
            "dead_letters_added_total" => {
                *summary
                    .dead_letters_added
                    .entry(label(sample, "source"))
                    .or_default() += whole(value);
            }
            "dead_letters" => summary.dead_letters_waiting = Some(whole(value)),
            "jobs" => {
                *summary
                    .jobs
                    .entry(label(sample, "queue"))
                    .or_default()
                    .entry(label(sample, "status"))
                    .or_default() += whole(value);
            }
            "leases_held" => summary.leases_held = whole(value),
            "coordinator" => summary.coordinator = value > 0.0,
            "draining" => summary.draining = value > 0.0,
            "dedup_checks_total" => {
                *summary.dedup.entry(label(sample, "outcome")).or_default() += whole(value);
            }
            "cache_operations_total" => {
                *summary.cache.entry(label(sample, "outcome")).or_default() += whole(value);
            }
            "endpoint_concurrency_limit" | "endpoint_in_flight" | "endpoint_queued" => {
                let endpoint = label(sample, "endpoint");
                let figures =
                    endpoints
                        .entry(endpoint.clone())
                        .or_insert_with(|| EndpointFigures {
                            endpoint,
                            ..EndpointFigures::default()
                        });
                let slot = match name {
                    "endpoint_concurrency_limit" => &mut figures.limit,
                    "endpoint_in_flight" => &mut figures.in_flight,
                    _ => &mut figures.queued,
                };
                *slot = signed(value);
            }
            "action_duration_seconds_bucket" => {
                let bound = match sample.label("le") {
                    Some("+Inf") | None => f64::INFINITY,
                    Some(bound) => bound.parse().unwrap_or(f64::INFINITY),
                };
                *duration_buckets.entry(bound.to_bits()).or_default() += value;
            }
            "action_duration_seconds_count" => duration_count += value,
            _ => {}
        }
    }
    summary.endpoints = endpoints.into_values().collect();
    summary.action_duration_p99_seconds = p99(&duration_buckets, duration_count);
    summary
}

/// The upper bound of the first bucket whose cumulative count reaches 99 % of `count`.
fn p99(buckets: &BTreeMap<u64, f64>, count: f64) -> Option<f64> {
    if count <= 0.0 {
        return None;
    }
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(bits, cumulative)| (f64::from_bits(*bits), *cumulative))
        .collect();
    bounds.sort_by(|left, right| left.0.total_cmp(&right.0));
    bounds
        .into_iter()
        .find(|(_, cumulative)| *cumulative >= count * 0.99)
        .map(|(bound, _)| bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_registry_parses_and_sums_by_outcome() {
        let text = "# HELP x y\n\
            fraiseql_observers_events_processed_total 7\n\
            fraiseql_observers_actions_total{action_type=\"webhook\",outcome=\"succeeded\"} 5\n\
            fraiseql_observers_actions_total{action_type=\"log\",outcome=\"succeeded\"} 2\n\
            fraiseql_observers_endpoint_concurrency_limit{endpoint=\"http://a:1\"} 4\n\
            fraiseql_observers_endpoint_in_flight{endpoint=\"http://a:1\"} 1\n\
            fraiseql_observers_action_duration_seconds_bucket{action_type=\"webhook\",le=\"0.001\"} 0\n\
            fraiseql_observers_action_duration_seconds_bucket{action_type=\"webhook\",le=\"0.002\"} 6\n\
            fraiseql_observers_action_duration_seconds_bucket{action_type=\"webhook\",le=\"+Inf\"} 7\n\
            fraiseql_observers_action_duration_seconds_count{action_type=\"webhook\"} 7\n\
            # EOF\n";
        let summary = summarize(&parse(text).expect("parses"));
        assert_eq!(summary.events_processed, 7);
        assert_eq!(summary.actions.get("succeeded"), Some(&7));
        assert_eq!(
            summary.endpoints,
            vec![EndpointFigures {
                endpoint: "http://a:1".to_owned(),
                limit: 4,
                in_flight: 1,
                queued: 0
            }]
        );
        assert_eq!(summary.action_duration_p99_seconds, Some(f64::INFINITY));
    }

    #[test]
    fn label_values_unescape_and_bad_lines_name_their_line() {
        let samples = parse("m{a=\"x\\\"y\\\\z\\n\"} 1.5\n").expect("parses");
        assert_eq!(samples[0].label("a"), Some("x\"y\\z\n"));
        assert!((samples[0].value - 1.5).abs() < f64::EPSILON);
        assert_eq!(
            parse("ok 1\nbroken{a=\"x} 1\n"),
            Err(MetricsTextError::Malformed {
                line: 2,
                problem: "a label value without its closing quote"
            })
        );
        assert_eq!(
            parse("m notanumber"),
            Err(MetricsTextError::Malformed {
                line: 1,
                problem: "the value is not a number"
            })
        );
    }
}
