//! The `slack` action: one message per matched event through a Slack incoming webhook.
//!
//! The payload is `{"text": …, "blocks": […], "channel": …}`: `text` is a text template (also
//! the notification fallback when `blocks` are given), `blocks` a JSON template that must render a
//! Block Kit array, `channel` an optional override. Slack answers 200 `ok`; a 429 carries
//! `Retry-After`, which the retry honours (OB007); other 4xx (`invalid_payload`,
//! `channel_not_found`, `no_service`) and redirects (3xx, not followed) are permanent with Slack's
//! answer as the reason (OB008); 5xx are transient (OB006). The webhook URL is a credential and
//! never appears in an error. Incoming webhooks take no idempotency key, so a retried message
//! can be posted twice if Slack received it but its answer was lost.

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Map, Value};

use super::webhook::{refusal_reason, retry_after};
use super::{
    ActionConfig, ActionContext, ActionRunner, ActionSuccess, Http, Secrets, redirect_reason,
    render, target_label, target_url,
};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::{Decoder, Fields, WebhookTarget, child};

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

impl ActionConfig for SlackAction {
    const KEYS: &[&str] = &[
        "webhook_url",
        "webhook_url_env",
        "text",
        "blocks",
        "channel",
        "timeout",
    ];

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<SlackAction> {
        let target = decoder.url_target(fields, path, "webhook_url");
        let text = decoder
            .required(fields, "text", path, "the message text template")
            .and_then(|_| decoder.template_field(fields, "text", path, "txt"));
        let blocks = match fields.get("blocks") {
            None => Some(None),
            Some(_) => decoder
                .template_field(fields, "blocks", path, "json")
                .map(Some),
        };
        let channel = match fields.get("channel") {
            None => Some(None),
            Some(node) => decoder
                .non_empty_string(node, &child(path, "channel"))
                .map(|channel| Some(channel.trim().to_owned())),
        };
        let timeout = decoder.action_timeout(fields, path);
        Some(SlackAction {
            target: target?,
            text_template: text?,
            blocks_template: blocks?,
            channel: channel?,
            timeout: timeout?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn secrets_from_env(&self) -> usize {
        usize::from(self.target.is_from_env())
    }
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &SlackAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(&runner.http, &runner.templates, action, context).await
}

fn payload(
    templates: &Templates,
    action: &SlackAction,
    context: &ActionContext<'_>,
) -> Result<Value, AttemptError> {
    let mut payload = Map::new();
    let text = render(templates, &action.text_template, context)?;
    payload.insert("text".into(), Value::String(text));
    if let Some(template) = &action.blocks_template {
        let rendered = render(templates, template, context)?;
        let blocks: Value = serde_json::from_str(&rendered).map_err(|error| {
            AttemptError::new(
                ErrorCode::TemplateFailed,
                format!("template {template} rendered invalid JSON ({error}); values are inserted as JSON, so write {{{{ data.name }}}} without quotes around it"),
            )
        })?;
        if !blocks.is_array() {
            return Err(AttemptError::new(
                ErrorCode::TemplateFailed,
                format!("template {template} must render a JSON array of Block Kit blocks"),
            ));
        }
        payload.insert("blocks".into(), blocks);
    }
    if let Some(channel) = &action.channel {
        payload.insert("channel".into(), Value::String(channel.clone()));
    }
    Ok(Value::Object(payload))
}

pub(super) async fn attempt(
    http: &Http,
    templates: &Templates,
    action: &SlackAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let url = target_url(&action.target, "the Slack webhook URL")?;
    let body = serde_json::to_vec(&payload(templates, action, context)?).map_err(|error| {
        AttemptError::new(
            ErrorCode::Internal,
            format!("serialize Slack payload: {error}"),
        )
    })?;
    // The webhook URL is the credential: its path holds the token, written in the file or not.
    let secrets = Secrets::of_url(&url, matches!(action.target, WebhookTarget::FromEnv { .. }));
    let request = http
        .client
        .post(url.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(body);
    let label = target_label(&action.target);
    let response = http
        .send(
            context,
            &url,
            label.as_deref(),
            request,
            action.timeout,
            &secrets,
        )
        .await?;
    let status = response.status().as_u16();
    let Some(code) = ErrorCode::from_http_status(status) else {
        return Ok(ActionSuccess {
            detail: format!("Slack HTTP {status}"),
        });
    };
    let wait = retry_after(response.headers());
    let reason = match redirect_reason(status, response.headers()) {
        Some(reason) => reason,
        None => refusal_reason(response).await,
    };
    let mut error = AttemptError::new(
        code,
        secrets.redact(&format!("Slack HTTP {status}: {reason}")),
    );
    error.retry_after = wait;
    Err(error)
}
