//! The `sms` action: one text message per matched event through a Twilio-compatible API.
//!
//! `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`, form-encoded `To`, `From`,
//! `Body`, with HTTP basic auth (account SID, auth token) and the action's idempotency key in
//! `I-Twilio-Idempotency-Token`, so a retried request does not send a second message. Twilio
//! answers 201 with the message; a 4xx is permanent with the `message` of its JSON error as the
//! reason (OB008), as is a redirect (3xx, not followed); 429 (OB007, honouring `Retry-After`) and
//! 5xx (OB006) are transient. Neither the URL (the SID is in its path) nor the credentials
//! appear in an error.

use serde::Deserialize;

use super::webhook::{body_excerpt, retry_after};
use super::{ActionContext, ActionSuccess, Http, Secrets, redirect_reason, render, secret_value};
use crate::config::SmsAction;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

/// Header Twilio deduplicates requests by.
pub const IDEMPOTENCY_HEADER: &str = "I-Twilio-Idempotency-Token";

/// The parts of a Twilio answer worth reporting.
#[derive(Deserialize)]
struct TwilioAnswer {
    sid: Option<String>,
    status: Option<serde_json::Value>,
    code: Option<serde_json::Value>,
    message: Option<String>,
}

/// `{base_url}/2010-04-01/Accounts/{sid}/Messages.json`, the SID percent-encoded as a segment.
fn messages_url(base_url: &url::Url, account_sid: &str) -> Result<url::Url, AttemptError> {
    let mut url = base_url.clone();
    url.path_segments_mut()
        .map_err(|()| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                format!("base_url {base_url} cannot take a path"),
            )
        })?
        .pop_if_empty()
        .extend(["2010-04-01", "Accounts", account_sid, "Messages.json"]);
    Ok(url)
}

pub(super) async fn attempt(
    http: &Http,
    templates: &Templates,
    action: &SmsAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let account_sid = secret_value(&action.account_sid, "the SMS account SID")?;
    let auth_token = secret_value(&action.auth_token, "the SMS auth token")?;
    let to = render(templates, &action.to_template, context)?;
    let from = render(templates, &action.from_template, context)?;
    let body = render(templates, &action.body_template, context)?;
    if to.trim().is_empty() {
        return Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!(
                "template {} rendered an empty recipient",
                action.to_template
            ),
        ));
    }
    let url = messages_url(&action.base_url, account_sid)?;
    // The account SID is in the path; neither it nor the token may reach an error.
    let mut secrets = Secrets::of_url(&url, false);
    secrets.add(account_sid);
    secrets.add(auth_token);
    let request = http
        .client
        .post(url.clone())
        .basic_auth(account_sid, Some(auth_token))
        .header(IDEMPOTENCY_HEADER, context.idempotency_key())
        .form(&[("To", to.trim()), ("From", from.trim()), ("Body", &body)]);
    let response = http
        .send(&url, None, request, action.timeout, &secrets)
        .await?;
    let status = response.status().as_u16();
    let code = ErrorCode::from_http_status(status);
    let wait = retry_after(response.headers());
    let redirect = redirect_reason(status, response.headers());
    let excerpt = body_excerpt(response).await;
    let answer: Option<TwilioAnswer> = serde_json::from_str(&excerpt).ok();
    let Some(code) = code else {
        let mut detail = format!("SMS HTTP {status}");
        if let Some(TwilioAnswer {
            sid: Some(sid),
            status: state,
            ..
        }) = &answer
        {
            detail.push_str(": ");
            detail.push_str(sid);
            if let Some(state) = state.as_ref().and_then(serde_json::Value::as_str) {
                detail.push(' ');
                detail.push_str(state);
            }
        }
        return Ok(ActionSuccess { detail });
    };
    let reason = match (redirect, answer) {
        (Some(redirect), _) => redirect,
        (
            None,
            Some(TwilioAnswer {
                message: Some(message),
                code: twilio_code,
                ..
            }),
        ) => match twilio_code {
            Some(twilio_code) => format!("{message} (Twilio error {twilio_code})"),
            None => message,
        },
        _ => excerpt.trim().to_owned(),
    };
    // Twilio's own messages name the resource, SID included.
    let mut error = AttemptError::new(
        code,
        secrets.redact(&format!("SMS HTTP {status}: {reason}")),
    );
    error.retry_after = wait;
    Err(error)
}
