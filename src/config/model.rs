//! The typed, validated form of an observers file.
//!
//! Nothing here can hold an invalid value: names, URLs, durations and conditions were checked
//! when the file was decoded (see `decode.rs`). Secrets are wrapped in [`Secret`] so they never
//! reach a log line, a `Debug` print or a report.

use std::fmt;
use std::time::Duration;

use crate::condition::Condition;
use crate::domain::EventKind;

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

/// HTTP methods a webhook may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpMethod {
    Post,
    Put,
    Patch,
    Delete,
    Get,
}

impl HttpMethod {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Get => "GET",
        }
    }
}

/// How a webhook body template's output is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// Values are inserted as JSON (`{{ data.name }}` renders `"Ann"` with quotes and escapes)
    /// and the result must be valid JSON; sent as `application/json`.
    Json,
    /// Values are inserted as text; sent as `text/plain` unless a header says otherwise.
    Text,
}

/// A header value: literal, or containing `${VAR}` and therefore secret.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderValue {
    Literal(String),
    Secret(Setting<Secret>),
}

/// The webhook's target: shown when literal, hidden when it came from the environment.
#[derive(Clone, Debug, PartialEq)]
pub enum WebhookTarget {
    Literal(url::Url),
    FromEnv {
        variable: String,
        url: Setting<SecretUrl>,
    },
}

/// A URL taken from the environment (it may carry a token), never printed.
#[derive(Clone, PartialEq)]
pub struct SecretUrl(pub url::Url);

impl fmt::Debug for SecretUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SecretUrl(<redacted>)")
    }
}

/// An HTTP call per matched event.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookAction {
    pub target: WebhookTarget,
    pub method: HttpMethod,
    pub headers: Vec<(String, HeaderValue)>,
    /// Name of the body template in the config's [`Templates`](crate::template::Templates);
    /// `None` sends the event envelope.
    pub body_template: Option<String>,
    pub body_format: BodyFormat,
    /// HMAC-SHA256 key for `X-FraiseQL-Signature-256`.
    pub signing_secret: Option<Setting<Secret>>,
    pub timeout: Duration,
    /// Cluster-wide limits on calls to the target endpoint.
    pub limits: EndpointLimits,
    /// `cache: {ttl}`: an identical request within this reuses the first one's result.
    pub cache_ttl: Option<Duration>,
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

/// Log levels a `log` action may write at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// A structured log line per matched event.
#[derive(Clone, Debug, PartialEq)]
pub struct LogAction {
    pub level: LogLevel,
    /// Name of the message template.
    pub message_template: String,
}

/// Longest PostgreSQL identifier (`NAMEDATALEN - 1` bytes).
const MAX_IDENTIFIER_BYTES: usize = 63;

fn sql_identifier(part: &str, what: &str) -> Result<(), String> {
    let mut characters = part.chars();
    let valid = characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters
            .all(|character| character.is_ascii_alphanumeric() || "_$".contains(character));
    if !valid {
        return Err(format!(
            "expected {what} of letters, digits, '_' and '$' starting with a letter or '_', found {part:?}"
        ));
    }
    if part.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "expected {what} of at most {MAX_IDENTIFIER_BYTES} bytes, found {} bytes",
            part.len()
        ));
    }
    Ok(())
}

/// A schema-qualified PostgreSQL function name, `schema.function`, checked when parsed and
/// always sent double-quoted (so it is case-sensitive and can never be read as SQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionName {
    schema: String,
    function: String,
}

impl FunctionName {
    /// # Errors
    /// What is wrong with the name, as a sentence fragment.
    pub fn parse(text: &str) -> Result<FunctionName, String> {
        let Some((schema, function)) = text.split_once('.') else {
            return Err(format!(
                "expected a schema-qualified function name such as app.on_order_paid, found {text:?}"
            ));
        };
        sql_identifier(schema, "a schema name")?;
        sql_identifier(function, "a function name")?;
        Ok(FunctionName {
            schema: schema.to_owned(),
            function: function.to_owned(),
        })
    }

    /// `"schema"."function"`: the form put into SQL.
    #[must_use]
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.function)
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.schema, self.function)
    }
}

/// The PostgreSQL type a parameter is cast to: a (possibly schema-qualified) type name of
/// identifier characters, optionally an array (`text`, `numeric`, `jsonb`, `uuid`, `int8[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlType(String);

