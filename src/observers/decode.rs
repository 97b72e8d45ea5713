//! Decoding an observers file's tree: the observers, their actions (each decoded by its type in
//! the catalog), and the file-wide settings.

use std::collections::HashMap;

use super::{ObserverDefinition, ObserversConfig};
use crate::actions::{ActionDefinition, ActionKind};
use crate::config::{
    ConfigErrors, Decoder, DeliveryMode, ExecutorSettings, FailurePolicy, Fields, JobSettings,
    LoadOptions, Node, NodeValue, ObserverName, Position, RetryPolicy, child, did_you_mean,
};
use crate::domain::EventKind;

pub(super) fn decode(
    root: &Node,
    origin: &str,
    options: &LoadOptions<'_>,
) -> Result<ObserversConfig, ConfigErrors> {
    let mut decoder = Decoder::new(origin, options);
    let (observers, executor, jobs) = observers_file(&mut decoder, root);
    let (history, history_search) = history_setting(&mut decoder, root);
    let (templates, warnings) = decoder.finish()?;
    Ok(ObserversConfig {
        origin: origin.to_owned(),
        observers,
        executor,
        jobs,
        history,
        history_search,
        templates,
        warnings,
    })
}

/// The top-level `history` key: `on` (the default) or `off` (YAML's `true`/`false` too), or a
/// mapping naming the backend (`{backend: search, url_env: …}` also copies it to a search
/// backend).
fn history_setting(
    decoder: &mut Decoder<'_>,
    root: &Node,
) -> (bool, Option<super::history::SearchHistory>) {
    let NodeValue::Map(entries) = &root.value else {
        return (true, None);
    };
    let Some((_, node)) = entries
        .iter()
        .find(|(key, _)| key.value == NodeValue::String("history".to_owned()))
    else {
        return (true, None);
    };
    match &node.value {
        NodeValue::Bool(on) => (*on, None),
        NodeValue::String(text) if text == "on" => (true, None),
        NodeValue::String(text) if text == "off" => (false, None),
        NodeValue::Map(_) => (true, super::history::decode(decoder, node)),
        _ => {
            decoder.expected(
                node,
                "history",
                "on, off, or a mapping such as {backend: search, url_env: …}",
            );
            (true, None)
        }
    }
}

fn observers_file(
    decoder: &mut Decoder<'_>,
    root: &Node,
) -> (Vec<ObserverDefinition>, ExecutorSettings, JobSettings) {
    let empty_map = matches!(&root.value, NodeValue::Map(entries) if entries.is_empty());
    if root.value == NodeValue::Null || empty_map {
        decoder.error(
            root.position,
            "",
            "the file is empty; expected a mapping with an 'observers' list",
        );
        return (
            Vec::new(),
            ExecutorSettings::default(),
            JobSettings::default(),
        );
    }
    let Some(fields) = decoder.fields(root, "", &["observers", "executor", "jobs", "history"])
    else {
        return (
            Vec::new(),
            ExecutorSettings::default(),
            JobSettings::default(),
        );
    };
    let executor = fields
        .get("executor")
        .and_then(|node| decoder.executor(node, "executor"))
        .unwrap_or_default();
    let mut jobs = fields
        .get("jobs")
        .and_then(|node| decoder.jobs(node, "jobs"))
        .unwrap_or_default();
    let Some(list_node) = decoder.required(&fields, "observers", "", "a list of observers") else {
        return (Vec::new(), executor, jobs);
    };
    let NodeValue::List(items) = &list_node.value else {
        decoder.expected(list_node, "observers", "a list of observers");
        return (Vec::new(), executor, jobs);
    };
    if items.is_empty() {
        decoder.warning(
            list_node.position,
            "observers",
            "no observers are defined; nothing will be done",
        );
    }
    let mut first_seen: HashMap<String, Position> = HashMap::new();
    let mut observers = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let path = format!("observers[{index}]");
        if let Some((name, position)) = declared_name(item) {
            if let Some(first) = first_seen.get(name) {
                decoder.error(
                    position,
                    &child(&path, "name"),
                    format!(
                        "duplicate observer name '{name}' (first defined at line {})",
                        first.line
                    ),
                );
            } else {
                first_seen.insert(name.to_owned(), position);
            }
        }
        if let Some(observer) = observer(decoder, item, &path) {
            observers.push(observer);
        }
    }
    let cache_action = observers
        .iter()
        .flat_map(|observer| &observer.actions)
        .any(|action| action.kind.needs_redis());
    if cache_action && decoder.env("REDIS_URL").is_none_or(|url| url.is_empty()) {
        // A warning either way: `run --redis-url` can provide it without the variable.
        decoder.warning(
            list_node.position,
            "observers",
            "cache actions remove keys through the node's Redis: REDIS_URL is not set here, so run the node with REDIS_URL or --redis-url",
        );
    }
    for action in observers.iter().flat_map(|observer| &observer.actions) {
        jobs.workers
            .entry(action.delivery.queue.clone())
            .or_insert(1);
    }
    (observers, executor, jobs)
}

