//! The Redis keys the service keeps for itself, which `cache` actions must never remove.
//!
//! Deduplication claims (`dedup`), circuit breakers (`breaker`), endpoint limits (`limits`) and
//! cached action results (`cache`) live in the node's Redis under the deployment's key prefix
//! (`--redis-prefix`, `FRAISEQL_OBSERVERS_REDIS_PREFIX`, default `fraiseql_observers:`). A `cache`
//! action removes keys from the same Redis, so a pattern such as `*`, or a key fed by event data,
//! could wipe that state. The fence is checked twice:
//! - at load, an exact key whose fixed text starts under the prefix, and a pattern that could
//!   match a key under it for some event, are refused ([`ServiceKeyspace::key_template_problem`],
//!   [`ServiceKeyspace::pattern_template_problem`]), against the prefix in the environment;
//! - at run time, every rendered key and every key a sweep finds is checked against the node's
//!   actual prefix with [`ServiceKeyspace::owns`] and left alone when it is the service's.
//!
//! With an empty prefix the stores' key families (`dedup:`, `breaker:`, …) are fenced instead.

/// The variable the node's Redis key prefix is read from (also `--redis-prefix` of `run`).
pub const REDIS_PREFIX_ENV: &str = "FRAISEQL_OBSERVERS_REDIS_PREFIX";
/// The node's Redis key prefix when neither the variable nor the flag sets one.
pub const DEFAULT_REDIS_PREFIX: &str = "fraiseql_observers:";

/// What the stores put right after the prefix: `<prefix>dedup:…` (`dedup`), `<prefix>breaker:…`
/// (`breaker`), `<prefix>rate:…` and `<prefix>inflight:…` (`limits`), `<prefix>cache:…` (`cache`).
const SERVICE_KEY_FAMILIES: [&str; 5] = ["dedup:", "breaker:", "rate:", "inflight:", "cache:"];

/// The key prefixes under which every key belongs to the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceKeyspace {
    fenced: Vec<String>,
}

impl ServiceKeyspace {
    /// The keyspace of a node whose Redis key prefix is `prefix`.
    #[must_use]
    pub fn new(prefix: &str) -> ServiceKeyspace {
        let fenced = if prefix.is_empty() {
            SERVICE_KEY_FAMILIES.map(str::to_owned).to_vec()
        } else {
            vec![prefix.to_owned()]
        };
        ServiceKeyspace { fenced }
    }

    /// Whether `key` is one of the service's own keys.
    #[must_use]
    pub fn owns(&self, key: &[u8]) -> bool {
        self.fenced
            .iter()
            .any(|prefix| key.starts_with(prefix.as_bytes()))
    }

    /// The fenced prefixes, quoted, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        let quoted: Vec<String> = self
            .fenced
            .iter()
            .map(|prefix| format!("{prefix:?}"))
            .collect();
        quoted.join(", ")
    }

    /// Why an exact-key template must not be used, if it must not: its fixed leading text (what
    /// every rendering starts with) is under the service's prefix.
    #[must_use]
    pub fn key_template_problem(&self, source: &str) -> Option<String> {
        let (fixed, _) = fixed_start(source);
        self.owns(fixed.as_bytes()).then(|| {
            format!(
                "the key starts with the service's own Redis prefix ({}), where it keeps \
                 deduplication claims, circuit breakers, limits and cached results; cache actions \
                 may not remove those keys",
                self.describe()
            )
        })
    }

    /// Why a `SCAN MATCH` pattern template must not be used, if it must not: for some event it
    /// could match a key under the service's prefix. A value inserted from the event can be any
    /// text (its glob characters escaped), so everything after the first `{{`/`{%` counts as `*`.
    #[must_use]
    pub fn pattern_template_problem(&self, source: &str) -> Option<String> {
        let (fixed, inserts_values) = fixed_start(source);
        let mut tokens = glob_tokens(fixed.as_bytes());
        let reachable = |tokens: &[GlobToken]| {
            self.fenced
                .iter()
                .any(|prefix| matches_a_key_starting_with(tokens, prefix.as_bytes()))
        };
        if reachable(&tokens) {
            return Some(format!(
                "the pattern can match keys under the service's own Redis prefix ({}), where it \
                 keeps deduplication claims, circuit breakers, limits and cached results; begin \
                 it with fixed text outside that prefix, such as \"orders:\"",
                self.describe()
            ));
        }
        if !inserts_values {
            return None;
        }
        tokens.push(GlobToken::Star);
        reachable(&tokens).then(|| {
            format!(
                "the pattern could match keys under the service's own Redis prefix ({}) for an \
                 event whose inserted value starts that way (values can be any text); begin it \
                 with fixed text outside that prefix, such as \"orders:{{{{ entity_id }}}}:*\"",
                self.describe()
            )
        })
    }
}

