//! Evaluation of a compiled condition against one event.
//!
//! Works on borrowed views of the event and of the condition's literals: nothing is cloned and,
//! apart from comparing two arrays or objects, nothing is allocated. Recursion follows the
//! expression tree only (bounded by the parser); walking paths and comparing nested JSON use
//! loops and an explicit work list, so deeply nested event data cannot exhaust the stack.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};

use super::expression::{ComparisonOperator, Expression, Path, PathRoot, Segment};
use crate::domain::{EntityEvent, FieldChange};

/// A value an operand evaluates to, borrowed from the event or the condition.
#[derive(Clone, Copy, Debug)]
enum Operand<'borrowed> {
    /// JSON null, and everything that does not resolve.
    Null,
    Boolean(bool),
    Number(&'borrowed Number),
    Text(&'borrowed str),
    Array(&'borrowed [Value]),
    Object(&'borrowed Map<String, Value>),
    /// `changes`: the whole field → old/new map.
    ChangeSet(&'borrowed BTreeMap<String, FieldChange>),
    /// `changes.<field>`: behaves like the object `{"old": …, "new": …}`.
    FieldChange(&'borrowed FieldChange),
}

impl<'borrowed> Operand<'borrowed> {
    fn from_json(value: &'borrowed Value) -> Operand<'borrowed> {
        match value {
            Value::Null => Operand::Null,
            Value::Bool(boolean) => Operand::Boolean(*boolean),
            Value::Number(number) => Operand::Number(number),
            Value::String(text) => Operand::Text(text),
            Value::Array(items) => Operand::Array(items),
            Value::Object(fields) => Operand::Object(fields),
        }
    }

    fn from_text(text: Option<&'borrowed str>) -> Operand<'borrowed> {
        text.map_or(Operand::Null, Operand::Text)
    }
}

/// Whether `expression` holds for `event`.
pub(super) fn is_satisfied(expression: &Expression, event: &EntityEvent) -> bool {
    match expression {
        Expression::AnyOf(alternatives) => alternatives
            .iter()
            .any(|alternative| is_satisfied(alternative, event)),
        Expression::AllOf(requirements) => requirements
            .iter()
            .all(|requirement| is_satisfied(requirement, event)),
        Expression::Not(negated) => !is_satisfied(negated, event),
        Expression::Compare {
            operator,
            left,
            right,
        } => compare(
            *operator,
            operand_value(left, event),
            operand_value(right, event),
        ),
        Expression::In {
            element,
            collection,
            negated,
        } => {
            is_member(
                operand_value(element, event),
                operand_value(collection, event),
            ) != *negated
        }
        Expression::Contains { container, item } => {
            contains(operand_value(container, event), operand_value(item, event))
        }
        Expression::Literal(value) => matches!(value, Value::Bool(true)),
        Expression::Path(path) => matches!(resolve_path(path, event), Operand::Boolean(true)),
        Expression::HasField(segments) => data_has_field(&event.data, segments),
        Expression::FieldChanged(field) => event.changes.contains_key(&**field),
        Expression::FieldChangedTo { field, value } => event
            .changes
            .get(&**field)
            .is_some_and(|change| json_equal(&change.new, value)),
        Expression::FieldChangedFrom { field, value } => event
            .changes
            .get(&**field)
            .is_some_and(|change| json_equal(&change.old, value)),
    }
}

/// The value of `expression` used as an operand: literals and paths as themselves, every other
/// expression as the boolean it evaluates to.
fn operand_value<'borrowed>(
    expression: &'borrowed Expression,
    event: &'borrowed EntityEvent,
) -> Operand<'borrowed> {
    match expression {
        Expression::Literal(value) => Operand::from_json(value),
        Expression::Path(path) => resolve_path(path, event),
        other => Operand::Boolean(is_satisfied(other, event)),
    }
}

fn resolve_path<'borrowed>(
    path: &'borrowed Path,
    event: &'borrowed EntityEvent,
) -> Operand<'borrowed> {
    match path.root {
        PathRoot::Data => {
            walk(&event.data, &path.segments).map_or(Operand::Null, Operand::from_json)
        }
        PathRoot::Before => event
            .before
            .as_ref()
            .and_then(|before| walk(before, &path.segments))
            .map_or(Operand::Null, Operand::from_json),
        PathRoot::Changes => resolve_changes(&event.changes, &path.segments),
        PathRoot::EventType => Operand::Text(event.kind.as_str()),
        PathRoot::EntityType => Operand::Text(&event.entity_type),
        PathRoot::EntityId => Operand::Text(&event.entity_id),
        PathRoot::TenantId => Operand::from_text(event.tenant_id.as_deref()),
        PathRoot::ActorType => {
            Operand::from_text(event.actor.as_ref().and_then(|actor| actor.kind.as_deref()))
        }
        PathRoot::ActorId => {
            Operand::from_text(event.actor.as_ref().and_then(|actor| actor.id.as_deref()))
        }
    }
}

/// `changes`, `changes.<field>`, `changes.<field>.old|new` and deeper into the old/new value.
fn resolve_changes<'borrowed>(
    changes: &'borrowed BTreeMap<String, FieldChange>,
    segments: &'borrowed [Segment],
) -> Operand<'borrowed> {
    let Some((field, after_field)) = segments.split_first() else {
        return Operand::ChangeSet(changes);
    };
    let Some(change) = changes.get(&*field.key) else {
        return Operand::Null;
    };
    let Some((side, inside_value)) = after_field.split_first() else {
        return Operand::FieldChange(change);
    };
    let value = match &*side.key {
        "old" => &change.old,
        "new" => &change.new,
        _ => return Operand::Null,
    };
    walk(value, inside_value).map_or(Operand::Null, Operand::from_json)
}

/// One step into an object (by key) or an array (by index).
fn step<'value>(value: &'value Value, segment: &Segment) -> Option<&'value Value> {
    match value {
        Value::Object(fields) => fields.get(&*segment.key),
        Value::Array(items) => items.get(segment.index?),
        _ => None,
    }
}