fn events(decoder: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<Vec<EventKind>> {
    let kinds = ["insert", "update", "delete", "custom"];
    let parse_one = |decoder: &mut Decoder<'_>, node: &Node, path: &str| -> Option<EventKind> {
        let text = decoder.string(node, path)?;
        match EventKind::parse(text) {
            Ok(kind) => Some(kind),
            Err(found) => {
                let hint = did_you_mean(&found.to_ascii_lowercase(), &kinds);
                decoder.error(
                    node.position,
                    path,
                    format!(
                        "{hint}expected one of insert, update, delete, custom, found {found:?}"
                    ),
                );
                None
            }
        }
    };
    match (fields.get("events"), fields.get("event_type")) {
        (Some(node), Some(_)) => {
            decoder.error(
                node.position,
                &child(path, "events"),
                "set either 'events' or 'event_type', not both",
            );
            None
        }
        (None, None) => {
            decoder.error(
                fields.position,
                path,
                "missing required key 'events' (e.g. [insert, update]) or 'event_type'",
            );
            None
        }
        (None, Some(node)) => {
            parse_one(decoder, node, &child(path, "event_type")).map(|kind| vec![kind])
        }
        (Some(node), None) => {
            let events_path = child(path, "events");
            let items: Vec<&Node> = match &node.value {
                NodeValue::List(items) => items.iter().collect(),
                NodeValue::String(_) => vec![node],
                _ => {
                    decoder.expected(
                        node,
                        &events_path,
                        "a list of event kinds such as [insert, update]",
                    );
                    return None;
                }
            };
            if items.is_empty() {
                decoder.error(
                    node.position,
                    &events_path,
                    "expected at least one event kind",
                );
                return None;
            }
            let mut kinds_found = Vec::with_capacity(items.len());
            let mut all_valid = true;
            for (index, item) in items.into_iter().enumerate() {
                match parse_one(decoder, item, &format!("{events_path}[{index}]")) {
                    Some(kind) if !kinds_found.contains(&kind) => kinds_found.push(kind),
                    Some(_) => {}
                    None => all_valid = false,
                }
            }
            all_valid.then_some(kinds_found)
        }
    }
}

