//! The `webhook` action: one HTTP request per matched event.
//!
//! The body is the event envelope (JSON) unless a `body_template` renders another. Every request
//! carries `Idempotency-Key: <event id>:<observer>:<action index>` and `X-FraiseQL-Event-Id`, and,
//! with a signing secret, `X-FraiseQL-Signature-256: t=<unix seconds>,v1=<hex>` where `<hex>` is
//! the HMAC-SHA256 of `"<t>.<body>"` (the Stripe-compatible shape FraiseQL's receivers verify).

use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use reqwest::header::{
    CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue as HttpHeaderValue, RETRY_AFTER,
};
use sha2::Sha256;

use super::{
    ActionConfig, ActionContext, ActionRunner, ActionSuccess, Http, Secrets, UrlFromEvent,
    endpoint_label, endpoint_of, error_chain, quoted, redirect_reason, render, secret_missing,
    target_label, target_url, template_failed,
};
use crate::breaker::{Admission, Breakers, CallOutcome, circuit_id, counts_as_failure};
use crate::cache::{Cache, CacheScope};
use crate::concurrency::EndpointPermit;
use crate::config::{
    DEFAULT_ACTION_TIMEOUT, Decoder, EndpointLimits, Fields, Node, NodeValue, Secret, Setting,
    WebhookTarget, child,
};
use crate::error::ErrorCode;
use crate::limits::{LimitStore, wait_for_slot, wait_for_token};
use crate::retry::AttemptError;
use crate::template::Templates;

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

/// An HTTP call per matched event.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookAction {
    pub target: WebhookTarget,
    pub method: HttpMethod,
    pub headers: Vec<(String, HeaderValue)>,
    /// Name of the body template in the config's [`Templates`];
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
    /// `allow_private_targets: true`: a URL whose host comes from event data may reach
    /// loopback, private and link-local addresses too (no SSRF guard for this action).
    pub allow_private_targets: bool,
}

/// Headers the service sets itself; a file may not override them.
const RESERVED_HEADERS: [&str; 4] = [
    "idempotency-key",
    "x-fraiseql-event-id",
    "x-fraiseql-signature-256",
    "content-length",
];

