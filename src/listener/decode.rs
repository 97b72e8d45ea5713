//! Turning a change-log row (its `row_to_json` text) into an [`EntityEvent`], or saying exactly
//! what is wrong with it. Pure: no I/O.
//!
//! Rows are read as JSON text so that FraiseQL tables whose columns have other types (a `uuid`
//! `object_id`, a `uuid` `tenant_id`) decode the same way, and so that a row that does not
//! decode can be kept in the dead-letter queue. The listener's path ([`decode_row_text`]) reads
//! the columns in place from the text and builds values only for the images and
//! `updated_fields`; a row it cannot take is parsed whole and explained by the parsed-row path
//! ([`decode_row_owned`]), so both accept the same rows and say the same about the others.
//!
//! Whoever can write a tracked table can put any JSON in it, so a row is bounded before it is
//! parsed ([`parse_row_text`]): larger than the row limit (the page statement then sends only an
//! excerpt) or nested deeper than [`MAX_ROW_DEPTH`], it is refused with its size or depth named,
//! and its dead letter carries an excerpt instead of the row. The depth bound leaves room under
//! the JSON parser's own recursion limit (128) for the levels an event adds around the images
//! (`changes.<field>.new`, a dead letter's or a job's envelope), so every event that is accepted
//! can be stored, listed and run again.

use chrono::{DateTime, Utc};
use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::{Actor, EntityEvent, EventKind, FieldChanges};

/// Why a row could not become an event; `column` names the culprit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("change-log row {position}: column {column}: {problem}")]
pub struct MalformedRow {
    pub position: i64,
    pub column: &'static str,
    pub problem: String,
}

/// How deep a change-log row (as JSON, the row itself being one level) may nest.
pub const MAX_ROW_DEPTH: usize = 64;

/// Default bound of one change-log row, in bytes of its JSON text (`--max-row-bytes`).
pub const DEFAULT_MAX_ROW_BYTES: u32 = 8 * 1024 * 1024;

/// Longest entity type or entity id accepted, in characters: they are keys of indexes (a job's
/// ordering key, the dead letters' entity type), which cannot hold values of a few kilobytes.
pub const MAX_IDENTITY_CHARS: usize = 512;

/// Characters of a refused row kept in its dead letter.
pub const ROW_EXCERPT_CHARS: usize = 16 * 1024;

