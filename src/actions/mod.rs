//! Actions: what an observer does about a matched event, one attempt at a time: `webhook`,
//! `log`, `database` (a PostgreSQL function), `cache` (Redis keys removed), `slack`, `sms`
//! (Twilio-compatible), `email` (SMTP) and `search` (Elasticsearch/OpenSearch documents).
//!
//! [`ActionRunner::attempt`] performs exactly one attempt of one action and classifies its
//! failure with an [`ErrorCode`](crate::error::ErrorCode); retries, timeouts, concurrency and
//! dead-lettering belong to the [`executor`](crate::executor). Every attempt of the same
//! (event, observer, action) carries the same idempotency key, so a target can recognise a
//! repeat.

mod cache;
mod database;
mod email;
mod log;
mod search;
mod slack;
mod sms;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::{ActionDefinition, ActionKind, ObserverName};
use crate::domain::EntityEvent;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

pub use database::IDEMPOTENCY_SETTING;
pub use email::IDEMPOTENCY_HEADER as EMAIL_IDEMPOTENCY_HEADER;
pub use sms::IDEMPOTENCY_HEADER as SMS_IDEMPOTENCY_HEADER;
pub use webhook::{SIGNATURE_HEADER, sign_payload};

/// Everything one attempt needs to know about where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct ActionContext<'run> {
    pub event: &'run EntityEvent,
    pub observer: &'run ObserverName,
    pub action_index: usize,
    /// The event envelope for this observer (also the template context), built once per observer.
    pub envelope: &'run Value,
}

impl ActionContext<'_> {
    /// `<event id>:<observer>:<action index>`: the same on every attempt and every replay.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        idempotency_key(self.event, self.observer, self.action_index)
    }
}

/// The idempotency key of one action for one event.
#[must_use]
pub fn idempotency_key(
    event: &EntityEvent,
    observer: &ObserverName,
    action_index: usize,
) -> String {
    format!("{}:{}:{}", event.id, observer, action_index)
}

/// What a successful attempt reports (e.g. `HTTP 200`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionSuccess {
    pub detail: String,
}

/// Performs single attempts of actions; cheap to clone, shares one HTTP connection pool.
#[derive(Clone, Debug)]
pub struct ActionRunner {
    http: reqwest::Client,
    templates: Arc<Templates>,
    breakers: Option<crate::breaker::Breakers>,
    /// Where `rate_limit` / `max_in_flight` of actions are counted (in process by default).
    limits: Arc<dyn crate::limits::LimitStore>,
    /// Where `cache: {ttl}` actions keep results (in process by default). Its prefix is the
    /// node's Redis key prefix, shared with deduplication, breakers and limits.
    cache: crate::cache::Cache,
    /// The keys under that prefix: `cache` actions leave them alone.
    service_keys: crate::config::ServiceKeyspace,
    /// The service's PostgreSQL pool, which `database` actions call their functions through.
    database: Option<sqlx::PgPool>,
    /// The node's Redis connection, which `cache` actions remove keys through.
    redis: Option<crate::redis_client::SharedConnection>,
    /// `_bulk` writers of `search` actions with `bulk`.
    search_bulk: search::BulkWriters,
}

/// How long an idle pooled connection to a webhook target is kept.
const HTTP_POOL_IDLE_TIMEOUT: Duration = Duration::from_mins(1);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ActionRunner {
    /// # Errors
    /// When the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(templates: Arc<Templates>) -> anyhow::Result<ActionRunner> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .pool_idle_timeout(HTTP_POOL_IDLE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ActionRunner {
            http,
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

    /// Lets `database` actions call their functions through `pool`.
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

    /// Counts endpoint limits in `store` (Redis: shared by every node).
    #[must_use]
    pub fn with_limits(mut self, store: Arc<dyn crate::limits::LimitStore>) -> ActionRunner {
        self.limits = store;
        self
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
            ActionKind::Webhook(webhook) => {
                webhook::attempt(
                    &self.http,
                    &self.templates,
                    webhook::Guards {
                        breakers: self.breakers.as_ref(),
                        limits: self.limits.as_ref(),
                        cache: &self.cache,
                    },
                    webhook,
                    context,
                )
                .await
            }
            ActionKind::Log(log) => log::attempt(&self.templates, log, context),
            ActionKind::Database(database) => {
                database::attempt(self.database.as_ref(), &self.templates, database, context).await
            }
            ActionKind::Cache(cache) => {
                cache::attempt(
                    self.redis.as_ref(),
                    &self.service_keys,
                    &self.templates,
                    cache,
                    context,
                )
                .await
            }
            ActionKind::Slack(slack) => {
                slack::attempt(&self.http, &self.templates, slack, context).await
            }
            ActionKind::Sms(sms) => sms::attempt(&self.http, &self.templates, sms, context).await,
            ActionKind::Email(email) => email::attempt(&self.templates, email, context).await,
            ActionKind::Search(search) => {
                search::attempt(
                    &self.http,
                    &self.templates,
                    search,
                    context,
                    &self.search_bulk,
                )
                .await
            }
        }
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

/// The URL of a literal or `*_env` target, or OB003 naming `what` and the unset variable.
fn target_url(target: &crate::config::WebhookTarget, what: &str) -> Result<url::Url, AttemptError> {
    use crate::config::{Setting, WebhookTarget};
    match target {
        WebhookTarget::Literal(url) => Ok(url.clone()),
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

fn template_failed(template: &str, error: &crate::template::TemplateError) -> AttemptError {
    AttemptError::new(
        ErrorCode::TemplateFailed,
        format!("template {template}: {error}"),
    )
}