fn observer(decoder: &mut Decoder<'_>, node: &Node, path: &str) -> Option<ObserverDefinition> {
    let fields = decoder.fields(
        node,
        path,
        &[
            "name",
            "description",
            "entity",
            "events",
            "event_type",
            "condition",
            "actions",
            "retry",
            "on_failure",
        ],
    )?;
    let name = decoder
        .required(&fields, "name", path, "a unique observer name")
        .and_then(|node| {
            let name_path = child(path, "name");
            let text = decoder.string(node, &name_path)?;
            ObserverName::parse(text)
                .map_err(|message| decoder.error(node.position, &name_path, message))
                .ok()
        });
    let description = fields
        .get("description")
        .and_then(|node| decoder.string(node, &child(path, "description")))
        .map(str::to_owned);
    let entity = decoder
        .required(
            &fields,
            "entity",
            path,
            "the entity type it watches, e.g. Order",
        )
        .and_then(|node| decoder.non_empty_string(node, &child(path, "entity")))
        .map(|text| text.trim().to_owned());
    let events = events(decoder, &fields, path);
    let condition = match fields.get("condition") {
        None => Some(None),
        Some(node) => decoder.condition(node, &child(path, "condition")).map(Some),
    };
    let actions = actions(decoder, &fields, path);
    let retry = match fields.get("retry") {
        None => Some(RetryPolicy::default()),
        Some(node) => decoder.retry(node, &child(path, "retry")),
    };
    let on_failure = match fields.get("on_failure") {
        None => Some(FailurePolicy::DeadLetter),
        Some(node) => decoder.choice(
            node,
            &child(path, "on_failure"),
            &[
                ("dlq", FailurePolicy::DeadLetter),
                ("log", FailurePolicy::Log),
            ],
        ),
    };
    Some(ObserverDefinition {
        name: name?,
        description,
        entity: entity?,
        events: events?,
        condition: condition?,
        actions: actions?,
        retry: retry?,
        on_failure: on_failure?,
    })
}

fn actions(
    decoder: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
) -> Option<Vec<ActionDefinition>> {
    let node = decoder.required(fields, "actions", path, "a list of actions")?;
    let actions_path = child(path, "actions");
    let NodeValue::List(items) = &node.value else {
        decoder.expected(node, &actions_path, "a list of actions");
        return None;
    };
    if items.is_empty() {
        decoder.error(node.position, &actions_path, "expected at least one action");
        return None;
    }
    let mut actions = Vec::with_capacity(items.len());
    let mut all_valid = true;
    for (index, item) in items.iter().enumerate() {
        match action(decoder, item, &format!("{actions_path}[{index}]"), index) {
            Some(action) => actions.push(action),
            None => all_valid = false,
        }
    }
    all_valid.then_some(actions)
}

fn action(
    decoder: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    index: usize,
) -> Option<ActionDefinition> {
    const TYPES: &[&str] = ActionKind::TYPE_NAMES;
    let NodeValue::Map(entries) = &node.value else {
        decoder.expected(node, path, "an action mapping with a 'type'");
        return None;
    };
    let type_node = entries.iter().find_map(|(key, value)| {
        matches!(&key.value, NodeValue::String(name) if name == "type").then_some(value)
    });
    let Some(type_node) = type_node else {
        decoder.error(
            node.position,
            path,
            format!("missing required key 'type' (one of: {})", TYPES.join(", ")),
        );
        return None;
    };
    let type_path = child(path, "type");
    let type_name = decoder.string(type_node, &type_path)?;
    let Some(own_keys) = ActionKind::keys_of(type_name) else {
        let hint = did_you_mean(type_name, TYPES);
        decoder.error(
            type_node.position,
            &type_path,
            format!(
                "unknown action type {type_name:?}; {hint}expected one of: {}",
                TYPES.join(", ")
            ),
        );
        return None;
    };
    let allowed: Vec<&str> = ["type", "name"]
        .into_iter()
        .chain(own_keys.iter().copied())
        .chain(["mode", "queue", "priority"])
        .collect();
    let fields = decoder.fields(node, path, &allowed)?;
    let label = decoder.label(&fields, path);
    let kind = ActionKind::decode(type_name, decoder, &fields, path);
    let default_mode = kind
        .as_ref()
        .map_or(DeliveryMode::Inline, ActionKind::default_delivery_mode);
    let delivery = decoder.delivery(node, path, default_mode);
    Some(ActionDefinition {
        index,
        label,
        kind: kind?,
        delivery: delivery?,
    })
}

/// The `name:` string of an observer mapping, read before (and whatever the outcome of) decoding it.
fn declared_name(node: &Node) -> Option<(&str, Position)> {
    let NodeValue::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find_map(|(key, value)| match (&key.value, &value.value) {
            (NodeValue::String(key), NodeValue::String(name)) if key == "name" => {
                Some((name.as_str(), value.position))
            }
            _ => None,
        })
}
