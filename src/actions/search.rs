//! The `search` action: the entity's document kept in step in an Elasticsearch/OpenSearch index.
//!
//! An INSERT, UPDATE or custom event puts the event's `data` as the document
//! (`PUT /{index}/_doc/{entity id}`, a full replace, so a repeat is harmless); a DELETE removes it
//! (`DELETE /{index}/_doc/{entity id}`, where 404 — already gone — counts as success). The index
//! name is a template, checked against the engines' naming rules once rendered; the entity id is
//! sent as one percent-encoded path segment. A 4xx is permanent with the engine's error `type:
//! reason` (OB008); 429, including a read-only block when disk is full (OB007, honouring
//! `Retry-After`), and 5xx (OB006) are transient.

use serde::Deserialize;

use super::webhook::{body_excerpt, retry_after, transport_error};
use super::{ActionContext, ActionSuccess, secret_missing, template_failed};
use crate::config::{SearchAction, Secret, Setting, WebhookTarget};
use crate::domain::EventKind;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

/// Longest index name the engines accept, in bytes.
const MAX_INDEX_NAME_BYTES: usize = 255;

/// An engine's error answer: `{"error": {"type": …, "reason": …}, "status": …}`.
#[derive(Deserialize)]
struct EngineError {
    error: EngineErrorBody,
}

#[derive(Deserialize)]
struct EngineErrorBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct EngineAnswer {
    result: Option<String>,
}

/// Checks a rendered index name against Elasticsearch/OpenSearch rules.
fn check_index(template: &str, index: &str) -> Result<(), AttemptError> {
    let problem = if index.is_empty() {
        Some("is empty")
    } else if index.len() > MAX_INDEX_NAME_BYTES {
        Some("is longer than 255 bytes")
    } else if index == "." || index == ".." {
        Some("is . or ..")
    } else if index.starts_with(['-', '_', '+']) {
        Some("starts with -, _ or +")
    } else if index.chars().any(|character| {
        character.is_uppercase() || " \"*\\<|,>/?#:".contains(character) || character.is_control()
    }) {
        Some("has upper-case letters or one of the characters space \" * \\ < | , > / ? # :")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(AttemptError::new(
            ErrorCode::TemplateFailed,
            format!("template {template} rendered the index name {index:?}, which {problem}"),
        )),
    }
}

fn ready<'setting>(
    setting: &'setting Setting<Secret>,
    what: &str,
) -> Result<&'setting str, AttemptError> {
    setting
        .ready()
        .map(Secret::expose)
        .map_err(|variable| secret_missing(what, variable))
}

pub(super) async fn attempt(
    http: &reqwest::Client,
    templates: &Templates,
    action: &SearchAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let mut url = match &action.target {
        WebhookTarget::Literal(url) => url.clone(),
        WebhookTarget::FromEnv {
            url: Setting::Ready(url),
            ..
        } => url.0.clone(),
        WebhookTarget::FromEnv {
            url: Setting::MissingEnv(variable),
            ..
        } => return Err(secret_missing("the search cluster URL", variable)),
    };
    let index = templates
        .render(&action.index_template, context.envelope)
        .map_err(|error| template_failed(&action.index_template, &error))?;
    let index = index.trim();
    check_index(&action.index_template, index)?;
    let entity_id = context.event.entity_id.as_str();
    url.path_segments_mut()
        .map_err(|()| {
            AttemptError::new(
                ErrorCode::ConfigInvalid,
                "the search cluster URL cannot take a path",
            )
        })?
        .pop_if_empty()
        .extend([index, "_doc", entity_id]);
    let deleting = context.event.kind == EventKind::Delete;
    let mut request = if deleting {
        http.delete(url)
    } else {
        http.put(url).json(&context.event.data)
    };
    if let Some(credentials) = &action.credentials {
        request = request.basic_auth(
            ready(&credentials.username, "the search username")?,
            Some(ready(&credentials.password, "the search password")?),
        );
    }
    let response = request
        .timeout(action.timeout)
        .send()
        .await
        .map_err(|error| transport_error(&error))?;
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let excerpt = body_excerpt(response).await;
    let operation = if deleting { "delete" } else { "index" };
    let code = match ErrorCode::from_http_status(status) {
        Some(ErrorCode::RemoteRejected) if deleting && status == 404 => None,
        other => other,
    };
    let Some(code) = code else {
        let result = serde_json::from_str::<EngineAnswer>(&excerpt)
            .ok()
            .and_then(|answer| answer.result)
            .unwrap_or_else(|| "ok".to_owned());
        return Ok(ActionSuccess {
            detail: format!("{operation} {index}/{entity_id}: HTTP {status} {result}"),
        });
    };
    let reason = match serde_json::from_str::<EngineError>(&excerpt) {
        Ok(EngineError {
            error:
                EngineErrorBody {
                    kind: Some(kind),
                    reason: Some(reason),
                },
        }) => format!("{kind}: {reason}"),
        _ => excerpt.trim().to_owned(),
    };
    let mut error = AttemptError::new(
        code,
        format!("{operation} {index}/{entity_id}: HTTP {status}: {reason}"),
    );
    error.retry_after = wait;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_follow_the_engines_rules() {
        for good in ["orders", "orders-acme", "orders.2026", "o_1"] {
            assert!(check_index("t", good).is_ok(), "{good}");
        }
        for bad in [
            "", "Orders", "_orders", "-x", "a b", "a/b", "a,b", "..", "a:b", "a#b",
        ] {
            assert!(check_index("t", bad).is_err(), "{bad:?}");
        }
    }
}
