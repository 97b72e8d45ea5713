//! Actions: what an observer does about a matched event, one attempt at a time: `webhook`,
//! `log`, `database` (a PostgreSQL function), `cache` (Redis keys removed), `slack`, `sms`
//! (Twilio-compatible), `email` (SMTP) and `search` (Elasticsearch/OpenSearch documents).
//!
//! Each type lives in one file, `actions/<type>.rs`, which owns its settings (the config struct
//! and the keys it takes), decodes them from the observers file with the shared primitives of
//! [`config`](crate::config) (see `ActionConfig`), answers what the reports ask of it, and runs
//! one attempt. `action_catalog!` registers the types, one line each, and generates
//! [`ActionKind`] with every dispatch over it.
//!
//! [`ActionRunner::attempt`] performs exactly one attempt of one action and classifies its
//! failure with an [`ErrorCode`](crate::error::ErrorCode); retries, timeouts, concurrency and
//! dead-lettering belong to the [`executor`](crate::executor). Every attempt of the same
//! (event, observer, action) carries the same idempotency key, so a target can recognise a
//! repeat.

pub mod cache;
pub mod database;
pub mod email;
pub mod log;
pub mod search;
pub mod slack;
pub mod sms;
pub mod target_guard;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use crate::concurrency::{EndpointLimiter, EndpointPermit, Signal};
use crate::config::{Decoder, Delivery, DeliveryMode, Fields, ObserverName};
use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

pub use database::IDEMPOTENCY_SETTING;
pub use email::IDEMPOTENCY_HEADER as EMAIL_IDEMPOTENCY_HEADER;
pub use sms::IDEMPOTENCY_HEADER as SMS_IDEMPOTENCY_HEADER;
pub use webhook::{SIGNATURE_HEADER, sign_payload};

/// What the loader and the reports ask of one action type's settings; each type's file
/// implements it for its config struct, and `action_catalog!` dispatches to it.
pub(crate) trait ActionConfig: Sized {
    /// The keys the type takes besides `type`, `name`, `mode`, `queue` and `priority`.
    const KEYS: &[&str];
    /// Where the action runs unless its `mode` says otherwise.
    const DEFAULT_MODE: DeliveryMode = DeliveryMode::Inline;
    /// Whether the action works through the node's Redis (`REDIS_URL`).
    const NEEDS_REDIS: bool = false;

    /// The settings from an action's mapping, its keys already checked against [`Self::KEYS`];
    /// `None` when a value is invalid (reported to `decoder`).
    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<Self>;

    /// The per-attempt timeout.
    fn timeout(&self) -> Duration;

    /// How many of the action's settings come from the environment.
    fn secrets_from_env(&self) -> usize {
        0
    }

    /// What the action relies on outside the file (a server, a connection), for the report.
    fn needs(&self) -> Option<String> {
        None
    }

    /// Whether the action's target URL is rendered from the event, for the report.
    fn url_from_event(&self) -> Option<UrlFromEvent> {
        None
    }
}

/// How an action's target URL is rendered from the event (`validate-config` lists them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlFromEvent {
    /// The envelope variables the URL template reads (`data.region`, …).
    pub reads: Vec<String>,
    /// Whether event data can choose the host (the text before the first tag does not fix it).
    pub host_from_event_data: bool,
    /// Whether the SSRF guard checks the addresses it reaches: the host comes from event data
    /// and the action does not set `allow_private_targets: true`.
    pub guarded: bool,
}