/// The text every rendering of template `source` starts with, and whether anything follows it
/// (a `{{ … }}`, `{% … %}` or `{# … #}` tag). Trailing whitespace is left out when a tag follows:
/// `{{-` would remove it.
fn fixed_start(source: &str) -> (&str, bool) {
    let first_tag = ["{{", "{%", "{#"]
        .iter()
        .filter_map(|opening| source.find(opening))
        .min();
    match first_tag {
        None => (source, false),
        Some(index) => (source[..index].trim_end(), true),
    }
}

/// One element of a Redis glob pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GlobToken {
    Byte(u8),
    /// `?`
    AnyByte,
    /// `*`
    Star,
    /// `[…]`: single bytes and inclusive ranges, or everything else with `^`.
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
}

impl GlobToken {
    fn matches(&self, byte: u8) -> bool {
        match self {
            GlobToken::Byte(expected) => *expected == byte,
            GlobToken::AnyByte => true,
            GlobToken::Star => false,
            GlobToken::Class { negated, ranges } => {
                ranges
                    .iter()
                    .any(|(low, high)| (*low..=*high).contains(&byte))
                    != *negated
            }
        }
    }

    /// Whether some text matches the token (a class can be empty: `[]`).
    fn satisfiable(&self) -> bool {
        match self {
            GlobToken::Class { .. } => (0..=u8::MAX).any(|byte| self.matches(byte)),
            _ => true,
        }
    }
}

/// Parses a pattern the way Redis's `stringmatchlen` reads it: `\` escapes the next byte, `[`
/// opens a class (`^` negates, `a-z` is a range in either order, an unclosed class runs to the
/// end), `?` and `*` are wildcards.
fn glob_tokens(pattern: &[u8]) -> Vec<GlobToken> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut index = 0;
    while index < pattern.len() {
        match pattern[index] {
            b'*' => {
                if tokens.last() != Some(&GlobToken::Star) {
                    tokens.push(GlobToken::Star);
                }
                index += 1;
            }
            b'?' => {
                tokens.push(GlobToken::AnyByte);
                index += 1;
            }
            b'\\' if index + 1 < pattern.len() => {
                tokens.push(GlobToken::Byte(pattern[index + 1]));
                index += 2;
            }
            b'[' => {
                let mut position = index + 1;
                let negated = pattern.get(position) == Some(&b'^');
                if negated {
                    position += 1;
                }
                let mut ranges = Vec::new();
                while position < pattern.len() {
                    match pattern[position] {
                        b'\\' if position + 1 < pattern.len() => {
                            position += 1;
                            ranges.push((pattern[position], pattern[position]));
                        }
                        b']' => break,
                        low if position + 2 < pattern.len() && pattern[position + 1] == b'-' => {
                            let high = pattern[position + 2];
                            ranges.push((low.min(high), low.max(high)));
                            position += 2;
                        }
                        single => ranges.push((single, single)),
                    }
                    position += 1;
                }
                tokens.push(GlobToken::Class { negated, ranges });
                index = position + 1;
            }
            byte => {
                tokens.push(GlobToken::Byte(byte));
                index += 1;
            }
        }
    }
    tokens
}