/// Whether the JSON `text` nests deeper than `limit` levels of objects and arrays. A single pass
/// over the bytes that stops at the first level past the limit; brackets inside strings do not
/// count.
#[must_use]
pub fn nests_deeper_than(text: &str, limit: usize) -> bool {
    let mut depth = 0_usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in text.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// At most [`ROW_EXCERPT_CHARS`] characters of `text`, cut on a character boundary.
#[must_use]
pub fn excerpt(text: &str) -> &str {
    match text.char_indices().nth(ROW_EXCERPT_CHARS) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

/// Parses a change-log row's JSON text after checking its bounds: `size` is the row's length in
/// bytes as the database measured it (`text` is only an excerpt when that is over `max_bytes`).
///
/// # Errors
/// The row is over `max_bytes`, nests deeper than [`MAX_ROW_DEPTH`], or is not JSON; the error
/// names the row's position and the bound.
pub fn parse_row_text(
    position: i64,
    size: u64,
    text: &str,
    max_bytes: u32,
) -> Result<Value, MalformedRow> {
    check_bounds(position, size, text, max_bytes)?;
    parse_checked(position, text)
}

fn refused_row(position: i64, problem: String) -> MalformedRow {
    MalformedRow {
        position,
        column: "(row)",
        problem,
    }
}

/// The row's size against `max_bytes` and its nesting against [`MAX_ROW_DEPTH`].
fn check_bounds(position: i64, size: u64, text: &str, max_bytes: u32) -> Result<(), MalformedRow> {
    if size > u64::from(max_bytes) {
        return Err(refused_row(
            position,
            format!(
                "the row is {size} bytes of JSON, over the limit of {max_bytes} (--max-row-bytes); \
                 its dead letter keeps the first {ROW_EXCERPT_CHARS} characters"
            ),
        ));
    }
    if nests_deeper_than(text, MAX_ROW_DEPTH) {
        return Err(refused_row(
            position,
            format!(
                "the row nests deeper than {MAX_ROW_DEPTH} levels of objects and arrays; \
                 its dead letter keeps the first {ROW_EXCERPT_CHARS} characters"
            ),
        ));
    }
    Ok(())
}

/// A row within its bounds, parsed.
fn parse_checked(position: i64, text: &str) -> Result<Value, MalformedRow> {
    serde_json::from_str(text)
        .map_err(|error| refused_row(position, format!("the row is not JSON: {error}")))
}

/// A column as the checks read it: null (or absent), a value of the parsed row, or the column's
/// JSON text borrowed from the row's text.
#[derive(Clone, Copy)]
enum Cell<'row> {
    Null,
    Parsed(&'row Value),
    Text(&'row RawValue),
}

/// Where the checks find a row's columns.
trait Columns {
    fn cell(&self, column: &'static str) -> Cell<'_>;
}

impl Columns for Map<String, Value> {
    fn cell(&self, column: &'static str) -> Cell<'_> {
        match self.get(column) {
            None | Some(Value::Null) => Cell::Null,
            Some(value) => Cell::Parsed(value),
        }
    }
}

/// The change log's columns as JSON text borrowed from the row's text (absent and `null` alike
/// `None`); other columns are skipped unread. Deserializing it allocates nothing.
#[derive(serde::Deserialize)]
struct ColumnTexts<'row> {
    #[serde(borrow, default)]
    id: Option<&'row RawValue>,
    #[serde(borrow, default)]
    object_type: Option<&'row RawValue>,
    #[serde(borrow, default)]
    object_id: Option<&'row RawValue>,
    #[serde(borrow, default)]
    modification_type: Option<&'row RawValue>,
    #[serde(borrow, default)]
    object_data: Option<&'row RawValue>,
    #[serde(borrow, default)]
    object_data_before: Option<&'row RawValue>,
    #[serde(borrow, default)]
    updated_fields: Option<&'row RawValue>,
    #[serde(borrow, default)]
    created_at: Option<&'row RawValue>,
    #[serde(borrow, default)]
    tenant_id: Option<&'row RawValue>,
    #[serde(borrow, default)]
    actor_type: Option<&'row RawValue>,
    #[serde(borrow, default)]
    actor_id: Option<&'row RawValue>,
    #[serde(borrow, default)]
    trace_id: Option<&'row RawValue>,
}

impl Columns for ColumnTexts<'_> {
    fn cell(&self, column: &'static str) -> Cell<'_> {
        let text = match column {
            "id" => self.id,
            "object_type" => self.object_type,
            "object_id" => self.object_id,
            "modification_type" => self.modification_type,
            "object_data" => self.object_data,
            "object_data_before" => self.object_data_before,
            "updated_fields" => self.updated_fields,
            "created_at" => self.created_at,
            "tenant_id" => self.tenant_id,
            "actor_type" => self.actor_type,
            "actor_id" => self.actor_id,
            "trace_id" => self.trace_id,
            _ => unreachable!("column {column} is not one of the change log's"),
        };
        text.map_or(Cell::Null, Cell::Text)
    }
}

/// What a JSON value is, as an error names it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Shape {
    fn of(value: &Value) -> Shape {
        match value {
            Value::Null => Shape::Null,
            Value::Bool(_) => Shape::Bool,
            Value::Number(_) => Shape::Number,
            Value::String(_) => Shape::String,
            Value::Array(_) => Shape::Array,
            Value::Object(_) => Shape::Object,
        }
    }

    /// The shape of valid JSON `text` (as `serde_json` captured it: no leading whitespace), read
    /// off its first byte.
    fn of_text(text: &str) -> Shape {
        match text.as_bytes().first() {
            Some(b'"') => Shape::String,
            Some(b'{') => Shape::Object,
            Some(b'[') => Shape::Array,
            Some(b't' | b'f') => Shape::Bool,
            Some(b'n') | None => Shape::Null,
            Some(_) => Shape::Number,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::Null => "null",
            Shape::Bool => "a boolean",
            Shape::Number => "a number",
            Shape::String => "a string",
            Shape::Array => "an array",
            Shape::Object => "an object",
        }
    }
}

impl Cell<'_> {
    fn shape(self) -> Shape {
        match self {
            Cell::Null => Shape::Null,
            Cell::Parsed(value) => Shape::of(value),
            Cell::Text(text) => Shape::of_text(text.get()),
        }
    }
}

/// A scalar column as text (`uuid`, `int` and `text` columns alike); `None` for null/absent.
/// Borrowed from the row when it can be.
fn text<'row>(
    row: &'row impl Columns,
    column: &'static str,
    position: i64,
) -> Result<Option<Cow<'row, str>>, MalformedRow> {
    let cell = row.cell(column);
    let not_scalar = |shape: Shape| MalformedRow {
        position,
        column,
        problem: format!("expected a scalar, found {}", shape.describe()),
    };
    match cell {
        Cell::Null => Ok(None),
        Cell::Parsed(value) => match value {
            Value::Null => Ok(None),
            Value::String(text) => Ok(Some(Cow::Borrowed(text.as_str()))),
            Value::Number(number) => Ok(Some(Cow::Owned(number.to_string()))),
            Value::Bool(flag) => Ok(Some(Cow::Owned(flag.to_string()))),
            other => Err(not_scalar(Shape::of(other))),
        },
        Cell::Text(raw) => {
            let json = raw.get();
            let unreadable = |error: serde_json::Error| MalformedRow {
                position,
                column,
                problem: format!("unreadable value ({error})"),
            };
            match Shape::of_text(json) {
                Shape::Null => Ok(None),
                // Borrowed unless the string has escapes.
                Shape::String => match serde_json::from_str::<&str>(json) {
                    Ok(text) => Ok(Some(Cow::Borrowed(text))),
                    Err(_) => serde_json::from_str::<String>(json)
                        .map(|text| Some(Cow::Owned(text)))
                        .map_err(unreadable),
                },
                Shape::Number => serde_json::from_str::<serde_json::Number>(json)
                    .map(|number| Some(Cow::Owned(number.to_string())))
                    .map_err(unreadable),
                Shape::Bool => Ok(Some(Cow::Owned(json.to_owned()))),
                shape @ (Shape::Array | Shape::Object) => Err(not_scalar(shape)),
            }
        }
    }
}