/// Registers the action types: `Variant(module::Config) = "type name"`, one line each, in the
/// order messages list them. Each `module` implements `ActionConfig` for its `Config` and has
/// `run(&ActionRunner, &Config, &ActionContext)`; the expansion is [`ActionKind`], its
/// dispatches, and [`ActionRunner::attempt`].
macro_rules! action_catalog {
    ($($variant:ident($module:ident::$config:ident) = $name:literal,)+) => {
        /// What an action does: one variant per registered type.
        #[derive(Clone, Debug, PartialEq)]
        #[allow(clippy::large_enum_variant, reason = "built once per configuration")]
        pub enum ActionKind {
            $($variant($module::$config),)+
        }

        impl ActionKind {
            /// Every `type:` an action may have, in the order they are listed in messages.
            pub const TYPE_NAMES: &[&str] = &[$($name),+];

            /// The `type:` name in the observers file, also the `action_type` metric label.
            #[must_use]
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(ActionKind::$variant(_) => $name,)+
                }
            }

            /// The per-attempt timeout.
            #[must_use]
            pub fn timeout(&self) -> Duration {
                match self {
                    $(ActionKind::$variant(config) => config.timeout(),)+
                }
            }

            /// Where the action runs unless its `mode` says otherwise: messages to people
            /// (SMS, email) are slow and rate-limited, so they go through the job queue.
            #[must_use]
            pub fn default_delivery_mode(&self) -> DeliveryMode {
                match self {
                    $(ActionKind::$variant(_) => <$module::$config as ActionConfig>::DEFAULT_MODE,)+
                }
            }

            /// Whether the action works through the node's Redis (`REDIS_URL`).
            #[must_use]
            pub fn needs_redis(&self) -> bool {
                match self {
                    $(ActionKind::$variant(_) => <$module::$config as ActionConfig>::NEEDS_REDIS,)+
                }
            }

            /// How many of the action's settings come from the environment.
            #[must_use]
            pub fn secrets_from_env(&self) -> usize {
                match self {
                    $(ActionKind::$variant(config) => config.secrets_from_env(),)+
                }
            }

            /// What the action relies on outside the file (a server, a connection).
            #[must_use]
            pub fn needs(&self) -> Option<String> {
                match self {
                    $(ActionKind::$variant(config) => config.needs(),)+
                }
            }

            /// Whether the action's target URL is rendered from the event, and how.
            #[must_use]
            pub fn url_from_event(&self) -> Option<UrlFromEvent> {
                match self {
                    $(ActionKind::$variant(config) => config.url_from_event(),)+
                }
            }

            /// The keys of the type named `type_name` (see `ActionConfig::KEYS`).
            pub(crate) fn keys_of(type_name: &str) -> Option<&'static [&'static str]> {
                match type_name {
                    $($name => Some(<$module::$config as ActionConfig>::KEYS),)+
                    _ => None,
                }
            }

            /// Decodes an action of the type named `type_name` (a registered one).
            pub(crate) fn decode(
                type_name: &str,
                decoder: &mut Decoder<'_>,
                fields: &Fields<'_>,
                path: &str,
            ) -> Option<ActionKind> {
                match type_name {
                    $($name => <$module::$config as ActionConfig>::decode(decoder, fields, path)
                        .map(ActionKind::$variant),)+
                    _ => None,
                }
            }
        }

        impl ActionRunner {
            /// Performs one attempt of `action`.
            ///
            /// # Errors
            /// The attempt's failure, classified transient or permanent by its code.
            pub async fn attempt(
                &self,
                action: &ActionDefinition,
                context: &ActionContext<'_>,
            ) -> Result<ActionSuccess, AttemptError> {
                match &action.kind {
                    $(ActionKind::$variant(config) => $module::run(self, config, context).await,)+
                }
            }
        }
    };
}

action_catalog! {
    Webhook(webhook::WebhookAction) = "webhook",
    Log(log::LogAction) = "log",
    Database(database::DatabaseAction) = "database",
    Cache(cache::CacheAction) = "cache",
    Slack(slack::SlackAction) = "slack",
    Sms(sms::SmsAction) = "sms",
    Email(email::EmailAction) = "email",
    Search(search::SearchAction) = "search",
}

/// One action of an observer, with its place in the observer's list (part of its identity).
#[derive(Clone, Debug, PartialEq)]
pub struct ActionDefinition {
    pub index: usize,
    /// Optional label from the file, for reports.
    pub label: Option<String>,
    pub kind: ActionKind,
    pub delivery: Delivery,
}

