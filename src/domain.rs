//! The event model: what a change to an entity looks like once it leaves the change log.
//!
//! Pure data, no I/O. Every other module speaks in these types: the listener produces
//! [`EntityEvent`]s, the matcher and the condition language read them, actions render them
//! into an [`envelope`](EntityEvent::envelope).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A moment given as an RFC 3339 time or as a duration ago (`2h`, `7d`), as the commands and the
/// control plane take `--since` and `--until`.
///
/// # Errors
/// Neither form, or a duration reaching before the calendar's start.
pub fn parse_moment(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(moment) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(moment.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text.trim()).map_err(|_| {
        format!("expected a duration ago such as 2h or 7d, or an RFC 3339 time, found {text:?}")
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{text:?} reaches too far back"))
}

/// The kind of change an event describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Insert,
    Update,
    Delete,
    /// An application-defined event written to the change log by hand, not by a trigger.
    Custom,
}

impl EventKind {
    /// Every kind, in a fixed order (used for the matcher's index and for reports).
    pub const ALL: [EventKind; 4] = [
        EventKind::Insert,
        EventKind::Update,
        EventKind::Delete,
        EventKind::Custom,
    ];

    /// The upper-case wire name (`INSERT`, `UPDATE`, …), as stored in `modification_type`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Insert => "INSERT",
            EventKind::Update => "UPDATE",
            EventKind::Delete => "DELETE",
            EventKind::Custom => "CUSTOM",
        }
    }

    /// Parses a kind name in any letter case (`insert`, `INSERT`, `Insert`).
    ///
    /// # Errors
    /// Returns the offending text when it is not one of the four kinds.
    pub fn parse(text: &str) -> Result<EventKind, String> {
        match text.to_ascii_uppercase().as_str() {
            "INSERT" => Ok(EventKind::Insert),
            "UPDATE" => Ok(EventKind::Update),
            "DELETE" => Ok(EventKind::Delete),
            "CUSTOM" => Ok(EventKind::Custom),
            _ => Err(text.to_owned()),
        }
    }

    /// Position in [`EventKind::ALL`], for array-indexed tables.
    #[must_use]
    pub fn index(self) -> usize {
        match self {
            EventKind::Insert => 0,
            EventKind::Update => 1,
            EventKind::Delete => 2,
            EventKind::Custom => 3,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One field's value before and after a change. `Null` stands for "absent" on either side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub old: Value,
    pub new: Value,
}

/// Who made a change, as far as the change log knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `actor_type` in the change log (e.g. `user`, `system`, `api_key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The actor's identifier, when the change log records one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A change to one entity, as observers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityEvent {
    /// Stable identity of the change (the change-log row's `id`); the base of every idempotency key.
    pub id: Uuid,
    pub kind: EventKind,
    /// The entity's type name (`object_type`, e.g. `Order`).
    pub entity_type: String,
    /// The entity's identifier (`object_id`), kept as text so any key type fits.
    pub entity_id: String,
    /// The row after the change. For a DELETE, the change log's `object_data` (often the last image).
    pub data: Value,
    /// The row before the change, when the writer recorded it.
    pub before: Option<Value>,
    /// Field → old/new, see [`FieldChanges::derive`].
    pub changes: BTreeMap<String, FieldChange>,
    pub tenant_id: Option<String>,
    pub actor: Option<Actor>,
    pub timestamp: DateTime<Utc>,
    /// Where the change sits in the change log (`pk_entity_change_log`), when it came from there.
    pub position: Option<i64>,
    /// Distributed-trace id recorded by the writer, propagated to outgoing calls.
    pub trace_id: Option<String>,
    /// Set when this event is a replay of an earlier one (`replay`): its own `id` is derived
    /// from the original's and the run's, so it is a distinct event everywhere (jobs, ledger,
    /// dedup), and its idempotency keys end in `:replay:<run>` ([`Replay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
}

/// What a replayed event replays: the original event and the replay run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// The original event's id.
    pub of: Uuid,
    /// The replay run (`replay status` lists it).
    pub run: Uuid,
}

/// Derivation of the `changes` map of an event.
pub struct FieldChanges;

