//! The `history` key of the observers file: `on`/`off`, or a mapping naming the backend
//! (`{backend: search, url_env: …}`: the history is also copied to Elasticsearch/OpenSearch by
//! `history_export`).

use std::time::Duration;

use crate::config::{BasicCredentials, Decoder, Fields, Node, WebhookTarget, child};

/// Index names start with this unless `index_prefix` says otherwise.
pub const DEFAULT_INDEX_PREFIX: &str = "fraiseql-history";
/// Rows per `_bulk` request unless `batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// How long an index is kept unless `retention` says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_hours(24 * 30);
/// How long one request may take unless `timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The `history` section with `backend: search`.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHistory {
    /// The cluster's base URL (`url`, or `url_env`).
    pub target: WebhookTarget,
    pub credentials: Option<BasicCredentials>,
    pub index_prefix: String,
    pub retention: Duration,
    pub batch_size: usize,
    pub timeout: Duration,
}

/// The keys of the `history` mapping.
pub const HISTORY_KEYS: &[&str] = &[
    "backend",
    "url",
    "url_env",
    "username",
    "username_env",
    "password",
    "password_env",
    "index_prefix",
    "retention",
    "batch_size",
    "timeout",
];

/// Which store the history goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Postgres,
    Search,
}

/// Decodes the `history` mapping: `None` for `backend: postgres` (or an error, reported).
pub(crate) fn decode(decoder: &mut Decoder<'_>, node: &Node) -> Option<SearchHistory> {
    let path = "history";
    let fields = decoder.fields(node, path, HISTORY_KEYS)?;
    let backend = match fields.get("backend") {
        None => Backend::Postgres,
        Some(node) => decoder.choice(
            node,
            &child(path, "backend"),
            &[("postgres", Backend::Postgres), ("search", Backend::Search)],
        )?,
    };
    if backend == Backend::Postgres {
        if let Some((key, node)) = HISTORY_KEYS
            .iter()
            .filter(|key| **key != "backend")
            .find_map(|key| fields.get(key).map(|node| (*key, node)))
        {
            decoder.error(
                node.position,
                &child(path, key),
                format!("'{key}' applies only with backend: search"),
            );
        }
        return None;
    }
    search_settings(decoder, &fields, path)
}

fn search_settings(
    decoder: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
) -> Option<SearchHistory> {
    let target = decoder.url_target(fields, path, "url");
    let credentials = decoder.basic_credentials(fields, path);
    let index_prefix = match fields.get("index_prefix") {
        None => Some(DEFAULT_INDEX_PREFIX.to_owned()),
        Some(node) => {
            let key_path = child(path, "index_prefix");
            decoder.non_empty_string(node, &key_path).and_then(|text| {
                match index_prefix_problem(text) {
                    None => Some(text.to_owned()),
                    Some(problem) => {
                        decoder.error(node.position, &key_path, problem);
                        None
                    }
                }
            })
        }
    };
    let retention = match fields.get("retention") {
        None => Some(DEFAULT_RETENTION),
        Some(node) => {
            let key_path = child(path, "retention");
            decoder.duration(node, &key_path).and_then(|retention| {
                if retention < Duration::from_hours(24) {
                    decoder.error(
                        node.position,
                        &key_path,
                        "expected at least 1d: indices are daily",
                    );
                    None
                } else {
                    Some(retention)
                }
            })
        }
    };
    let batch_size = match fields.get("batch_size") {
        None => Some(DEFAULT_BATCH_SIZE),
        Some(node) => decoder
            .integer_in(node, &child(path, "batch_size"), 1, 10_000)
            .and_then(|size| usize::try_from(size).ok()),
    };
    let timeout = match fields.get("timeout") {
        None => Some(DEFAULT_TIMEOUT),
        Some(node) => decoder.timeout(node, &child(path, "timeout")),
    };
    Some(SearchHistory {
        target: target?,
        credentials: credentials.ok()?,
        index_prefix: index_prefix?,
        retention: retention?,
        batch_size: batch_size?,
        timeout: timeout?,
    })
}

/// Why `prefix` cannot start index names, if it cannot (the engines' rules: lowercase, no
/// separators, not starting with `-`, `_` or `+`, short).
fn index_prefix_problem(prefix: &str) -> Option<String> {
    if prefix.len() > 200 {
        return Some(format!(
            "expected at most 200 bytes, found {} (index names are at most 255)",
            prefix.len()
        ));
    }
    if prefix.starts_with(['-', '_', '+']) {
        return Some(format!(
            "index names cannot start with '-', '_' or '+': {prefix:?}"
        ));
    }
    let bad: Vec<char> = prefix
        .chars()
        .filter(|character| {
            !(character.is_ascii_lowercase()
                || character.is_ascii_digit()
                || matches!(character, '-' | '_' | '.'))
        })
        .collect();
    if bad.is_empty() {
        None
    } else {
        Some(format!(
            "expected lowercase letters, digits, '-', '_' or '.' in an index prefix, found {:?}",
            bad.into_iter().collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_prefixes_follow_the_engines_naming_rules() {
        assert_eq!(index_prefix_problem("fraiseql-history"), None);
        assert!(index_prefix_problem("History").unwrap().contains("\"H\""));
        assert!(index_prefix_problem("_hidden").is_some());
        assert!(index_prefix_problem(&"a".repeat(201)).is_some());
    }
}