/// Everything one attempt needs to know about where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct ActionContext<'run> {
    pub event: &'run EntityEvent,
    pub observer: &'run ObserverName,
    pub action_index: usize,
    /// The event envelope for this observer (also the template context), built once per observer.
    pub envelope: &'run crate::domain::Envelope<'run>,
    /// The leases the attempt runs under, when it delivers for a partition this node leads: an
    /// HTTP action checks them again once it holds its endpoint slot, as the wait for it can
    /// outlast them. `None` for work that no partition lease guards (job queue, CLI).
    pub lease: Option<&'run crate::lease::LeaseValidity>,
}

impl ActionContext<'_> {
    /// Whether the call may go out now: always, unless the attempt runs under leases this node
    /// has not confirmed within the node timeout (cut off or paused), whose partitions peers
    /// may have taken over.
    ///
    /// # Errors
    /// OB011 (not settled: the partition's next leader delivers the action).
    pub fn may_dispatch(&self) -> Result<(), AttemptError> {
        match self.lease {
            Some(lease) if !lease.holds() => Err(AttemptError::new(
                ErrorCode::FencedOut,
                "this node's leases are not confirmed (no heartbeat within the node timeout): not dispatching",
            )),
            _ => Ok(()),
        }
    }

    /// `<event id>:<observer>:<action index>`: the same on every attempt and every re-delivery
    /// of the event; for a `replay`ed event the original's key with `:replay:<run id>` after it.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        idempotency_key(self.event, self.observer, self.action_index)
    }
}

/// The idempotency key receivers see for one action of one event: `<event id>:<observer>:<action
/// index>`, or, for an event replayed by `replay`, `<original event id>:<observer>:<action
/// index>:replay:<run id>` — the original's key, told apart by its suffix.
#[must_use]
pub fn idempotency_key(
    event: &EntityEvent,
    observer: &ObserverName,
    action_index: usize,
) -> String {
    use std::fmt::Write as _;
    if let Some(replay) = event.replay {
        return format!(
            "{}:replay:{}",
            crate::domain::ActionKey::new(replay.of, observer.as_str(), action_index),
            replay.run
        );
    }
    // One allocation: the id, the observer and room for the index.
    let mut key = String::with_capacity(36 + observer.as_str().len() + 22);
    let _ = write!(
        key,
        "{}",
        crate::domain::ActionKey::new(event.id, observer.as_str(), action_index)
    );
    key
}

/// What a successful attempt reports (e.g. `HTTP 200`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionSuccess {
    pub detail: String,
}

/// The node's HTTP clients and the adaptive concurrency limits of the endpoints it calls: every
/// HTTP action sends through [`Http::send`] (or [`Http::reserve`] and [`Http::send_reserved`]).
#[derive(Clone, Debug)]
struct Http {
    client: reqwest::Client,
    /// The client of URLs whose host comes from event data: its resolver connects only to
    /// addresses `target_policy` allows (the SSRF guard, `target_guard`).
    guarded_client: reqwest::Client,
    target_policy: target_guard::TargetPolicy,
    limiter: EndpointLimiter,
}

/// How metrics name an endpoint: `scheme://host:port`, unless the target names it otherwise
/// (see [`target_label`]).
fn endpoint_label(endpoint: &str, label: Option<&str>) -> String {
    label.map_or_else(|| endpoint.to_owned(), ToOwned::to_owned)
}

/// `scheme://host:port`: what a concurrency limit and a circuit breaker guard.
fn endpoint_of(url: &url::Url) -> String {
    use std::fmt::Write as _;
    let scheme = url.scheme();
    let host = url.host_str().unwrap_or_default();
    // One allocation, sized for the longest port.
    let mut endpoint = String::with_capacity(scheme.len() + host.len() + 9);
    let _ = write!(
        endpoint,
        "{scheme}://{host}:{}",
        url.port_or_known_default().unwrap_or_default()
    );
    endpoint
}

/// How a call ended, for the limiter: timeouts, connection failures, 429 and 503 say the
/// receiver is overloaded; any other answer is a latency sample.
fn limiter_signal(result: &Result<reqwest::Response, reqwest::Error>) -> Signal {
    match result {
        Ok(response) => match response.status().as_u16() {
            429 | 503 => Signal::Overloaded {
                retry_after: webhook::retry_after(response.headers()),
            },
            _ => Signal::Answered,
        },
        Err(error) if error.is_builder() || target_guard::refusal_in(error).is_some() => {
            Signal::Ignored
        }
        Err(_) => Signal::Overloaded { retry_after: None },
    }
}

