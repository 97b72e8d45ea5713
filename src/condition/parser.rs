//! The parser: turns tokens into the compiled [`Expression`] tree, enforcing the input limits.
//!
//! A recursive-descent parser, one function per precedence level, lowest first:
//!
//! ```text
//! any_of      := all_of (('||' | 'or') all_of)*
//! all_of      := negation (('&&' | 'and') negation)*
//! negation    := ('!' | 'not') negation | comparison
//! comparison  := membership (('==' | '!=' | '>' | '>=' | '<' | '<=') membership)?
//! membership  := containment (('in' | 'not' 'in') containment)?
//! containment := operand ('contains' operand)?
//! operand     := literal | list | path | function_call | '(' any_of ')'
//! ```
//!
//! Recursion only happens through `(`, `!`/`not` and `[`, and each of those counts one level
//! against [`MAX_NESTING_DEPTH`], so neither parsing nor the tree it builds can get deep enough to
//! threaten the stack. `&&`/`||` chains are collected into flat lists for the same reason.

use serde_json::Value;

use super::error::ConditionError;
use super::expression::{ComparisonOperator, Expression, Path, PathRoot, Segment};
use super::lexer::{Token, TokenKind, tokenize};
use super::{MAX_CONDITION_LENGTH, MAX_NESTING_DEPTH};

/// Words that are operators, so they cannot start an operand.
const OPERATOR_KEYWORDS: [&str; 5] = ["and", "or", "not", "in", "contains"];

/// How many characters of a token an error message quotes before cutting it short.
const TOKEN_PREVIEW_CHARACTERS: usize = 30;

/// Parses a whole condition.
pub(super) fn parse(source: &str) -> Result<Expression, ConditionError> {
    if source.len() > MAX_CONDITION_LENGTH {
        return Err(too_long_error(source));
    }
    if source.trim().is_empty() {
        return Err(ConditionError::new(source, 1, "condition is empty"));
    }
    let tokens = tokenize(source)?;
    let mut parser = Parser {
        source,
        tokens,
        position: 0,
        nesting_depth: 0,
    };
    let expression = parser.any_of()?;
    parser.expect_end()?;
    Ok(expression)
}

/// The error for a condition over [`MAX_CONDITION_LENGTH`], pointing at the first character past
/// the limit. Only looks at the part of `source` up to the limit.
fn too_long_error(source: &str) -> ConditionError {
    let mut boundary = MAX_CONDITION_LENGTH;
    while !source.is_char_boundary(boundary) {
        boundary -= 1;
    }
    let column = source.get(..boundary).unwrap_or_default().chars().count() + 1;
    ConditionError::new(
        source,
        column,
        format!(
            "condition is too long: expected at most {MAX_CONDITION_LENGTH} bytes, found {}",
            source.len()
        ),
    )
}

/// A token as error messages name it: `end of input`, `string 'x'`, `number 3`, `'&&'`.
fn describe(token: &Token<'_>) -> String {
    let mut preview: String = token.text.chars().take(TOKEN_PREVIEW_CHARACTERS).collect();
    if token.text.chars().nth(TOKEN_PREVIEW_CHARACTERS).is_some() {
        preview.push('…');
    }
    match token.kind {
        TokenKind::End => "end of input".to_owned(),
        TokenKind::String(_) => format!("string {preview}"),
        TokenKind::Number(_) => format!("number {preview}"),
        _ => format!("'{preview}'"),
    }
}

fn comparison_operator(kind: &TokenKind<'_>) -> Option<ComparisonOperator> {
    let operator = match kind {
        TokenKind::Equal => ComparisonOperator::Equal,
        TokenKind::NotEqual => ComparisonOperator::NotEqual,
        TokenKind::Greater => ComparisonOperator::Greater,
        TokenKind::GreaterOrEqual => ComparisonOperator::GreaterOrEqual,
        TokenKind::Less => ComparisonOperator::Less,
        TokenKind::LessOrEqual => ComparisonOperator::LessOrEqual,
        _ => return None,
    };
    Some(operator)
}

/// The built-in functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Function {
    HasField,
    FieldChanged,
    FieldChangedTo,
    FieldChangedFrom,
}

