//! The shared primitives every decoder of an observers file uses: a [`Decoder`] that collects
//! every problem (with its place) instead of stopping at the first, and checks for strings,
//! integers, durations, choices, secrets, `${VAR}` expansion, templates, URLs, timeouts, rate
//! limits and credentials; `settings.rs` adds the settings every observer or action shares.
//! Each action type decodes its own keys with these (`actions/<type>.rs`); the observers file
//! as a whole is decoded in `observers`.

use std::time::Duration;

use super::model::{
    BasicCredentials, DEFAULT_ACTION_TIMEOUT, RateLimit, Secret, SecretUrl, Setting, UrlTemplate,
    WebhookTarget,
};
use super::tree::{Node, NodeValue, Position};
use super::{ConfigError, ConfigErrors, LoadOptions, MissingEnv};
use crate::template::Templates;

const MAX_ACTION_TIMEOUT: Duration = Duration::from_mins(10);

/// Decodes values of one observers file, collecting every error and warning with its place,
/// and every template it compiles.
pub(crate) struct Decoder<'load> {
    origin: &'load str,
    options: &'load LoadOptions<'load>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    templates: Templates,
}

/// The entries of a mapping whose keys were checked against the allowed set.
pub(crate) struct Fields<'node> {
    /// Where the mapping starts (for "missing required key" errors).
    pub(crate) position: Position,
    entries: Vec<(&'node str, &'node Node)>,
}

impl<'node> Fields<'node> {
    /// The value of `key`, if the mapping has it.
    pub(crate) fn get(&self, key: &str) -> Option<&'node Node> {
        self.entries
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, node)| *node)
    }
}

/// The path of `key` inside `path`: `observers[0].actions[1]` + `url`.
pub(crate) fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (left_index, left_char) in left.chars().enumerate() {
        let mut current = vec![left_index + 1];
        for (right_index, right_char) in right.iter().enumerate() {
            let substitution = previous[right_index] + usize::from(left_char != *right_char);
            current.push(
                substitution
                    .min(previous[right_index + 1] + 1)
                    .min(current[right_index] + 1),
            );
        }
        previous = current;
    }
    previous[right.len()]
}

