//! The observers file as a whole: its model ([`ObserverDefinition`], [`ObserversConfig`]) and
//! its loader ([`load_file`], [`load_bytes`], [`load_str`]).
//!
//! It sits above the action catalog because an observer's actions are of the catalog's types:
//! the loader reads each action's `type:`, checks its keys against the type's own, and lets the
//! type decode them (`actions/<type>.rs`), with the shared primitives of [`config`](crate::config).
//! Problems are collected, never the first only: [`ConfigErrors`] lists them all, each with its
//! file, line:column and path.

mod decode;
pub mod history;

use std::fmt;
use std::path::Path;

use crate::actions::ActionDefinition;
use crate::condition::Condition;
use crate::config::{
    ConfigError, ConfigErrors, ExecutorSettings, FailurePolicy, Format, JobSettings, LoadOptions,
    ObserverName, Position, RetryPolicy, parse,
};
use crate::domain::EventKind;
use crate::template::Templates;

/// Largest observers file accepted; anything bigger is not a hand-written configuration.
pub const MAX_CONFIG_FILE_BYTES: usize = 4 * 1024 * 1024;

/// One observer: which changes it watches and what it does about them.
#[derive(Clone, Debug)]
pub struct ObserverDefinition {
    pub name: ObserverName,
    pub description: Option<String>,
    pub entity: String,
    pub events: Vec<EventKind>,
    pub condition: Option<Condition>,
    pub actions: Vec<ActionDefinition>,
    pub retry: RetryPolicy,
    pub on_failure: FailurePolicy,
}

impl ObserverDefinition {
    /// The job that runs `action` of this observer for `event` in the queue, with `max_attempts`
    /// (at least 1) under the observer's backoff, due now.
    #[must_use]
    pub fn job_for(
        &self,
        event: &crate::domain::EntityEvent,
        action: &ActionDefinition,
        max_attempts: u32,
    ) -> crate::outcome::NewJob {
        crate::outcome::NewJob {
            queue: action.delivery.queue.clone(),
            priority: action.delivery.priority,
            run_at: None,
            event: event.clone(),
            observer: self.name.to_string(),
            action_index: action.index,
            action_type: action.kind.type_name().to_owned(),
            max_attempts: max_attempts.max(1),
            initial_delay: self.retry.initial_delay,
            max_delay: self.retry.max_delay,
            parked_on: None,
            history: Vec::new(),
        }
    }
}

/// A loaded, valid observers file.
#[derive(Debug)]
pub struct ObserversConfig {
    /// The file it came from (for messages).
    pub origin: String,
    pub observers: Vec<ObserverDefinition>,
    pub executor: ExecutorSettings,
    pub jobs: JobSettings,
    /// Whether processed events are recorded in the history (`history: on|off`, on by default).
    pub history: bool,
    /// `history: {backend: search, …}`: the history is also copied to Elasticsearch/OpenSearch.
    pub history_search: Option<history::SearchHistory>,
    /// Every body/message template of every action, compiled.
    pub templates: Templates,
    /// Problems that do not stop the file from loading (e.g. a secret not set while validating).
    pub warnings: Vec<ConfigError>,
}

/// Where an action is defined, for messages: `observers[2].actions[0] (observer 'order-paid')`.
#[derive(Clone, Copy, Debug)]
pub struct ActionPlace<'config> {
    pub observer_index: usize,
    pub observer: &'config ObserverDefinition,
    pub action: &'config ActionDefinition,
}

impl fmt::Display for ActionPlace<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "observers[{}].actions[{}] (observer '{}')",
            self.observer_index, self.action.index, self.observer.name
        )
    }
}

impl ObserversConfig {
    /// Every action whose `type:` is `type_name`, in file order.
    pub fn actions_of_type<'config>(
        &'config self,
        type_name: &'config str,
    ) -> impl Iterator<Item = ActionPlace<'config>> + 'config {
        self.observers
            .iter()
            .enumerate()
            .flat_map(|(observer_index, observer)| {
                observer.actions.iter().map(move |action| ActionPlace {
                    observer_index,
                    observer,
                    action,
                })
            })
            .filter(move |place| place.action.kind.type_name() == type_name)
    }
}

/// Chooses the format from a file name: `.toml` is TOML, `.yaml`/`.yml` YAML.
///
/// # Errors
/// Any other extension.
pub fn format_for(path: &Path) -> Result<Format, String> {
    match path.extension().and_then(|extension| extension.to_str()) {
        Some(extension) if extension.eq_ignore_ascii_case("toml") => Ok(Format::Toml),
        Some(extension)
            if extension.eq_ignore_ascii_case("yaml") || extension.eq_ignore_ascii_case("yml") =>
        {
            Ok(Format::Yaml)
        }
        _ => Err(format!(
            "expected a file ending in .yaml, .yml or .toml, found {:?}",
            path.display().to_string()
        )),
    }
}

/// Loads and validates an observers file.
///
/// # Errors
/// Every problem found, each with its place.
pub fn load_file(path: &Path, options: &LoadOptions<'_>) -> Result<ObserversConfig, ConfigErrors> {
    let origin = path.display().to_string();
    let format =
        format_for(path).map_err(|message| ConfigErrors::single(&origin, None, message))?;
    let bytes = std::fs::read(path).map_err(|error| {
        ConfigErrors::single(&origin, None, format!("cannot read the file: {error}"))
    })?;
    load_bytes(&bytes, format, &origin, options)
}

/// Loads and validates observers configuration from raw bytes.
///
/// # Errors
/// Every problem found, each with its place.
pub fn load_bytes(
    bytes: &[u8],
    format: Format,
    origin: &str,
    options: &LoadOptions<'_>,
) -> Result<ObserversConfig, ConfigErrors> {
    if bytes.len() > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigErrors::single(
            origin,
            None,
            format!(
                "the file is {} bytes; observers files are limited to {MAX_CONFIG_FILE_BYTES} bytes",
                bytes.len()
            ),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let valid = &bytes[..error.valid_up_to()];
            let line = valid.split(|&byte| byte == b'\n').count();
            let line_start = valid
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |index| index + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            return Err(ConfigErrors::single(
                origin,
                Some(Position { line, column }),
                format!(
                    "expected UTF-8 text, found an invalid byte at offset {}",
                    error.valid_up_to()
                ),
            ));
        }
    };
    load_str(text, format, origin, options)
}

/// Loads and validates observers configuration from text.
///
/// # Errors
/// Every problem found, each with its place.
pub fn load_str(
    text: &str,
    format: Format,
    origin: &str,
    options: &LoadOptions<'_>,
) -> Result<ObserversConfig, ConfigErrors> {
    let root = parse(text, format).map_err(|syntax| {
        ConfigErrors::single(
            origin,
            Some(syntax.position),
            format!("syntax error: {}", syntax.message),
        )
    })?;
    decode::decode(&root, origin, options)
}
