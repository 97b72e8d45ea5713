//! The compiled form of a condition: the expression tree the parser builds and the evaluator walks.
//!
//! Everything that can be decided once is decided here at parse time: path roots are an enum,
//! path segments are pre-split (with their array index pre-parsed), literals are ready-made JSON
//! values, `&&`/`||` chains are flat lists rather than deep binary trees.

use serde_json::Value;

/// One node of a compiled condition.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Expression {
    /// `a || b || c`: true when any alternative is true (evaluated left to right, short-circuit).
    AnyOf(Box<[Expression]>),
    /// `a && b && c`: true when every requirement is true (evaluated left to right, short-circuit).
    AllOf(Box<[Expression]>),
    /// `!a` / `not a`.
    Not(Box<Expression>),
    /// `left <operator> right`.
    Compare {
        operator: ComparisonOperator,
        left: Box<Expression>,
        right: Box<Expression>,
    },
    /// `element in collection`, or `element not in collection` when `negated`.
    In {
        element: Box<Expression>,
        collection: Box<Expression>,
        negated: bool,
    },
    /// `container contains item`.
    Contains {
        container: Box<Expression>,
        item: Box<Expression>,
    },
    /// A string, number, boolean, null or list literal.
    Literal(Value),
    /// A path into the event, such as `data.customer.city` or `event_type`.
    Path(Path),
    /// `has_field('a.b')`: the (dotted) key exists in `data`, even with a null value.
    HasField(Box<[Segment]>),
    /// `field_changed('status')`: the field is in the event's `changes`.
    FieldChanged(Box<str>),
    /// `field_changed_to('status', value)`: the field changed and its new value equals `value`.
    FieldChangedTo { field: Box<str>, value: Value },
    /// `field_changed_from('status', value)`: the field changed and its old value equals `value`.
    FieldChangedFrom { field: Box<str>, value: Value },
}

/// The six comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ComparisonOperator {
    Equal,
    NotEqual,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
}

/// A path into the event: a root plus zero or more segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Path {
    pub(super) root: PathRoot,
    pub(super) segments: Box<[Segment]>,
}

/// The names a path can start with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PathRoot {
    /// The row after the change (`EntityEvent::data`).
    Data,
    /// The row before the change, null when the event has none.
    Before,
    /// The field → `{old, new}` map of the event.
    Changes,
    /// The event kind as upper-case text (`INSERT`, `UPDATE`, `DELETE`, `CUSTOM`).
    EventType,
    EntityType,
    EntityId,
    /// Text, or null when the event has no tenant.
    TenantId,
    /// Text, or null when the event has no actor kind.
    ActorType,
    /// Text, or null when the event has no actor id.
    ActorId,
}

impl PathRoot {
    /// Every root, in the order error messages list them.
    pub(super) const ALL: [PathRoot; 9] = [
        PathRoot::Data,
        PathRoot::Before,
        PathRoot::Changes,
        PathRoot::EventType,
        PathRoot::EntityType,
        PathRoot::EntityId,
        PathRoot::TenantId,
        PathRoot::ActorType,
        PathRoot::ActorId,
    ];

    /// The name written in conditions.
    pub(super) fn name(self) -> &'static str {
        match self {
            PathRoot::Data => "data",
            PathRoot::Before => "before",
            PathRoot::Changes => "changes",
            PathRoot::EventType => "event_type",
            PathRoot::EntityType => "entity_type",
            PathRoot::EntityId => "entity_id",
            PathRoot::TenantId => "tenant_id",
            PathRoot::ActorType => "actor_type",
            PathRoot::ActorId => "actor_id",
        }
    }

    /// The root spelled `name`, if any.
    pub(super) fn from_name(name: &str) -> Option<PathRoot> {
        PathRoot::ALL.into_iter().find(|root| root.name() == name)
    }

    /// Whether the root is a plain text value that cannot be followed by segments.
    pub(super) fn is_text(self) -> bool {
        !matches!(self, PathRoot::Data | PathRoot::Before | PathRoot::Changes)
    }

    /// The valid root names joined for an error message: `data, before, …, actor_id`.
    pub(super) fn listing() -> String {
        PathRoot::ALL.map(PathRoot::name).join(", ")
    }
}

/// One step of a path: an object key, which also selects an array element when it is a
/// non-negative integer (`[0]`, `.0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) key: Box<str>,
    pub(super) index: Option<usize>,
}

impl Segment {
    /// A segment named `key`; its array index is parsed once here when `key` is all digits.
    pub(super) fn new(key: &str) -> Segment {
        let is_all_digits = !key.is_empty() && key.bytes().all(|byte| byte.is_ascii_digit());
        let index = if is_all_digits {
            key.parse::<usize>().ok()
        } else {
            None
        };
        Segment {
            key: key.into(),
            index,
        }
    }
}
