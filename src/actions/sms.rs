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
use super::{
    ActionConfig, ActionContext, ActionRunner, ActionSuccess, Http, Secrets, redirect_reason,
    render, secret_value,
};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::DeliveryMode;
use crate::config::{Decoder, Fields, Secret, Setting, child};

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

impl ActionConfig for SmsAction {
    const KEYS: &[&str] = &[
        "base_url",
        "account_sid",
        "account_sid_env",
        "auth_token",
        "auth_token_env",
        "to",
        "from",
        "body",
        "timeout",
    ];
    const DEFAULT_MODE: DeliveryMode = DeliveryMode::Async;

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<SmsAction> {
        let base_url = match fields.get("base_url") {
            None => url::Url::parse(DEFAULT_SMS_BASE_URL).ok(),
            Some(node) => {
                let url_path = child(path, "base_url");
                decoder
                    .non_empty_string(node, &url_path)
                    .and_then(|text| decoder.http_url(text.trim(), node.position, &url_path, None))
            }
        };
        let account_sid = decoder.required_secret(fields, "account_sid", path, "the account SID");
        let auth_token = decoder.required_secret(fields, "auth_token", path, "the auth token");
        let mut template = |key: &str, what: &str| {
            decoder
                .required(fields, key, path, what)
                .and_then(|_| decoder.template_field(fields, key, path, "txt"))
        };
        let to = template(
            "to",
            "the recipient's number template, e.g. \"{{ data.phone }}\"",
        );
        let from = template("from", "the sender number or messaging service");
        let body = template("body", "the message text template");
        let timeout = decoder.action_timeout(fields, path);
        Some(SmsAction {
            base_url: base_url?,
            account_sid: account_sid?,
            auth_token: auth_token?,
            to_template: to?,
            from_template: from?,
            body_template: body?,
            timeout: timeout?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn secrets_from_env(&self) -> usize {
        2
    }

    fn needs(&self) -> Option<String> {
        Some(self.base_url.as_str().trim_end_matches('/').to_owned())
    }
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &SmsAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(&runner.http, &runner.templates, action, context).await
}

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
        .send(context, &url, None, request, action.timeout, &secrets)
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