impl ActionConfig for WebhookAction {
    const KEYS: &[&str] = &[
        "url",
        "url_env",
        "method",
        "headers",
        "body_template",
        "body_format",
        "signing_secret",
        "signing_secret_env",
        "timeout",
        "rate_limit",
        "max_in_flight",
        "cache",
        "allow_private_targets",
    ];

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<WebhookAction> {
        let target = decoder.url_target_or_template(fields, path, "url");
        let method = match fields.get("method") {
            None => Some(HttpMethod::Post),
            Some(node) => decoder.choice(
                node,
                &child(path, "method"),
                &[
                    ("POST", HttpMethod::Post),
                    ("PUT", HttpMethod::Put),
                    ("PATCH", HttpMethod::Patch),
                    ("DELETE", HttpMethod::Delete),
                    ("GET", HttpMethod::Get),
                ],
            ),
        };
        let headers = match fields.get("headers") {
            None => Some(Vec::new()),
            Some(node) => headers(decoder, node, &child(path, "headers")),
        };
        let body_format = match fields.get("body_format") {
            None => Some(BodyFormat::Json),
            Some(node) => decoder.choice(
                node,
                &child(path, "body_format"),
                &[("json", BodyFormat::Json), ("text", BodyFormat::Text)],
            ),
        };
        let body_template = match (fields.get("body_template"), body_format) {
            (None, _) => Some(None),
            (Some(node), Some(format)) => {
                let template_path = child(path, "body_template");
                decoder.string(node, &template_path).and_then(|source| {
                    let suffix = if format == BodyFormat::Json {
                        "json"
                    } else {
                        "txt"
                    };
                    decoder
                        .template(
                            format!("{template_path}.{suffix}"),
                            source,
                            node.position,
                            &template_path,
                        )
                        .map(Some)
                })
            }
            (Some(_), None) => None,
        };
        let signing_secret = decoder.secret(fields, "signing_secret", path);
        let signing_valid = fields.get("signing_secret").is_none()
            && fields.get("signing_secret_env").is_none()
            || signing_secret.is_some();
        let timeout = match fields.get("timeout") {
            None => Some(DEFAULT_ACTION_TIMEOUT),
            Some(node) => decoder.timeout(node, &child(path, "timeout")),
        };
        let rate = match fields.get("rate_limit") {
            None => Some(None),
            Some(node) => decoder
                .rate_limit(node, &child(path, "rate_limit"))
                .map(Some),
        };
        let max_in_flight = match fields.get("max_in_flight") {
            None => Some(None),
            Some(node) => decoder
                .integer_in(node, &child(path, "max_in_flight"), 1, 10_000)
                .and_then(|limit| u32::try_from(limit).ok())
                .map(Some),
        };
        let cache_ttl = match fields.get("cache") {
            None => Some(None),
            Some(node) => cache_ttl(decoder, node, &child(path, "cache")).map(Some),
        };
        let allow_private_targets = allow_private_targets(decoder, fields, path, target.as_ref());
        if !signing_valid {
            return None;
        }
        Some(WebhookAction {
            target: target?,
            method: method?,
            headers: headers?,
            body_template: body_template?,
            body_format: body_format?,
            signing_secret,
            timeout: timeout?,
            limits: EndpointLimits {
                rate: rate?,
                max_in_flight: max_in_flight?,
            },
            cache_ttl: cache_ttl?,
            allow_private_targets: allow_private_targets?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn secrets_from_env(&self) -> usize {
        usize::from(self.target.is_from_env())
            + usize::from(self.signing_secret.is_some())
            + self
                .headers
                .iter()
                .filter(|(_, value)| matches!(value, HeaderValue::Secret(_)))
                .count()
    }

    fn url_from_event(&self) -> Option<UrlFromEvent> {
        let WebhookTarget::Template(template) = &self.target else {
            return None;
        };
        let host_from_event_data = template.host_from_event_data();
        Some(UrlFromEvent {
            reads: template.reads.clone(),
            host_from_event_data,
            guarded: host_from_event_data && !self.allow_private_targets,
        })
    }
}

/// `allow_private_targets` (default false); a warning when the URL's host does not come from
/// event data, as such URLs are never checked.
fn allow_private_targets(
    decoder: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
    target: Option<&WebhookTarget>,
) -> Option<bool> {
    let Some(node) = fields.get("allow_private_targets") else {
        return Some(false);
    };
    let key_path = child(path, "allow_private_targets");
    let allowed = decoder.boolean(node, &key_path)?;
    let host_from_data = matches!(
        target,
        Some(WebhookTarget::Template(template)) if template.host_from_event_data()
    );
    if allowed && target.is_some() && !host_from_data {
        decoder.warning(
            node.position,
            &key_path,
            "has no effect: the url's host does not come from event data, and such URLs are \
             never checked",
        );
    }
    Some(allowed)
}

/// `cache: {ttl: 30s}`.
fn cache_ttl(decoder: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Duration> {
    let fields = decoder.fields(node, path, &["ttl"])?;
    let Some(ttl) = fields.get("ttl") else {
        decoder.error(node.position, path, "'ttl' is required");
        return None;
    };
    let ttl_path = child(path, "ttl");
    let duration = decoder.duration(ttl, &ttl_path)?;
    if duration.is_zero() {
        decoder.error(ttl.position, &ttl_path, "expected a time to live above 0");
        return None;
    }
    Some(duration)
}

fn headers(
    decoder: &mut Decoder<'_>,
    node: &Node,
    path: &str,
) -> Option<Vec<(String, HeaderValue)>> {
    let NodeValue::Map(entries) = &node.value else {
        decoder.expected(node, path, "a mapping of header names to values");
        return None;
    };
    let mut headers = Vec::with_capacity(entries.len());
    let mut all_valid = true;
    for (key, value) in entries {
        let Some(name) = decoder.string(key, path) else {
            all_valid = false;
            continue;
        };
        let header_path = child(path, name);
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            decoder.error(
                key.position,
                &header_path,
                format!("{name:?} is not a valid HTTP header name"),
            );
            all_valid = false;
            continue;
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            decoder.error(
                key.position,
                &header_path,
                format!("header {name:?} is set by the service and cannot be configured"),
            );
            all_valid = false;
            continue;
        }
        let raw = match &value.value {
            NodeValue::String(text) => text.clone(),
            NodeValue::Integer(number) => number.to_string(),
            NodeValue::Bool(flag) => flag.to_string(),
            _ => {
                decoder.expected(value, &header_path, "a header value string");
                all_valid = false;
                continue;
            }
        };
        let Some(expanded) = decoder.expand(&raw, value.position, &header_path) else {
            all_valid = false;
            continue;
        };
        if !expanded.missing.is_empty() {
            decoder.report_missing_env(&expanded.missing, value.position, &header_path);
            headers.push((
                name.to_owned(),
                HeaderValue::Secret(Setting::MissingEnv(expanded.missing.join(", "))),
            ));
            continue;
        }
        if reqwest::header::HeaderValue::from_str(&expanded.text).is_err() {
            let shown = if expanded.variables.is_empty() {
                format!("{raw:?}")
            } else {
                "the value after ${…} expansion".into()
            };
            decoder.error(
                value.position,
                &header_path,
                format!(
                    "{shown} is not a valid HTTP header value (control characters or non-ASCII)"
                ),
            );
            all_valid = false;
            continue;
        }
        let header_value = if expanded.variables.is_empty() {
            HeaderValue::Literal(expanded.text)
        } else {
            HeaderValue::Secret(Setting::Ready(Secret::new(expanded.text)))
        };
        headers.push((name.to_owned(), header_value));
    }
    all_valid.then_some(headers)
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &WebhookAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(
        &runner.http,
        &runner.templates,
        Guards {
            breakers: runner.breakers.as_ref(),
            limits: runner.limits.as_ref(),
            cache: &runner.cache,
        },
        action,
        context,
    )
    .await
}

/// Header carrying the payload signature.
pub const SIGNATURE_HEADER: &str = "X-FraiseQL-Signature-256";
/// How much of an error response's body is kept for the DLQ and logs.
const ERROR_BODY_EXCERPT_BYTES: usize = 512;

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
///
/// # Panics
/// Never: HMAC-SHA256 accepts keys of any length.
#[must_use]
pub fn sign_payload(secret: &[u8], unix_seconds: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

fn method(method: HttpMethod) -> reqwest::Method {
    match method {
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
        HttpMethod::Get => reqwest::Method::GET,
    }
}

fn render_body(
    templates: &Templates,
    action: &WebhookAction,
    context: &ActionContext<'_>,
) -> Result<Vec<u8>, AttemptError> {
    let Some(template) = &action.body_template else {
        return envelope_body(context.envelope);
    };
    let body = templates
        .render(template, context.envelope)
        .map_err(|error| template_failed(template, &error))?;
    if action.body_format == BodyFormat::Json
        && let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&body)
    {
        return Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!(
                "template {template} rendered invalid JSON ({error}); values are inserted as JSON, so write {{{{ data.name }}}} without quotes around it"
            ),
        ));
    }
    Ok(body.into_bytes())
}

thread_local! {
    /// Where this thread serializes envelopes before copying them into bodies of their size.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch buffers above this are not kept between bodies.
const SCRATCH_KEPT_BYTES: usize = 1 << 20;

/// The envelope as the default body, written straight from the event into this thread's scratch
/// buffer and copied into a body of its exact size: one allocation per body, and none of the slack
/// of a grown buffer (a body waits with its attempt for an endpoint slot, and a backlog holds
/// thousands of them).
///
/// # Errors
/// OB013 when the envelope does not serialize (a defect: its values are JSON).
pub fn envelope_body(envelope: &crate::domain::Envelope<'_>) -> Result<Vec<u8>, AttemptError> {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let written = serde_json::to_writer(&mut *scratch, envelope);
        let body = written.map(|()| scratch.as_slice().to_vec());
        if scratch.capacity() > SCRATCH_KEPT_BYTES {
            *scratch = Vec::new();
        }
        body.map_err(|error| {
            AttemptError::new(ErrorCode::Internal, format!("serialize envelope: {error}"))
        })
    })
}