impl Http {
    /// Waits for a slot at the endpoint of `url` (at most the limiter's queue wait, which is
    /// not part of the attempt's timeout). `label`: how metrics name the endpoint when not by
    /// its `scheme://host:port` ([`target_label`]); `ceiling`: a configured `max_in_flight`.
    ///
    /// # Errors
    /// OB016 when no slot came within the queue wait.
    async fn reserve(
        &self,
        context: &ActionContext<'_>,
        url: &url::Url,
        label: Option<&str>,
        ceiling: Option<u32>,
    ) -> Result<Option<EndpointPermit>, AttemptError> {
        let endpoint = endpoint_of(url);
        let permit = self
            .limiter
            .acquire(&endpoint, &endpoint_label(&endpoint, label), ceiling)
            .await?;
        // The slot may have come after the leases lapsed; dropped unused, it is given back.
        context.may_dispatch()?;
        Ok(permit)
    }

    /// Sends `request` in the slot `permit` and tells the limiter how it went. A request that
    /// a reused keep-alive connection closed before it was written is sent again on another
    /// connection by the client itself (hyper's `retry_canceled_requests`), within this call.
    ///
    /// # Errors
    /// The transport failure, classified, its text without the URL or `secrets`.
    async fn send_reserved(
        &self,
        permit: Option<EndpointPermit>,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        secrets: &Secrets,
    ) -> Result<reqwest::Response, AttemptError> {
        self.send_noting_shrinking(permit, request, timeout, secrets)
            .await
            .0
    }

    /// [`send_reserved`](Self::send_reserved), also saying whether the endpoint's limit was
    /// already shrinking when the call ended (before this call's own signal): a failure then is
    /// our own overload being shed, which the circuit breaker does not count.
    async fn send_noting_shrinking(
        &self,
        permit: Option<EndpointPermit>,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        secrets: &Secrets,
    ) -> (Result<reqwest::Response, AttemptError>, bool) {
        let result = request.timeout(timeout).send().await;
        let shrinking = permit
            .as_ref()
            .is_some_and(EndpointPermit::endpoint_is_shrinking);
        if let Some(permit) = permit {
            permit.finish(limiter_signal(&result));
        }
        (
            result.map_err(|error| webhook::transport_error(error, timeout, secrets)),
            shrinking,
        )
    }

    /// [`reserve`](Self::reserve) a slot at `url`'s endpoint, then
    /// [`send_reserved`](Self::send_reserved) `request` (built for `url`) in it.
    ///
    /// # Errors
    /// As those two.
    async fn send(
        &self,
        context: &ActionContext<'_>,
        url: &url::Url,
        label: Option<&str>,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        secrets: &Secrets,
    ) -> Result<reqwest::Response, AttemptError> {
        let permit = self.reserve(context, url, label, None).await?;
        self.send_reserved(permit, request, timeout, secrets).await
    }
}

/// How metrics name a target's endpoint when not by its `scheme://host:port`: `env:<VARIABLE>`
/// for a URL from the environment (its host may be secret), `template:<template>` for a URL
/// whose host comes from event data (metric labels stay a fixed set, whatever the data says).
/// Where an action would send, for `debug-event --explain`: the URL of a webhook, Slack or
/// search action (an `*_env` one by its variable's name, a rendered one by its template), or
/// what [`ActionKind::needs`] names.
#[must_use]
pub fn target_of(kind: &ActionKind) -> Option<String> {
    use crate::config::WebhookTarget;
    let target = match kind {
        ActionKind::Webhook(action) => &action.target,
        ActionKind::Slack(action) => &action.target,
        ActionKind::Search(action) => &action.target,
        _ => return kind.needs(),
    };
    Some(match target {
        WebhookTarget::Literal(url) => url.to_string(),
        WebhookTarget::FromEnv { variable, .. } => format!("the URL in {variable}"),
        WebhookTarget::Template(template) => format!("rendered by {}", template.name),
    })
}

