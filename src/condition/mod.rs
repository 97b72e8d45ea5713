//! The condition language: the filter an observer applies to events, parsed once when the
//! configuration loads and evaluated for every event.
//!
//! ```text
//! data.total > 100 && field_changed_to('status', 'paid')
//! event_type == 'UPDATE' && changes.status.old in ['new', 'pending']
//! data.customer.email contains '@example.com' || !has_field('customer.email')
//! ```
//!
//! This module owns the language end to end: the lexer (`lexer.rs`), the parser with its input
//! limits (`parser.rs`), the compiled expression tree (`expression.rs`), the evaluator
//! (`eval.rs`) and the [error](ConditionError) a bad condition reports (`error.rs`).
//!
//! # Syntax
//!
//! - **Literals**: strings in single or double quotes with the escapes `\'` `\"` `\\` `\/` `\n`
//!   `\t` `\r` `\0` and `\uXXXX` (a surrogate pair as two escapes); numbers such as `42`, `-7`,
//!   `3.5`, `1e3`, `-2.5E-3`; `true`, `false`, `null`; lists of literals `[1, 'a', null, [2]]`.
//! - **Paths** start with one of these roots:
//!   - `data`: the row after the change; `before`: the row before it (null when not recorded);
//!   - `changes`: the changed fields; `changes.<field>` is the object `{old, new}` when the
//!     field changed and null otherwise, `changes.<field>.old` / `.new` its two sides;
//!   - the text values `event_type` (`INSERT`, `UPDATE`, `DELETE` or `CUSTOM`), `entity_type`,
//!     `entity_id`, `tenant_id`, `actor_type`, `actor_id` (the last three null when absent).
//!
//!   Segments follow as `.name` (letters, digits, `_`, any Unicode letter), `["any key"]` for keys
//!   with other characters, or `[0]` for an array index. A segment that is a non-negative integer
//!   selects an array element (`data.items[0].sku` and `data.items.0.sku` are the same). A path
//!   that does not resolve is `null`. An unknown root name is a parse error.
//! - **Operators**, from lowest to highest precedence: `||` (or `or`); `&&` (or `and`); `!` (or
//!   `not`); comparisons `== != > >= < <=`; `in` and `not in`; `contains`. Parentheses group.
//!   Comparisons do not chain (`a == b == c` is an error), and `!` applies to a whole comparison
//!   (`!data.total > 5` means `!(data.total > 5)`).
//! - **Functions** take literal arguments:
//!   - `has_field('customer.email')`: `data` has that (dotted) key, even with a null value;
//!   - `field_changed('status')`: `changes` has the field;
//!   - `field_changed_to('status', 'paid')`: the field changed and its new value equals the value;
//!   - `field_changed_from('status', 'new')`: the field changed and its old value equals the value.
//!
//! # Semantics
//!
//! Evaluation never fails: a type mismatch makes an operator false instead of an error.
//!
//! - `==` / `!=` are JSON equality, except that numbers compare numerically (`1 == 1.0`, exactly,
//!   even for large integers) and a missing value equals `null`. `!=` is exactly `!(a == b)`.
//! - `>` `>=` `<` `<=` compare two numbers numerically or two strings lexicographically (by code
//!   point); any other pair of types is false.
//! - `x in list` is true when the list (a literal or an array in the event) has an element equal to
//!   `x` by `==`; when the right side is not an array it is false. `x not in list` is `!(x in
//!   list)`.
//! - `a contains b` is a substring test when both are strings, element membership (by `==`) when
//!   `a` is an array, key membership when `a` is an object (including `changes` and
//!   `changes.<field>`) and `b` a string; otherwise false.
//! - An operand used as a condition by itself (`data.is_vip`, `!data.archived`) is true only when
//!   it is JSON `true`; everything else, including missing values, strings and numbers, is false.
//! - Used as an operand, a sub-condition such as `(a && b)` or `x in [..]` is the boolean it
//!   evaluates to, so `(data.total > 10) == true` works.
//! - `&&` and `||` evaluate left to right and stop as soon as the result is known.
//!
//! # Limits
//!
//! A condition longer than [`MAX_CONDITION_LENGTH`] bytes is rejected without being parsed, and
//! one nesting deeper than [`MAX_NESTING_DEPTH`] levels of parentheses, `!` and lists is rejected
//! at the column where the limit is exceeded. Parsing and evaluation take time linear in the size
//! of the condition (and of the event values it compares), and their recursion is bounded by the
//! nesting limit, so hostile conditions or event data cannot exhaust the stack.

mod error;
mod eval;
mod expression;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use error::ConditionError;

use crate::domain::EntityEvent;

/// The longest condition accepted, in bytes. Longer input is rejected before parsing.
pub const MAX_CONDITION_LENGTH: usize = 16 * 1024;

/// The deepest nesting accepted: every `(`, `!`/`not` and `[` open one level.
pub const MAX_NESTING_DEPTH: usize = 64;

/// A compiled condition: parsed once, then evaluated against any number of events.
#[derive(Clone, Debug)]
pub struct Condition {
    source: String,
    expression: expression::Expression,
}

impl Condition {
    /// Parses and compiles `source`.
    ///
    /// # Errors
    /// When `source` is empty, longer than [`MAX_CONDITION_LENGTH`], nested deeper than
    /// [`MAX_NESTING_DEPTH`], or not a valid condition; the error says what was expected, what
    /// was found, and at which column.
    pub fn parse(source: &str) -> Result<Condition, ConditionError> {
        let expression = parser::parse(source)?;
        Ok(Condition {
            source: source.to_owned(),
            expression,
        })
    }

    /// The text the condition was parsed from.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `event` satisfies the condition. Never fails and never panics; see the module
    /// documentation for how type mismatches and missing values behave.
    #[must_use]
    pub fn evaluate(&self, event: &EntityEvent) -> bool {
        eval::is_satisfied(&self.expression, event)
    }
}

impl FromStr for Condition {
    type Err = ConditionError;

    fn from_str(source: &str) -> Result<Condition, ConditionError> {
        Condition::parse(source)
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.source)
    }
}