fn build_headers(
    action: &WebhookAction,
    context: &ActionContext<'_>,
    body: &[u8],
) -> Result<HeaderMap, AttemptError> {
    let mut headers = HeaderMap::with_capacity(action.headers.len() + 4);
    let content_type = match action.body_format {
        BodyFormat::Json => "application/json",
        BodyFormat::Text => "text/plain; charset=utf-8",
    };
    headers.insert(CONTENT_TYPE, HttpHeaderValue::from_static(content_type));
    for (name, value) in &action.headers {
        let (text, sensitive) = match value {
            HeaderValue::Literal(text) => (text.as_str(), false),
            HeaderValue::Secret(Setting::Ready(secret)) => (secret.expose(), true),
            HeaderValue::Secret(Setting::MissingEnv(variable)) => {
                return Err(secret_missing(&format!("header {name}"), variable));
            }
        };
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|error| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                format!("header name {name:?}: {error}"),
            )
        })?;
        let mut header_value = HttpHeaderValue::from_str(text).map_err(|_| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                format!("header {name}: invalid value"),
            )
        })?;
        header_value.set_sensitive(sensitive);
        headers.insert(header_name, header_value);
    }
    let ascii = |text: String| {
        HttpHeaderValue::from_str(&text).map_err(|_| {
            AttemptError::new(
                ErrorCode::Internal,
                format!("non-ASCII header value {text:?}"),
            )
        })
    };
    headers.insert("idempotency-key", ascii(context.idempotency_key())?);
    let mut event_id = uuid::Uuid::encode_buffer();
    headers.insert(
        "x-fraiseql-event-id",
        HttpHeaderValue::from_bytes(
            context
                .event
                .id
                .hyphenated()
                .encode_lower(&mut event_id)
                .as_bytes(),
        )
        .expect("a UUID is ASCII"),
    );
    if let Some(secret) = &action.signing_secret {
        let secret = match secret {
            Setting::Ready(secret) => secret,
            Setting::MissingEnv(variable) => {
                return Err(secret_missing("the signing secret", variable));
            }
        };
        let unix_seconds = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        headers.insert(
            SIGNATURE_HEADER,
            ascii(sign_payload(secret.expose().as_bytes(), unix_seconds, body))?,
        );
    }
    Ok(headers)
}