/// Whether the pattern matches some key that starts with `prefix`: run the pattern over the
/// prefix as a set of positions (an NFA), then ask whether a position reached can still match
/// the rest of a key.
fn matches_a_key_starting_with(tokens: &[GlobToken], prefix: &[u8]) -> bool {
    let close = |positions: &mut Vec<bool>| {
        for index in 0..tokens.len() {
            if positions[index] && tokens[index] == GlobToken::Star {
                positions[index + 1] = true;
            }
        }
    };
    let mut positions = vec![false; tokens.len() + 1];
    positions[0] = true;
    close(&mut positions);
    for &byte in prefix {
        let mut next = vec![false; tokens.len() + 1];
        for (index, token) in tokens.iter().enumerate() {
            if !positions[index] {
                continue;
            }
            if *token == GlobToken::Star {
                next[index] = true;
            } else if token.matches(byte) {
                next[index + 1] = true;
            }
        }
        close(&mut next);
        if !next.contains(&true) {
            return false;
        }
        positions = next;
    }
    (0..=tokens.len())
        .any(|index| positions[index] && tokens[index..].iter().all(GlobToken::satisfiable))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "fraiseql_observers:";

    #[test]
    fn keys_under_the_prefix_are_the_services() {
        let keyspace = ServiceKeyspace::new(PREFIX);
        assert!(keyspace.owns(b"fraiseql_observers:dedup:x"));
        assert!(keyspace.owns(b"fraiseql_observers:"));
        assert!(!keyspace.owns(b"fraiseql_observers"));
        assert!(!keyspace.owns(b"orders:fraiseql_observers:x"));
        let unprefixed = ServiceKeyspace::new("");
        assert!(unprefixed.owns(b"dedup:x") && unprefixed.owns(b"cache:webhook:x"));
        assert!(!unprefixed.owns(b"orders:1"));
    }

    #[test]
    fn patterns_that_can_reach_the_prefix_are_refused() {
        let keyspace = ServiceKeyspace::new(PREFIX);
        for reaching in [
            "*",
            "**",
            "f*",
            "?raiseql*",
            "[a-g]raiseql_observers:*",
            "[^x]raiseql_observers:dedup:*",
            "fraiseql_observers:*",
            "fraiseql_observers:dedup:x",
            "fraiseql\\_observers:*",
            "{{ entity_type }}:*",
            "fraiseql{{ entity_id }}",
            "f {%- if true %}x{% endif %}",
            "*:{{ entity_id }}",
        ] {
            assert!(
                keyspace.pattern_template_problem(reaching).is_some(),
                "{reaching:?} can match a key under the prefix"
            );
        }
        for confined in [
            "orders:*",
            "orders:{{ entity_id }}:*",
            "[a-e]*",
            "[^f]*",
            "fraiseql_orders:*",
            "fraiseql_observers",
            "fraiseql_observers\\?*",
            "F*",
            "fraiseql_observers[]*",
        ] {
            assert_eq!(
                keyspace.pattern_template_problem(confined),
                None,
                "{confined:?} cannot match a key under the prefix"
            );
        }
    }

    #[test]
    fn keys_whose_fixed_text_is_under_the_prefix_are_refused() {
        let keyspace = ServiceKeyspace::new(PREFIX);
        assert!(
            keyspace
                .key_template_problem("fraiseql_observers:dedup:{{ entity_id }}")
                .is_some()
        );
        assert!(
            keyspace
                .key_template_problem("fraiseql_observers:x")
                .is_some()
        );
        // Decided by the event: checked when rendered.
        assert_eq!(keyspace.key_template_problem("{{ data.key }}"), None);
        assert_eq!(
            keyspace.key_template_problem("fraiseql{{ data.key }}"),
            None
        );
        assert_eq!(keyspace.key_template_problem("order:{{ entity_id }}"), None);
    }

    #[test]
    fn an_empty_prefix_fences_the_stores_key_families() {
        let keyspace = ServiceKeyspace::new("");
        assert!(keyspace.pattern_template_problem("*").is_some());
        assert!(keyspace.pattern_template_problem("d*").is_some());
        assert!(keyspace.pattern_template_problem("cache:*").is_some());
        assert_eq!(keyspace.pattern_template_problem("orders:*"), None);
        assert!(keyspace.key_template_problem("breaker:x").is_some());
    }
}
