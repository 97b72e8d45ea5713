//! The `database` action: one call of a PostgreSQL function per matched event.
//!
//! The function name was checked at load and is always sent double-quoted; every argument is a
//! rendered template bound as a text parameter and cast to its declared type (`$2::numeric`), so
//! no event value is ever part of the SQL text. Each call runs in its own transaction with
//! `statement_timeout` set just under the action's timeout, and with the idempotency key in the
//! transaction-local setting `fraiseql.idempotency_key` (read it with
//! `current_setting('fraiseql.idempotency_key')`) so the function can recognise a repeat.
//!
//! *Exactly once.* The function always runs in the service's own database (the runner's pool,
//! `DATABASE_URL`; there is no setting that points a `database` action elsewhere), which also
//! holds the completed-actions ledger. So the call's transaction first records the action in the
//! ledger ([`crate::checkpoint::record_completed_in`]), then calls the function, then commits:
//! the function's writes and the ledger row commit together or not at all. An action already in
//! the ledger is not called again (the attempt succeeds, saying so), whoever runs it — the page
//! replayed after a crash between the call and the checkpoint, the job queue, a second node, a
//! `dlq retry` — and of two attempts running at once, the second waits for the first's
//! transaction and then either finds its row or, if it rolled back, makes the call itself. What
//! the function does outside its transaction (`dblink`, an HTTP extension, a file) is not covered:
//! for that, as for every target outside our database, the promise stays at-least-once with the
//! idempotency key.
//!
//! SQLSTATE classes 08 (connection), 40 (rollback: serialization failure, deadlock), 53
//! (insufficient resources) and 57 (operator intervention, a cancelled statement) are transient;
//! everything else (`RAISE EXCEPTION` P0001, data errors 22, undefined function 42883, …) is
//! permanent, with PostgreSQL's message as the reason.

use std::fmt::Write as _;
use std::time::Duration;

use sqlx::PgPool;

use super::{ActionConfig, ActionContext, ActionRunner, ActionSuccess, template_failed};
use crate::checkpoint::{ActionKey, CheckpointError, record_completed_in};
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;
use std::fmt;

use crate::config::{Decoder, Fields, Node, NodeValue, child};

/// Longest PostgreSQL identifier (`NAMEDATALEN - 1` bytes).
const MAX_IDENTIFIER_BYTES: usize = 63;

fn sql_identifier(part: &str, what: &str) -> Result<(), String> {
    let mut characters = part.chars();
    let valid = characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters
            .all(|character| character.is_ascii_alphanumeric() || "_$".contains(character));
    if !valid {
        return Err(format!(
            "expected {what} of letters, digits, '_' and '$' starting with a letter or '_', found {part:?}"
        ));
    }
    if part.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "expected {what} of at most {MAX_IDENTIFIER_BYTES} bytes, found {} bytes",
            part.len()
        ));
    }
    Ok(())
}

/// A schema-qualified PostgreSQL function name, `schema.function`, checked when parsed and
/// always sent double-quoted (so it is case-sensitive and can never be read as SQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionName {
    schema: String,
    function: String,
}

impl FunctionName {
    /// # Errors
    /// What is wrong with the name, as a sentence fragment.
    pub fn parse(text: &str) -> Result<FunctionName, String> {
        let Some((schema, function)) = text.split_once('.') else {
            return Err(format!(
                "expected a schema-qualified function name such as app.on_order_paid, found {text:?}"
            ));
        };
        sql_identifier(schema, "a schema name")?;
        sql_identifier(function, "a function name")?;
        Ok(FunctionName {
            schema: schema.to_owned(),
            function: function.to_owned(),
        })
    }

    /// `"schema"."function"`: the form put into SQL.
    #[must_use]
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.function)
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.schema, self.function)
    }
}

/// The PostgreSQL type a parameter is cast to: a (possibly schema-qualified) type name of
/// identifier characters, optionally an array (`text`, `numeric`, `jsonb`, `uuid`, `int8[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlType(String);

impl SqlType {
    /// # Errors
    /// What is wrong with the type name, as a sentence fragment.
    pub fn parse(text: &str) -> Result<SqlType, String> {
        let base = text.strip_suffix("[]").unwrap_or(text);
        let parts: Vec<&str> = base.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|part| sql_identifier(part, "").is_err()) {
            return Err(format!(
                "expected a type name such as text, numeric, jsonb, uuid or int8[], found {text:?}"
            ));
        }
        Ok(SqlType(text.to_ascii_lowercase()))
    }

    #[must_use]
    pub fn text() -> SqlType {
        SqlType("text".to_owned())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether values are JSON (`json`, `jsonb`): their template inserts values as JSON.
    #[must_use]
    pub fn is_json(&self) -> bool {
        matches!(self.0.as_str(), "json" | "jsonb")
    }
}

/// One argument of a `database` action's function: a template, sent as text and cast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseParam {
    /// Name of the value template.
    pub template: String,
    pub sql_type: SqlType,
}