/// Parses `Retry-After` as seconds or as an HTTP date.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let moment = httpdate::parse_http_date(text).ok()?;
    Some(
        moment
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A request that got no answer, described without its target: reqwest's own text ends with
/// `for url (…)`, and target URLs carry tokens (Slack, `url_env`, `${VAR}`) and account SIDs
/// (SMS). The cause chain is kept (`… tcp connect error: Connection refused (os error 111)`),
/// with `secrets` blanked should a cause quote them; a timeout says how long was waited (as the
/// executor's own deadline does).
pub(super) fn transport_error(
    error: reqwest::Error,
    timeout: Duration,
    secrets: &Secrets,
) -> AttemptError {
    let error = error.without_url();
    if let Some(refused) = super::target_guard::refusal_in(&error) {
        return refused.clone().into_attempt_error();
    }
    if error.is_timeout() && !error.is_connect() {
        return AttemptError::new(
            ErrorCode::ActionTimeout,
            format!("no answer within {}", humantime::format_duration(timeout)),
        );
    }
    let code = if error.is_timeout() {
        ErrorCode::ActionTimeout
    } else {
        ErrorCode::ConnectionFailed
    };
    AttemptError::new(code, secrets.redact(&error_chain(&error)))
}

/// What a refusing answer said: its body's excerpt, trimmed, or — for an empty body — the status's
/// standard phrase (`Gone (empty body)`), so that no error ends in a bare `HTTP 410: `.
pub(super) async fn refusal_reason(response: reqwest::Response) -> String {
    let status = response.status();
    let excerpt = body_excerpt(response).await;
    let excerpt = excerpt.trim();
    if excerpt.is_empty() {
        format!(
            "{} (empty body)",
            status.canonical_reason().unwrap_or("no reason")
        )
    } else {
        excerpt.to_owned()
    }
}

pub(super) async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut excerpt = Vec::with_capacity(ERROR_BODY_EXCERPT_BYTES);
    while excerpt.len() < ERROR_BODY_EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => excerpt.extend_from_slice(
                &chunk[..chunk.len().min(ERROR_BODY_EXCERPT_BYTES - excerpt.len())],
            ),
            _ => break,
        }
    }
    String::from_utf8_lossy(&excerpt).into_owned()
}