fn target_label(target: &crate::config::WebhookTarget) -> Option<String> {
    match target {
        crate::config::WebhookTarget::Literal(_) => None,
        crate::config::WebhookTarget::Template(template) => template
            .host_from_event_data()
            .then(|| format!("template:{}", template.name)),
        crate::config::WebhookTarget::FromEnv { variable, .. } => Some(format!("env:{variable}")),
    }
}

/// Performs single attempts of actions; cheap to clone, shares one HTTP connection pool.
#[derive(Clone, Debug)]
pub struct ActionRunner {
    http: Http,
    templates: Arc<Templates>,
    breakers: Option<crate::breaker::Breakers>,
    /// Where `rate_limit` / `max_in_flight` of actions are counted (in process by default).
    limits: Arc<dyn crate::limits::LimitStore>,
    /// Where `cache: {ttl}` actions keep results (in process by default). Its prefix is the
    /// node's Redis key prefix, shared with deduplication, breakers and limits.
    cache: crate::cache::Cache,
    /// The keys under that prefix: `cache` actions leave them alone.
    service_keys: crate::config::ServiceKeyspace,
    /// The service's PostgreSQL pool, which `database` actions call their functions through, and
    /// whose ledger records those calls in the same transactions.
    database: Option<sqlx::PgPool>,
    /// The node's Redis connection, which `cache` actions remove keys through.
    redis: Option<crate::redis_client::SharedConnection>,
    /// `_bulk` writers of `search` actions with `bulk`.
    search_bulk: search::BulkWriters,
}

/// How long an idle pooled connection to a webhook target is kept.
const HTTP_POOL_IDLE_TIMEOUT: Duration = Duration::from_mins(1);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings both HTTP clients share.
fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(HTTP_CONNECT_TIMEOUT)
        .pool_idle_timeout(HTTP_POOL_IDLE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        // Idle keep-alive connections per endpoint: no more than its limit can use at once.
        .pool_max_idle_per_host(
            usize::try_from(crate::concurrency::DEFAULT_MAX_LIMIT).unwrap_or(usize::MAX),
        )
}

/// The client of URLs whose host comes from event data: it connects only to the addresses
/// `policy` allows, and goes direct (a proxy would resolve the host out of the guard's sight).
fn guarded_http_client(
    policy: &target_guard::TargetPolicy,
) -> Result<reqwest::Client, reqwest::Error> {
    http_client_builder()
        .no_proxy()
        .dns_resolver(Arc::new(target_guard::GuardedResolver {
            policy: policy.clone(),
        }))
        .build()
}