impl FieldChanges {
    /// Computes field → old/new for a change.
    ///
    /// - With both images present (objects), the fields whose values differ, plus any listed in
    ///   `updated_fields` (a writer may flag a field it rewrote to the same value).
    /// - Without a before image, the fields named in `updated_fields` (old value `null`), or, for an
    ///   INSERT without `updated_fields`, every field of `after` (old `null`).
    /// - For a DELETE without an after image, every field of `before` (new `null`).
    #[must_use]
    pub fn derive(
        kind: EventKind,
        before: Option<&Value>,
        after: &Value,
        updated_fields: Option<&[String]>,
    ) -> BTreeMap<String, FieldChange> {
        let mut changes = BTreeMap::new();
        let after_object = after.as_object();
        let before_object = before.and_then(Value::as_object);
        let lookup = |object: Option<&Map<String, Value>>, field: &str| {
            object
                .and_then(|fields| fields.get(field))
                .cloned()
                .unwrap_or(Value::Null)
        };

        match (before_object, after_object) {
            (Some(old_fields), Some(new_fields)) => {
                for (field, new_value) in new_fields {
                    if old_fields.get(field) != Some(new_value) {
                        changes.insert(
                            field.clone(),
                            FieldChange {
                                old: lookup(Some(old_fields), field),
                                new: new_value.clone(),
                            },
                        );
                    }
                }
                for (field, old_value) in old_fields {
                    if !new_fields.contains_key(field) {
                        changes.insert(
                            field.clone(),
                            FieldChange {
                                old: old_value.clone(),
                                new: Value::Null,
                            },
                        );
                    }
                }
            }
            (Some(old_fields), None) if kind == EventKind::Delete => {
                for (field, old_value) in old_fields {
                    changes.insert(
                        field.clone(),
                        FieldChange {
                            old: old_value.clone(),
                            new: Value::Null,
                        },
                    );
                }
            }
            (None, Some(new_fields)) if kind == EventKind::Insert && updated_fields.is_none() => {
                for (field, new_value) in new_fields {
                    changes.insert(
                        field.clone(),
                        FieldChange {
                            old: Value::Null,
                            new: new_value.clone(),
                        },
                    );
                }
            }
            _ => {}
        }

        for field in updated_fields.unwrap_or_default() {
            changes.entry(field.clone()).or_insert_with(|| FieldChange {
                old: lookup(before_object, field),
                new: lookup(after_object, field),
            });
        }
        changes
    }
}

impl EntityEvent {
    /// Builds an event with `changes` derived from the images (see [`FieldChanges::derive`]),
    /// a fresh id and the current time; adjust the public fields for anything else.
    #[must_use]
    pub fn new(
        kind: EventKind,
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        data: Value,
        before: Option<Value>,
    ) -> EntityEvent {
        let changes = FieldChanges::derive(kind, before.as_ref(), &data, None);
        EntityEvent {
            id: Uuid::now_v7(),
            kind,
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            data,
            before,
            changes,
            tenant_id: None,
            actor: None,
            timestamp: Utc::now(),
            position: None,
            trace_id: None,
            replay: None,
        }
    }

    /// This event replayed by `run`: the same change, with an id of its own derived from the
    /// original's and the run's (the same on every resume of the run).
    #[must_use]
    pub fn replayed(&self, run: Uuid) -> EntityEvent {
        let original = self.replay.map_or(self.id, |replay| replay.of);
        let mut digest = Sha256::new();
        digest.update(b"fraiseql-observers replay\0");
        digest.update(original.as_bytes());
        digest.update(run.as_bytes());
        let mut bytes = [0_u8; 16];
        bytes.copy_from_slice(&digest.finalize()[..16]);
        EntityEvent {
            id: uuid::Builder::from_custom_bytes(bytes).into_uuid(),
            replay: Some(Replay { of: original, run }),
            ..self.clone()
        }
    }

    /// The key under which events are kept in order: one entity of one type.
    #[must_use]
    pub fn entity_key(&self) -> EntityKey<'_> {
        EntityKey {
            entity_type: &self.entity_type,
            entity_id: &self.entity_id,
        }
    }

    /// The JSON envelope sent to webhooks by default and offered to templates:
    /// `{"id","event_type","entity_type","entity_id","data","before","changes","timestamp",
    /// "observer","tenant_id","actor"}`, and `"replay": {"of","run"}` for a replayed event.
    /// A view: it borrows the event and serializes straight from it (no JSON tree is built).
    #[must_use]
    pub fn envelope<'event>(&'event self, observer: &'event str) -> Envelope<'event> {
        Envelope {
            event: self,
            observer,
        }
    }
}