/// What stands between an action and its endpoint.
pub(super) struct Guards<'runner> {
    pub breakers: Option<&'runner Breakers>,
    pub limits: &'runner dyn LimitStore,
    pub cache: &'runner Cache,
}

pub(super) async fn attempt(
    http: &Http,
    templates: &Templates,
    guards: Guards<'_>,
    action: &WebhookAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let (url, guarded) = webhook_url(templates, action, context)?;
    if guarded {
        // An IP address as the host is never resolved, so the guarded client's resolver would
        // not see it: checked here, before anything else.
        http.target_policy
            .check_url(&url)
            .map_err(super::target_guard::TargetRefused::into_attempt_error)?;
    }
    let body = render_body(templates, action, context)?;
    let headers = build_headers(action, context, &body)?;
    let cached = match action.cache_ttl {
        Some(ttl) => {
            let key = cache_key(guards.cache, action, context, &url, &headers, &body);
            if let Some(detail) = guards.cache.get(&key).await {
                return Ok(ActionSuccess {
                    detail: format!("{detail} (cached)"),
                });
            }
            Some((key, ttl))
        }
        None => None,
    };
    let endpoint = endpoint_of(&url);
    // How messages name the endpoint: the host of a URL from the environment may be secret too.
    let named = match &action.target {
        WebhookTarget::Literal(_) | WebhookTarget::Template(_) => endpoint.clone(),
        WebhookTarget::FromEnv { variable, .. } => format!("the endpoint of {variable}"),
    };
    let label = endpoint_label(&endpoint, target_label(&action.target).as_deref());
    let admission = match guards.breakers {
        Some(breakers) => breakers.admit(&endpoint, &label).await,
        None => Admission::Allowed,
    };
    if let Admission::Refused { retry_in } = admission {
        let mut refused = AttemptError::new(
            ErrorCode::CircuitOpen,
            format!(
                "circuit open for {named}; not called (retry in {} ms)",
                retry_in.as_millis()
            ),
        );
        refused.retry_after = Some(retry_in);
        refused.circuit = Some(circuit_id(&endpoint));
        return Err(refused);
    }
    if let Some(rate) = action.limits.rate {
        wait_for_token(guards.limits, &endpoint, rate).await;
    }
    let (permit, slot) =
        match take_slots(http, &guards, action, context, &url, (&endpoint, &named)).await {
            Ok(slots) => slots,
            Err(not_made) => {
                // A probe that was not made is given back to the half-open circuit.
                if let (Some(breakers), Admission::Probe) = (guards.breakers, admission) {
                    breakers
                        .record_outcome(&endpoint, &label, CallOutcome::Discounted)
                        .await;
                }
                return Err(not_made);
            }
        };
    let (mut result, limiter_was_shrinking) =
        call(http, permit, action, (url, guarded), headers, body).await;
    leave_slot(&guards, &endpoint, slot, &named).await;
    if let Some(breakers) = guards.breakers {
        breakers
            .record(
                &endpoint,
                &label,
                result.as_ref().err().map(|error| error.code),
                limiter_was_shrinking,
            )
            .await;
    }
    // A failed probe opened the circuit again: its job is parked on it like a refused one.
    if admission == Admission::Probe
        && let Err(error) = &mut result
        && counts_as_failure(error.code)
    {
        error.circuit = Some(circuit_id(&endpoint));
    }
    if let (Some((key, ttl)), Ok(success)) = (&cached, &result) {
        guards.cache.set(key, &success.detail, *ttl).await;
    }
    result
}