impl ActionRunner {
    /// # Errors
    /// When the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(templates: Arc<Templates>) -> anyhow::Result<ActionRunner> {
        let target_policy = target_guard::TargetPolicy::default();
        Ok(ActionRunner {
            http: Http {
                client: http_client_builder().build()?,
                guarded_client: guarded_http_client(&target_policy)?,
                target_policy,
                limiter: EndpointLimiter::default(),
            },
            templates,
            breakers: None,
            limits: Arc::new(crate::limits::InMemoryLimitStore::default()),
            cache: crate::cache::Cache {
                backend: Arc::new(crate::cache::InMemoryCache::default()),
                prefix: String::new(),
                metrics: None,
            },
            service_keys: crate::config::ServiceKeyspace::new(""),
            database: None,
            redis: None,
            search_bulk: search::BulkWriters::default(),
        })
    }

    /// Lets `cache` actions remove keys through the node's Redis connection.
    #[must_use]
    pub fn with_redis(mut self, connection: crate::redis_client::SharedConnection) -> ActionRunner {
        self.redis = Some(connection);
        self
    }

    /// Lets `database` actions call their functions through `pool`: the service's own database,
    /// migrated, whose completed-actions ledger each call records itself in (in the call's
    /// transaction, so a call is made once per action of an event; see [`database`]).
    #[must_use]
    pub fn with_database(mut self, pool: sqlx::PgPool) -> ActionRunner {
        self.database = Some(pool);
        self
    }

    /// Keeps `cache: {ttl}` results in `cache` (Redis: shared by every node). Its prefix is taken
    /// as the node's Redis key prefix, under which `cache` actions remove nothing.
    #[must_use]
    pub fn with_cache(mut self, cache: crate::cache::Cache) -> ActionRunner {
        self.service_keys = crate::config::ServiceKeyspace::new(&cache.prefix);
        self.cache = cache;
        self
    }

    /// Lets webhook URLs rendered from event data reach the non-public addresses in `networks`
    /// too (`--allow-private-targets-cidr`); by default they reach public addresses only.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS roots unavailable).
    pub fn with_private_targets_allowed(
        mut self,
        networks: &[crate::config::Network],
    ) -> anyhow::Result<ActionRunner> {
        let policy = target_guard::TargetPolicy::allowing(networks);
        self.http.guarded_client = guarded_http_client(&policy)?;
        self.http.target_policy = policy;
        Ok(self)
    }

    /// Counts endpoint limits in `store` (Redis: shared by every node).
    #[must_use]
    pub fn with_limits(mut self, store: Arc<dyn crate::limits::LimitStore>) -> ActionRunner {
        self.limits = store;
        self
    }

    /// Limits the calls in flight per HTTP endpoint with `limiter` (by default, an adaptive
    /// limiter with default settings and no metrics).
    #[must_use]
    pub fn with_limiter(mut self, limiter: EndpointLimiter) -> ActionRunner {
        self.http.limiter = limiter;
        self
    }

    /// The per-endpoint concurrency limits of HTTP actions.
    #[must_use]
    pub fn limiter(&self) -> &EndpointLimiter {
        &self.http.limiter
    }

    /// How long one attempt of `action` may take in all: its timeout, plus — for the HTTP
    /// actions — the longest wait for a slot at its endpoint, which is not part of the timeout.
    #[must_use]
    pub fn attempt_deadline(&self, action: &ActionDefinition) -> Duration {
        let timeout = action.kind.timeout();
        match &action.kind {
            ActionKind::Webhook(_)
            | ActionKind::Slack(_)
            | ActionKind::Sms(_)
            | ActionKind::Search(_)
                if self.http.limiter.settings().adaptive =>
            {
                timeout + self.http.limiter.settings().queue_wait
            }
            _ => timeout,
        }
    }

    /// Guards every HTTP endpoint with a circuit breaker from `breakers`.
    #[must_use]
    pub fn with_breakers(mut self, breakers: crate::breaker::Breakers) -> ActionRunner {
        self.breakers = Some(breakers);
        self
    }

    /// The templates actions render with.
    #[must_use]
    pub fn templates(&self) -> &Templates {
        &self.templates
    }
}

fn secret_missing(what: &str, variable: &str) -> AttemptError {
    AttemptError::new(
        ErrorCode::SecretMissing,
        format!(
            "{what} needs environment variable {variable}, which was not set when the configuration was loaded"
        ),
    )
}

/// Template `name` rendered against the event's envelope.
fn render(
    templates: &Templates,
    name: &str,
    context: &ActionContext<'_>,
) -> Result<String, AttemptError> {
    templates
        .render(name, context.envelope)
        .map_err(|error| template_failed(name, &error))
}

/// A secret's value, or OB003 naming `what` and the unset variable.
fn secret_value<'setting>(
    setting: &'setting crate::config::Setting<crate::config::Secret>,
    what: &str,
) -> Result<&'setting str, AttemptError> {
    setting
        .ready()
        .map(crate::config::Secret::expose)
        .map_err(|variable| secret_missing(what, variable))
}

/// The URL of a literal or `*_env` target, or OB003 naming `what` and the unset variable (a
/// URL template, which only a webhook may have, is rendered by the webhook itself).
fn target_url(target: &crate::config::WebhookTarget, what: &str) -> Result<url::Url, AttemptError> {
    use crate::config::{Setting, WebhookTarget};
    match target {
        WebhookTarget::Literal(url) => Ok(url.clone()),
        WebhookTarget::Template(template) => Err(AttemptError::new(
            ErrorCode::Internal,
            format!(
                "{what} is the template {}, which this action cannot render",
                template.name
            ),
        )),
        WebhookTarget::FromEnv {
            url: Setting::Ready(url),
            ..
        } => Ok(url.0.clone()),
        WebhookTarget::FromEnv {
            url: Setting::MissingEnv(variable),
            ..
        } => Err(secret_missing(what, variable)),
    }
}