fn required_text<'row>(
    row: &'row impl Columns,
    column: &'static str,
    position: i64,
) -> Result<Cow<'row, str>, MalformedRow> {
    match text(row, column, position)? {
        Some(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(MalformedRow {
            position,
            column,
            problem: "expected a value, found null or empty".into(),
        }),
    }
}

/// An identity column (entity type or id): a value of at most [`MAX_IDENTITY_CHARS`].
fn identity_text(
    row: &impl Columns,
    column: &'static str,
    position: i64,
) -> Result<String, MalformedRow> {
    let value = required_text(row, column, position)?;
    let length = value.chars().count();
    if length > MAX_IDENTITY_CHARS {
        return Err(MalformedRow {
            position,
            column,
            problem: format!("{length} characters, over the limit of {MAX_IDENTITY_CHARS}"),
        });
    }
    Ok(value.into_owned())
}

/// Whether a row image column holds an object (`false`: null or absent); an error for anything else.
fn image_present(
    row: &impl Columns,
    column: &'static str,
    position: i64,
) -> Result<bool, MalformedRow> {
    match row.cell(column).shape() {
        Shape::Null => Ok(false),
        Shape::Object => Ok(true),
        other => Err(MalformedRow {
            position,
            column,
            problem: format!(
                "expected a JSON object (the row image), found {}",
                other.describe()
            ),
        }),
    }
}

/// A checked row image: its object, or `None` for null.
fn image_of(value: Option<Value>) -> Option<Value> {
    value.filter(Value::is_object)
}

