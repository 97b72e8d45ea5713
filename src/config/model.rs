//! The typed, validated settings shared by every observer and action: secrets, observer names,
//! retry and failure policies, targets and limits, delivery, executor and job settings.
//!
//! Nothing here can hold an invalid value: names, URLs and durations were checked when the file
//! was decoded (see `decode.rs`). Secrets are wrapped in [`Secret`] so they never reach a log
//! line, a `Debug` print or a report. Each action type's own settings live in its file under
//! `actions/`.

use std::fmt;
use std::time::Duration;

/// Default per-attempt timeout of an action that does not set one.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on actions running at once in one node.
pub const DEFAULT_MAX_CONCURRENT_ACTIONS: usize = 256;
/// Default longest wait of an HTTP call for a slot of its endpoint's concurrency limit.
pub const DEFAULT_ENDPOINT_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// Default bound on entities whose events are being executed at once in one batch.
pub const DEFAULT_MAX_CONCURRENT_ENTITIES: usize = 256;
/// Default retry policy: 3 attempts, 100 ms doubling up to 30 s, with jitter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_INITIAL_DELAY: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);

/// A value read from the environment that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<redacted>")
    }
}

/// A setting taken from the environment, which may be absent when the file is only validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting<T> {
    Ready(T),
    /// The named variable was not set when the file was loaded with
    /// [`MissingEnv::Warn`](super::MissingEnv::Warn); using the setting fails with OB003.
    MissingEnv(String),
}

impl<T> Setting<T> {
    /// The value, or the name of the missing environment variable.
    ///
    /// # Errors
    /// The variable name when the setting could not be resolved.
    pub fn ready(&self) -> Result<&T, &str> {
        match self {
            Setting::Ready(value) => Ok(value),
            Setting::MissingEnv(variable) => Err(variable),
        }
    }
}

/// An observer's name: 1–128 characters of `A-Z a-z 0-9 _ - .`; part of idempotency keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObserverName(String);

impl ObserverName {
    pub const MAX_LENGTH: usize = 128;

    /// # Errors
    /// What is wrong with the name, as a sentence fragment.
    pub fn parse(name: &str) -> Result<ObserverName, String> {
        if name.is_empty() {
            return Err("expected a non-empty name".into());
        }
        if name.chars().count() > Self::MAX_LENGTH {
            return Err(format!("expected at most {} characters", Self::MAX_LENGTH));
        }
        if let Some(bad) = name
            .chars()
            .find(|character| !(character.is_ascii_alphanumeric() || "_-.".contains(*character)))
        {
            return Err(format!(
                "expected only letters, digits, '_', '-' and '.', found {bad:?}"
            ));
        }
        Ok(ObserverName(name.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObserverName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// How the delay between attempts grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffKind {
    /// `initial_delay`, doubling each attempt, capped at `max_delay`.
    Exponential,
    /// `initial_delay` every time.
    Fixed,
}

/// How often and how patiently a failing action is retried in process.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub backoff: BackoffKind,
    /// Randomize each delay so that many failing actions do not retry in lockstep.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            backoff: BackoffKind::Exponential,
            jitter: true,
        }
    }
}

/// What happens to an action that failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Park it in the dead-letter queue with its event, error and attempts (default).
    DeadLetter,
    /// Log it at ERROR and drop it.
    Log,
}

/// The webhook's target: shown when literal, hidden when it came from the environment, or
/// rendered per event from a template (only a webhook's `url` may be one).
#[derive(Clone, Debug, PartialEq)]
pub enum WebhookTarget {
    Literal(url::Url),
    FromEnv {
        variable: String,
        url: Setting<SecretUrl>,
    },
    Template(UrlTemplate),
}