impl Function {
    const ALL: [Function; 4] = [
        Function::HasField,
        Function::FieldChanged,
        Function::FieldChangedTo,
        Function::FieldChangedFrom,
    ];

    fn name(self) -> &'static str {
        match self {
            Function::HasField => "has_field",
            Function::FieldChanged => "field_changed",
            Function::FieldChangedTo => "field_changed_to",
            Function::FieldChangedFrom => "field_changed_from",
        }
    }

    /// How the function is called, for error messages.
    fn signature(self) -> &'static str {
        match self {
            Function::HasField => "has_field(field: string)",
            Function::FieldChanged => "field_changed(field: string)",
            Function::FieldChangedTo => "field_changed_to(field: string, value)",
            Function::FieldChangedFrom => "field_changed_from(field: string, value)",
        }
    }

    fn parameter_count(self) -> usize {
        match self {
            Function::HasField | Function::FieldChanged => 1,
            Function::FieldChangedTo | Function::FieldChangedFrom => 2,
        }
    }

    fn from_name(name: &str) -> Option<Function> {
        Function::ALL
            .into_iter()
            .find(|function| function.name() == name)
    }

    /// Every signature, for the unknown-function message.
    fn listing() -> String {
        Function::ALL.map(Function::signature).join(", ")
    }
}

/// One literal argument of a function call, with where it was written.
struct CallArgument {
    value: Value,
    column: usize,
    description: String,
}

/// The parser's position in the token list and its current nesting depth.
struct Parser<'source> {
    source: &'source str,
    /// Ends with a [`TokenKind::End`] token, which the parser never moves past.
    tokens: Vec<Token<'source>>,
    position: usize,
    nesting_depth: usize,
}