/// `updated_fields`: `None` for null, else its field names; an error for anything but an array
/// of strings.
fn updated_fields(row: &impl Columns, position: i64) -> Result<Option<Vec<String>>, MalformedRow> {
    let column = "updated_fields";
    let names = |items: &[Value]| {
        items
            .iter()
            .map(|item| match item {
                Value::String(field) => Ok(field.clone()),
                other => Err(MalformedRow {
                    position,
                    column,
                    problem: format!(
                        "expected field names, found {}",
                        Shape::of(other).describe()
                    ),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let cell = row.cell(column);
    match (cell, cell.shape()) {
        (_, Shape::Null) => Ok(None),
        (Cell::Parsed(Value::Array(items)), _) => names(items).map(Some),
        (Cell::Text(raw), Shape::Array) => match serde_json::from_str::<Vec<String>>(raw.get()) {
            Ok(fields) => Ok(Some(fields)),
            // Not all strings: the parsed items say which is not.
            Err(_) => match serde_json::from_str::<Vec<Value>>(raw.get()) {
                Ok(items) => names(&items).map(Some),
                Err(error) => Err(MalformedRow {
                    position,
                    column,
                    problem: format!("unreadable value ({error})"),
                }),
            },
        },
        (_, other) => Err(MalformedRow {
            position,
            column,
            problem: format!(
                "expected an array of field names, found {}",
                other.describe()
            ),
        }),
    }
}

/// Everything of a row but its images, checked: building the event from it cannot fail.
struct CheckedRow {
    id: Uuid,
    kind: EventKind,
    entity_type: String,
    entity_id: String,
    updated_fields: Option<Vec<String>>,
    timestamp: DateTime<Utc>,
    tenant_id: Option<String>,
    actor: Option<Actor>,
    trace_id: Option<String>,
}

fn not_an_object(position: i64, row: &Value) -> MalformedRow {
    MalformedRow {
        position,
        column: "(row)",
        problem: format!("expected a row object, found {}", Shape::of(row).describe()),
    }
}

/// Checks every column of the contract, images included (by reference, nothing copied).
fn check_row(position: i64, row: &impl Columns) -> Result<CheckedRow, MalformedRow> {
    let id_text = required_text(row, "id", position)?;
    let id = Uuid::parse_str(&id_text).map_err(|error| MalformedRow {
        position,
        column: "id",
        problem: format!("expected a UUID, found {id_text:?} ({error})"),
    })?;
    let entity_type = identity_text(row, "object_type", position)?;
    let entity_id = identity_text(row, "object_id", position)?;
    let kind_text = required_text(row, "modification_type", position)?;
    let kind = EventKind::parse(kind_text.trim()).map_err(|found| MalformedRow {
        position,
        column: "modification_type",
        problem: format!("expected INSERT, UPDATE, DELETE or CUSTOM, found {found:?}"),
    })?;
    let after = image_present(row, "object_data", position)?;
    let before = image_present(row, "object_data_before", position)?;
    if !after && !before && kind != EventKind::Custom {
        return Err(MalformedRow {
            position,
            column: "object_data",
            problem: format!("a {kind} row needs object_data or object_data_before, both are null"),
        });
    }
    let updated_fields = updated_fields(row, position)?;
    let timestamp = match text(row, "created_at", position)? {
        None => Utc::now(),
        Some(moment) => DateTime::parse_from_rfc3339(&moment)
            .map(|moment| moment.with_timezone(&Utc))
            .map_err(|error| MalformedRow {
                position,
                column: "created_at",
                problem: format!("expected a timestamp, found {moment:?} ({error})"),
            })?,
    };
    let owned = |column| text(row, column, position).map(|value| value.map(Cow::into_owned));
    let actor_kind = owned("actor_type")?;
    let actor_id = owned("actor_id")?;
    Ok(CheckedRow {
        id,
        kind,
        entity_type,
        entity_id,
        updated_fields,
        timestamp,
        tenant_id: owned("tenant_id")?,
        actor: (actor_kind.is_some() || actor_id.is_some()).then_some(Actor {
            kind: actor_kind,
            id: actor_id,
        }),
        trace_id: owned("trace_id")?,
    })
}

impl CheckedRow {
    fn event(self, position: i64, after: Option<Value>, before: Option<Value>) -> EntityEvent {
        let data = after.unwrap_or(Value::Null);
        let changes = FieldChanges::derive(
            self.kind,
            before.as_ref(),
            &data,
            self.updated_fields.as_deref(),
        );
        EntityEvent {
            id: self.id,
            kind: self.kind,
            entity_type: self.entity_type,
            entity_id: self.entity_id,
            data,
            before,
            changes,
            tenant_id: self.tenant_id,
            actor: self.actor,
            timestamp: self.timestamp,
            position: Some(position),
            trace_id: self.trace_id,
            replay: None,
        }
    }
}

/// Decodes one change-log row.
///
/// # Errors
/// The first column that does not fit the change-log contract.
pub fn decode_row(position: i64, row: &Value) -> Result<EntityEvent, MalformedRow> {
    let object = row
        .as_object()
        .ok_or_else(|| not_an_object(position, row))?;
    let checked = check_row(position, object)?;
    Ok(checked.event(
        position,
        image_of(object.get("object_data").cloned()),
        image_of(object.get("object_data_before").cloned()),
    ))
}

/// [`decode_row`] taking the parsed row: its images move into the event instead of being copied
/// (the listener's path). A refused row comes back unchanged with the problem, for its dead
/// letter.
///
/// # Errors
/// The first column that does not fit the change-log contract, with the row.
pub fn decode_row_owned(position: i64, row: Value) -> Result<EntityEvent, (Value, MalformedRow)> {
    let Value::Object(mut object) = row else {
        let problem = not_an_object(position, &row);
        return Err((row, problem));
    };
    match check_row(position, &object) {
        Ok(checked) => Ok(checked.event(
            position,
            image_of(object.remove("object_data")),
            image_of(object.remove("object_data_before")),
        )),
        Err(problem) => Err((Value::Object(object), problem)),
    }
}

/// Decodes a change-log row from its JSON text after checking its bounds (as
/// [`parse_row_text`]): the listener's path. The columns are read straight from the text — only
/// the images and `updated_fields` are built as values, the rest is borrowed or parsed in place —
/// so a row costs no parse tree of its own. A row that does not decode is parsed whole, and the
/// error and the row are [`decode_row_owned`]'s: the two paths accept the same rows and build the
/// same events.
///
/// # Errors
/// The row is over its bounds or not JSON (no row: the dead letter keeps an excerpt), or the
/// first column that does not fit the change-log contract (with the parsed row).
pub fn decode_row_text(
    position: i64,
    size: u64,
    text: &str,
    max_bytes: u32,
) -> Result<EntityEvent, (Option<Value>, MalformedRow)> {
    check_bounds(position, size, text, max_bytes).map_err(|problem| (None, problem))?;
    if let Some(event) = decode_columns(position, text) {
        return Ok(event);
    }
    let row = parse_checked(position, text).map_err(|problem| (None, problem))?;
    decode_row_owned(position, row).map_err(|(row, problem)| (Some(row), problem))
}

/// The event of a row whose text reads as the change log's columns and fits the contract;
/// `None` for anything else (left to the parsed row's path to explain).
fn decode_columns(position: i64, text: &str) -> Option<EntityEvent> {
    let columns: ColumnTexts<'_> = serde_json::from_str(text).ok()?;
    let checked = check_row(position, &columns).ok()?;
    let image = |raw: Option<&RawValue>| -> Option<Option<Value>> {
        match raw {
            Some(raw) if Shape::of_text(raw.get()) == Shape::Object => {
                serde_json::from_str(raw.get()).ok().map(Some)
            }
            _ => Some(None),
        }
    };
    let after = image(columns.object_data)?;
    let before = image(columns.object_data_before)?;
    Some(checked.event(position, after, before))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row() -> Value {
        json!({
            "pk_entity_change_log": 7, "id": "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11",
            "created_at": "2026-11-27T21:00:00.123456+00:00", "tenant_id": 5,
            "object_type": "Order", "object_id": "42", "modification_type": "update",
            "object_data": {"id": 42, "status": "paid"}, "object_data_before": {"id": 42, "status": "new"},
            "updated_fields": ["status"], "actor_type": "user", "actor_id": null, "trace_id": "t-1"
        })
    }

    #[test]
    fn the_owned_decode_moves_the_images_and_gives_a_refused_row_back_whole() {
        let borrowed = decode_row(7, &row()).unwrap();
        let owned = decode_row_owned(7, row()).unwrap();
        assert_eq!(
            serde_json::to_value(&owned).unwrap(),
            serde_json::to_value(&borrowed).unwrap()
        );
        let mut refused = row();
        refused["created_at"] = json!("yesterday");
        let (back, problem) = decode_row_owned(7, refused.clone()).unwrap_err();
        assert_eq!(back, refused, "the row comes back as it was read");
        assert_eq!(problem.column, "created_at");
        let (back, problem) = decode_row_owned(7, json!([1, 2])).unwrap_err();
        assert_eq!(back, json!([1, 2]));
        assert_eq!(problem.column, "(row)");
    }

    /// `decode_row_text` against the parsed-row path on `text`: the same event, or the same
    /// error with the same row.
    fn both_paths_agree(text: &str) {
        let size = text.len() as u64;
        let from_text = decode_row_text(3, size, text, 1 << 20);
        let from_value = parse_row_text(3, size, text, 1 << 20)
            .map_err(|problem| (None, problem))
            .and_then(|row| {
                decode_row_owned(3, row).map_err(|(row, problem)| (Some(row), problem))
            });
        match (from_text, from_value) {
            (Ok(mut event), Ok(expected)) => {
                let stamped =
                    serde_json::from_str::<Value>(text).unwrap()["created_at"] != Value::Null;
                if !stamped {
                    // Both stamp the event with their own reading of the clock.
                    let apart = (event.timestamp - expected.timestamp).abs();
                    assert!(apart < chrono::TimeDelta::seconds(5), "{text}");
                    event.timestamp = expected.timestamp;
                }
                assert_eq!(
                    serde_json::to_value(&event).unwrap(),
                    serde_json::to_value(&expected).unwrap(),
                    "{text}"
                );
            }
            (Err(error), Err(expected)) => assert_eq!(error, expected, "{text}"),
            (got, expected) => panic!("{text}: {got:?} against {expected:?}"),
        }
    }

    #[test]
    fn the_text_path_accepts_and_refuses_what_the_parsed_path_does() {
        let values = [
            json!(null),
            json!(true),
            json!(0),
            json!(-12.5e3),
            json!(18_446_744_073_709_551_615_u64),
            json!(""),
            json!("  "),
            json!("Order"),
            json!("with \"escapes\", \u{e9} and \u{1}"),
            json!("INSERT"),
            json!("delete"),
            json!("custom"),
            json!("0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11"),
            json!("2026-11-27T21:00:00Z"),
            json!([]),
            json!(["status", "total"]),
            json!(["status", 1]),
            json!({}),
            json!({"id": 1, "nested": {"list": [1, "two", null]}}),
            json!("x".repeat(MAX_IDENTITY_CHARS + 1)),
        ];
        let columns = [
            "id",
            "object_type",
            "object_id",
            "modification_type",
            "object_data",
            "object_data_before",
            "updated_fields",
            "created_at",
            "tenant_id",
            "actor_type",
            "actor_id",
            "trace_id",
            "extra_metadata",
        ];
        let mut cases = 0;
        for column in columns {
            for value in &values {
                let mut row = row();
                row[column] = value.clone();
                both_paths_agree(&row.to_string());
                row.as_object_mut().unwrap().remove(column);
                both_paths_agree(&row.to_string());
                cases += 2;
            }
        }
        assert_eq!(cases, 2 * columns.len() * values.len());
        // Whitespace as PostgreSQL's `row_to_json` and `to_jsonb` print it, and odd shapes.
        for text in [
            serde_json::to_string_pretty(&row()).unwrap(),
            row().to_string().replace(':', ": ").replace(',', " , "),
            r#"{"id": "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11", "id": "x"}"#.to_owned(),
            r#"{"object_type": "A", "object_type": "B", "object_id": 1, "modification_type": "INSERT", "object_data": {}, "id": "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11"}"#.to_owned(),
            r#"{"obj\u0065ct_type": "Order", "object_id": 1, "modification_type": "INSERT", "object_data": {"a": 1}, "id": "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11"}"#.to_owned(),
            "[1, 2]".to_owned(),
            "\"row\"".to_owned(),
            "{\"id\": ".to_owned(),
            "not json".to_owned(),
        ] {
            both_paths_agree(&text);
        }
    }

    #[test]
    fn the_text_path_keeps_the_bounds() {
        let deep = format!(r#"{{"object_data": {}}}"#, nested(200));
        let (row, error) = decode_row_text(9, deep.len() as u64, &deep, 1 << 20).unwrap_err();
        assert!(row.is_none(), "a row over its bounds is not kept");
        assert!(error.problem.contains("deeper than 64 levels"), "{error}");
        let (row, error) = decode_row_text(9, 50 << 20, "{\"id\": 1", 8 << 20).unwrap_err();
        assert!(row.is_none());
        assert!(error.problem.contains("52428800 bytes"), "{error}");
    }

    #[test]
    fn a_contract_row_decodes() {
        let event = decode_row(7, &row()).unwrap();
        assert_eq!(event.kind, EventKind::Update);
        assert_eq!(event.entity_type, "Order");
        assert_eq!(event.entity_id, "42");
        assert_eq!(event.tenant_id.as_deref(), Some("5"));
        assert_eq!(event.position, Some(7));
        assert_eq!(event.changes["status"].new, json!("paid"));
        assert_eq!(event.actor.unwrap().kind.as_deref(), Some("user"));
        assert_eq!(
            event.timestamp.to_rfc3339(),
            "2026-11-27T21:00:00.123456+00:00"
        );
    }

    #[test]
    fn each_contract_violation_names_its_column() {
        let cases: [(&str, Value, &str, &str); 7] = [
            (
                "modification_type",
                json!("UPSERT"),
                "modification_type",
                "found \"UPSERT\"",
            ),
            (
                "object_data",
                json!([1, 2]),
                "object_data",
                "found an array",
            ),
            (
                "object_data_before",
                json!("text"),
                "object_data_before",
                "found a string",
            ),
            ("object_id", Value::Null, "object_id", "found null"),
            ("id", json!("not-a-uuid"), "id", "expected a UUID"),
            (
                "updated_fields",
                json!([1]),
                "updated_fields",
                "found a number",
            ),
            (
                "created_at",
                json!("yesterday"),
                "created_at",
                "expected a timestamp",
            ),
        ];
        for (column, value, expected_column, expected_problem) in cases {
            let mut broken = row();
            broken[column] = value;
            let error = decode_row(7, &broken).unwrap_err();
            assert_eq!(error.column, expected_column, "{error}");
            assert!(error.problem.contains(expected_problem), "{error}");
            assert!(
                error.to_string().starts_with("change-log row 7: column"),
                "{error}"
            );
        }
    }

    /// `{"a":{"a":…{"a":1}…}}` nested `depth` objects deep.
    fn nested(depth: usize) -> String {
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert!(!nests_deeper_than(&nested(64), 64));
        assert!(nests_deeper_than(&nested(65), 64));
        assert!(nests_deeper_than("[[[1]]]", 2));
        assert!(!nests_deeper_than(r#"{"a":"[[[[{{{{\"]]]"}"#, 1));
        assert!(!nests_deeper_than(r#"[{}, {}, [], {"x": [1]}]"#, 3));
    }

    #[test]
    fn rows_over_the_size_or_depth_bound_are_refused_with_the_bound_named() {
        let deep = format!(r#"{{"object_data": {}}}"#, nested(200));
        let error = parse_row_text(9, deep.len() as u64, &deep, 1 << 20).unwrap_err();
        assert_eq!(error.column, "(row)");
        assert!(error.problem.contains("deeper than 64 levels"), "{error}");
        assert!(
            error.to_string().starts_with("change-log row 9:"),
            "{error}"
        );

        let error = parse_row_text(9, 50 << 20, "{\"id\": 1", 8 << 20).unwrap_err();
        assert!(
            error.problem.contains("52428800 bytes") && error.problem.contains("8388608"),
            "{error}"
        );

        let within = format!(r#"{{"object_data": {}}}"#, nested(63));
        assert!(parse_row_text(9, within.len() as u64, &within, 1 << 20).is_ok());
    }

    #[test]
    fn an_excerpt_is_cut_on_a_character_boundary() {
        let text = "é".repeat(ROW_EXCERPT_CHARS + 10);
        assert_eq!(excerpt(&text).chars().count(), ROW_EXCERPT_CHARS);
        assert_eq!(excerpt("short"), "short");
    }

    #[test]
    fn a_row_with_no_image_at_all_is_malformed_unless_custom() {
        let mut broken = row();
        broken["object_data"] = Value::Null;
        broken["object_data_before"] = Value::Null;
        assert_eq!(decode_row(1, &broken).unwrap_err().column, "object_data");
        broken["modification_type"] = json!("CUSTOM");
        assert_eq!(decode_row(1, &broken).unwrap().kind, EventKind::Custom);
    }
}
