//! Templates for action payloads and messages, compiled once at config load.
//!
//! One [`minijinja`] environment holds every template of an observers file under the path it
//! was defined at (`observers[0].actions[1].body_template`). Templates whose name ends in
//! `.json` are JSON-escaping: `{{ data.name }}` renders as a JSON value (`"Ann"`, with quotes and
//! escapes), so a hostile string in the data cannot break out of its place in a JSON body.
//! Rendering is strict: a reference to an undefined variable is an error (OB002), not an empty
//! string; write `{{ data.x | default(none) }}` for optional fields. Templates whose name ends in
//! `.html` escape values as HTML (`<` becomes `&lt;`). Templates whose name ends in
//! `.glob` are Redis `MATCH` patterns: values are inserted with `* ? [ ] \\` escaped, so only the
//! template's own wildcards match more than one key.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

/// The auto-escape mode of `.glob` templates.
const GLOB_ESCAPE: &str = "glob";

/// The compiled templates of one observers file.
#[derive(Debug)]
pub struct Templates {
    environment: Environment<'static>,
}

/// A template that failed to compile or render.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
    /// 1-based line inside the template, when known.
    pub line: Option<usize>,
}

impl From<minijinja::Error> for TemplateError {
    fn from(error: minijinja::Error) -> Self {
        let mut message = error.kind().to_string();
        if let Some(detail) = error.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        TemplateError {
            message,
            line: error.line(),
        }
    }
}

impl Default for Templates {
    fn default() -> Self {
        Templates::new()
    }
}

impl Templates {
    #[must_use]
    pub fn new() -> Templates {
        let mut environment = Environment::new();
        environment.set_undefined_behavior(UndefinedBehavior::Strict);
        environment.set_auto_escape_callback(|name| {
            let is_json = std::path::Path::new(name)
                .extension()
                .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
            let is_glob = std::path::Path::new(name)
                .extension()
                .is_some_and(|extension| extension.eq_ignore_ascii_case("glob"));
            let is_html = std::path::Path::new(name)
                .extension()
                .is_some_and(|extension| extension.eq_ignore_ascii_case("html"));
            if is_json {
                AutoEscape::Json
            } else if is_html {
                AutoEscape::Html
            } else if is_glob {
                AutoEscape::Custom(GLOB_ESCAPE)
            } else {
                AutoEscape::None
            }
        });
        environment.set_formatter(|output, state, value| {
            if matches!(state.auto_escape(), AutoEscape::Custom(GLOB_ESCAPE)) && !value.is_safe() {
                return output
                    .write_str(&glob_escape(&value.to_string()))
                    .map_err(minijinja::Error::from);
            }
            minijinja::escape_formatter(output, state, value)
        });
        // Bounded output: a template cannot loop or recurse its way to unbounded memory.
        environment.set_fuel(Some(100_000));
        environment.set_recursion_limit(64);
        Templates { environment }
    }

    /// Compiles `source` under `name`.
    ///
    /// # Errors
    /// A syntax error with its line.
    pub fn add(&mut self, name: String, source: String) -> Result<(), TemplateError> {
        self.environment.add_template_owned(name, source)?;
        Ok(())
    }

    /// The variables template `name` reads from its context (`data.region`, `entity_id`, …),
    /// sorted; empty for an unknown name.
    #[must_use]
    pub fn variables_of(&self, name: &str) -> Vec<String> {
        let Ok(template) = self.environment.get_template(name) else {
            return Vec::new();
        };
        let mut variables: Vec<String> = template.undeclared_variables(true).into_iter().collect();
        variables.sort();
        variables
    }

    /// The names of the templates under `prefix` (`observers[0].actions[1].`), sorted.
    #[must_use]
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .environment
            .templates()
            .map(|(name, _)| name)
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// Renders the template `name` with `context`.
    ///
    /// # Errors
    /// An undefined variable, a failing filter, or an unknown template name.
    pub fn render<S: Serialize>(&self, name: &str, context: S) -> Result<String, TemplateError> {
        let template = self.environment.get_template(name)?;
        Ok(template.render(context)?)
    }
}

/// Escapes the glob characters of a literal key part.
#[must_use]
pub fn glob_escape(part: &str) -> String {
    let mut escaped = String::with_capacity(part.len());
    for character in part.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_templates_escape_values_as_json() {
        let mut templates = Templates::new();
        templates
            .add(
                "body.json".into(),
                r#"{"name": {{ data.name }}, "n": {{ data.n }}}"#.into(),
            )
            .unwrap();
        let hostile = r#"x", "admin": true, "y": ""#;
        let rendered = templates
            .render("body.json", json!({"data": {"name": hostile, "n": 3}}))
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(parsed["name"], hostile);
        assert_eq!(parsed["n"], 3);
        assert!(parsed.get("admin").is_none());
    }

    #[test]
    fn undefined_variables_are_errors_and_syntax_errors_have_lines() {
        let mut templates = Templates::new();
        templates
            .add("t".into(), "hello {{ data.missing }}".into())
            .unwrap();
        let error = templates.render("t", json!({"data": {}})).unwrap_err();
        assert!(error.message.contains("undefined"), "{error}");

        let error = templates
            .add("bad".into(), "line one\n{{ oops(".into())
            .unwrap_err();
        assert_eq!(error.line, Some(2), "{error:?}");
    }

    #[test]
    fn glob_templates_escape_wildcards_in_values_only() {
        let mut templates = Templates::new();
        templates
            .add("keys.glob".into(), "orders:{{ entity_id }}:*".into())
            .unwrap();
        let rendered = templates
            .render("keys.glob", json!({"entity_id": "7*[a]?\\"}))
            .unwrap();
        assert_eq!(rendered, r"orders:7\*\[a\]\?\\:*");
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let mut templates = Templates::new();
        templates
            .add(
                "loop".into(),
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                    .into(),
            )
            .unwrap();
        assert!(templates.render("loop", json!({})).is_err());
    }
}