impl<'source> Parser<'source> {
    fn current(&self) -> &Token<'source> {
        let last_index = self.tokens.len().saturating_sub(1);
        &self.tokens[self.position.min(last_index)]
    }

    fn previous(&self) -> Option<&Token<'source>> {
        self.position
            .checked_sub(1)
            .and_then(|index| self.tokens.get(index))
    }

    /// Moves past the current token (never past the end) and returns it.
    fn advance(&mut self) -> Token<'source> {
        let token = self.current().clone();
        if token.kind != TokenKind::End {
            self.position += 1;
        }
        token
    }

    fn current_is(&self, kind: &TokenKind<'_>) -> bool {
        self.current().kind == *kind
    }

    fn current_is_word(&self, word: &str) -> bool {
        matches!(self.current().kind, TokenKind::Word(current) if current == word)
    }

    fn next_is(&self, kind: &TokenKind<'_>) -> bool {
        self.tokens
            .get(self.position + 1)
            .is_some_and(|next| next.kind == *kind)
    }

    fn error_at(&self, column: usize, message: impl Into<String>) -> ConditionError {
        ConditionError::new(self.source, column, message)
    }

    fn error_here(&self, message: impl Into<String>) -> ConditionError {
        self.error_at(self.current().column, message)
    }

    fn found(&self) -> String {
        describe(self.current())
    }

    /// Counts one level of nesting opened at `column`, failing past [`MAX_NESTING_DEPTH`].
    fn enter_nesting(&mut self, column: usize) -> Result<(), ConditionError> {
        self.nesting_depth += 1;
        if self.nesting_depth > MAX_NESTING_DEPTH {
            return Err(self.error_at(
                column,
                format!(
                    "nesting too deep: expected at most {MAX_NESTING_DEPTH} levels of \
                     parentheses, '!' and lists, found more"
                ),
            ));
        }
        Ok(())
    }

    fn leave_nesting(&mut self) {
        self.nesting_depth = self.nesting_depth.saturating_sub(1);
    }

    fn expect_end(&self) -> Result<(), ConditionError> {
        match self.current().kind {
            TokenKind::End => Ok(()),
            TokenKind::RightParenthesis => Err(self.error_here(
                "expected an operator or end of input, found ')' without a matching '('",
            )),
            _ => Err(self.error_here(format!(
                "expected an operator or end of input, found {}",
                self.found()
            ))),
        }
    }

    fn expected_operand_error(&self) -> ConditionError {
        let after = self
            .previous()
            .map(|previous| format!(" after {}", describe(previous)))
            .unwrap_or_default();
        self.error_here(format!(
            "expected an operand{after}, found {}",
            self.found()
        ))
    }

    fn any_of(&mut self) -> Result<Expression, ConditionError> {
        let first = self.all_of()?;
        if !self.at_or_operator() {
            return Ok(first);
        }
        let mut alternatives = vec![first];
        while self.at_or_operator() {
            self.advance();
            alternatives.push(self.all_of()?);
        }
        Ok(Expression::AnyOf(alternatives.into_boxed_slice()))
    }

    fn at_or_operator(&self) -> bool {
        self.current_is(&TokenKind::Or) || self.current_is_word("or")
    }

    fn all_of(&mut self) -> Result<Expression, ConditionError> {
        let first = self.negation()?;
        if !self.at_and_operator() {
            return Ok(first);
        }
        let mut requirements = vec![first];
        while self.at_and_operator() {
            self.advance();
            requirements.push(self.negation()?);
        }
        Ok(Expression::AllOf(requirements.into_boxed_slice()))
    }

    fn at_and_operator(&self) -> bool {
        self.current_is(&TokenKind::And) || self.current_is_word("and")
    }

    fn negation(&mut self) -> Result<Expression, ConditionError> {
        if !(self.current_is(&TokenKind::Not) || self.current_is_word("not")) {
            return self.comparison();
        }
        let operator = self.advance();
        self.enter_nesting(operator.column)?;
        let negated = self.negation()?;
        self.leave_nesting();
        Ok(Expression::Not(Box::new(negated)))
    }

    fn comparison(&mut self) -> Result<Expression, ConditionError> {
        let left = self.membership()?;
        let Some(operator) = comparison_operator(&self.current().kind) else {
            return Ok(left);
        };
        self.advance();
        let right = self.membership()?;
        if comparison_operator(&self.current().kind).is_some() {
            return Err(self.error_here(format!(
                "expected '&&', '||' or end of input after a comparison, found {} (comparisons \
                 cannot be chained; join them with '&&')",
                self.found()
            )));
        }
        Ok(Expression::Compare {
            operator,
            left: Box::new(left),
            right: Box::new(right),
        })
    }

    fn membership(&mut self) -> Result<Expression, ConditionError> {
        let element = self.containment()?;
        let negated = if self.current_is_word("in") {
            self.advance();
            false
        } else if self.current_is_word("not") {
            self.advance();
            if !self.current_is_word("in") {
                return Err(
                    self.error_here(format!("expected 'in' after 'not', found {}", self.found()))
                );
            }
            self.advance();
            true
        } else {
            return Ok(element);
        };
        let collection = self.containment()?;
        Ok(Expression::In {
            element: Box::new(element),
            collection: Box::new(collection),
            negated,
        })
    }

    fn containment(&mut self) -> Result<Expression, ConditionError> {
        let container = self.operand()?;
        if !self.current_is_word("contains") {
            return Ok(container);
        }
        self.advance();
        let item = self.operand()?;
        Ok(Expression::Contains {
            container: Box::new(container),
            item: Box::new(item),
        })
    }

    fn operand(&mut self) -> Result<Expression, ConditionError> {
        let token = self.current().clone();
        match token.kind {
            TokenKind::LeftParenthesis => self.parenthesized(),
            TokenKind::LeftBracket => Ok(Expression::Literal(self.list()?)),
            TokenKind::String(text) => {
                self.advance();
                Ok(Expression::Literal(Value::String(text)))
            }
            TokenKind::Number(number) => {
                self.advance();
                Ok(Expression::Literal(Value::Number(number)))
            }
            TokenKind::Word(word) => self.word_operand(word),
            _ => Err(self.expected_operand_error()),
        }
    }

    fn parenthesized(&mut self) -> Result<Expression, ConditionError> {
        let opening = self.advance();
        self.enter_nesting(opening.column)?;
        let inner = self.any_of()?;
        if !self.current_is(&TokenKind::RightParenthesis) {
            return Err(self.error_here(format!(
                "expected ')' to close '(' opened at column {}, found {}",
                opening.column,
                self.found()
            )));
        }
        self.advance();
        self.leave_nesting();
        Ok(inner)
    }

    /// An operand starting with a word: a keyword literal, a path or a function call.
    fn word_operand(&mut self, word: &'source str) -> Result<Expression, ConditionError> {
        let keyword_literal = match word {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            "null" => Some(Value::Null),
            _ => None,
        };
        if let Some(literal) = keyword_literal {
            self.advance();
            return Ok(Expression::Literal(literal));
        }
        if let Some(root) = PathRoot::from_name(word) {
            return Ok(Expression::Path(self.path(root)?));
        }
        if let Some(function) = Function::from_name(word) {
            return self.function_call(function);
        }
        if OPERATOR_KEYWORDS.contains(&word) {
            return Err(self.expected_operand_error());
        }
        if self.next_is(&TokenKind::LeftParenthesis) {
            return Err(self.error_here(format!(
                "unknown function '{word}': expected one of {}",
                Function::listing()
            )));
        }
        Err(self.error_here(format!(
            "unknown name '{word}': expected a path starting with one of {}, a literal or a \
             function call",
            PathRoot::listing()
        )))
    }

    fn path(&mut self, root: PathRoot) -> Result<Path, ConditionError> {
        self.advance();
        let mut segments = Vec::new();
        loop {
            let opening = self.current().clone();
            let is_dotted = match opening.kind {
                TokenKind::Dot => true,
                TokenKind::LeftBracket => false,
                _ => break,
            };
            if root.is_text() {
                return Err(self.error_here(format!(
                    "expected an operator after {} (a text value without fields), found {}",
                    root.name(),
                    self.found()
                )));
            }
            self.advance();
            let key_token = self.current().clone();
            let key = if is_dotted {
                self.dotted_segment()?
            } else {
                self.bracketed_segment(opening.column)?
            };
            let is_field_change_side = root == PathRoot::Changes && segments.len() == 1;
            if is_field_change_side && key != "old" && key != "new" {
                return Err(self.error_at(
                    key_token.column,
                    format!(
                        "expected 'old' or 'new' after changes.{}, found {}",
                        segments.first().map_or("", |field: &Segment| &field.key),
                        describe(&key_token)
                    ),
                ));
            }
            segments.push(Segment::new(&key));
        }
        Ok(Path {
            root,
            segments: segments.into_boxed_slice(),
        })
    }

    /// The field name after a `.` (already consumed).
    fn dotted_segment(&mut self) -> Result<String, ConditionError> {
        let TokenKind::Word(name) = self.current().kind else {
            return Err(self.error_here(format!(
                "expected a field name after '.', found {}",
                self.found()
            )));
        };
        self.advance();
        Ok(name.to_owned())
    }

    /// The quoted key or array index after a `[` (already consumed) opened at `opening_column`.
    fn bracketed_segment(&mut self, opening_column: usize) -> Result<String, ConditionError> {
        let key = match &self.current().kind {
            TokenKind::String(text) => text.clone(),
            TokenKind::Number(number) if number.is_u64() => number.to_string(),
            TokenKind::Number(_) => {
                return Err(self.error_here(format!(
                    "expected a non-negative integer array index inside '[', found {}",
                    self.found()
                )));
            }
            _ => {
                return Err(self.error_here(format!(
                    "expected a quoted key or an array index after '[', found {}",
                    self.found()
                )));
            }
        };
        self.advance();
        if !self.current_is(&TokenKind::RightBracket) {
            return Err(self.error_here(format!(
                "expected ']' to close '[' opened at column {opening_column}, found {}",
                self.found()
            )));
        }
        self.advance();
        Ok(key)
    }

    /// A literal: string, number, `true`, `false`, `null` or a list of literals. `role` says
    /// what the literal is for in the error message.
    fn literal(&mut self, role: &str) -> Result<Value, ConditionError> {
        let value = match &self.current().kind {
            TokenKind::String(text) => Value::String(text.clone()),
            TokenKind::Number(number) => Value::Number(number.clone()),
            TokenKind::Word("true") => Value::Bool(true),
            TokenKind::Word("false") => Value::Bool(false),
            TokenKind::Word("null") => Value::Null,
            TokenKind::LeftBracket => return self.list(),
            _ => {
                return Err(self.error_here(format!(
                    "expected a literal (string, number, true, false, null or list) as {role}, \
                     found {}",
                    self.found()
                )));
            }
        };
        self.advance();
        Ok(value)
    }

    /// A `[...]` list of literals; the current token is the `[`.
    fn list(&mut self) -> Result<Value, ConditionError> {
        let opening = self.advance();
        self.enter_nesting(opening.column)?;
        let mut elements = Vec::new();
        while !self.current_is(&TokenKind::RightBracket) {
            elements.push(self.literal("a list element")?);
            if self.current_is(&TokenKind::Comma) {
                self.advance();
            } else if !self.current_is(&TokenKind::RightBracket) {
                return Err(self.error_here(format!(
                    "expected ',' or ']' to close the list opened at column {}, found {}",
                    opening.column,
                    self.found()
                )));
            }
        }
        self.advance();
        self.leave_nesting();
        Ok(Value::Array(elements))
    }

    /// A call of `function`; the current token is its name.
    fn function_call(&mut self, function: Function) -> Result<Expression, ConditionError> {
        self.advance();
        if !self.current_is(&TokenKind::LeftParenthesis) {
            return Err(self.error_here(format!(
                "expected '(' after {}, found {}: call it as {}",
                function.name(),
                self.found(),
                function.signature()
            )));
        }
        let opening = self.advance();
        let mut arguments = Vec::new();
        if !self.current_is(&TokenKind::RightParenthesis) {
            loop {
                let argument_token = self.current().clone();
                let role = format!("an argument of {}", function.signature());
                arguments.push(CallArgument {
                    value: self.literal(&role)?,
                    column: argument_token.column,
                    description: describe(&argument_token),
                });
                if !self.current_is(&TokenKind::Comma) {
                    break;
                }
                self.advance();
            }
        }
        if !self.current_is(&TokenKind::RightParenthesis) {
            return Err(self.error_here(format!(
                "expected ',' or ')' to close the call to {} opened at column {}, found {}",
                function.name(),
                opening.column,
                self.found()
            )));
        }
        let closing = self.advance();
        let expected_count = function.parameter_count();
        if arguments.len() != expected_count {
            let column = arguments
                .get(expected_count)
                .map_or(closing.column, |extra| extra.column);
            return Err(self.error_at(
                column,
                format!(
                    "wrong number of arguments: expected {expected_count} for {}, found {}",
                    function.signature(),
                    arguments.len()
                ),
            ));
        }
        self.build_call(function, arguments)
    }

    /// Checks the argument types of a call with the right number of arguments and compiles it.
    fn build_call(
        &self,
        function: Function,
        arguments: Vec<CallArgument>,
    ) -> Result<Expression, ConditionError> {
        let mut arguments = arguments.into_iter();
        let Some(field_argument) = arguments.next() else {
            return Err(self.error_here(format!("expected {}", function.signature())));
        };
        let field = match field_argument.value {
            Value::String(field) if !field.is_empty() => field,
            _ => {
                return Err(self.error_at(
                    field_argument.column,
                    format!(
                        "expected a non-empty string naming the field as the first argument of \
                         {}, found {}",
                        function.signature(),
                        field_argument.description
                    ),
                ));
            }
        };
        let compared_value = arguments
            .next()
            .map_or(Value::Null, |argument| argument.value);
        let expression = match function {
            Function::HasField => {
                if field.split('.').any(str::is_empty) {
                    return Err(self.error_at(
                        field_argument.column,
                        format!(
                            "expected a dotted field path such as 'customer.email' in {}, found \
                             {} with an empty part",
                            function.signature(),
                            field_argument.description
                        ),
                    ));
                }
                Expression::HasField(field.split('.').map(Segment::new).collect())
            }
            Function::FieldChanged => Expression::FieldChanged(field.into()),
            Function::FieldChangedTo => Expression::FieldChangedTo {
                field: field.into(),
                value: compared_value,
            },
            Function::FieldChangedFrom => Expression::FieldChangedFrom {
                field: field.into(),
                value: compared_value,
            },
        };
        Ok(expression)
    }
}
