//! Turning a change-log row (its `row_to_json` text) into an [`EntityEvent`], or saying exactly
//! what is wrong with it. Pure: no I/O.
//!
//! Rows are read as JSON text so that FraiseQL tables whose columns have other types (a `uuid`
//! `object_id`, a `uuid` `tenant_id`) decode the same way, and so that a row that does not
//! decode can be kept in the dead-letter queue.
//!
//! Whoever can write a tracked table can put any JSON in it, so a row is bounded before it is
//! parsed ([`parse_row_text`]): larger than the row limit (the page statement then sends only an
//! excerpt) or nested deeper than [`MAX_ROW_DEPTH`], it is refused with its size or depth named,
//! and its dead letter carries an excerpt instead of the row. The depth bound leaves room under
//! the JSON parser's own recursion limit (128) for the levels an event adds around the images
//! (`changes.<field>.new`, a dead letter's or a job's envelope), so every event that is accepted
//! can be stored, listed and run again.

use chrono::{DateTime, Utc};
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
    let refused = |problem: String| MalformedRow {
        position,
        column: "(row)",
        problem,
    };
    if size > u64::from(max_bytes) {
        return Err(refused(format!(
            "the row is {size} bytes of JSON, over the limit of {max_bytes} (--max-row-bytes); \
             its dead letter keeps the first {ROW_EXCERPT_CHARS} characters"
        )));
    }
    if nests_deeper_than(text, MAX_ROW_DEPTH) {
        return Err(refused(format!(
            "the row nests deeper than {MAX_ROW_DEPTH} levels of objects and arrays; \
             its dead letter keeps the first {ROW_EXCERPT_CHARS} characters"
        )));
    }
    serde_json::from_str(text).map_err(|error| refused(format!("the row is not JSON: {error}")))
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A scalar column as text (`uuid`, `int` and `text` columns alike); `None` for null/absent.
fn text(
    row: &Map<String, Value>,
    column: &'static str,
    position: i64,
) -> Result<Option<String>, MalformedRow> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(Value::Bool(flag)) => Ok(Some(flag.to_string())),
        Some(other) => Err(MalformedRow {
            position,
            column,
            problem: format!("expected a scalar, found {}", describe(other)),
        }),
    }
}

fn required_text(
    row: &Map<String, Value>,
    column: &'static str,
    position: i64,
) -> Result<String, MalformedRow> {
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
    row: &Map<String, Value>,
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
    Ok(value)
}

/// Whether a row image column holds an object (`false`: null or absent); an error for anything else.
fn image_present(
    row: &Map<String, Value>,
    column: &'static str,
    position: i64,
) -> Result<bool, MalformedRow> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(_)) => Ok(true),
        Some(other) => Err(MalformedRow {
            position,
            column,
            problem: format!(
                "expected a JSON object (the row image), found {}",
                describe(other)
            ),
        }),
    }
}

/// A checked row image: its object, or `None` for null.
fn image_of(value: Option<Value>) -> Option<Value> {
    value.filter(Value::is_object)
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
        problem: format!("expected a row object, found {}", describe(row)),
    }
}

/// Checks every column of the contract, images included (by reference, nothing copied).
fn check_row(position: i64, row: &Map<String, Value>) -> Result<CheckedRow, MalformedRow> {
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
    let updated_fields = match row.get("updated_fields") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|item| match item {
                    Value::String(field) => Ok(field.clone()),
                    other => Err(MalformedRow {
                        position,
                        column: "updated_fields",
                        problem: format!("expected field names, found {}", describe(other)),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            return Err(MalformedRow {
                position,
                column: "updated_fields",
                problem: format!(
                    "expected an array of field names, found {}",
                    describe(other)
                ),
            });
        }
    };
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
    let actor_kind = text(row, "actor_type", position)?;
    let actor_id = text(row, "actor_id", position)?;
    Ok(CheckedRow {
        id,
        kind,
        entity_type,
        entity_id,
        updated_fields,
        timestamp,
        tenant_id: text(row, "tenant_id", position)?,
        actor: (actor_kind.is_some() || actor_id.is_some()).then_some(Actor {
            kind: actor_kind,
            id: actor_id,
        }),
        trace_id: text(row, "trace_id", position)?,
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