/// An event's envelope for one observer ([`EntityEvent::envelope`]): serialized key by key from
/// the event, in the order the envelope documents, so a webhook body or a template context is
/// written without copying the event's images into a `serde_json::Value` first.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'event> {
    event: &'event EntityEvent,
    observer: &'event str,
}

impl Envelope<'_> {
    /// The envelope as a JSON tree, for callers that inspect it rather than serialize it.
    #[must_use]
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for Envelope<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let event = self.event;
        let mut map = serializer.serialize_map(Some(11 + usize::from(event.replay.is_some())))?;
        // A string whatever the serializer (Uuid itself is bytes to a binary one).
        map.serialize_entry("id", &event.id.hyphenated())?;
        map.serialize_entry("event_type", event.kind.as_str())?;
        map.serialize_entry("entity_type", &event.entity_type)?;
        map.serialize_entry("entity_id", &event.entity_id)?;
        map.serialize_entry("data", &event.data)?;
        map.serialize_entry("before", &event.before)?;
        map.serialize_entry("changes", &event.changes)?;
        map.serialize_entry(
            "timestamp",
            &event
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        )?;
        map.serialize_entry("observer", self.observer)?;
        map.serialize_entry("tenant_id", &event.tenant_id)?;
        map.serialize_entry("actor", &event.actor)?;
        if let Some(replay) = &event.replay {
            map.serialize_entry("replay", replay)?;
        }
        map.end()
    }
}

/// Identity of one entity: the unit of ordering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntityKey<'event> {
    pub entity_type: &'event str,
    pub entity_id: &'event str,
}

#[cfg(test)]
mod action_key_tests {
    use super::ActionKey;

    #[test]
    fn the_action_identity_reads_back_what_it_writes() {
        let key = ActionKey::new(
            uuid::Uuid::parse_str("0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11").unwrap(),
            "order-paid.v2",
            3,
        );
        let text = key.to_string();
        assert_eq!(text, "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11:order-paid.v2:3");
        assert_eq!(text.parse::<ActionKey>().unwrap(), key);
        assert!("nope".parse::<ActionKey>().is_err());
        assert!(
            "0194f8a2-7c1e-7b3a-9c1d-2b9f7e1a0c11:x:y"
                .parse::<ActionKey>()
                .is_err()
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn update_changes_are_the_differing_fields() {
        let before = json!({"id": 1, "status": "new", "total": 10, "gone": true});
        let after = json!({"id": 1, "status": "paid", "total": 10});
        let changes = FieldChanges::derive(EventKind::Update, Some(&before), &after, None);
        assert_eq!(changes.len(), 2);
        assert_eq!(
            changes["status"],
            FieldChange {
                old: json!("new"),
                new: json!("paid")
            }
        );
        assert_eq!(
            changes["gone"],
            FieldChange {
                old: json!(true),
                new: Value::Null
            }
        );
    }

    #[test]
    fn updated_fields_fill_in_without_a_before_image() {
        let after = json!({"status": "paid", "total": 10});
        let fields = vec!["status".to_owned()];
        let changes = FieldChanges::derive(EventKind::Update, None, &after, Some(&fields));
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes["status"],
            FieldChange {
                old: Value::Null,
                new: json!("paid")
            }
        );
    }

    #[test]
    fn updated_fields_add_rewritten_fields_to_the_diff() {
        let before = json!({"status": "paid"});
        let after = json!({"status": "paid"});
        let fields = vec!["status".to_owned()];
        let changes = FieldChanges::derive(EventKind::Update, Some(&before), &after, Some(&fields));
        assert_eq!(
            changes["status"],
            FieldChange {
                old: json!("paid"),
                new: json!("paid")
            }
        );
    }

    #[test]
    fn insert_changes_every_field_from_null_and_delete_every_field_to_null() {
        let row = json!({"a": 1, "b": "x"});
        let inserted = FieldChanges::derive(EventKind::Insert, None, &row, None);
        assert_eq!(
            inserted["a"],
            FieldChange {
                old: Value::Null,
                new: json!(1)
            }
        );
        assert_eq!(inserted.len(), 2);
        let deleted = FieldChanges::derive(EventKind::Delete, Some(&row), &Value::Null, None);
        assert_eq!(
            deleted["b"],
            FieldChange {
                old: json!("x"),
                new: Value::Null
            }
        );
        assert_eq!(deleted.len(), 2);
    }

    #[test]
    fn envelope_has_the_documented_fields() {
        let mut event = EntityEvent::new(
            EventKind::Update,
            "Order",
            "42",
            json!({"status": "paid"}),
            Some(json!({"status": "new"})),
        );
        event.tenant_id = Some("acme".into());
        let envelope = event.envelope("order-paid").to_value();
        let keys: Vec<&str> = envelope
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "event_type",
                "entity_type",
                "entity_id",
                "data",
                "before",
                "changes",
                "timestamp",
                "observer",
                "tenant_id",
                "actor"
            ]
        );
        assert_eq!(envelope["event_type"], "UPDATE");
        assert_eq!(envelope["changes"]["status"]["new"], "paid");
        assert_eq!(envelope["before"]["status"], "new");
        assert_eq!(envelope["tenant_id"], "acme");
        assert_eq!(envelope["actor"], Value::Null);
        let timestamp = envelope["timestamp"].as_str().unwrap();
        assert!(
            timestamp.ends_with('Z') && timestamp.split('.').nth(1).unwrap().len() == 7,
            "RFC 3339, UTC, microseconds: {timestamp}"
        );
        let text = serde_json::to_string(&event.envelope("order-paid")).unwrap();
        assert!(
            text.starts_with(&format!(
                "{{\"id\":\"{}\",\"event_type\":\"UPDATE\"",
                event.id
            )),
            "{text}"
        );