/// This node's adaptive slot at `endpoint` first, then the cluster-wide one of a configured
/// `max_in_flight` (no cluster slot is held while this node queues); then the leases the
/// attempt runs under once more, as either wait can outlast them. `named`: how messages name
/// the endpoint.
///
/// # Errors
/// OB016 when no slot came within the queue wait; OB011 when the leases lapsed meanwhile
/// (the slots are given back). Either way the call was not made.
async fn take_slots(
    http: &Http,
    guards: &Guards<'_>,
    action: &WebhookAction,
    context: &ActionContext<'_>,
    url: &url::Url,
    (endpoint, named): (&str, &str),
) -> Result<(Option<EndpointPermit>, Option<String>), AttemptError> {
    let permit = http
        .reserve(
            context,
            url,
            target_label(&action.target).as_deref(),
            action.limits.max_in_flight,
        )
        .await?;
    let slot = match action.limits.max_in_flight {
        Some(limit) => {
            let lease = action.timeout + Duration::from_secs(5);
            wait_for_slot(guards.limits, endpoint, limit, lease).await
        }
        None => None,
    };
    if let Err(fenced) = context.may_dispatch() {
        leave_slot(guards, endpoint, slot, named).await;
        return Err(fenced);
    }
    Ok((permit, slot))
}

/// Gives a cluster-wide in-flight slot back (a slot not given back expires with its lease).
async fn leave_slot(guards: &Guards<'_>, endpoint: &str, slot: Option<String>, named: &str) {
    if let Some(slot) = slot
        && let Err(error) = guards.limits.leave(endpoint, &slot).await
    {
        tracing::warn!(%error, endpoint = named, "giving an in-flight slot back failed; it expires");
    }
}

/// The cache key of the fully rendered request: method, URL, headers (the Idempotency-Key
/// included; the signature left out, as it changes with time) and body.
fn cache_key(
    cache: &Cache,
    action: &WebhookAction,
    context: &ActionContext<'_>,
    url: &url::Url,
    headers: &HeaderMap,
    body: &[u8],
) -> String {
    let mut header_lines: Vec<String> = headers
        .iter()
        .filter(|(name, _)| !name.as_str().eq_ignore_ascii_case(SIGNATURE_HEADER))
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    header_lines.sort();
    let method = format!("{:?}", action.method);
    let headers = header_lines.join("\n");
    cache.key(
        CacheScope {
            action_type: "webhook",
            entity_type: &context.event.entity_type,
            entity_id: &context.event.entity_id,
            observer: context.observer.as_str(),
            action_index: context.action_index,
        },
        &[
            method.as_bytes(),
            url.as_str().as_bytes(),
            headers.as_bytes(),
            body,
        ],
    )
}

/// The URL this attempt calls, and whether the SSRF guard checks it: a template's rendering
/// whose host comes from event data (unless the action sets `allow_private_targets`), else the
/// literal or `url_env` URL, unchecked.
fn webhook_url(
    templates: &Templates,
    action: &WebhookAction,
    context: &ActionContext<'_>,
) -> Result<(url::Url, bool), AttemptError> {
    let WebhookTarget::Template(template) = &action.target else {
        return Ok((target_url(&action.target, "the webhook URL")?, false));
    };
    let rendered = render(templates, &template.name, context)?;
    let url = match url::Url::parse(rendered.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => url,
        parsed => {
            let reason = match parsed {
                Ok(url) => format!("scheme {:?} or no host", url.scheme()),
                Err(error) => error.to_string(),
            };
            return Err(AttemptError::new(
                ErrorCode::TemplateFailed,
                format!(
                    "template {} rendered {}, not an http:// or https:// URL with a host ({reason})",
                    template.name,
                    quoted(&rendered)
                ),
            ));
        }
    };
    // The origin is checked again after rendering: the text before the first tag fixed it, so
    // it cannot differ, but if it ever did, the guard applies.
    let host_is_the_operators = template.fixed_origin.as_ref() == Some(&url.origin());
    Ok((url, !host_is_the_operators && !action.allow_private_targets))
}

