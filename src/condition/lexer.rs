//! The lexer: turns condition text into tokens, each carrying its 1-based character column.
//!
//! Owns the spelling of literals (string escapes, number syntax) and of operators. Words are not
//! classified here: whether `in` is an operator or a field name depends on where it appears, which
//! the parser decides. One exception: right after a `.`, a run of letters, digits and `_` is a word
//! even when it starts with a digit, so `data.items.0` and `data.2fa` are paths.

use serde_json::Number;

use super::error::ConditionError;

/// What a token is.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum TokenKind<'source> {
    /// A name: a path root, field name, function name, keyword or `true`/`false`/`null`.
    Word(&'source str),
    /// A string literal, escapes already decoded.
    String(String),
    Number(Number),
    LeftParenthesis,
    RightParenthesis,
    LeftBracket,
    RightBracket,
    Comma,
    Dot,
    Equal,
    NotEqual,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
    /// `&&`
    And,
    /// `||`
    Or,
    /// `!`
    Not,
    /// End of input; always the last token.
    End,
}

/// A token with where it is in the condition.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Token<'source> {
    pub(super) kind: TokenKind<'source>,
    /// 1-based character column of the token's first character.
    pub(super) column: usize,
    /// The token exactly as written (empty for [`TokenKind::End`]).
    pub(super) text: &'source str,
}

/// Splits `source` into tokens; the last one is always [`TokenKind::End`].
pub(super) fn tokenize(source: &str) -> Result<Vec<Token<'_>>, ConditionError> {
    let mut lexer = Lexer {
        source,
        offset: 0,
        column: 1,
        tokens: Vec::new(),
    };
    lexer.run()?;
    Ok(lexer.tokens)
}

/// Whether `character` may start a word.
fn is_word_start(character: char) -> bool {
    character == '_' || character.is_alphabetic()
}

/// Whether `character` may continue a word.
fn is_word_continuation(character: char) -> bool {
    character == '_' || character.is_alphanumeric()
}

/// A character shown in an error message, with end of input spelled out.
fn describe_character(character: Option<char>) -> String {
    match character {
        Some(character) => format!("'{character}'"),
        None => "end of input".to_owned(),
    }
}

/// The cursor over the source and the tokens produced so far.
struct Lexer<'source> {
    source: &'source str,
    /// Byte offset of the next character.
    offset: usize,
    /// 1-based character column of the next character.
    column: usize,
    tokens: Vec<Token<'source>>,
}