/// `did you mean 'x'? ` when `found` is close to one of `allowed`, else empty.
pub(crate) fn did_you_mean(found: &str, allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|candidate| {
            (
                edit_distance(&found.to_ascii_lowercase(), &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!("did you mean '{candidate}'? "))
        .unwrap_or_default()
}

/// Result of expanding `${VAR}` references in a string.
pub(crate) struct Expanded {
    /// The text with every variable that is set put in.
    pub(crate) text: String,
    /// Every variable named.
    pub(crate) variables: Vec<String>,
    /// The variables named but not set (or empty).
    pub(crate) missing: Vec<String>,
}

impl<'load> Decoder<'load> {
    /// A decoder for the file named `origin` (in messages), loaded with `options`.
    pub(crate) fn new(origin: &'load str, options: &'load LoadOptions<'load>) -> Decoder<'load> {
        Decoder {
            origin,
            options,
            errors: Vec::new(),
            warnings: Vec::new(),
            templates: Templates::new(),
        }
    }

    /// The compiled templates and the warnings, or every error, each list in file order.
    pub(crate) fn finish(mut self) -> Result<(Templates, Vec<ConfigError>), ConfigErrors> {
        let by_place = |error: &ConfigError| {
            error
                .position
                .map(|position| (position.line, position.column))
        };
        self.errors.sort_by_key(by_place);
        self.warnings.sort_by_key(by_place);
        if !self.errors.is_empty() {
            return Err(ConfigErrors {
                errors: self.errors,
            });
        }
        Ok((self.templates, self.warnings))
    }

    /// The environment variable `name`, as the loader sees the environment.
    pub(crate) fn env(&self, name: &str) -> Option<String> {
        (self.options.env)(name)
    }

    /// Records an error at `position`, `path`.
    pub(crate) fn error(&mut self, position: Position, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.origin.to_owned(),
            position: Some(position),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Records a warning (the file still loads) at `position`, `path`.
    pub(crate) fn warning(&mut self, position: Position, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.origin.to_owned(),
            position: Some(position),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Records "expected `what`, found …", describing what `node` holds.
    pub(crate) fn expected(&mut self, node: &Node, path: &str, what: &str) {
        let found = match &node.value {
            NodeValue::String(text) if text.chars().count() <= 60 => format!("the string {text:?}"),
            NodeValue::Integer(number) => format!("the integer {number}"),
            NodeValue::Bool(flag) => format!("the boolean {flag}"),
            other => other.kind_name().to_owned(),
        };
        self.error(
            node.position,
            path,
            format!("expected {what}, found {found}"),
        );
    }

    /// The entries of a mapping, each key checked against `allowed` (unknown and duplicate keys
    /// are reported and left out); `None` when `node` is not a mapping.
    pub(crate) fn fields<'node>(
        &mut self,
        node: &'node Node,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'node>> {
        let NodeValue::Map(entries) = &node.value else {
            self.expected(node, path, "a mapping");
            return None;
        };
        let mut fields = Fields {
            position: node.position,
            entries: Vec::with_capacity(entries.len()),
        };
        for (key, value) in entries {
            let NodeValue::String(name) = &key.value else {
                self.expected(key, path, "a text key");
                continue;
            };
            if !allowed.contains(&name.as_str()) {
                let hint = did_you_mean(name, allowed);
                self.error(
                    key.position,
                    &child(path, name),
                    format!(
                        "unknown key '{name}'; {hint}expected one of: {}",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            if fields.get(name).is_some() {
                self.error(
                    key.position,
                    &child(path, name),
                    format!("duplicate key '{name}'"),
                );
                continue;
            }
            fields.entries.push((name.as_str(), value));
        }
        Some(fields)
    }

    /// The value of `key`, or an error naming it and `what` it is for.
    pub(crate) fn required<'node>(
        &mut self,
        fields: &Fields<'node>,
        key: &str,
        path: &str,
        what: &str,
    ) -> Option<&'node Node> {
        let found = fields.get(key);
        if found.is_none() {
            self.error(
                fields.position,
                path,
                format!("missing required key '{key}' ({what})"),
            );
        }
        found
    }

    /// The text of a string node.
    pub(crate) fn string<'node>(&mut self, node: &'node Node, path: &str) -> Option<&'node str> {
        if let NodeValue::String(text) = &node.value {
            Some(text)
        } else {
            self.expected(node, path, "a string");
            None
        }
    }

    /// The text of a string node that is not blank.
    pub(crate) fn non_empty_string<'node>(
        &mut self,
        node: &'node Node,
        path: &str,
    ) -> Option<&'node str> {
        let text = self.string(node, path)?;
        if text.trim().is_empty() {
            self.error(node.position, path, "expected a non-empty string");
            return None;
        }
        Some(text)
    }

    /// `true` or `false`.
    pub(crate) fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        if let NodeValue::Bool(flag) = node.value {
            Some(flag)
        } else {
            self.expected(node, path, "true or false");
            None
        }
    }

    /// An integer from `minimum` to `maximum`.
    pub(crate) fn integer_in(
        &mut self,
        node: &Node,
        path: &str,
        minimum: i64,
        maximum: i64,
    ) -> Option<i64> {
        let NodeValue::Integer(number) = node.value else {
            self.expected(
                node,
                path,
                &format!("an integer from {minimum} to {maximum}"),
            );
            return None;
        };
        if !(minimum..=maximum).contains(&number) {
            self.error(
                node.position,
                path,
                format!("expected an integer from {minimum} to {maximum}, found {number}"),
            );
            return None;
        }
        Some(number)
    }

    /// A human duration with a unit (`"5s"`, `"250ms"`, `"1m 30s"`).
    pub(crate) fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let text = match &node.value {
            NodeValue::String(text) => text,
            NodeValue::Integer(number) => {
                self.error(
                    node.position,
                    path,
                    format!("expected a duration with a unit such as \"5s\" or \"250ms\", found the bare number {number}"),
                );
                return None;
            }
            _ => {
                self.expected(node, path, "a duration such as \"5s\" or \"250ms\"");
                return None;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.error(
                    node.position,
                    path,
                    format!("expected a duration such as \"5s\", \"250ms\" or \"1m 30s\", found {text:?} ({error})"),
                );
                None
            }
        }
    }

    /// One of the names of `choices` (case-insensitive), as its value.
    pub(crate) fn choice<T: Copy>(
        &mut self,
        node: &Node,
        path: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expectation = format!("one of {}", names.join(", "));
        let NodeValue::String(text) = &node.value else {
            self.expected(node, path, &expectation);
            return None;
        };
        let found = choices
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(text))
            .map(|(_, value)| *value);
        if found.is_none() {
            let hint = did_you_mean(&text.to_ascii_lowercase(), &names);
            self.error(
                node.position,
                path,
                format!("{hint}expected {expectation}, found {text:?}"),
            );
        }
        found
    }

    /// Expands `${VAR}` references; `$${` stands for a literal `${`.
    pub(crate) fn expand(
        &mut self,
        text: &str,
        position: Position,
        path: &str,
    ) -> Option<Expanded> {
        let mut expanded = Expanded {
            text: String::with_capacity(text.len()),
            variables: Vec::new(),
            missing: Vec::new(),
        };
        let mut rest = text;
        while let Some(start) = rest.find('$') {
            expanded.text.push_str(&rest[..start]);
            let after = &rest[start..];
            if let Some(stripped) = after.strip_prefix("$${") {
                expanded.text.push_str("${");
                rest = stripped;
            } else if let Some(reference) = after.strip_prefix("${") {
                let Some(end) = reference.find('}') else {
                    self.error(
                        position,
                        path,
                        "unterminated '${' (write '$${' for a literal '${')",
                    );
                    return None;
                };
                let variable = &reference[..end];
                let valid_name = variable
                    .chars()
                    .next()
                    .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
                    && variable
                        .chars()
                        .all(|character| character.is_ascii_alphanumeric() || character == '_');
                if !valid_name {
                    self.error(position, path, format!("expected an environment variable name inside '${{…}}', found {variable:?}"));
                    return None;
                }
                match (self.options.env)(variable).filter(|value| !value.is_empty()) {
                    Some(value) => expanded.text.push_str(&value),
                    None => expanded.missing.push(variable.to_owned()),
                }
                expanded.variables.push(variable.to_owned());
                rest = &reference[end + 1..];
            } else {
                expanded.text.push('$');
                rest = &after[1..];
            }
        }
        expanded.text.push_str(rest);
        Some(expanded)
    }

    /// An error, or a warning when only validating, for each variable not set.
    pub(crate) fn report_missing_env(
        &mut self,
        variables: &[String],
        position: Position,
        path: &str,
    ) {
        for variable in variables {
            let message = format!("environment variable {variable} is not set (or is empty)");
            match self.options.missing_env {
                MissingEnv::Error => self.error(position, path, message),
                MissingEnv::Warn => self.warning(position, path, message),
            }
        }
    }

    /// Reads a secret from `key` (a string that may hold `${VAR}`) or `key_env` (a variable name).
    pub(crate) fn secret(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
    ) -> Option<Setting<Secret>> {
        let env_key = format!("{key}_env");
        match (fields.get(key), fields.get(&env_key)) {
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, key),
                    format!("set either '{key}' or '{env_key}', not both"),
                );
                None
            }
            (Some(node), None) => {
                let key_path = child(path, key);
                let text = self.non_empty_string(node, &key_path)?;
                let expanded = self.expand(text, node.position, &key_path)?;
                if expanded.variables.is_empty() {
                    self.warning(
                        node.position,
                        &key_path,
                        format!("the secret is written in the file in clear; prefer '{env_key}'"),
                    );
                }
                if expanded.missing.is_empty() {
                    Some(Setting::Ready(Secret::new(expanded.text)))
                } else {
                    self.report_missing_env(&expanded.missing, node.position, &key_path);
                    Some(Setting::MissingEnv(expanded.missing.join(", ")))
                }
            }
            (None, Some(node)) => {
                let key_path = child(path, &env_key);
                let variable = self.non_empty_string(node, &key_path)?;
                Some(
                    self.env_variable(variable, node.position, &key_path)
                        .map_or_else(
                            || Setting::MissingEnv(variable.to_owned()),
                            |value| Setting::Ready(Secret::new(value)),
                        ),
                )
            }
            (None, None) => None,
        }
    }

    /// The value of `variable`, reported when not set (or empty).
    pub(crate) fn env_variable(
        &mut self,
        variable: &str,
        position: Position,
        path: &str,
    ) -> Option<String> {
        let value = (self.options.env)(variable).filter(|value| !value.is_empty());
        if value.is_none() {
            self.report_missing_env(&[variable.to_owned()], position, path);
        }
        value
    }

    /// Compiles `source` as the template `name` (its suffix chooses the escaping); `Some(name)`.
    pub(crate) fn template(
        &mut self,
        name: String,
        source: &str,
        position: Position,
        path: &str,
    ) -> Option<String> {
        match self.templates.add(name.clone(), source.to_owned()) {
            Ok(()) => Some(name),
            Err(error) => {
                let line = error
                    .line
                    .map(|line| format!(" (line {line} of the template)"))
                    .unwrap_or_default();
                self.error(
                    position,
                    path,
                    format!("invalid template{line}: {}", error.message),
                );
                None
            }
        }
    }

    /// `rate_limit: {per_second: N, burst: M}` (burst defaults to N).
    pub(crate) fn rate_limit(&mut self, node: &Node, path: &str) -> Option<RateLimit> {
        let fields = self.fields(node, path, &["per_second", "burst"])?;
        let Some(per_second_node) = fields.get("per_second") else {
            self.error(node.position, path, "'per_second' is required");
            return None;
        };
        let per_second = self
            .integer_in(per_second_node, &child(path, "per_second"), 1, 100_000)
            .and_then(|rate| u32::try_from(rate).ok())?;
        let burst = match fields.get("burst") {
            None => per_second,
            Some(burst) => self
                .integer_in(burst, &child(path, "burst"), 1, 1_000_000)
                .and_then(|burst| u32::try_from(burst).ok())?,
        };
        Some(RateLimit { per_second, burst })
    }

    /// A timeout above 0 and at most 10 minutes.
    pub(crate) fn timeout(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let duration = self.duration(node, path)?;
        if duration.is_zero() || duration > MAX_ACTION_TIMEOUT {
            self.error(
                node.position,
                path,
                format!(
                    "expected a timeout above 0 and at most {}, found {}",
                    humantime::format_duration(MAX_ACTION_TIMEOUT),
                    humantime::format_duration(duration)
                ),
            );
            return None;
        }
        Some(duration)
    }

    /// [`url_target`](Self::url_target), or — when the value at `key` holds template tags
    /// (`{{ … }}`, `{% … %}`) — a [`UrlTemplate`] rendered per event: a webhook's `url`.
    pub(crate) fn url_target_or_template(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
        key: &str,
    ) -> Option<WebhookTarget> {
        let Some(node) = fields.get(key) else {
            return self.url_target(fields, path, key);
        };
        let NodeValue::String(text) = &node.value else {
            return self.url_target(fields, path, key);
        };
        if first_template_tag(text).is_none() {
            return self.url_target(fields, path, key);
        }
        let env_key = format!("{key}_env");
        let url_path = child(path, key);
        if fields.get(&env_key).is_some() {
            self.error(
                node.position,
                &url_path,
                format!("set either '{key}' or '{env_key}', not both"),
            );
            return None;
        }
        let source = text.trim();
        if source.contains("${") {
            self.error(
                node.position,
                &url_path,
                "a URL template cannot also hold ${VAR}: its rendered URLs appear in no secret \
                 store; put a token in a header (headers: {Authorization: 'Bearer ${TOKEN}'})",
            );
            return None;
        }
        let name = self.template(format!("{url_path}.txt"), source, node.position, &url_path)?;
        let reads = self.templates.variables_of(&name);
        let fixed_origin = fixed_origin(source);
        Some(WebhookTarget::Template(UrlTemplate {
            name,
            reads,
            fixed_origin,
        }))
    }

    /// An http(s) URL from `key` (literal, or with `${VAR}`) or `<key>_env` (a variable name).
    pub(crate) fn url_target(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
        key: &str,
    ) -> Option<WebhookTarget> {
        if let Some(node) = fields.get(key)
            && let NodeValue::String(text) = &node.value
            && first_template_tag(text).is_some()
        {
            self.error(
                node.position,
                &child(path, key),
                "expected a URL without template tags ({{ … }}, {% … %}): only a webhook's url \
                 may be rendered from the event",
            );
            return None;
        }
        let env_key = format!("{key}_env");
        match (fields.get(key), fields.get(&env_key)) {
            (Some(node), Some(_)) => {
                self.error(
                    node.position,
                    &child(path, key),
                    format!("set either '{key}' or '{env_key}', not both"),
                );
                None
            }
            (None, None) => {
                self.error(
                    fields.position,
                    path,
                    format!("missing required key '{key}' (or '{env_key}')"),
                );
                None
            }
            (Some(node), None) => {
                let url_path = child(path, key);
                let text = self.non_empty_string(node, &url_path)?;
                let expanded = self.expand(text.trim(), node.position, &url_path)?;
                if expanded.variables.is_empty() {
                    return self
                        .http_url(&expanded.text, node.position, &url_path, None)
                        .map(WebhookTarget::Literal);
                }
                let variable = expanded.variables.join(", ");
                if !expanded.missing.is_empty() {
                    self.report_missing_env(&expanded.missing, node.position, &url_path);
                    return Some(WebhookTarget::FromEnv {
                        url: Setting::MissingEnv(expanded.missing.join(", ")),
                        variable,
                    });
                }
                let url =
                    self.http_url(&expanded.text, node.position, &url_path, Some(&variable))?;
                Some(WebhookTarget::FromEnv {
                    variable,
                    url: Setting::Ready(SecretUrl(url)),
                })
            }
            (None, Some(node)) => {
                let env_path = child(path, &env_key);
                let variable = self.non_empty_string(node, &env_path)?.to_owned();
                let Some(value) = self.env_variable(&variable, node.position, &env_path) else {
                    return Some(WebhookTarget::FromEnv {
                        url: Setting::MissingEnv(variable.clone()),
                        variable,
                    });
                };
                let url = self.http_url(value.trim(), node.position, &env_path, Some(&variable))?;
                Some(WebhookTarget::FromEnv {
                    variable,
                    url: Setting::Ready(SecretUrl(url)),
                })
            }
        }
    }

    /// Parses an absolute http(s) URL; `secret_source` names the variable it came from, so the
    /// value itself is never echoed.
    pub(crate) fn http_url(
        &mut self,
        text: &str,
        position: Position,
        path: &str,
        secret_source: Option<&str>,
    ) -> Option<url::Url> {
        let shown = secret_source.map_or_else(
            || format!("{text:?}"),
            |variable| format!("the value of {variable}"),
        );
        match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(url)
            }
            Ok(url) => {
                let scheme = if secret_source.is_some() {
                    String::new()
                } else {
                    format!(" (scheme {:?})", url.scheme())
                };
                self.error(
                    position,
                    path,
                    format!(
                        "expected an http:// or https:// URL with a host, found {shown}{scheme}"
                    ),
                );
                None
            }
            Err(error) => {
                self.error(
                    position,
                    path,
                    format!(
                        "expected an absolute http:// or https:// URL, found {shown} ({error})"
                    ),
                );
                None
            }
        }
    }

    /// The action's `timeout`, or the default.
    pub(crate) fn action_timeout(&mut self, fields: &Fields<'_>, path: &str) -> Option<Duration> {
        match fields.get("timeout") {
            None => Some(DEFAULT_ACTION_TIMEOUT),
            Some(node) => self.timeout(node, &child(path, "timeout")),
        }
    }

    /// A required or optional text template at `key`; `suffix` chooses its escaping (`json`
    /// inserts values as JSON, `txt` as text).
    pub(crate) fn template_field(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        suffix: &str,
    ) -> Option<String> {
        let node = fields.get(key)?;
        let template_path = child(path, key);
        let source = self.string(node, &template_path)?;
        self.template(
            format!("{template_path}.{suffix}"),
            source,
            node.position,
            &template_path,
        )
    }

    /// `username_env` and `password_env`: both, or neither for a server without AUTH (`Err`
    /// when they are invalid, already reported).
    pub(crate) fn basic_credentials(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
    ) -> Result<Option<BasicCredentials>, ()> {
        let username = self.secret(fields, "username", path);
        let password = self.secret(fields, "password", path);
        let username_given =
            fields.get("username").is_some() || fields.get("username_env").is_some();
        let password_given =
            fields.get("password").is_some() || fields.get("password_env").is_some();
        match (username, password) {
            (Some(username), Some(password)) => Ok(Some(BasicCredentials { username, password })),
            (None, None) if !username_given && !password_given => Ok(None),
            _ if username_given != password_given => {
                self.error(
                    fields.position,
                    path,
                    "set both 'username_env' and 'password_env' (or neither, for a server without authentication)",
                );
                Err(())
            }
            _ => Err(()),
        }
    }

    /// A secret that must be given, as `<key>_env` (or `key`).
    pub(crate) fn required_secret(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        what: &str,
    ) -> Option<Setting<Secret>> {
        if fields.get(key).is_none() && fields.get(&format!("{key}_env")).is_none() {
            self.error(
                fields.position,
                path,
                format!("missing required key '{key}_env' ({what}, from the environment)"),
            );
            return None;
        }
        self.secret(fields, key, path)
    }

    /// An optional list of templates at `key` (a single string counts as a list of one).
    pub(crate) fn template_list(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        path: &str,
        suffix: &str,
    ) -> Option<Vec<String>> {
        const MAX_TEMPLATES: usize = 100;
        let Some(node) = fields.get(key) else {
            return Some(Vec::new());
        };
        let list_path = child(path, key);
        let items: Vec<(String, &Node)> = match &node.value {
            NodeValue::String(_) => vec![(list_path.clone(), node)],
            NodeValue::List(items) if items.len() <= MAX_TEMPLATES => items
                .iter()
                .enumerate()
                .map(|(index, item)| (format!("{list_path}[{index}]"), item))
                .collect(),
            _ => {
                self.expected(
                    node,
                    &list_path,
                    &format!("a template string or a list of at most {MAX_TEMPLATES}"),
                );
                return None;
            }
        };
        let mut templates = Vec::with_capacity(items.len());
        let mut all_valid = true;
        for (item_path, item) in items {
            let template = self.non_empty_string(item, &item_path).and_then(|source| {
                self.template(
                    format!("{item_path}.{suffix}"),
                    source,
                    item.position,
                    &item_path,
                )
            });
            match template {
                Some(template) => templates.push(template),
                None => all_valid = false,
            }
        }
        all_valid.then_some(templates)
    }
}

/// Where the first template tag (`{{`, `{%` or `{#`) of `text` starts, if it has one.
fn first_template_tag(text: &str) -> Option<usize> {
    ["{{", "{%", "{#"]
        .iter()
        .filter_map(|tag| text.find(tag))
        .min()
}

/// The scheme, host and port of a URL template when the literal text before its first tag
/// already ends its authority (a `/`, `?`, `#` or `\\` after `scheme://host[:port]`): whatever the
/// tags render then lands in the path, query or fragment and cannot move the request to
/// another host. `None` when the tags can reach the host (or the prefix is not an http(s) URL).
fn fixed_origin(source: &str) -> Option<url::Origin> {
    let prefix = &source[..first_template_tag(source)?];
    let authority_start = prefix.find("://")? + 3;
    let authority_end = authority_start + prefix[authority_start..].find(['/', '?', '#', '\\'])?;
    let url = url::Url::parse(&prefix[..authority_end]).ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host().is_some()).then(|| url.origin())
}
