//! The error a condition reports when it does not parse, and its two-line caret rendering.

/// How many characters of the condition [`ConditionError::caret`] shows at most.
const CARET_WINDOW_CHARACTERS: usize = 80;

/// A condition that does not parse: what was expected, what was found, and where.
///
/// `Display` gives `"<message> at column <column>"`; [`ConditionError::caret`] points at the
/// spot in the condition text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at column {column}")]
pub struct ConditionError {
    /// What was expected and what was found instead.
    pub message: String,
    /// 1-based position of the problem, counted in characters (not bytes) from the start of the
    /// condition; one past the last character when the problem is the end of input.
    pub column: usize,
    /// The part of the condition shown by [`ConditionError::caret`], control characters blanked.
    shown_text: String,
    /// The column of the first character of `shown_text`.
    shown_text_first_column: usize,
}

impl ConditionError {
    /// An error at `column` of `source`. Keeps only a window of at most 80 characters of the
    /// source (not the whole of it), so a huge rejected condition does not make a huge error.
    pub(super) fn new(source: &str, column: usize, message: impl Into<String>) -> ConditionError {
        let source_fits_whole = source.chars().nth(CARET_WINDOW_CHARACTERS).is_none();
        let shown_text_first_column = if source_fits_whole {
            1
        } else {
            column.saturating_sub(CARET_WINDOW_CHARACTERS / 2).max(1)
        };
        let shown_text = source
            .chars()
            .skip(shown_text_first_column - 1)
            .take(CARET_WINDOW_CHARACTERS)
            .map(|character| {
                if character.is_control() {
                    ' '
                } else {
                    character
                }
            })
            .collect();
        ConditionError {
            message: message.into(),
            column,
            shown_text,
            shown_text_first_column,
        }
    }

    /// Two lines: the condition (or a window of at most 80 characters around the column, for a
    /// long condition) and a `^` under the column. Newlines and tabs in the condition are shown
    /// as spaces so the caret stays aligned.
    ///
    /// ```text
    /// data.total > && true
    ///              ^
    /// ```
    #[must_use]
    pub fn caret(&self) -> String {
        let padding = self.column.saturating_sub(self.shown_text_first_column);
        format!("{}\n{}^", self.shown_text, " ".repeat(padding))
    }
}