/// Sends the request in `permit`'s slot; also says whether the endpoint's limiter was already
/// shrinking when the call ended (for the circuit breaker).
async fn call(
    http: &Http,
    permit: Option<EndpointPermit>,
    action: &WebhookAction,
    (url, guarded): (url::Url, bool),
    headers: HeaderMap,
    body: Vec<u8>,
) -> (Result<ActionSuccess, AttemptError>, bool) {
    let secrets = Secrets::of_url(&url, matches!(action.target, WebhookTarget::FromEnv { .. }));
    let client = if guarded {
        &http.guarded_client
    } else {
        &http.client
    };
    let request = client
        .request(method(action.method), url)
        .headers(headers)
        .body(body);
    let (sent, limiter_was_shrinking) = http
        .send_noting_shrinking(permit, request, action.timeout, &secrets)
        .await;
    (answer(&secrets, sent).await, limiter_was_shrinking)
}

/// The attempt's result from the receiver's answer.
async fn answer(
    secrets: &Secrets,
    sent: Result<reqwest::Response, AttemptError>,
) -> Result<ActionSuccess, AttemptError> {
    let response = sent?;
    let status = response.status().as_u16();
    let Some(code) = ErrorCode::from_http_status(status) else {
        return Ok(ActionSuccess {
            detail: format!("HTTP {status}"),
        });
    };
    let retry_after = retry_after(response.headers());
    let reason = match redirect_reason(status, response.headers()) {
        Some(reason) => reason,
        None => refusal_reason(response).await,
    };
    let mut error = AttemptError::new(code, secrets.redact(&format!("HTTP {status}: {reason}")));
    error.retry_after = retry_after;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Reference value computed independently:
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'whsec_test'
        let signature = sign_payload(b"whsec_test", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            signature,
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn the_envelope_body_is_the_envelope_at_its_exact_size_and_a_large_scratch_is_not_kept() {
        use crate::domain::{EntityEvent, EventKind};
        let small = EntityEvent::new(
            EventKind::Update,
            "Order",
            "42",
            serde_json::json!({"id": 42, "status": "paid", "note": "quote \" and \u{1}"}),
            Some(serde_json::json!({"id": 42, "status": "new"})),
        );
        let large = EntityEvent::new(
            EventKind::Insert,
            "Order",
            "43",
            serde_json::json!({"blob": "x".repeat(2 * SCRATCH_KEPT_BYTES)}),
            None,
        );
        for event in [&small, &large, &small] {
            let envelope = event.envelope("order-paid");
            let body = envelope_body(&envelope).unwrap();
            assert_eq!(body, serde_json::to_vec(&envelope).unwrap());
            assert_eq!(
                body.capacity(),
                body.len(),
                "one allocation of the body's size"
            );
            let kept = SCRATCH.with_borrow(Vec::capacity);
            assert!(kept <= SCRATCH_KEPT_BYTES, "scratch of {kept} bytes kept");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HttpHeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(61));
        headers.insert(
            RETRY_AFTER,
            HttpHeaderValue::from_str(&in_a_minute).unwrap(),
        );
        let parsed = retry_after(&headers).unwrap();
        assert!(
            parsed > Duration::from_secs(55) && parsed <= Duration::from_secs(61),
            "{parsed:?}"
        );
        headers.insert(RETRY_AFTER, HttpHeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
