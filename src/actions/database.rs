//! The `database` action: one call of a PostgreSQL function per matched event.
//!
//! The function name was checked at load and is always sent double-quoted; every argument is a
//! rendered template bound as a text parameter and cast to its declared type (`$2::numeric`), so
//! no event value is ever part of the SQL text. Each call runs in its own transaction with
//! `statement_timeout` set just under the action's timeout, and with the idempotency key in the
//! transaction-local setting `fraiseql.idempotency_key` (read it with
//! `current_setting('fraiseql.idempotency_key')`) so the function can recognise a repeat.
//!
//! SQLSTATE classes 08 (connection), 40 (rollback: serialization failure, deadlock), 53
//! (insufficient resources) and 57 (operator intervention, a cancelled statement) are transient;
//! everything else (`RAISE EXCEPTION` P0001, data errors 22, undefined function 42883, …) is
//! permanent, with PostgreSQL's message as the reason.

use std::fmt::Write as _;
use std::time::Duration;

use sqlx::PgPool;

use super::{ActionContext, ActionSuccess, template_failed};
use crate::config::DatabaseAction;
use crate::error::ErrorCode;
use crate::retry::AttemptError;
use crate::template::Templates;

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
    let mut transaction = pool.begin().await.map_err(fail)?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true), set_config($2, $3, true)")
        .bind(format!(
            "{}ms",
            statement_timeout(action.timeout).as_millis()
        ))
        .bind(IDEMPOTENCY_SETTING)
        .bind(context.idempotency_key())
        .execute(&mut *transaction)
        .await
        .map_err(fail)?;
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
    use crate::config::{DatabaseParam, FunctionName, SqlType};

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