/// A target URL rendered per event (`url: 'https://{{ data.region }}.hooks.example/in'`).
#[derive(Clone, Debug, PartialEq)]
pub struct UrlTemplate {
    /// The template's name in the configuration's `Templates`.
    pub name: String,
    /// The variables of the event envelope it reads (`data.region`, …), sorted, for reports.
    /// Not what the guard decides by: a template can read the event through another template
    /// it includes.
    pub reads: Vec<String>,
    /// The scheme, host and port when the text before the template's first tag fixes them
    /// (`https://hooks.example/orders/{{ data.id }}`): event data then shapes only the path
    /// and query, and the host stays the operator's. `None` when event data can choose the host.
    pub fixed_origin: Option<url::Origin>,
}

impl UrlTemplate {
    /// Whether event data can choose where the request goes: the text before the template's
    /// first tag does not fix its host. Such URLs are checked against private and loopback
    /// addresses (the SSRF guard) unless the action allows them.
    #[must_use]
    pub fn host_from_event_data(&self) -> bool {
        self.fixed_origin.is_none()
    }
}

/// A URL taken from the environment (it may carry a token), never printed.
#[derive(Clone, PartialEq)]
pub struct SecretUrl(pub url::Url);

impl WebhookTarget {
    /// Whether the URL came from the environment (and so counts as a secret).
    #[must_use]
    pub fn is_from_env(&self) -> bool {
        matches!(self, WebhookTarget::FromEnv { .. })
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SecretUrl(<redacted>)")
    }
}

/// Limits on one endpoint (`scheme://host:port`), shared by every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Calls per second (token bucket), with bursts of up to `burst`.
    pub rate: Option<RateLimit>,
    /// Calls in flight at once across the cluster.
    pub max_in_flight: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// A user and password from the environment (SMTP AUTH, HTTP basic auth).
#[derive(Clone, Debug, PartialEq)]
pub struct BasicCredentials {
    pub username: Setting<Secret>,
    pub password: Setting<Secret>,
}

/// Where an action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// In the change-log page, before its checkpoint (fast actions; transient failures that
    /// outlast a short in-page retry move to the job queue).
    Inline,
    /// Through the durable job queue, enqueued with the page's checkpoint.
    Async,
}

/// How an action is delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub mode: DeliveryMode,
    /// Job queue name (`default` unless set).
    pub queue: String,
    /// Job priority, 0 (least) to 10.
    pub priority: i16,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            mode: DeliveryMode::Inline,
            queue: DEFAULT_QUEUE.to_owned(),
            priority: DEFAULT_JOB_PRIORITY,
        }
    }
}

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_JOB_PRIORITY: i16 = 5;

/// Job queue workers and retention.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSettings {
    /// Workers per queue on every node; every queue an action names gets at least one.
    pub workers: std::collections::BTreeMap<String, usize>,
    /// How long a claim lasts without a heartbeat (a dead worker's job is retried after it).
    pub visibility_timeout: Duration,
    /// Completed and cancelled jobs are deleted after this long; failed ones never.
    pub retention: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            workers: std::collections::BTreeMap::from([(DEFAULT_QUEUE.to_owned(), 2)]),
            visibility_timeout: Duration::from_secs(30),
            retention: Duration::from_hours(7 * 24),
        }
    }
}

/// Node-wide execution bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutorSettings {
    pub max_concurrent_actions: usize,
    pub max_concurrent_entities: usize,
    /// How long an HTTP call waits for a slot of its endpoint's adaptive concurrency limit
    /// before it goes to the job queue (not part of the attempt's timeout).
    pub endpoint_queue_wait: Duration,
    /// Whether HTTP calls are limited per endpoint by an adaptive concurrency limit.
    pub adaptive_concurrency: bool,
    /// Non-public networks that webhook URLs rendered from event data may reach anyway
    /// (`--allow-private-targets-cidr`; the node's decision, not an observers-file key).
    pub private_targets_allowed: Vec<super::Network>,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        ExecutorSettings {
            max_concurrent_actions: DEFAULT_MAX_CONCURRENT_ACTIONS,
            max_concurrent_entities: DEFAULT_MAX_CONCURRENT_ENTITIES,
            endpoint_queue_wait: DEFAULT_ENDPOINT_QUEUE_WAIT,
            adaptive_concurrency: true,
            private_targets_allowed: Vec::new(),
        }
    }
}
