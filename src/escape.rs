//! Escaping of text that others control — event data rendered by a template, a receiver's error
//! body, what a remote node reports — on its way to an output a human reads line by line: the
//! text-format log and the CLI's tables and trees.
//!
//! There, a newline forges a line of its own, an ESC or C1 control drives the terminal, and a
//! bidirectional override reorders what is shown. Each such character is written as a visible
//! escape instead (`\n`, `\r`, `\t`, `\u{1b}`, `\u{202e}`), so one value stays on one line and
//! shows what it holds; every other character, backslashes included, is written as it is. JSON
//! output needs none of this (its encoder escapes control characters), except where a human
//! command prints JSON to a terminal: [`json_for_terminal`].

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Whether `character` is escaped: C0 controls, DEL and C1 controls (Unicode category Cc), the
/// line and paragraph separators, and the bidirectional marks, embeddings, overrides and isolates.
#[must_use]
pub fn is_escaped(character: char) -> bool {
    character.is_control()
        || matches!(
            character,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

fn write_escape(out: &mut impl fmt::Write, character: char) -> fmt::Result {
    match character {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        other => write!(out, "\\u{{{:x}}}", u32::from(other)),
    }
}

/// A [`fmt::Write`] that passes text on to `W` with every [`is_escaped`] character escaped.
#[derive(Debug)]
pub struct EscapingWriter<W>(pub W);

impl<W: fmt::Write> fmt::Write for EscapingWriter<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some((index, character)) = rest
            .char_indices()
            .find(|(_, character)| is_escaped(*character))
        {
            self.0.write_str(&rest[..index])?;
            write_escape(&mut self.0, character)?;
            rest = &rest[index + character.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// `text` with control and bidirectional-override characters escaped; borrowed when there are
/// none (the usual case).
#[must_use]
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_escaped) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    // Writing into a String cannot fail.
    let _ = EscapingWriter(&mut escaped).write_str(text);
    Cow::Owned(escaped)
}

/// `text` as PostgreSQL can store it: a NUL character, which no `text` or `jsonb` value may hold,
/// becomes U+FFFD. Everything written to the service's tables that others control (a receiver's
/// answer in an error message) goes through this, so such an answer cannot make a dead letter or
/// a job's history unstorable — and with it stall the page that holds it.
#[must_use]
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// JSON text (as `serde_json` writes it) made safe for a terminal and still the same JSON: the
/// characters its encoder leaves raw inside strings — DEL, C1 controls, separators, bidi
/// overrides — become `\uXXXX` escapes, which decode to the same value. Raw newlines, carriage
/// returns and tabs are left alone: the encoder escapes them inside strings, so any left are
/// the layout of pretty-printed JSON.
#[must_use]
pub fn json_for_terminal(json: &str) -> Cow<'_, str> {
    let needs_escape =
        |character: char| is_escaped(character) && !matches!(character, '\n' | '\r' | '\t');
    if !json.chars().any(needs_escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for character in json.chars() {
        if needs_escape(character) {
            // Every escaped character is in the Basic Multilingual Plane: one `\uXXXX`.
            let _ = write!(out, "\\u{:04x}", u32::from(character));
        } else {
            out.push(character);
        }
    }
    Cow::Owned(out)
}

/// The field formatter of the text log format: tracing-subscriber's default layout (the message,
/// then `name=value` pairs, strings quoted), with every value written through
/// [`EscapingWriter`], so an event is always one line whatever its fields hold.
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedLogFields;

impl<'writer> FormatFields<'writer> for EscapedLogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = FieldVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldVisitor<'writer> {
    writer: Writer<'writer>,
    is_empty: bool,
    result: fmt::Result,
}

impl FieldVisitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let name = field.name();
        // Metadata of records from the `log` crate, already shown by the event formatter.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let separator = if std::mem::take(&mut self.is_empty) {
            ""
        } else {
            " "
        };
        self.result = self.writer.write_str(separator).and_then(|()| {
            if name != "message" {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.writer, "{name}=")?;
            }
            EscapingWriter(&mut self.writer).write_fmt(value)
        });
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut sources = Vec::new();
        let mut source = value.source();
        while let Some(error) = source {
            sources.push(error.to_string());
            source = error.source();
        }
        if sources.is_empty() {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(
                field,
                format_args!("{value} {}.sources=[{}]", field.name(), sources.join(", ")),
            );
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod storable_tests {
    use super::storable;

    #[test]
    fn a_nul_becomes_a_replacement_character_and_clean_text_is_borrowed() {
        assert_eq!(storable("bad\0request"), "bad\u{fffd}request");
        assert!(matches!(
            storable("fine"),
            std::borrow::Cow::Borrowed("fine")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn control_and_bidi_characters_are_escaped_and_other_text_is_borrowed() {
        assert!(matches!(
            escape_control("order 17 paid — €5, C:\\temp"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_control("a\nFAKE\r\tb\u{1b}[31mred\u{7}\u{7f}\u{9b}2J\u{202e}txt.exe\u{2028}"),
            "a\\nFAKE\\r\\tb\\u{1b}[31mred\\u{7}\\u{7f}\\u{9b}2J\\u{202e}txt.exe\\u{2028}"
        );
    }

    #[test]
    fn json_for_terminal_escapes_what_serde_json_leaves_raw_and_decodes_to_the_same_value() {
        let value = serde_json::json!({"error": "a\u{9b}b\u{7f}\u{202e}c\n\u{1b}d"});
        for text in [serde_json::to_string(&value).unwrap(), format!("{value:#}")] {
            assert!(text.contains('\u{9b}'), "serde_json leaves C1 controls raw");
            let safe = json_for_terminal(&text);
            assert!(
                !safe
                    .chars()
                    .any(|character| is_escaped(character) && character != '\n'),
                "{safe}"
            );
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
                value
            );
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_field_of_a_text_log_event_stays_on_its_line() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedLogFields)
            .with_ansi(false)
            .with_writer({
                let buffer = buffer.clone();
                move || buffer.clone()
            })
            .finish();
        let forged = "paid\nFAKE level=ERROR admin logged in";
        let error = std::io::Error::other("HTTP 500: \u{1b}[2Jboom\r\nFAKE");
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(entity_id = forged, error = %error, detail = ?forged, "order {forged}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text}");
        assert!(
            text.contains(r#"order paid\nFAKE level=ERROR admin logged in entity_id="paid\nFAKE"#),
            "{text}"
        );
        assert!(
            text.contains(r"error=HTTP 500: \u{1b}[2Jboom\r\nFAKE"),
            "{text}"
        );
    }
}