/// Follows `segments` from `value`; `None` when a step does not resolve.
fn walk<'value>(value: &'value Value, segments: &[Segment]) -> Option<&'value Value> {
    segments
        .iter()
        .try_fold(value, |current, segment| step(current, segment))
}

/// `has_field`: the last segment exists (possibly null) in the object or array the others lead to.
fn data_has_field(data: &Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    match walk(data, parents) {
        Some(Value::Object(fields)) => fields.contains_key(&*last.key),
        Some(Value::Array(items)) => last.index.is_some_and(|index| index < items.len()),
        _ => false,
    }
}

fn compare(operator: ComparisonOperator, left: Operand<'_>, right: Operand<'_>) -> bool {
    match operator {
        ComparisonOperator::Equal => operands_equal(left, right),
        ComparisonOperator::NotEqual => !operands_equal(left, right),
        ComparisonOperator::Greater => order(left, right).is_some_and(Ordering::is_gt),
        ComparisonOperator::GreaterOrEqual => order(left, right).is_some_and(Ordering::is_ge),
        ComparisonOperator::Less => order(left, right).is_some_and(Ordering::is_lt),
        ComparisonOperator::LessOrEqual => order(left, right).is_some_and(Ordering::is_le),
    }
}

/// The order of two numbers or two strings; `None` for any other pair.
fn order(left: Operand<'_>, right: Operand<'_>) -> Option<Ordering> {
    match (left, right) {
        (Operand::Number(left), Operand::Number(right)) => compare_numbers(left, right),
        (Operand::Text(left), Operand::Text(right)) => Some(left.cmp(right)),
        _ => None,
    }
}

/// The integer value of `number` when it is stored as an integer.
fn exact_integer(number: &Number) -> Option<i128> {
    if let Some(integer) = number.as_i64() {
        return Some(i128::from(integer));
    }
    number.as_u64().map(i128::from)
}

/// Compares numerically: integers exactly, an integer against a float without rounding the
/// integer when the float is integral, floats as floats.
fn compare_numbers(left: &Number, right: &Number) -> Option<Ordering> {
    match (exact_integer(left), exact_integer(right)) {
        (Some(left), Some(right)) => Some(left.cmp(&right)),
        (Some(left), None) => compare_integer_with_float(left, right.as_f64()?),
        (None, Some(right)) => {
            compare_integer_with_float(right, left.as_f64()?).map(Ordering::reverse)
        }
        (None, None) => left.as_f64()?.partial_cmp(&right.as_f64()?),
    }
}

/// An integer (from an i64 or u64) against a finite float.
fn compare_integer_with_float(integer: i128, float: f64) -> Option<Ordering> {
    // Integral floats within ±1e38 fit i128, so they compare exactly as integers. A float with a
    // fractional part is below 2^52 in magnitude, and a float beyond 1e38 is far outside any
    // i64/u64, so comparing as floats gives the right answer for both.
    let is_integral = float.fract() == 0.0;
    if is_integral && float.abs() < 1.0e38 {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "the float is integral and within the i128 range, so the cast is exact"
        )]
        let float_as_integer = float as i128;
        return Some(integer.cmp(&float_as_integer));
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "only reached when the float's magnitude makes rounding the integer harmless"
    )]
    let integer_as_float = integer as f64;
    integer_as_float.partial_cmp(&float)
}