/// Longest text from a receiver or from event data quoted in a message, in characters.
const MAX_QUOTED_CHARS: usize = 256;

/// `text` in double quotes with quotes, backslashes and control characters escaped, cut at
/// [`MAX_QUOTED_CHARS`] (then `…`): text from a receiver or from event data can hold anything,
/// and a message must stay one bounded line.
fn quoted(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len().min(MAX_QUOTED_CHARS) + 2);
    quoted.push('"');
    for (count, character) in text.chars().enumerate() {
        if count == MAX_QUOTED_CHARS {
            quoted.push('…');
            break;
        }
        match character {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(character);
            }
            _ if character.is_control() => quoted.extend(character.escape_default()),
            _ => quoted.push(character),
        }
    }
    quoted.push('"');
    quoted
}

/// The reason of a redirect (3xx) answer, naming where it pointed (see [`quoted`]: the
/// `Location` comes from the receiver), or `None` for another status.
fn redirect_reason(status: u16, headers: &reqwest::header::HeaderMap) -> Option<String> {
    if !(300..=399).contains(&status) {
        return None;
    }
    let Some(location) = headers.get(reqwest::header::LOCATION) else {
        return Some("a redirect without a Location; redirects are not followed".to_owned());
    };
    Some(format!(
        "redirected to {}; redirects are not followed",
        quoted(&String::from_utf8_lossy(location.as_bytes()))
    ))
}

/// Fragments shorter than this are left in messages: they cannot be told apart from ordinary
/// words, and blanking every occurrence would make the message unreadable.
const MIN_SECRET_CHARS: usize = 3;

/// Text that must never appear in an action's error messages (and so in logs, dead letters and
/// job histories): the parts of its target URL that can carry a token — the whole URL, its path,
/// query and user info, and its host when the URL came from the environment — and its
/// credentials.
#[derive(Clone, Default)]
struct Secrets(Vec<String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Secrets(<{} redacted>)", self.0.len())
    }
}

impl Secrets {
    /// The parts of `url` that can carry a token; `host_is_secret` for a URL from the environment.
    fn of_url(url: &url::Url, host_is_secret: bool) -> Secrets {
        let mut secrets = Secrets::default();
        secrets.add(url.as_str());
        secrets.add(&url[..url::Position::AfterPath]);
        secrets.add(&url[url::Position::BeforeUsername..]);
        secrets.add(url.path());
        secrets.add(url.query().unwrap_or_default());
        secrets.add(url.username());
        secrets.add(url.password().unwrap_or_default());
        if host_is_secret {
            secrets.add(url.host_str().unwrap_or_default());
        }
        secrets
    }

    /// Adds `value` (a credential); fragments shorter than [`MIN_SECRET_CHARS`] are ignored.
    fn add(&mut self, value: &str) {
        if value.chars().count() >= MIN_SECRET_CHARS && !self.0.iter().any(|known| known == value) {
            self.0.push(value.to_owned());
        }
    }

    /// `message` with every occurrence of a secret replaced by `<redacted>`, longest first (so a
    /// URL is blanked as a whole rather than around its path).
    fn redact(&self, message: &str) -> String {
        let mut secrets: Vec<&str> = self.0.iter().map(String::as_str).collect();
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        let mut redacted = message.to_owned();
        for secret in secrets {
            if redacted.contains(secret) {
                redacted = redacted.replace(secret, "<redacted>");
            }
        }
        redacted
    }
}

/// `error: cause: cause…`, the whole source chain on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors print their source in their own text already.
        if !message.ends_with(&cause_text) {
            message.push_str(": ");
            message.push_str(&cause_text);
        }
        source = cause.source();
    }
    message
}