impl SqlType {
    /// # Errors
    /// What is wrong with the type name, as a sentence fragment.
    pub fn parse(text: &str) -> Result<SqlType, String> {
        let base = text.strip_suffix("[]").unwrap_or(text);
        let parts: Vec<&str> = base.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|part| sql_identifier(part, "").is_err()) {
            return Err(format!(
                "expected a type name such as text, numeric, jsonb, uuid or int8[], found {text:?}"
            ));
        }
        Ok(SqlType(text.to_ascii_lowercase()))
    }

    #[must_use]
    pub fn text() -> SqlType {
        SqlType("text".to_owned())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether values are JSON (`json`, `jsonb`): their template inserts values as JSON.
    #[must_use]
    pub fn is_json(&self) -> bool {
        matches!(self.0.as_str(), "json" | "jsonb")
    }
}

/// One argument of a `database` action's function: a template, sent as text and cast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseParam {
    /// Name of the value template.
    pub template: String,
    pub sql_type: SqlType,
}

/// A PostgreSQL function called per matched event, in its own transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct DatabaseAction {
    pub function: FunctionName,
    pub params: Vec<DatabaseParam>,
    /// Per attempt; also the transaction's `statement_timeout`.
    pub timeout: Duration,
}

/// Redis keys removed per matched event (the node's Redis, `REDIS_URL`).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheAction {
    /// Names of exact-key templates: each rendered key is removed with `UNLINK`.
    pub keys: Vec<String>,
    /// Names of `SCAN MATCH` pattern templates (values inserted with glob characters escaped):
    /// every key matching a rendered pattern is removed.
    pub patterns: Vec<String>,
    pub timeout: Duration,
}

/// A Slack message per matched event, through an incoming webhook.
#[derive(Clone, Debug, PartialEq)]
pub struct SlackAction {
    /// The incoming-webhook URL (`webhook_url`, or `webhook_url_env`: it carries a token).
    pub target: WebhookTarget,
    /// Name of the `text` template (the message, or the notification fallback with blocks).
    pub text_template: String,
    /// Name of the `blocks` template: JSON that renders a Block Kit array.
    pub blocks_template: Option<String>,
    /// Overrides the webhook's default channel.
    pub channel: Option<String>,
    pub timeout: Duration,
}

/// Twilio's API, the default `base_url` of `sms` actions.
pub const DEFAULT_SMS_BASE_URL: &str = "https://api.twilio.com";

/// A text message per matched event, through a Twilio-compatible Messages API.
#[derive(Clone, Debug, PartialEq)]
pub struct SmsAction {
    /// `https://api.twilio.com` unless set; messages go to
    /// `{base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`.
    pub base_url: url::Url,
    /// Basic-auth user and part of the path.
    pub account_sid: Setting<Secret>,
    /// Basic-auth password.
    pub auth_token: Setting<Secret>,
    /// Names of the `to`, `from` and `body` templates.
    pub to_template: String,
    pub from_template: String,
    pub body_template: String,
    pub timeout: Duration,
}

/// How an `email` action's connection to its SMTP server is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS, which is required (default; port 587).
    StartTls,
    /// TLS from the first byte, "SMTPS" (port 465).
    Tls,
    /// No encryption: only for a relay on a trusted network (port 25).
    Plain,
}

impl SmtpSecurity {
    #[must_use]
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::Plain => 25,
        }
    }
}

/// An email address with an optional display name, checked when parsed.
pub type Mailbox = lettre::message::Mailbox;

/// Who an email goes to.
#[derive(Clone, Debug, PartialEq)]
pub enum EmailRecipients {
    /// Addresses written in the file, checked at load.
    Literal(Vec<Mailbox>),
    /// A template (`to_template`), checked when rendered. Its values come from event data, so it
    /// must render exactly one address, unless `list` (`to_list: true`) lets it render a
    /// comma-separated list.
    Template { name: String, list: bool },
}

/// A user and password from the environment (SMTP AUTH, HTTP basic auth).
#[derive(Clone, Debug, PartialEq)]
pub struct BasicCredentials {
    pub username: Setting<Secret>,
    pub password: Setting<Secret>,
}