        let replayed = event.replayed(Uuid::new_v4());
        let envelope = replayed.envelope("order-paid").to_value();
        assert_eq!(envelope["replay"]["of"], event.id.to_string());
        assert_ne!(envelope["id"], envelope["replay"]["of"]);
    }

    #[test]
    fn event_kind_parses_any_case_and_rejects_others() {
        assert_eq!(EventKind::parse("insert"), Ok(EventKind::Insert));
        assert_eq!(EventKind::parse("DELETE"), Ok(EventKind::Delete));
        assert_eq!(EventKind::parse("Custom"), Ok(EventKind::Custom));
        assert_eq!(EventKind::parse("upsert"), Err("upsert".to_owned()));
    }
}

/// One action of one event for one observer: the unit of effectively-once, and the one source of
/// the text `<event id>:<observer>:<action index>` that receivers see as the idempotency key, the
/// job queue stores as a job's identity, and the deduplication store claims.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionKey {
    pub event_id: Uuid,
    pub observer: String,
    pub action_index: usize,
}

impl ActionKey {
    #[must_use]
    pub fn new(event_id: Uuid, observer: impl Into<String>, action_index: usize) -> ActionKey {
        ActionKey {
            event_id,
            observer: observer.into(),
            action_index,
        }
    }
}

impl std::fmt::Display for ActionKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}:{}:{}",
            self.event_id, self.observer, self.action_index
        )
    }
}

impl std::str::FromStr for ActionKey {
    type Err = String;

    /// Parses `<event id>:<observer>:<action index>` (observer names hold no `:`, and neither
    /// does a UUID, but the observer is taken as everything between the first and the last `:`).
    fn from_str(text: &str) -> Result<ActionKey, String> {
        let (event_id, rest) = text.split_once(':').ok_or_else(|| {
            format!("expected <event id>:<observer>:<action index>, found {text:?}")
        })?;
        let (observer, action_index) = rest.rsplit_once(':').ok_or_else(|| {
            format!("expected <event id>:<observer>:<action index>, found {text:?}")
        })?;
        Ok(ActionKey {
            event_id: Uuid::parse_str(event_id)
                .map_err(|error| format!("the event id of {text:?} is not a UUID ({error})"))?,
            observer: observer.to_owned(),
            action_index: action_index.parse().map_err(|error| {
                format!("the action index of {text:?} is not a number ({error})")
            })?,
        })
    }
}
