//! The `email` action: one message per matched event over SMTP (lettre, rustls).
//!
//! The message has the configured `From`, `To` (literal addresses, or a template rendering one
//! address — a comma-separated list only with `to_list: true`), `Cc`, `Reply-To`, a rendered
//! `Subject`, and a text body, an HTML body (values HTML-escaped), or both as
//! `multipart/alternative`. Its `Message-ID` is derived from the action's idempotency key, and the
//! key itself travels in `X-FraiseQL-Idempotency-Key`, so a receiving system can drop a repeat. A
//! 4xx SMTP reply is transient (OB006), a 5xx permanent (OB008) with the server's reply as the
//! reason (the credentials blanked, should it quote them); connection and TLS failures are
//! transient. Each message uses its own connection, ended with `QUIT`.

use std::str::FromStr;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncTransport, Message, Tokio1Executor};

use super::{ActionContext, ActionSuccess, Secrets, error_chain, quoted, render, secret_value};
use crate::config::{EmailAction, EmailRecipients, SmtpSecurity};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

/// Header carrying the action's idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "X-FraiseQL-Idempotency-Key";

/// `<event id>.<observer>.<action index>@fraiseql-observers`: the idempotency key as a
/// Message-ID (every character of it is allowed there).
fn message_id(context: &ActionContext<'_>) -> String {
    format!(
        "<{}.{}.{}@fraiseql-observers>",
        context.event.id, context.observer, context.action_index
    )
}

/// The recipients a `to_template` renders for this event: exactly one address, or, with
/// `to_list: true`, a comma-separated list of at least one. Values come from event data, so
/// without `to_list` a value such as `ann@example.com, eve@example.net` must not add a recipient:
/// such a rendering is a permanent failure (OB002) and nothing is sent.
fn rendered_recipients(
    templates: &Templates,
    template: &str,
    list: bool,
    context: &ActionContext<'_>,
) -> Result<Mailboxes, AttemptError> {
    let rendered = render(templates, template, context)?;
    let recipients = Mailboxes::from_str(rendered.trim()).map_err(|error| {
        AttemptError::new(
            ErrorCode::TemplateFailed,
            format!(
                "template {template} rendered {}, not {}: {error}",
                quoted(&rendered),
                if list {
                    "a list of email addresses"
                } else {
                    "an email address"
                }
            ),
        )
    })?;
    match recipients.iter().count() {
        0 => Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!("template {template} rendered no recipient"),
        )),
        1 => Ok(recipients),
        _ if list => Ok(recipients),
        count => Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!(
                "template {template} rendered {count} addresses ({}) where one is expected; \
                 set to_list: true if its values may name several recipients",
                quoted(&rendered)
            ),
        )),
    }
}

fn build_message(
    templates: &Templates,
    action: &EmailAction,
    context: &ActionContext<'_>,
) -> Result<Message, AttemptError> {
    let invalid = |what: &str, error: &dyn std::fmt::Display| {
        AttemptError::new(ErrorCode::TemplateFailed, format!("{what}: {error}"))
    };
    let subject = render(templates, &action.subject_template, context)?.replace(['\r', '\n'], " ");
    let mut builder = Message::builder()
        .from(action.from.clone())
        .subject(subject.trim())
        .message_id(Some(message_id(context)));
    match &action.to {
        EmailRecipients::Literal(recipients) => {
            for recipient in recipients {
                builder = builder.to(recipient.clone());
            }
        }
        EmailRecipients::Template {
            name: template,
            list,
        } => {
            for recipient in rendered_recipients(templates, template, *list, context)? {
                builder = builder.to(recipient);
            }
        }
    }
    for copy in &action.cc {
        builder = builder.cc(copy.clone());
    }
    if let Some(reply_to) = &action.reply_to {
        builder = builder.reply_to(reply_to.clone());
    }
    let text = action
        .text_template
        .as_ref()
        .map(|template| render(templates, template, context))
        .transpose()?;
    let html = action
        .html_template
        .as_ref()
        .map(|template| render(templates, template, context))
        .transpose()?;
    let message = match (text, html) {
        (Some(text), Some(html)) => {
            builder.multipart(MultiPart::alternative_plain_html(text, html))
        }
        (None, Some(html)) => builder.singlepart(SinglePart::html(html)),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text)),
        (None, None) => {
            return Err(AttemptError::new(
                ErrorCode::ConfigInvalid,
                "an email action needs a text or an html body",
            ));
        }
    };
    let mut message = message.map_err(|error| invalid("build the message", &error))?;
    message.headers_mut().insert_raw(HeaderValue::new(
        HeaderName::new_from_ascii_str(IDEMPOTENCY_HEADER),
        context.idempotency_key(),
    ));
    Ok(message)
}

/// The SMTP client for `action`, and the credentials it uses (kept out of errors).
fn transport(
    action: &EmailAction,
) -> Result<(AsyncSmtpTransport<Tokio1Executor>, Secrets), AttemptError> {
    let tls_parameters = || {
        TlsParameters::new(action.host.clone()).map_err(|error| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                format!("TLS for SMTP host {}: {error}", action.host),
            )
        })
    };
    let tls = match action.security {
        SmtpSecurity::StartTls => Tls::Required(tls_parameters()?),
        SmtpSecurity::Tls => Tls::Wrapper(tls_parameters()?),
        SmtpSecurity::Plain => Tls::None,
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(action.host.clone())
        .port(action.port)
        .tls(tls)
        .timeout(Some(action.timeout));
    let mut secrets = Secrets::default();
    if let Some(credentials) = &action.credentials {
        let username = secret_value(&credentials.username, "the SMTP username")?;
        let password = secret_value(&credentials.password, "the SMTP password")?;
        secrets.add(username);
        secrets.add(password);
        builder = builder.credentials(Credentials::new(username.to_owned(), password.to_owned()));
    }
    Ok((builder.build(), secrets))
}

/// A failed SMTP exchange, classified, with the credentials blanked should the server's reply
/// or a cause quote them.
fn smtp_failed(
    server: &str,
    error: &lettre::transport::smtp::Error,
    secrets: &Secrets,
) -> AttemptError {
    let code = if error.is_permanent() {
        ErrorCode::RemoteRejected
    } else if error.is_transient() {
        ErrorCode::RemoteUnavailable
    } else if error.is_timeout() {
        ErrorCode::ActionTimeout
    } else if error.is_client() {
        ErrorCode::Internal
    } else {
        ErrorCode::ConnectionFailed
    };
    AttemptError::new(
        code,
        secrets.redact(&format!("SMTP {server}: {}", error_chain(error))),
    )
}

pub(super) async fn attempt(
    templates: &Templates,
    action: &EmailAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let message = build_message(templates, action, context)?;
    let recipients = message.envelope().to().len();
    let (transport, secrets) = transport(action)?;
    let server = format!("{}:{}", action.host, action.port);
    let response = transport
        .send(message)
        .await
        .map_err(|error| smtp_failed(&server, &error, &secrets))?;
    let reply: Vec<&str> = response.message().collect();
    Ok(ActionSuccess {
        detail: format!(
            "SMTP {} to {recipients} recipient{}: {}",
            response.code(),
            if recipients == 1 { "" } else { "s" },
            reply.join(" ")
        ),
    })
}