/// An email per matched event, sent over SMTP.
#[derive(Clone, Debug, PartialEq)]
pub struct EmailAction {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub credentials: Option<BasicCredentials>,
    pub from: Mailbox,
    pub to: EmailRecipients,
    pub cc: Vec<Mailbox>,
    pub reply_to: Option<Mailbox>,
    /// Names of the templates: a subject, and a text and/or HTML body (HTML escapes values).
    pub subject_template: String,
    pub text_template: Option<String>,
    pub html_template: Option<String>,
    pub timeout: Duration,
}

/// The entity's document indexed, updated or deleted per matched event in an
/// Elasticsearch/OpenSearch index.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchAction {
    /// The cluster's base URL (`url`, or `url_env`).
    pub target: WebhookTarget,
    /// Name of the index-name template.
    pub index_template: String,
    /// HTTP basic auth.
    pub credentials: Option<BasicCredentials>,
    pub timeout: Duration,
    /// `Some`: operations of concurrent events go to the cluster together, as `_bulk` requests.
    pub bulk: Option<SearchBulk>,
}

/// How a search action batches its operations into `_bulk` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchBulk {
    /// Most operations per request.
    pub max_documents: usize,
    /// Longest an operation waits for others to join its request.
    pub max_wait: Duration,
}

impl Default for SearchBulk {
    fn default() -> Self {
        SearchBulk {
            max_documents: 500,
            max_wait: Duration::from_millis(5),
        }
    }
}

/// What an action does.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "built once per configuration")]
pub enum ActionKind {
    Webhook(WebhookAction),
    Log(LogAction),
    Database(DatabaseAction),
    Cache(CacheAction),
    Slack(SlackAction),
    Sms(SmsAction),
    Email(EmailAction),
    Search(SearchAction),
}

impl ActionKind {
    /// Every `type:` an action may have, in the order they are listed in messages.
    pub const TYPE_NAMES: &[&str] = &[
        "webhook", "log", "database", "cache", "slack", "sms", "email", "search",
    ];

    /// The `type:` name in the observers file, also the `action_type` metric label.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            ActionKind::Webhook(_) => "webhook",
            ActionKind::Log(_) => "log",
            ActionKind::Database(_) => "database",
            ActionKind::Cache(_) => "cache",
            ActionKind::Slack(_) => "slack",
            ActionKind::Sms(_) => "sms",
            ActionKind::Email(_) => "email",
            ActionKind::Search(_) => "search",
        }
    }

    /// The per-attempt timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        match self {
            ActionKind::Webhook(webhook) => webhook.timeout,
            ActionKind::Log(_) => DEFAULT_ACTION_TIMEOUT,
            ActionKind::Database(database) => database.timeout,
            ActionKind::Cache(cache) => cache.timeout,
            ActionKind::Slack(slack) => slack.timeout,
            ActionKind::Sms(sms) => sms.timeout,
            ActionKind::Email(email) => email.timeout,
            ActionKind::Search(search) => search.timeout,
        }
    }

    /// Where the action runs unless its `mode` says otherwise: messages to people (SMS, email)
    /// are slow and rate-limited, so they go through the job queue.
    #[must_use]
    pub fn default_delivery_mode(&self) -> DeliveryMode {
        match self {
            ActionKind::Sms(_) | ActionKind::Email(_) => DeliveryMode::Async,
            _ => DeliveryMode::Inline,
        }
    }
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

/// One action of an observer, with its place in the observer's list (part of its identity).
#[derive(Clone, Debug, PartialEq)]
pub struct ActionDefinition {
    pub index: usize,
    /// Optional label from the file, for reports.
    pub label: Option<String>,
    pub kind: ActionKind,
    pub delivery: Delivery,
}

/// One observer: which changes it watches and what it does about them.
#[derive(Clone, Debug)]
pub struct ObserverDefinition {
    pub name: ObserverName,
    pub description: Option<String>,
    pub entity: String,
    pub events: Vec<EventKind>,
    pub condition: Option<Condition>,
    pub actions: Vec<ActionDefinition>,
    pub retry: RetryPolicy,
    pub on_failure: FailurePolicy,
}

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
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        ExecutorSettings {
            max_concurrent_actions: DEFAULT_MAX_CONCURRENT_ACTIONS,
            max_concurrent_entities: DEFAULT_MAX_CONCURRENT_ENTITIES,
            endpoint_queue_wait: DEFAULT_ENDPOINT_QUEUE_WAIT,
            adaptive_concurrency: true,
        }
    }
}