fn template_failed(template: &str, error: &crate::template::TemplateError) -> AttemptError {
    AttemptError::new(
        ErrorCode::TemplateFailed,
        format!("template {template}: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_a_target_whose_host_comes_from_event_data_by_its_template() {
        use crate::config::{UrlTemplate, WebhookTarget};
        let template = |fixed_origin: Option<url::Origin>| {
            WebhookTarget::Template(UrlTemplate {
                name: "observers[0].actions[0].url.txt".into(),
                reads: vec!["data.host".into()],
                fixed_origin,
            })
        };
        assert_eq!(
            target_label(&template(None)).as_deref(),
            Some("template:observers[0].actions[0].url.txt")
        );
        let fixed = url::Url::parse("https://hooks.example.com/")
            .unwrap()
            .origin();
        assert_eq!(target_label(&template(Some(fixed))), None);
        let literal = WebhookTarget::Literal(url::Url::parse("https://a.example/").unwrap());
        assert_eq!(target_label(&literal), None);
    }

    #[test]
    fn every_action_type_has_its_keys() {
        const COMMON_KEYS: [&str; 5] = ["type", "name", "mode", "queue", "priority"];
        for type_name in ActionKind::TYPE_NAMES {
            let keys = ActionKind::keys_of(type_name).unwrap();
            assert!(!keys.is_empty(), "{type_name}");
            for key in keys {
                assert!(!COMMON_KEYS.contains(key), "{type_name}: {key}");
                assert_eq!(
                    keys.iter().filter(|other| *other == key).count(),
                    1,
                    "{type_name}: {key} twice"
                );
            }
        }
        assert_eq!(ActionKind::keys_of("nope"), None);
    }

    #[test]
    fn only_2xx_is_success_and_redirects_are_permanent() {
        assert_eq!(ErrorCode::from_http_status(200), None);
        assert_eq!(ErrorCode::from_http_status(204), None);
        for redirect in [301, 302, 303, 304, 307, 308] {
            assert_eq!(
                ErrorCode::from_http_status(redirect),
                Some(ErrorCode::RemoteRejected),
                "{redirect}"
            );
        }
        assert_eq!(
            ErrorCode::from_http_status(503),
            Some(ErrorCode::RemoteUnavailable)
        );
        assert_eq!(
            ErrorCode::from_http_status(429),
            Some(ErrorCode::RateLimited)
        );
    }

    #[test]
    fn a_redirect_names_its_location_escaped_and_bounded() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(redirect_reason(200, &headers), None);
        assert_eq!(
            redirect_reason(302, &headers).unwrap(),
            "a redirect without a Location; redirects are not followed"
        );
        headers.insert(
            reqwest::header::LOCATION,
            reqwest::header::HeaderValue::from_static("https://elsewhere.example/\t\"x\""),
        );
        assert_eq!(
            redirect_reason(307, &headers).unwrap(),
            r#"redirected to "https://elsewhere.example/\t\"x\""; redirects are not followed"#
        );
        let long = format!("/{}", "a".repeat(1000));
        headers.insert(
            reqwest::header::LOCATION,
            reqwest::header::HeaderValue::from_str(&long).unwrap(),
        );
        let reason = redirect_reason(301, &headers).unwrap();
        assert!(
            reason.contains(&format!("\"/{}…\"", "a".repeat(MAX_QUOTED_CHARS - 1))),
            "{reason}"
        );
        assert!(reason.len() < 400, "{reason}");
    }

    #[test]
    fn secrets_of_a_url_are_blanked_wherever_a_message_quotes_them() {
        let url = url::Url::parse(
            "https://user:pass-word@hooks.example.com/services/T000/B000/XXXXSECRET?token=q-secret",
        )
        .unwrap();
        let message = format!(
            "error for url ({url}): path /services/T000/B000/XXXXSECRET, query token=q-secret, \
             user pass-word at hooks.example.com"
        );
        let shown = Secrets::of_url(&url, false).redact(&message);
        for secret in ["XXXXSECRET", "q-secret", "pass-word"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("hooks.example.com"),
            "a literal host is named: {shown}"
        );
        let hidden = Secrets::of_url(&url, true).redact(&message);
        assert!(!hidden.contains("hooks.example.com"), "{hidden}");
    }
}
