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

use super::{
    ActionConfig, ActionContext, ActionRunner, ActionSuccess, Secrets, error_chain, quoted, render,
    secret_value,
};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::time::Duration;

use crate::config::DeliveryMode;
use crate::config::{BasicCredentials, Decoder, Fields, Node, NodeValue, child};

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

impl ActionConfig for EmailAction {
    const KEYS: &[&str] = &[
        "host",
        "port",
        "security",
        "username",
        "username_env",
        "password",
        "password_env",
        "from",
        "to",
        "to_template",
        "to_list",
        "cc",
        "reply_to",
        "subject",
        "text",
        "html",
        "timeout",
    ];
    const DEFAULT_MODE: DeliveryMode = DeliveryMode::Async;

    fn decode(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<EmailAction> {
        let endpoint = smtp_endpoint(decoder, fields, path);
        let credentials = decoder.basic_credentials(fields, path);
        let from = decoder
            .required(fields, "from", path, "the sender address")
            .and_then(|node| mailbox(decoder, node, &child(path, "from")));
        let to = match (fields.get("to"), fields.get("to_template")) {
            (Some(node), None) => {
                mailboxes(decoder, node, &child(path, "to")).map(EmailRecipients::Literal)
            }
            (None, Some(_)) => {
                let list = match fields.get("to_list") {
                    None => Some(false),
                    Some(node) => decoder.boolean(node, &child(path, "to_list")),
                };
                let name = decoder.template_field(fields, "to_template", path, "txt");
                Some(EmailRecipients::Template {
                    name: name?,
                    list: list?,
                })
            }
            (Some(node), Some(_)) => {
                decoder.error(
                    node.position,
                    &child(path, "to"),
                    "set either 'to' (addresses) or 'to_template', not both",
                );
                None
            }
            (None, None) => {
                decoder.error(
                    fields.position,
                    path,
                    "missing required key 'to' (a list of addresses) or 'to_template'",
                );
                None
            }
        };
        if let (Some(_), Some(node)) = (fields.get("to"), fields.get("to_list")) {
            decoder.error(
                node.position,
                &child(path, "to_list"),
                "'to_list' applies to 'to_template'; a literal 'to' lists its addresses itself",
            );
        }
        let cc = match fields.get("cc") {
            None => Some(Vec::new()),
            Some(node) => mailboxes(decoder, node, &child(path, "cc")),
        };
        let reply_to = match fields.get("reply_to") {
            None => Some(None),
            Some(node) => mailbox(decoder, node, &child(path, "reply_to")).map(Some),
        };
        let subject = decoder
            .required(fields, "subject", path, "the subject template")
            .and_then(|_| decoder.template_field(fields, "subject", path, "txt"));
        let text = match fields.get("text") {
            None => Some(None),
            Some(_) => decoder
                .template_field(fields, "text", path, "txt")
                .map(Some),
        };
        let html = match fields.get("html") {
            None => Some(None),
            Some(_) => decoder
                .template_field(fields, "html", path, "html")
                .map(Some),
        };
        if fields.get("text").is_none() && fields.get("html").is_none() {
            decoder.error(
                fields.position,
                path,
                "missing required key 'text' or 'html' (the body template; both make a multipart/alternative message)",
            );
            return None;
        }
        let timeout = decoder.action_timeout(fields, path);
        let (host, port, security) = endpoint?;
        Some(EmailAction {
            host,
            port,
            security,
            credentials: credentials.ok()?,
            from: from?,
            to: to?,
            cc: cc?,
            reply_to: reply_to?,
            subject_template: subject?,
            text_template: text?,
            html_template: html?,
            timeout: timeout?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn secrets_from_env(&self) -> usize {
        2 * usize::from(self.credentials.is_some())
    }

    fn needs(&self) -> Option<String> {
        Some(format!(
            "SMTP {}:{} ({})",
            self.host,
            self.port,
            match self.security {
                SmtpSecurity::StartTls => "STARTTLS",
                SmtpSecurity::Tls => "TLS",
                SmtpSecurity::Plain => "plain",
            }
        ))
    }
}

/// `host`, `port` (defaulting by `security`) and `security` of an SMTP server.
fn smtp_endpoint(
    decoder: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
) -> Option<(String, u16, SmtpSecurity)> {
    let host = decoder
        .required(fields, "host", path, "the SMTP server's host name")
        .and_then(|node| {
            let host_path = child(path, "host");
            let host = decoder.non_empty_string(node, &host_path)?.trim();
            let valid = host.len() <= 253
                && host.chars().all(|character| {
                    character.is_ascii_alphanumeric() || "-._:[]".contains(character)
                });
            if !valid {
                decoder.error(
                    node.position,
                    &host_path,
                    format!("expected a host name or IP address, found {host:?}"),
                );
                return None;
            }
            Some(host.to_owned())
        });
    let security = match fields.get("security") {
        None => Some(SmtpSecurity::StartTls),
        Some(node) => decoder.choice(
            node,
            &child(path, "security"),
            &[
                ("starttls", SmtpSecurity::StartTls),
                ("tls", SmtpSecurity::Tls),
                ("plain", SmtpSecurity::Plain),
            ],
        ),
    };
    let port = match fields.get("port") {
        None => security.map(SmtpSecurity::default_port),
        Some(node) => decoder
            .integer_in(node, &child(path, "port"), 1, 65_535)
            .and_then(|port| u16::try_from(port).ok()),
    };
    Some((host?, port?, security?))
}

/// An email address, optionally with a display name: `Orders <orders@example.com>`.
fn mailbox(decoder: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Mailbox> {
    let text = decoder.non_empty_string(node, path)?;
    match text.trim().parse::<Mailbox>() {
        Ok(mailbox) => Some(mailbox),
        Err(error) => {
            decoder.error(
                node.position,
                path,
                format!(
                    "expected an email address such as \"Orders <orders@example.com>\", found {text:?} ({error})"
                ),
            );
            None
        }
    }
}

/// One address or a list of them.
fn mailboxes(decoder: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Vec<Mailbox>> {
    let items: Vec<(String, &Node)> = match &node.value {
        NodeValue::String(_) => vec![(path.to_owned(), node)],
        NodeValue::List(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(index, item)| (format!("{path}[{index}]"), item))
            .collect(),
        _ => {
            decoder.expected(node, path, "an email address or a non-empty list of them");
            return None;
        }
    };
    let mut mailboxes = Vec::with_capacity(items.len());
    let mut all_valid = true;
    for (item_path, item) in items {
        match mailbox(decoder, item, &item_path) {
            Some(mailbox) => mailboxes.push(mailbox),
            None => all_valid = false,
        }
    }
    all_valid.then_some(mailboxes)
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &EmailAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(&runner.templates, action, context).await
}

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
