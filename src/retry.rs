//! In-process retries: exponential or fixed backoff with jitter (via `backon`), honouring a
//! target's `Retry-After`, retrying only transient failures.
//!
//! Delays are slept with `tokio::time`, so a test under `tokio::time::pause()` runs a whole
//! schedule instantly and can still observe every delay.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder, Retryable};

use crate::config::{BackoffKind, RetryPolicy};
use crate::error::ErrorCode;

/// Why one attempt of an action failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AttemptError {
    pub code: ErrorCode,
    pub message: String,
    /// How long the target asked us to wait (`Retry-After`), if it did.
    pub retry_after: Option<Duration>,
    /// With OB015: the circuit (a digest of the endpoint) whose open breaker refused the call,
    /// so the job the action is parked as can be woken when that circuit closes.
    pub circuit: Option<String>,
}

impl AttemptError {
    #[must_use]
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AttemptError {
        AttemptError {
            code,
            message: message.into(),
            retry_after: None,
            circuit: None,
        }
    }
}

/// One failed attempt, as kept in a job's and a dead letter's history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedAttempt {
    /// 1-based, counted across the page and the job queue.
    pub attempt: u32,
    pub code: ErrorCode,
    pub message: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl FailedAttempt {
    /// Attempt `attempt` failed now with `error` (its message made storable).
    #[must_use]
    pub fn now(attempt: u32, error: &AttemptError) -> FailedAttempt {
        FailedAttempt {
            attempt,
            code: error.code,
            message: crate::escape::storable(&error.message).into_owned(),
            at: chrono::Utc::now(),
        }
    }
}

