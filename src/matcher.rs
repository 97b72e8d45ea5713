//! Finding the observers an event concerns: an O(1) index by (entity type, event kind), then
//! each candidate's compiled condition. Pure: no I/O, no allocation per lookup.

use std::collections::HashMap;

use crate::domain::{EntityEvent, EventKind};
use crate::observers::ObserverDefinition;

/// The observers of a configuration, indexed for matching.
#[derive(Debug)]
pub struct Matcher {
    observers: Vec<ObserverDefinition>,
    /// entity type → per event kind ([`EventKind::index`]) → indexes into `observers`, in file order.
    index: HashMap<String, [Vec<usize>; 4]>,
}

impl Matcher {
    #[must_use]
    pub fn new(observers: Vec<ObserverDefinition>) -> Matcher {
        let mut index: HashMap<String, [Vec<usize>; 4]> = HashMap::new();
        for (position, observer) in observers.iter().enumerate() {
            let by_kind = index.entry(observer.entity.clone()).or_default();
            for kind in &observer.events {
                by_kind[kind.index()].push(position);
            }
        }
        Matcher { observers, index }
    }

    /// Every observer, in file order.
    #[must_use]
    pub fn observers(&self) -> &[ObserverDefinition] {
        &self.observers
    }

    /// Observers registered for this entity type and kind, before conditions are applied.
    pub fn candidates(
        &self,
        entity_type: &str,
        kind: EventKind,
    ) -> impl Iterator<Item = &ObserverDefinition> {
        self.index
            .get(entity_type)
            .map(|by_kind| by_kind[kind.index()].as_slice())
            .unwrap_or_default()
            .iter()
            .map(|&position| &self.observers[position])
    }

    /// Observers whose entity, kind and condition all accept the event, in file order.
    pub fn matching<'matcher>(
        &'matcher self,
        event: &'matcher EntityEvent,
    ) -> impl Iterator<Item = &'matcher ObserverDefinition> {
        self.candidates(&event.entity_type, event.kind)
            .filter(move |observer| {
                observer
                    .condition
                    .as_ref()
                    .is_none_or(|condition| condition.evaluate(event))
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{Format, LoadOptions, MissingEnv};
    use crate::observers::load_str;

    fn matcher(yaml: &str) -> Matcher {
        let no_env = |_: &str| None;
        let options = LoadOptions {
            env: &no_env,
            missing_env: MissingEnv::Error,
        };
        Matcher::new(
            load_str(yaml, Format::Yaml, "test.yaml", &options)
                .unwrap()
                .observers,
        )
    }

    const CONFIG: &str = r#"
observers:
  - name: orders-any
    entity: Order
    events: [insert, update, delete]
    actions: [{type: log}]
  - name: big-orders
    entity: Order
    events: [insert]
    condition: "data.total > 100"
    actions: [{type: log}]
  - name: users
    entity: User
    event_type: DELETE
    actions: [{type: log}]
"#;

    fn names<'a>(observers: impl Iterator<Item = &'a ObserverDefinition>) -> Vec<&'a str> {
        observers.map(|observer| observer.name.as_str()).collect()
    }

    #[test]
    fn candidates_are_indexed_by_entity_and_kind() {
        let matcher = matcher(CONFIG);
        assert_eq!(
            names(matcher.candidates("Order", EventKind::Insert)),
            ["orders-any", "big-orders"]
        );
        assert_eq!(
            names(matcher.candidates("Order", EventKind::Update)),
            ["orders-any"]
        );
        assert_eq!(
            names(matcher.candidates("User", EventKind::Delete)),
            ["users"]
        );
        assert!(
            matcher
                .candidates("User", EventKind::Insert)
                .next()
                .is_none()
        );
        assert!(
            matcher
                .candidates("order", EventKind::Insert)
                .next()
                .is_none(),
            "entity names are exact"
        );
        assert!(
            matcher
                .candidates("Invoice", EventKind::Custom)
                .next()
                .is_none()
        );
    }

    #[test]
    fn conditions_filter_candidates() {
        let matcher = matcher(CONFIG);
        let small = EntityEvent::new(EventKind::Insert, "Order", "1", json!({"total": 50}), None);
        assert_eq!(names(matcher.matching(&small)), ["orders-any"]);
        let big = EntityEvent::new(EventKind::Insert, "Order", "2", json!({"total": 500}), None);
        assert_eq!(names(matcher.matching(&big)), ["orders-any", "big-orders"]);
    }
}
