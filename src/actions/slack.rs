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

use super::webhook::{body_excerpt, retry_after};
use super::{
    ActionContext, ActionSuccess, Http, Secrets, redirect_reason, render, target_url,
    target_variable,
};
use crate::config::{SlackAction, WebhookTarget};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

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
    let variable = target_variable(&action.target);
    let response = http
        .send(&url, variable, request, action.timeout, &secrets)
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
        None => body_excerpt(response).await.trim().to_owned(),
    };
    let mut error = AttemptError::new(
        code,
        secrets.redact(&format!("Slack HTTP {status}: {reason}")),
    );
    error.retry_after = wait;
    Err(error)
}
