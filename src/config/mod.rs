//! Observers files: the shared parts of loading one, below every action type.
//!
//! A file (YAML, or TOML chosen by the `.toml` extension) is parsed into a positioned tree
//! (`tree.rs`), then decoded with the primitives of `decode.rs`, which check every value, compile
//! conditions and templates, resolve `${VAR}` / `*_env` secrets, and collect *all* problems, each
//! naming file, line:column and path (`observers[2].actions[0].url`). `model.rs` holds the
//! settings every observer and action shares. The file as a whole (observers and their actions,
//! whose types this module cannot name) is loaded by [`observers`](crate::observers).

mod decode;
mod keyspace;
mod model;
mod network;
mod settings;
mod tree;

use std::fmt;

pub(crate) use decode::{Decoder, Fields, child, did_you_mean};
pub use keyspace::{DEFAULT_REDIS_PREFIX, REDIS_PREFIX_ENV, ServiceKeyspace};
pub use model::*;
pub use network::{Network, NetworkParseError};
pub use tree::{Format, Position};
pub(crate) use tree::{Node, NodeValue, parse};

/// One problem in an observers file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub position: Option<Position>,
    /// Where in the document, e.g. `observers[2].actions[0].url`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.file)?;
        if let Some(position) = self.position {
            write!(formatter, ":{}:{}", position.line, position.column)?;
        }
        if !self.path.is_empty() {
            write!(formatter, ": {}", self.path)?;
        }
        write!(formatter, ": {}", self.message)
    }
}

/// Every problem found in an observers file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.errors.len();
        writeln!(
            formatter,
            "{count} error{} in observers configuration:",
            if count == 1 { "" } else { "s" }
        )?;
        for error in &self.errors {
            writeln!(formatter, "  {error}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// One problem of the whole file (no path).
    pub(crate) fn single(file: &str, position: Option<Position>, message: String) -> ConfigErrors {
        ConfigErrors {
            errors: vec![ConfigError {
                file: file.to_owned(),
                position,
                path: String::new(),
                message,
            }],
        }
    }
}

/// What to do when an environment variable named by the file is not set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingEnv {
    /// An error: the service is about to run and cannot do without it.
    Error,
    /// A warning: the file is only being validated, perhaps away from its deployment.
    Warn,
}

/// How a file is loaded.
pub struct LoadOptions<'env> {
    /// Looks an environment variable up (the process environment, or a map in tests).
    pub env: &'env (dyn Fn(&str) -> Option<String> + Sync),
    pub missing_env: MissingEnv,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl LoadOptions<'static> {
    /// Reads variables from the process environment.
    #[must_use]
    pub fn from_process_env(missing_env: MissingEnv) -> LoadOptions<'static> {
        LoadOptions {
            env: &process_env,
            missing_env,
        }
    }
}