fn json_equal(left: &Value, right: &Value) -> bool {
    operands_equal(Operand::from_json(left), Operand::from_json(right))
}

/// Equality: JSON equality, except numbers compare numerically, missing equals null, and a field
/// change equals the object `{"old": …, "new": …}`. Nested values are compared with a work list
/// instead of recursion.
fn operands_equal<'borrowed>(left: Operand<'borrowed>, right: Operand<'borrowed>) -> bool {
    let mut pending_pairs: Vec<(&Value, &Value)> = Vec::new();
    if !shallow_equal(left, right, &mut pending_pairs) {
        return false;
    }
    while let Some((left, right)) = pending_pairs.pop() {
        if !shallow_equal(
            Operand::from_json(left),
            Operand::from_json(right),
            &mut pending_pairs,
        ) {
            return false;
        }
    }
    true
}

/// Compares the top level of two operands, queueing the pairs of nested values that must also be
/// equal onto `pending_pairs`.
fn shallow_equal<'borrowed>(
    left: Operand<'borrowed>,
    right: Operand<'borrowed>,
    pending_pairs: &mut Vec<(&'borrowed Value, &'borrowed Value)>,
) -> bool {
    match (left, right) {
        (Operand::Null, Operand::Null) => true,
        (Operand::Boolean(left), Operand::Boolean(right)) => left == right,
        (Operand::Number(left), Operand::Number(right)) => {
            compare_numbers(left, right) == Some(Ordering::Equal)
        }
        (Operand::Text(left), Operand::Text(right)) => left == right,
        (Operand::Array(left), Operand::Array(right)) => {
            if left.len() != right.len() {
                return false;
            }
            pending_pairs.extend(left.iter().zip(right));
            true
        }
        (Operand::Object(left), Operand::Object(right)) => {
            if left.len() != right.len() {
                return false;
            }
            for (key, left_value) in left {
                let Some(right_value) = right.get(key) else {
                    return false;
                };
                pending_pairs.push((left_value, right_value));
            }
            true
        }
        (Operand::FieldChange(left), Operand::FieldChange(right)) => {
            pending_pairs.push((&left.old, &right.old));
            pending_pairs.push((&left.new, &right.new));
            true
        }
        (Operand::FieldChange(change), Operand::Object(object))
        | (Operand::Object(object), Operand::FieldChange(change)) => {
            field_change_matches_object(change, object, pending_pairs)
        }
        (Operand::ChangeSet(left), Operand::ChangeSet(right)) => {
            if left.len() != right.len() {
                return false;
            }
            for ((left_field, left_change), (right_field, right_change)) in left.iter().zip(right) {
                if left_field != right_field {
                    return false;
                }
                pending_pairs.push((&left_change.old, &right_change.old));
                pending_pairs.push((&left_change.new, &right_change.new));
            }
            true
        }
        (Operand::ChangeSet(changes), Operand::Object(object))
        | (Operand::Object(object), Operand::ChangeSet(changes)) => {
            if changes.len() != object.len() {
                return false;
            }
            changes
                .iter()
                .all(|(field, change)| match object.get(field) {
                    Some(Value::Object(change_object)) => {
                        field_change_matches_object(change, change_object, pending_pairs)
                    }
                    _ => false,
                })
        }
        _ => false,
    }
}

/// Whether `object` has exactly the keys `old` and `new`, queueing their comparison with `change`.
fn field_change_matches_object<'borrowed>(
    change: &'borrowed FieldChange,
    object: &'borrowed Map<String, Value>,
    pending_pairs: &mut Vec<(&'borrowed Value, &'borrowed Value)>,
) -> bool {
    if object.len() != 2 {
        return false;
    }
    let (Some(old), Some(new)) = (object.get("old"), object.get("new")) else {
        return false;
    };
    pending_pairs.push((&change.old, old));
    pending_pairs.push((&change.new, new));
    true
}

/// `element in collection`: `collection` is an array holding an element equal to `element`.
fn is_member(element: Operand<'_>, collection: Operand<'_>) -> bool {
    let Operand::Array(items) = collection else {
        return false;
    };
    items
        .iter()
        .any(|item| operands_equal(Operand::from_json(item), element))
}

/// `container contains item`: substring, array element, or object key.
fn contains(container: Operand<'_>, item: Operand<'_>) -> bool {
    match (container, item) {
        (Operand::Text(text), Operand::Text(part)) => text.contains(part),
        (Operand::Array(_), _) => is_member(item, container),
        (Operand::Object(fields), Operand::Text(key)) => fields.contains_key(key),
        (Operand::ChangeSet(changes), Operand::Text(field)) => changes.contains_key(field),
        (Operand::FieldChange(_), Operand::Text(side)) => side == "old" || side == "new",
        _ => false,
    }
}