/// A PostgreSQL function called per matched event, in its own transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct DatabaseAction {
    pub function: FunctionName,
    pub params: Vec<DatabaseParam>,
    /// Per attempt; also the transaction's `statement_timeout`.
    pub timeout: Duration,
}

impl ActionConfig for DatabaseAction {
    const KEYS: &[&str] = &["function", "params", "timeout"];

    fn decode(
        decoder: &mut Decoder<'_>,
        fields: &Fields<'_>,
        path: &str,
    ) -> Option<DatabaseAction> {
        let function = decoder
            .required(
                fields,
                "function",
                path,
                "a schema-qualified PostgreSQL function, e.g. app.on_order_paid",
            )
            .and_then(|node| {
                let function_path = child(path, "function");
                let text = decoder.non_empty_string(node, &function_path)?;
                FunctionName::parse(text.trim())
                    .map_err(|message| decoder.error(node.position, &function_path, message))
                    .ok()
            });
        let params = match fields.get("params") {
            None => Some(Vec::new()),
            Some(node) => database_params(decoder, node, &child(path, "params")),
        };
        let timeout = decoder.action_timeout(fields, path);
        Some(DatabaseAction {
            function: function?,
            params: params?,
            timeout: timeout?,
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn needs(&self) -> Option<String> {
        Some(format!(
            "{} in the service database (DATABASE_URL)",
            self.function
        ))
    }
}

/// `params: ["{{ entity_id }}", {value: "{{ data.total }}", type: numeric}]`.
fn database_params(
    decoder: &mut Decoder<'_>,
    node: &Node,
    path: &str,
) -> Option<Vec<DatabaseParam>> {
    const MAX_PARAMS: usize = 100;
    let NodeValue::List(items) = &node.value else {
        decoder.expected(node, path, "a list of parameter templates");
        return None;
    };
    if items.len() > MAX_PARAMS {
        decoder.error(
            node.position,
            path,
            format!(
                "expected at most {MAX_PARAMS} parameters, found {}",
                items.len()
            ),
        );
        return None;
    }
    let mut params = Vec::with_capacity(items.len());
    let mut all_valid = true;
    for (index, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{index}]");
        let (source_node, sql_type) = match &item.value {
            NodeValue::String(_) => (item, Some(SqlType::text())),
            NodeValue::Map(_) => {
                let Some(param_fields) = decoder.fields(item, &item_path, &["value", "type"])
                else {
                    all_valid = false;
                    continue;
                };
                let sql_type = match param_fields.get("type") {
                    None => Some(SqlType::text()),
                    Some(type_node) => {
                        let type_path = child(&item_path, "type");
                        decoder
                            .non_empty_string(type_node, &type_path)
                            .and_then(|text| {
                                SqlType::parse(text.trim())
                                    .map_err(|message| {
                                        decoder.error(type_node.position, &type_path, message);
                                    })
                                    .ok()
                            })
                    }
                };
                let Some(value) = decoder.required(
                    &param_fields,
                    "value",
                    &item_path,
                    "the parameter's template",
                ) else {
                    all_valid = false;
                    continue;
                };
                (value, sql_type)
            }
            _ => {
                decoder.expected(
                    item,
                    &item_path,
                    "a template string or a mapping with 'value' and 'type'",
                );
                all_valid = false;
                continue;
            }
        };
        let Some(sql_type) = sql_type else {
            all_valid = false;
            continue;
        };
        let value_path = if std::ptr::eq(source_node, item) {
            item_path.clone()
        } else {
            child(&item_path, "value")
        };
        let Some(source) = decoder.string(source_node, &value_path) else {
            all_valid = false;
            continue;
        };
        let suffix = if sql_type.is_json() { "json" } else { "txt" };
        match decoder.template(
            format!("{value_path}.{suffix}"),
            source,
            source_node.position,
            &value_path,
        ) {
            Some(template) => params.push(DatabaseParam { template, sql_type }),
            None => all_valid = false,
        }
    }
    all_valid.then_some(params)
}

/// One attempt of `action` with the runner's clients.
pub(super) async fn run(
    runner: &ActionRunner,
    action: &DatabaseAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    attempt(runner.database.as_ref(), &runner.templates, action, context).await
}

/// The transaction-local setting holding the idempotency key while the function runs.
pub const IDEMPOTENCY_SETTING: &str = "fraiseql.idempotency_key";
/// How much of the function's result is kept in the success detail.
const RESULT_EXCERPT_CHARS: usize = 200;

/// `SELECT "schema"."function"($1::text, $2::numeric)::text`.
fn call_sql(action: &DatabaseAction) -> String {
    let mut sql = format!("SELECT ({}(", action.function.quoted());
    for (index, param) in action.params.iter().enumerate() {
        if index > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "${}::{}", index + 1, param.sql_type.as_str());
    }
    sql.push_str("))::text AS result");
    sql
}

/// The statement timeout: a little under the attempt's timeout, so PostgreSQL cancels the
/// statement (and says so) before the executor gives up on the attempt.
fn statement_timeout(timeout: Duration) -> Duration {
    (timeout * 9 / 10).max(Duration::from_millis(1))
}

/// Classifies a failure by its SQLSTATE (or, without one, as a connection problem).
fn classify(function: &str, error: &sqlx::Error) -> AttemptError {
    match error {
        sqlx::Error::Database(database) => {
            let sqlstate = database
                .code()
                .map(std::borrow::Cow::into_owned)
                .unwrap_or_default();
            let code = match sqlstate.get(..2) {
                _ if sqlstate == "57014" => ErrorCode::ActionTimeout,
                Some("08") => ErrorCode::ConnectionFailed,
                Some("40" | "53" | "57") => ErrorCode::RemoteUnavailable,
                _ => ErrorCode::RemoteRejected,
            };
            AttemptError::new(
                code,
                format!("{function}: SQLSTATE {sqlstate}: {}", database.message()),
            )
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => {
            AttemptError::new(ErrorCode::ConnectionFailed, format!("{function}: {error}"))
        }
        other => AttemptError::new(ErrorCode::Internal, format!("{function}: {other}")),
    }
}

pub(super) async fn attempt(
    pool: Option<&PgPool>,
    templates: &Templates,
    action: &DatabaseAction,
    context: &ActionContext<'_>,
) -> Result<ActionSuccess, AttemptError> {
    let function = action.function.to_string();
    let Some(pool) = pool else {
        return Err(AttemptError::new(
            ErrorCode::ConfigInvalid,
            format!(
                "{function}: database actions need the service's PostgreSQL pool, and none was given to the action runner"
            ),
        ));
    };
    let arguments = action
        .params
        .iter()
        .map(|param| {
            templates
                .render(&param.template, context.envelope)
                .map_err(|error| template_failed(&param.template, &error))
        })
        .collect::<Result<Vec<String>, AttemptError>>()?;
    let fail = |error: sqlx::Error| classify(&function, &error);
    let key = ActionKey::new(
        context.event.id,
        context.observer.as_str(),
        context.action_index,
    );
    let mut transaction = pool.begin().await.map_err(fail)?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true), set_config($2, $3, true)")
        .bind(format!(
            "{}ms",
            statement_timeout(action.timeout).as_millis()
        ))
        .bind(IDEMPOTENCY_SETTING)
        .bind(key.to_string())
        .execute(&mut *transaction)
        .await
        .map_err(fail)?;
    // Recorded first, in the call's transaction: committed with the call's effects, or not at all.
    let first_time =
        record_completed_in(&mut transaction, &key)
            .await
            .map_err(|error| match error {
                CheckpointError::Storage(storage) => {
                    let mut failure = classify(&function, &storage);
                    failure.message = format!(
                        "{function}: recording it in the completed-actions ledger: {storage}"
                    );
                    failure
                }
                CheckpointError::FencedOut { .. } => {
                    AttemptError::new(ErrorCode::Internal, format!("{function}: {error}"))
                }
            })?;
    if !first_time {
        transaction.rollback().await.map_err(fail)?;
        return Ok(ActionSuccess {
            detail: format!("{function} was already called for this event; not called again"),
        });
    }
    let mut call = sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(call_sql(action)));
    for argument in arguments {
        call = call.bind(argument);
    }
    let results = call.fetch_all(&mut *transaction).await.map_err(fail)?;
    transaction.commit().await.map_err(fail)?;
    let first: String = results
        .first()
        .cloned()
        .flatten()
        .unwrap_or_default()
        .chars()
        .take(RESULT_EXCERPT_CHARS)
        .collect();
    let detail = match results.len() {
        0 | 1 if first.is_empty() => format!("called {function}"),
        1 => format!("called {function}: {first}"),
        rows => format!("called {function}: {rows} rows, first {first}"),
    };
    Ok(ActionSuccess { detail })
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::{DatabaseParam, FunctionName, SqlType};

    #[test]
    fn the_call_quotes_the_name_and_casts_every_parameter() {
        let action = DatabaseAction {
            function: FunctionName::parse("app.on_order_paid").unwrap(),
            params: vec![
                DatabaseParam {
                    template: "a".into(),
                    sql_type: SqlType::text(),
                },
                DatabaseParam {
                    template: "b".into(),
                    sql_type: SqlType::parse("numeric").unwrap(),
                },
            ],
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            call_sql(&action),
            r#"SELECT ("app"."on_order_paid"($1::text, $2::numeric))::text AS result"#
        );
    }

    #[test]
    fn names_and_types_that_could_carry_sql_are_refused() {
        for bad in [
            "on_order_paid",
            "app.f()",
            "app.f; drop table x",
            "app.\"f\"",
            "a.b.c",
            "app.",
            ".f",
        ] {
            assert!(FunctionName::parse(bad).is_err(), "{bad}");
        }
        for bad in ["text)", "numeric(10,2)", "text; x", "", "a.b.c", "int[]]"] {
            assert!(SqlType::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SqlType::parse("INT8[]").unwrap().as_str(), "int8[]");
        assert!(SqlType::parse("jsonb").unwrap().is_json());
    }
}