/// A history as one line per attempt (`attempt N (time): CODE message`), oldest first: how a
/// dead letter's message spells it.
#[must_use]
pub fn history_text(history: &[FailedAttempt]) -> String {
    history
        .iter()
        .map(|attempt| {
            format!(
                "attempt {} ({}): {} {}",
                attempt.attempt,
                attempt.at.to_rfc3339(),
                attempt.code,
                attempt.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A history read back from [`history_text`]: each `attempt N (time): CODE message` line as an
/// entry. A text that is not such a history (a letter of one attempt holds only its error) is
/// one entry, attempt `attempts`, failed with `code` at `at`.
#[must_use]
pub fn history_from_text(
    text: &str,
    attempts: u32,
    code: ErrorCode,
    at: chrono::DateTime<chrono::Utc>,
) -> Vec<FailedAttempt> {
    let parse_line = |line: &str| -> Option<FailedAttempt> {
        let rest = line.strip_prefix("attempt ")?;
        let (number, rest) = rest.split_once(" (")?;
        let (time, rest) = rest.split_once("): ")?;
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(FailedAttempt {
            attempt: number.parse().ok()?,
            code: serde_json::from_value(serde_json::Value::String(code.to_owned())).ok()?,
            message: message.to_owned(),
            at: chrono::DateTime::parse_from_rfc3339(time)
                .ok()?
                .with_timezone(&chrono::Utc),
        })
    };
    let parsed: Option<Vec<FailedAttempt>> = text.lines().map(parse_line).collect();
    match parsed {
        Some(history) if !history.is_empty() => history,
        _ => vec![FailedAttempt {
            attempt: attempts.max(1),
            code,
            message: text.to_owned(),
            at,
        }],
    }
}

/// The delays between attempts of `policy` (one fewer than its attempts), before any
/// `Retry-After` adjustment.
#[must_use]
pub fn backoff_delays(policy: &RetryPolicy) -> Box<dyn Iterator<Item = Duration> + Send + Sync> {
    let retries = usize::try_from(policy.max_attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    let max_delay = policy.max_delay;
    let delays: Box<dyn Iterator<Item = Duration> + Send + Sync> = match policy.backoff {
        BackoffKind::Exponential => {
            let mut builder = ExponentialBuilder::new()
                .with_min_delay(policy.initial_delay)
                .with_max_delay(max_delay)
                .with_factor(2.0)
                .with_max_times(retries);
            if policy.jitter {
                builder = builder.with_jitter();
            }
            Box::new(builder.build())
        }
        BackoffKind::Fixed => {
            let mut builder = ConstantBuilder::new()
                .with_delay(policy.initial_delay)
                .with_max_times(retries);
            if policy.jitter {
                builder = builder.with_jitter();
            }
            Box::new(builder.build())
        }
    };
    Box::new(delays.map(move |delay| delay.min(max_delay)))
}

/// The delay actually waited: the backoff delay, lengthened to a target's `Retry-After`, never
/// beyond the policy's `max_delay`.
#[must_use]
pub fn next_delay(
    policy: &RetryPolicy,
    backoff_delay: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    retry_after
        .map_or(backoff_delay, |asked| asked.max(backoff_delay))
        .min(policy.max_delay.max(backoff_delay))
}

/// The result of running an operation under a retry policy.
#[derive(Debug)]
pub struct RetryOutcome<T> {
    pub result: Result<T, AttemptError>,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Every failed attempt, oldest first (the last one's error is also in `result`).
    pub failures: Vec<FailedAttempt>,
}

/// Runs `operation` (given the 1-based attempt number) until it succeeds, fails permanently,
/// or the policy's attempts are used up.
pub async fn run_with_retry<T, Operation, Attempt>(
    policy: &RetryPolicy,
    mut operation: Operation,
) -> RetryOutcome<T>
where
    Operation: FnMut(u32) -> Attempt,
    Attempt: Future<Output = Result<T, AttemptError>>,
{
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    let backoff = BackoffAdapter {
        delays: backoff_delays(policy),
    };
    let result = (|| {
        let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // Boxed: the attempt (an HTTP call with its slots) is large, and the wrapper would
        // otherwise carry it inline through every caller's future.
        let running = Box::pin(operation(attempt));
        let failures = &failures;
        async move {
            let result = running.await;
            if let Err(error) = &result {
                failures
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(FailedAttempt::now(attempt, error));
            }
            result
        }
    })
    .retry(backoff)
    .sleep(tokio::time::sleep)
    // An open circuit or a busy endpoint is not retried in place: the call was not made, and
    // the caller parks the work until the endpoint can take it.
    .when(|error: &AttemptError| error.code.is_transient() && !error.code.call_not_made())
    .adjust(|error: &AttemptError, delay| {
        delay.map(|delay| next_delay(policy, delay, error.retry_after))
    })
    .await;
    RetryOutcome {
        result,
        attempts: attempts.into_inner(),
        failures: failures
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    }
}

/// Hands a ready-made delay iterator to `backon`.
struct BackoffAdapter {
    delays: Box<dyn Iterator<Item = Duration> + Send + Sync>,
}

impl BackoffBuilder for BackoffAdapter {
    type Backoff = Box<dyn Iterator<Item = Duration> + Send + Sync>;

    fn build(self) -> Self::Backoff {
        self.delays
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    #[test]
    fn a_history_reads_back_from_its_text_and_a_single_error_becomes_one_entry() {
        let first = FailedAttempt::now(1, &AttemptError::new(ErrorCode::ActionTimeout, "slow"));
        let second = FailedAttempt::now(
            2,
            &AttemptError::new(ErrorCode::RemoteRejected, "HTTP 404: no (such) hook"),
        );
        let history = vec![first, second];
        let text = history_text(&history);
        let read = history_from_text(&text, 2, ErrorCode::RemoteRejected, chrono::Utc::now());
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].attempt, 2);
        assert_eq!(read[1].code, ErrorCode::RemoteRejected);
        assert_eq!(read[1].message, "HTTP 404: no (such) hook");
        assert_eq!(history_text(&read), text);

        let at = chrono::Utc::now();
        let single = history_from_text("HTTP 500: boom", 3, ErrorCode::RemoteUnavailable, at);
        assert_eq!(
            single,
            vec![FailedAttempt {
                attempt: 3,
                code: ErrorCode::RemoteUnavailable,
                message: "HTTP 500: boom".to_owned(),
                at,
            }]
        );
    }

    fn policy(max_attempts: u32, jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            backoff: BackoffKind::Exponential,
            jitter,
        }
    }

    #[test]
    fn exponential_schedule_doubles_up_to_the_cap() {
        let delays: Vec<Duration> = backoff_delays(&policy(7, false)).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn fixed_schedule_repeats_the_initial_delay() {
        let mut fixed = policy(4, false);
        fixed.backoff = BackoffKind::Fixed;
        let millis: Vec<u128> = backoff_delays(&fixed)
            .map(|delay| delay.as_millis())
            .collect();
        assert_eq!(millis, [100, 100, 100]);
    }

    #[test]
    fn jitter_stays_between_the_delay_and_the_cap() {
        for _ in 0..50 {
            let delays: Vec<Duration> = backoff_delays(&policy(6, true)).collect();
            let bases = [100, 200, 400, 800, 1000];
            assert_eq!(delays.len(), bases.len());
            for (delay, base) in delays.iter().zip(bases) {
                assert!(
                    delay.as_millis() >= base && delay.as_millis() <= 1000.max(base),
                    "{delay:?} vs {base}"
                );
                assert!(delay.as_millis() < 2 * base, "{delay:?} vs {base}");
            }
        }
    }

    #[test]
    fn retry_after_lengthens_but_never_beyond_max_delay() {
        let policy = policy(3, false);
        let base = Duration::from_millis(100);
        assert_eq!(next_delay(&policy, base, None), base);
        assert_eq!(
            next_delay(&policy, base, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            next_delay(&policy, base, Some(Duration::from_millis(10))),
            base
        );
        assert_eq!(
            next_delay(&policy, base, Some(Duration::from_mins(2))),
            Duration::from_secs(1)
        );
    }

    async fn timed_run(
        policy: &RetryPolicy,
        failures: Vec<AttemptError>,
    ) -> (RetryOutcome<&'static str>, Vec<Duration>) {
        let started = Instant::now();
        let seen = Mutex::new(Vec::new());
        let failures = Mutex::new(failures.into_iter());
        let outcome = run_with_retry(policy, |_| {
            seen.lock().unwrap().push(started.elapsed());
            let next = failures.lock().unwrap().next();
            async move { next.map_or(Ok("done"), Err) }
        })
        .await;
        (outcome, seen.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_on_schedule() {
        let unavailable = AttemptError::new(ErrorCode::RemoteUnavailable, "503");
        let (outcome, at) =
            timed_run(&policy(5, false), vec![unavailable.clone(), unavailable]).await;
        assert_eq!(outcome.result, Ok("done"));
        assert_eq!(outcome.attempts, 3);
        let history: Vec<(u32, ErrorCode)> = outcome
            .failures
            .iter()
            .map(|failure| (failure.attempt, failure.code))
            .collect();
        assert_eq!(
            history,
            [
                (1, ErrorCode::RemoteUnavailable),
                (2, ErrorCode::RemoteUnavailable)
            ]
        );
        // Gaps between attempts: 100 ms then 200 ms (the timer may round up by a millisecond).
        let gaps: Vec<u128> = at
            .windows(2)
            .map(|pair| pair[1].saturating_sub(pair[0]).as_millis())
            .collect();
        assert_eq!(gaps.len(), 2);
        assert!(
            (100..=101).contains(&gaps[0]) && (200..=201).contains(&gaps[1]),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let rejected = AttemptError::new(ErrorCode::RemoteRejected, "400");
        let (outcome, at) = timed_run(&policy(5, false), vec![rejected.clone()]).await;
        assert_eq!(outcome.result, Err(rejected));
        assert_eq!(outcome.attempts, 1);
        assert_eq!(at.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_run_out_with_the_last_error() {
        let timeout = AttemptError::new(ErrorCode::ActionTimeout, "slow");
        let (outcome, at) = timed_run(&policy(3, false), vec![timeout.clone(); 10]).await;
        assert_eq!(outcome.result, Err(timeout));
        assert_eq!(outcome.attempts, 3);
        assert_eq!(at.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let mut limited = AttemptError::new(ErrorCode::RateLimited, "429");
        limited.retry_after = Some(Duration::from_millis(750));
        let (outcome, at) = timed_run(&policy(3, false), vec![limited]).await;
        assert_eq!(outcome.attempts, 2);
        assert!(outcome.result.is_ok());
        assert!((750..=751).contains(&at[1].as_millis()), "{at:?}");
    }
}