impl<'source> Lexer<'source> {
    fn remaining(&self) -> &'source str {
        self.source.get(self.offset..).unwrap_or_default()
    }

    fn peek(&self) -> Option<char> {
        self.remaining().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.remaining().chars().nth(1)
    }

    fn advance(&mut self) -> Option<char> {
        let character = self.peek()?;
        self.offset += character.len_utf8();
        self.column += 1;
        Some(character)
    }

    /// Consumes the next character when it is `expected`.
    fn advance_if(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.advance();
            return true;
        }
        false
    }

    fn error(&self, column: usize, message: impl Into<String>) -> ConditionError {
        ConditionError::new(self.source, column, message)
    }

    fn run(&mut self) -> Result<(), ConditionError> {
        loop {
            while self.peek().is_some_and(char::is_whitespace) {
                self.advance();
            }
            let start_offset = self.offset;
            let start_column = self.column;
            let Some(character) = self.peek() else {
                self.tokens.push(Token {
                    kind: TokenKind::End,
                    column: start_column,
                    text: "",
                });
                return Ok(());
            };
            let kind = self.token_starting_with(character, start_column)?;
            self.tokens.push(Token {
                kind,
                column: start_column,
                text: self
                    .source
                    .get(start_offset..self.offset)
                    .unwrap_or_default(),
            });
        }
    }

    /// Reads the token whose first character is `character` (not yet consumed).
    fn token_starting_with(
        &mut self,
        character: char,
        start_column: usize,
    ) -> Result<TokenKind<'source>, ConditionError> {
        let follows_dot = matches!(
            self.tokens.last(),
            Some(Token {
                kind: TokenKind::Dot,
                ..
            })
        );
        if (follows_dot && is_word_continuation(character)) || is_word_start(character) {
            return Ok(self.word());
        }
        if character == '\'' || character == '"' {
            return self.string(character, start_column);
        }
        if character == '-' || character.is_ascii_digit() {
            return self.number(start_column);
        }
        self.advance();
        let kind = match character {
            '(' => TokenKind::LeftParenthesis,
            ')' => TokenKind::RightParenthesis,
            '[' => TokenKind::LeftBracket,
            ']' => TokenKind::RightBracket,
            ',' => TokenKind::Comma,
            '.' => TokenKind::Dot,
            '!' if self.advance_if('=') => TokenKind::NotEqual,
            '!' => TokenKind::Not,
            '>' if self.advance_if('=') => TokenKind::GreaterOrEqual,
            '>' => TokenKind::Greater,
            '<' if self.advance_if('=') => TokenKind::LessOrEqual,
            '<' => TokenKind::Less,
            '=' if self.advance_if('=') => TokenKind::Equal,
            '&' if self.advance_if('&') => TokenKind::And,
            '|' if self.advance_if('|') => TokenKind::Or,
            '=' | '&' | '|' => {
                return Err(self.error(
                    start_column,
                    format!("expected '{character}{character}', found a single '{character}'"),
                ));
            }
            other => {
                return Err(self.error(
                    start_column,
                    format!(
                        "expected a name, literal, operator or parenthesis, found the character \
                         '{}'",
                        other.escape_debug()
                    ),
                ));
            }
        };
        Ok(kind)
    }

    fn word(&mut self) -> TokenKind<'source> {
        let start_offset = self.offset;
        while self.peek().is_some_and(is_word_continuation) {
            self.advance();
        }
        TokenKind::Word(
            self.source
                .get(start_offset..self.offset)
                .unwrap_or_default(),
        )
    }

    /// Reads a quoted string whose opening `quote` is the next character.
    fn string(
        &mut self,
        quote: char,
        opening_column: usize,
    ) -> Result<TokenKind<'source>, ConditionError> {
        self.advance();
        let mut text = String::new();
        loop {
            let character_column = self.column;
            let Some(character) = self.advance() else {
                return Err(self.error(
                    character_column,
                    format!(
                        "unterminated string: expected {quote} to close the string opened at \
                         column {opening_column}, found end of input"
                    ),
                ));
            };
            if character == quote {
                return Ok(TokenKind::String(text));
            }
            if character == '\\' {
                text.push(self.escape(character_column)?);
            } else {
                text.push(character);
            }
        }
    }

    /// Decodes the escape after a backslash (already consumed) at `backslash_column`.
    fn escape(&mut self, backslash_column: usize) -> Result<char, ConditionError> {
        let found = self.advance();
        let decoded = match found {
            Some('\'') => '\'',
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('0') => '\0',
            Some('u') => return self.unicode_escape(backslash_column),
            other => {
                let found_text = match other {
                    Some(character) => format!("'\\{}'", character.escape_debug()),
                    None => "end of input".to_owned(),
                };
                return Err(self.error(
                    backslash_column,
                    format!(
                        "expected an escape (\\' \\\" \\\\ \\/ \\n \\t \\r \\0 or \\uXXXX) after \
                         '\\', found {found_text}"
                    ),
                ));
            }
        };
        Ok(decoded)
    }

    /// Decodes `\uXXXX` (the `\u` already consumed), joining a UTF-16 surrogate pair written as
    /// two escapes.
    fn unicode_escape(&mut self, backslash_column: usize) -> Result<char, ConditionError> {
        let first_unit = self.four_hex_digits()?;
        let code_point = if (0xD800..0xDC00).contains(&first_unit) {
            let low_surrogate_column = self.column;
            let low_unit = if self.peek() == Some('\\') && self.peek_second() == Some('u') {
                self.advance();
                self.advance();
                Some(self.four_hex_digits()?)
            } else {
                None
            };
            match low_unit {
                Some(low_unit) if (0xDC00..0xE000).contains(&low_unit) => {
                    0x10000 + ((first_unit - 0xD800) << 10) + (low_unit - 0xDC00)
                }
                _ => {
                    return Err(self.error(
                        low_surrogate_column,
                        "expected a low surrogate escape \\uDC00-\\uDFFF after a high surrogate \
                         escape",
                    ));
                }
            }
        } else {
            first_unit
        };
        char::from_u32(code_point).ok_or_else(|| {
            self.error(
                backslash_column,
                format!(
                    "expected a Unicode scalar value in \\u escape, found the lone surrogate \
                     {code_point:04X}"
                ),
            )
        })
    }

    fn four_hex_digits(&mut self) -> Result<u32, ConditionError> {
        let mut value = 0;
        for _ in 0..4 {
            let digit_column = self.column;
            let found = self.peek();
            let Some(digit) = found.and_then(|character| character.to_digit(16)) else {
                return Err(self.error(
                    digit_column,
                    format!(
                        "expected 4 hex digits after '\\u', found {}",
                        describe_character(found)
                    ),
                ));
            };
            self.advance();
            value = value * 16 + digit;
        }
        Ok(value)
    }

    /// Consumes ASCII digits, returning whether there was at least one.
    fn digits(&mut self) -> bool {
        let mut any = false;
        while self
            .peek()
            .is_some_and(|character| character.is_ascii_digit())
        {
            self.advance();
            any = true;
        }
        any
    }

    /// Fails unless the next character is an ASCII digit, naming what it had to follow.
    fn require_digit(&self, after: &str) -> Result<(), ConditionError> {
        let found = self.peek();
        if found.is_some_and(|character| character.is_ascii_digit()) {
            return Ok(());
        }
        Err(self.error(
            self.column,
            format!(
                "expected a digit after {after}, found {}",
                describe_character(found)
            ),
        ))
    }

    /// Reads `-?digits(.digits)?([eE][+-]?digits)?`. Integers that fit stay exact (i64 or u64);
    /// everything else becomes a finite f64.
    fn number(&mut self, start_column: usize) -> Result<TokenKind<'source>, ConditionError> {
        let start_offset = self.offset;
        if self.advance_if('-') {
            self.require_digit("'-'")?;
        }
        self.digits();
        let mut is_integer = true;
        if self.advance_if('.') {
            self.require_digit("the decimal point")?;
            self.digits();
            is_integer = false;
        }
        if self.advance_if('e') || self.advance_if('E') {
            if !self.advance_if('+') {
                self.advance_if('-');
            }
            self.require_digit("the exponent marker")?;
            self.digits();
            is_integer = false;
        }
        let text = self
            .source
            .get(start_offset..self.offset)
            .unwrap_or_default();
        if let Some(next) = self
            .peek()
            .filter(|&character| is_word_continuation(character))
        {
            return Err(self.error(
                self.column,
                format!(
                    "expected an operator or delimiter after the number {text}, found '{next}'"
                ),
            ));
        }
        if is_integer {
            if let Ok(integer) = text.parse::<i64>() {
                return Ok(TokenKind::Number(Number::from(integer)));
            }
            if let Ok(integer) = text.parse::<u64>() {
                return Ok(TokenKind::Number(Number::from(integer)));
            }
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(TokenKind::Number)
            .ok_or_else(|| {
                self.error(
                    start_column,
                    format!("expected a number within the range of a 64-bit float, found {text}"),
                )
            })
    }
}
