//! The database-backed CLI commands (`migrate`, `dlq …`), as library functions that return what
//! to print, so `main.rs` stays a thin shell and tests can call them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::actions::{ActionContext, ActionRunner};
use crate::database::ConnectError;
use crate::dlq::{DeadLetter, DeadLetterFilter, DeadLetterQueue, PostgresDeadLetterQueue};
use crate::escape::{escape_control, json_for_terminal};
use crate::observers::ObserversConfig;
use crate::retry::run_with_retry;

/// Connects to the service's database.
///
/// # Errors
/// The database cannot be reached (see [`crate::database::connect`]).
pub async fn connect(database_url: &str) -> Result<PgPool, ConnectError> {
    connect_with_size(database_url, 4).await
}

/// Connects with a pool of at most `max_connections`. A running node needs one connection for
/// notifications, one for reading, one for checkpoints and the ledger, and more for dead letters
/// under failure; too small a pool shows up as page latency.
///
/// # Errors
/// The database cannot be reached (see [`crate::database::connect`]).
pub async fn connect_with_size(
    database_url: &str,
    max_connections: u32,
) -> Result<PgPool, ConnectError> {
    crate::database::connect(database_url, max_connections).await
}

/// `migrate`: applies missing migrations and says what it did.
///
/// # Errors
/// A migration failed or the database is ahead of this binary.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<String> {
    let report = crate::migrate::run(pool).await?;
    let mut out = String::new();
    for name in &report.applied {
        let _ = writeln!(out, "applied {name}");
    }
    let _ = writeln!(
        out,
        "✓ database is migrated ({} applied now, {} already in place)",
        report.applied.len(),
        report.already_applied
    );
    Ok(out)
}

/// `migrate --status` (and `--dry-run`, which says what `migrate` would apply): every migration
/// with its state, applied time and checksum, or JSON; reads only.
///
/// # Errors
/// The database could not be read.
pub async fn migrate_status(pool: &PgPool, dry_run: bool, json: bool) -> anyhow::Result<String> {
    use crate::migrate::MigrationState;
    let lines = crate::migrate::status(pool).await?;
    if json {
        return Ok(format!("{:#}\n", serde_json::to_value(&lines)?));
    }
    let pending: Vec<_> = lines
        .iter()
        .filter(|line| line.state == MigrationState::Pending)
        .collect();
    let blocking = lines
        .iter()
        .filter(|line| {
            matches!(
                line.state,
                MigrationState::Changed { .. } | MigrationState::Unknown
            )
        })
        .count();
    let mut out = String::new();
    if dry_run {
        for line in &pending {
            let _ = writeln!(
                out,
                "would apply {} (checksum {})",
                line.name,
                &line.checksum[..12.min(line.checksum.len())]
            );
        }
    } else {
        let _ = writeln!(
            out,
            "{:>7}  {:<28} {:<8} {:<25} checksum",
            "version", "name", "state", "applied at"
        );
        for line in &lines {
            let state = match &line.state {
                MigrationState::Applied => "applied",
                MigrationState::Pending => "pending",
                MigrationState::Changed { .. } => "CHANGED",
                MigrationState::Unknown => "UNKNOWN",
            };
            let applied_at = line.applied_at.map_or_else(
                || "-".to_owned(),
                |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            let _ = writeln!(
                out,
                "{:>7}  {:<28} {:<8} {:<25} {}",
                line.version,
                escape_control(&line.name),
                state,
                applied_at,
                &line.checksum[..12.min(line.checksum.len())]
            );
        }
    }
    if blocking > 0 {
        let _ = writeln!(
            out,
            "✗ {blocking} migration(s) changed since applied or unknown to this binary: `migrate` refuses this database"
        );
    } else if dry_run {
        let _ = writeln!(
            out,
            "{} migration(s) would be applied; nothing was changed",
            pending.len()
        );
    } else {
        let _ = writeln!(
            out,
            "✓ {} applied, {} pending",
            lines.len() - pending.len(),
            pending.len()
        );
    }
    Ok(out)
}

fn age(letter: &DeadLetter) -> String {
    let seconds = (Utc::now() - letter.created_at).num_seconds().max(0);
    let seconds = u64::try_from(seconds).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// `events search`: the history rows matching `query`, newest first, as a table (or JSON), with
/// the cursor of the next page when there is one.
///
/// # Errors
/// The database failed (the history table is missing when the migrations were not applied).
pub async fn events_search(
    pool: &PgPool,
    query: &crate::history::HistoryQuery,
    json: bool,
) -> anyhow::Result<String> {
    let page = crate::history::search(pool, query)
        .await
        .context("search the history")?;
    if json {
        let text = format!("{:#}", serde_json::to_value(&page)?);
        return Ok(format!("{}\n", json_for_terminal(&text)));
    }
    let mut out = format!("Events (showing {})\n", page.entries.len());
    let _ = writeln!(
        out,
        "{:<20}  {:<36}  {:<24}  {:<7}  {:<6}  {:>9}  actions",
        "processed", "event", "entity", "kind", "record", "took ms"
    );
    // Entity ids, observers and errors come from the change log and the targets: escaped, so
    // each row is one line and nothing reaches the terminal as a control sequence.
    for entry in &page.entries {
        let actions: Vec<String> = entry
            .actions
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|action| {
                format!(
                    "{}[{}]={}x{}",
                    action["observer"].as_str().unwrap_or("?"),
                    action["action_index"],
                    action["outcome"].as_str().unwrap_or("?"),
                    action["attempts"]
                )
            })
            .collect();
        let entity: String = format!("{}:{}", entry.entity_type, entry.entity_id)
            .chars()
            .take(24)
            .collect();
        let _ = writeln!(
            out,
            "{:<20}  {:<36}  {:<24}  {:<7}  {:<6}  {:>9.1}  {}",
            entry.processed_at.format("%Y-%m-%dT%H:%M:%SZ"),
            entry.event_id,
            escape_control(&entity),
            entry.event_kind,
            entry.record_kind,
            entry.processing_ms.unwrap_or_default(),
            escape_control(&actions.join(" "))
        );
    }
    if let Some(cursor) = page.next_cursor {
        let _ = writeln!(out, "more: --after {cursor}");
    }
    Ok(out)
}

/// Which events `debug-event` shows.
#[derive(Clone, Debug)]
pub enum DebugTarget {
    /// The events of one entity, latest first.
    Entity {
        entity_type: String,
        entity_id: String,
    },
    /// One event.
    Event(Uuid),
}

/// History rows `debug-event` reads at most: an entity's events beyond this are not shown.
pub const DEBUG_EVENT_ROWS: i64 = crate::history::MAX_SEARCH_LIMIT;

/// One event as `debug-event` shows it: its row as processed, the later rows of its queued
/// actions (oldest first), and — given the observers file — each observer's condition on it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DebuggedEvent {
    pub event: Option<crate::history::HistoryEntry>,
    pub jobs: Vec<crate::history::HistoryEntry>,
    /// Observers of the event's entity type and kind in the file, with their condition and its
    /// result on the event as the change log holds it (`None`: no condition, or the change-log
    /// row is gone).
    pub conditions: Vec<DebuggedCondition>,
    /// Observers in the file that do not watch this entity type and kind.
    pub other_observers: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DebuggedCondition {
    pub observer: String,
    pub condition: Option<String>,
    pub holds: Option<bool>,
}

/// `debug-event`: each event of the target (the latest only unless `all`) as a tree — what
/// matched, each action's outcome, attempts and latency, the later outcomes of queued actions,
/// the observers whose condition was false, the processing time — read from the history; with
/// the observers file, each observer's condition and whether it holds on the event.
///
/// # Errors
/// No history for the target, or the database failed.
pub async fn debug_event(
    pool: &PgPool,
    target: &DebugTarget,
    all: bool,
    config: Option<&ObserversConfig>,
    json: bool,
) -> anyhow::Result<String> {
    let mut query = crate::history::HistoryQuery {
        limit: DEBUG_EVENT_ROWS,
        ..crate::history::HistoryQuery::default()
    };
    match target {
        DebugTarget::Entity {
            entity_type,
            entity_id,
        } => {
            query.entity_type = Some(entity_type.clone());
            query.entity_id = Some(entity_id.clone());
        }
        DebugTarget::Event(id) => query.event_id = Some(*id),
    }
    let page = crate::history::search(pool, &query)
        .await
        .context("read the history")?;
    // Rows newest first; events in the order their latest row appears.
    let mut order: Vec<Uuid> = Vec::new();
    for entry in &page.entries {
        if !order.contains(&entry.event_id) {
            order.push(entry.event_id);
        }
    }
    if order.is_empty() {
        anyhow::bail!(
            "no history for {}: its changes were not processed yet, history is off, or its rows are past the retention",
            match target {
                DebugTarget::Entity {
                    entity_type,
                    entity_id,
                } => format!(
                    "{} {}",
                    escape_control(entity_type),
                    escape_control(entity_id)
                ),
                DebugTarget::Event(id) => format!("event {id}"),
            }
        );
    }
    if !all {
        order.truncate(1);
    }
    let mut events = Vec::with_capacity(order.len());
    for id in order {
        let rows: Vec<&crate::history::HistoryEntry> = page
            .entries
            .iter()
            .filter(|entry| entry.event_id == id)
            .collect();
        let event = rows
            .iter()
            .find(|entry| entry.record_kind == "event")
            .map(|entry| (*entry).clone());
        let mut jobs: Vec<crate::history::HistoryEntry> = rows
            .iter()
            .filter(|entry| entry.record_kind != "event")
            .map(|entry| (*entry).clone())
            .collect();
        jobs.reverse();
        let (conditions, other_observers) = match (config, &event) {
            (Some(config), Some(event)) => conditions_on(pool, config, event).await?,
            _ => (Vec::new(), 0),
        };
        events.push(DebuggedEvent {
            event,
            jobs,
            conditions,
            other_observers,
        });
    }
    if json {
        let text = format!("{:#}", serde_json::to_value(&events)?);
        return Ok(format!("{}\n", json_for_terminal(&text)));
    }
    let mut out = String::new();
    for (position, event) in events.iter().enumerate() {
        if position > 0 {
            out.push('\n');
        }
        write_debugged_event(&mut out, event, config.is_some());
    }
    Ok(out)
}

fn history_actions(entry: &crate::history::HistoryEntry) -> Vec<crate::history::HistoryAction> {
    serde_json::from_value(entry.actions.clone()).unwrap_or_default()
}

fn plural(count: u32, word: &str) -> String {
    format!("{count} {word}{}", if count == 1 { "" } else { "s" })
}

/// One action's outcome in words, with a mark: `✓` done, `✗` failed, `…` still to come, `=` not
/// run here.
fn action_outcome(action: &crate::history::HistoryAction) -> (char, String) {
    use crate::history::HistoryOutcome;
    let error = || {
        format!(
            ": {} {}",
            action.error_code.as_deref().unwrap_or("?"),
            escape_control(action.error_message.as_deref().unwrap_or_default())
        )
    };
    let attempts = plural(action.attempts, "attempt");
    let latency = action.latency_ms;
    match action.outcome {
        HistoryOutcome::Succeeded => ('✓', format!("succeeded, {attempts}, {latency:.1} ms")),
        HistoryOutcome::Failed => (
            '✗',
            format!("failed, {attempts}, {latency:.1} ms{}", error()),
        ),
        HistoryOutcome::DeadLettered => (
            '✗',
            format!(
                "dead-lettered{}, {attempts}, {latency:.1} ms{}",
                action
                    .dead_letter_id
                    .map(|id| format!(" as {id}"))
                    .unwrap_or_default(),
                error()
            ),
        ),
        HistoryOutcome::Queued => (
            '…',
            format!(
                "queued on {}{}",
                escape_control(action.queue.as_deref().unwrap_or("default")),
                if action.attempts == 0 {
                    String::new()
                } else {
                    format!(" after {attempts} ({latency:.1} ms){}", error())
                }
            ),
        ),
        HistoryOutcome::SkippedDuplicate => {
            ('=', "skipped: another node holds its claim".to_owned())
        }
        HistoryOutcome::AlreadyCompleted => {
            ('=', "already completed before: not run again".to_owned())
        }
    }
}

/// The later rows of a queued action: each job attempt's outcome, oldest first.
type LaterRows<'rows> = Vec<(
    crate::history::HistoryAction,
    &'rows crate::history::HistoryEntry,
)>;

fn moment(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The `debug-event` tree of one event.
fn write_debugged_event(out: &mut String, debugged: &DebuggedEvent, with_config: bool) {
    let Some(event) = &debugged.event else {
        write_orphan_jobs(out, &debugged.jobs);
        return;
    };
    let _ = writeln!(
        out,
        "Event: {} {}",
        escape_control(&event.entity_type),
        event.event_kind.to_ascii_uppercase()
    );
    let _ = writeln!(out, "├── Entity ID: {}", escape_control(&event.entity_id));
    let _ = writeln!(out, "├── Event ID: {}", event.event_id);
    if let Some(at) = event.event_at {
        let _ = writeln!(out, "├── Timestamp: {}", moment(at));
    }
    if let Some(position) = event.change_log_id {
        let _ = writeln!(out, "├── Change-log row: {position}");
    }
    let unknown = || "?".to_owned();
    let _ = writeln!(
        out,
        "├── Processed: {} by {} (partition {}, epoch {})",
        moment(event.processed_at),
        escape_control(event.node_id.as_deref().unwrap_or("?")),
        event
            .partition
            .map_or_else(unknown, |partition| partition.to_string()),
        event.epoch.map_or_else(unknown, |epoch| epoch.to_string())
    );
    let actions = history_actions(event);
    let later: LaterRows<'_> = debugged
        .jobs
        .iter()
        .flat_map(|job| {
            history_actions(job)
                .into_iter()
                .map(move |action| (action, job))
        })
        .collect();
    let _ = writeln!(
        out,
        "├── Matching Observers: {}",
        event.matched_observers.len()
    );
    for (position, observer) in event.matched_observers.iter().enumerate() {
        let last = position + 1 == event.matched_observers.len();
        let condition = debugged
            .conditions
            .iter()
            .find(|condition| condition.observer == *observer);
        let condition = with_config.then_some(ConditionShown(condition));
        write_matched_observer(out, observer, last, condition, &actions, &later);
    }
    let condition_false = event.unmatched_observers.len();
    let non_matching = if with_config {
        condition_false + debugged.other_observers
    } else {
        condition_false
    };
    let _ = writeln!(out, "├── Non-Matching Observers: {non_matching}");
    for (position, observer) in event.unmatched_observers.iter().enumerate() {
        let source = debugged
            .conditions
            .iter()
            .find(|condition| condition.observer == *observer)
            .and_then(|condition| condition.condition.as_deref());
        let _ = writeln!(
            out,
            "│   {} {}: condition false{}",
            if position + 1 == event.unmatched_observers.len() {
                "└──"
            } else {
                "├──"
            },
            escape_control(observer),
            source
                .map(|source| format!(" ({})", escape_control(source)))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "└── Processing Time: {:.1} ms",
        event.processing_ms.unwrap_or_default()
    );
}

/// Only later rows of queued actions remain (the event's own row is past retention).
fn write_orphan_jobs(out: &mut String, jobs: &[crate::history::HistoryEntry]) {
    let first = &jobs[0];
    let _ = writeln!(
        out,
        "Event: {} {} (its processing row is past retention)",
        escape_control(&first.entity_type),
        first.event_kind.to_ascii_uppercase()
    );
    let _ = writeln!(out, "├── Entity ID: {}", escape_control(&first.entity_id));
    let _ = writeln!(out, "├── Event ID: {}", first.event_id);
    let _ = writeln!(out, "└── Later outcomes of queued actions:");
    for (position, job) in jobs.iter().enumerate() {
        let last = position + 1 == jobs.len();
        for action in history_actions(job) {
            let (mark, text) = action_outcome(&action);
            let _ = writeln!(
                out,
                "    {} {}[{}] {}: {mark} {text} ({})",
                if last { "└──" } else { "├──" },
                escape_control(&action.observer),
                action.action_index,
                action.action_type,
                moment(job.processed_at)
            );
        }
    }
}

/// An observer's condition as the observers file states it (`None`: the observer is not in it).
#[derive(Clone, Copy)]
struct ConditionShown<'condition>(Option<&'condition DebuggedCondition>);

/// One matching observer's branch: its condition (given the observers file: `Some`), each
/// action's outcome with the later rows of its job, and the observer's status.
fn write_matched_observer(
    out: &mut String,
    observer: &str,
    last: bool,
    condition: Option<ConditionShown<'_>>,
    actions: &[crate::history::HistoryAction],
    later: &LaterRows<'_>,
) {
    let (branch, indent) = if last {
        ("└──", "    ")
    } else {
        ("├──", "│   ")
    };
    let _ = writeln!(out, "│   {branch} {}", escape_control(observer));
    if let Some(ConditionShown(condition)) = condition {
        let text = match condition.and_then(|condition| condition.condition.as_ref()) {
            None if condition.is_none() => {
                "? (the observer is not in the observers file)".to_owned()
            }
            None => "✓ (no condition)".to_owned(),
            Some(source) => format!(
                "{} {}",
                match condition.and_then(|condition| condition.holds) {
                    Some(true) => '✓',
                    Some(false) => '✗',
                    None => '?',
                },
                escape_control(source)
            ),
        };
        let _ = writeln!(out, "│   {indent}├── Condition: {text}");
    }
    let of_observer: Vec<&crate::history::HistoryAction> = actions
        .iter()
        .filter(|action| action.observer == observer)
        .collect();
    let _ = writeln!(out, "│   {indent}├── Actions: {}", of_observer.len());
    let mut failed = false;
    let mut pending = false;
    for (index, action) in of_observer.iter().enumerate() {
        let (action_branch, action_indent) = if index + 1 == of_observer.len() {
            ("└──", "    ")
        } else {
            ("├──", "│   ")
        };
        let (mark, text) = action_outcome(action);
        let _ = writeln!(
            out,
            "│   {indent}│   {action_branch} {} #{}: {mark} {text}",
            action.action_type, action.action_index
        );
        let followed: Vec<_> = later
            .iter()
            .filter(|(job, _)| {
                job.observer == action.observer && job.action_index == action.action_index
            })
            .collect();
        for (step, (job_action, row)) in followed.iter().enumerate() {
            let (mark, text) = action_outcome(job_action);
            let _ = writeln!(
                out,
                "│   {indent}│   {action_indent}{} job{}: {mark} {text} ({})",
                if step + 1 == followed.len() {
                    "└──"
                } else {
                    "├──"
                },
                job_action
                    .job_id
                    .map(|id| format!(" {id}"))
                    .unwrap_or_default(),
                moment(row.processed_at)
            );
        }
        let final_mark = followed
            .last()
            .map_or(mark, |(job_action, _)| action_outcome(job_action).0);
        failed |= final_mark == '✗';
        pending |= final_mark == '…';
    }
    let status = if failed {
        "✗ Failed"
    } else if pending {
        "… Queued"
    } else {
        "✓ Processed"
    };
    let _ = writeln!(out, "│   {indent}└── Status: {status}");
}

/// Each observer of `event`'s entity type and kind with its condition evaluated on the event as
/// the change log holds it, and how many observers of the file watch something else.
async fn conditions_on(
    pool: &PgPool,
    config: &ObserversConfig,
    event: &crate::history::HistoryEntry,
) -> anyhow::Result<(Vec<DebuggedCondition>, usize)> {
    let decoded = match event.change_log_id {
        Some(position) => {
            crate::replay::change_at(pool, &event.entity_type, &event.entity_id, position)
                .await
                .context("read the event's change-log row")?
        }
        None => None,
    };
    let kind = crate::domain::EventKind::parse(&event.event_kind).ok();
    let mut conditions = Vec::new();
    let mut other_observers = 0;
    for observer in &config.observers {
        let watches = observer.entity == event.entity_type
            && kind.is_some_and(|kind| observer.events.contains(&kind));
        if !watches {
            other_observers += 1;
            continue;
        }
        let condition = observer.condition.as_ref();
        conditions.push(DebuggedCondition {
            observer: observer.name.to_string(),
            condition: condition.map(|condition| condition.source().to_owned()),
            holds: match (condition, &decoded) {
                (Some(condition), Some(change)) => Some(condition.evaluate(change)),
                _ => None,
            },
        });
    }
    Ok((conditions, other_observers))
}

/// Most bytes of one rendered text `debug-event --explain` prints (`--json` keeps it whole).
pub const EXPLAIN_TEXT_BYTES: usize = 2000;

/// What the observers file would do with a hypothetical change: `debug-event --explain`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Explanation {
    pub event_kind: String,
    pub entity_type: String,
    pub entity_id: String,
    /// The observers of the change's entity type and kind, in file order.
    pub observers: Vec<ExplainedObserver>,
    /// Observers of other entity types or kinds.
    pub other_observers: usize,
}

/// One observer watching the change's entity type and kind.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExplainedObserver {
    pub observer: String,
    pub condition: Option<String>,
    pub matches: bool,
    /// The actions it would run (only when it matches).
    pub actions: Vec<ExplainedAction>,
}

/// One action a matching observer would run, with what it would send.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExplainedAction {
    pub index: usize,
    #[serde(rename = "type")]
    pub action_type: String,
    /// Where it would go, secrets left out (a URL's credentials and query; an `*_env` URL by its
    /// variable's name).
    pub target: Option<String>,
    /// `inline` (in the page) or `async` (through the job queue).
    pub mode: String,
    pub rendered: Vec<RenderedText>,
}

/// One text an action would send, rendered from the change.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RenderedText {
    /// Which setting it renders (`body_template`, `subject`, … ; `body` for a webhook's default
    /// body, the event envelope).
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Why it does not render (the action would fail with OB004).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `config` would do with the change-log row `change` (a JSON object with the change log's
/// columns; `id` and `created_at` may be left out): which observers match, with their
/// conditions, and what each of their actions would send, rendered. Nothing is sent.
///
/// # Errors
/// The change does not decode as a change-log row (the message names the column).
pub fn explain_change(
    config: &ObserversConfig,
    change: &serde_json::Value,
) -> anyhow::Result<Explanation> {
    let mut row = change
        .as_object()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the change must be a JSON object with the change log's columns (object_type, object_id, modification_type, object_data, …)"))?;
    row.entry("id")
        .or_insert_with(|| serde_json::Value::String(Uuid::nil().to_string()));
    let event = crate::listener::decode_row_owned(0, serde_json::Value::Object(row))
        .map_err(|(_, malformed)| anyhow::anyhow!("the change does not decode: {malformed}"))?;
    let mut observers = Vec::new();
    let mut other_observers = 0;
    for (position, observer) in config.observers.iter().enumerate() {
        if observer.entity != event.entity_type || !observer.events.contains(&event.kind) {
            other_observers += 1;
            continue;
        }
        let matches = observer
            .condition
            .as_ref()
            .is_none_or(|condition| condition.evaluate(&event));
        let envelope = event.envelope(observer.name.as_str());
        let actions = if matches {
            observer
                .actions
                .iter()
                .map(|action| explain_action(config, position, action, &envelope))
                .collect()
        } else {
            Vec::new()
        };
        observers.push(ExplainedObserver {
            observer: observer.name.to_string(),
            condition: observer
                .condition
                .as_ref()
                .map(|condition| condition.source().to_owned()),
            matches,
            actions,
        });
    }
    Ok(Explanation {
        event_kind: event.kind.as_str().to_owned(),
        entity_type: event.entity_type,
        entity_id: event.entity_id,
        observers,
        other_observers,
    })
}

fn explain_action(
    config: &ObserversConfig,
    observer_position: usize,
    action: &crate::actions::ActionDefinition,
    envelope: &crate::domain::Envelope<'_>,
) -> ExplainedAction {
    let prefix = format!("observers[{observer_position}].actions[{}].", action.index);
    let mut rendered: Vec<RenderedText> = config
        .templates
        .names_under(&prefix)
        .into_iter()
        .map(|name| {
            let what = name[prefix.len()..]
                .rsplit_once('.')
                .map_or(&name[prefix.len()..], |(what, _)| what)
                .to_owned();
            match config.templates.render(&name, envelope) {
                Ok(text) => RenderedText {
                    what,
                    text: Some(text),
                    error: None,
                },
                Err(error) => RenderedText {
                    what,
                    text: None,
                    error: Some(error.message),
                },
            }
        })
        .collect();
    let action_type = action.kind.type_name();
    if action_type == "webhook" && !rendered.iter().any(|text| text.what.starts_with("body")) {
        rendered.insert(
            0,
            RenderedText {
                what: "body".to_owned(),
                text: Some(serde_json::to_string(envelope).unwrap_or_default()),
                error: None,
            },
        );
    }
    ExplainedAction {
        index: action.index,
        action_type: action_type.to_owned(),
        target: crate::actions::target_of(&action.kind).map(|target| redacted_target(&target)),
        mode: match action.delivery.mode {
            crate::config::DeliveryMode::Inline => "inline",
            crate::config::DeliveryMode::Async => "async",
        }
        .to_owned(),
        rendered,
    }
}

/// A target as `--explain` shows it: a URL without its credentials and query (they may carry
/// tokens); anything else as it is.
fn redacted_target(target: &str) -> String {
    match url::Url::parse(target) {
        Ok(mut url) if url.has_host() => {
            let had_query = url.query().is_some();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            let mut text = url.to_string();
            if had_query {
                text.push_str("?…");
            }
            text
        }
        _ => target.to_owned(),
    }
}

/// `debug-event --explain` as a tree.
#[must_use]
pub fn explanation_text(explanation: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Explain: {} {} {} (a hypothetical change: nothing is sent)",
        explanation.event_kind.to_ascii_uppercase(),
        escape_control(&explanation.entity_type),
        escape_control(&explanation.entity_id)
    );
    let matched = explanation
        .observers
        .iter()
        .filter(|observer| observer.matches)
        .count();
    let _ = writeln!(
        out,
        "├── {matched} of {} observer(s) of {} {} would run; {} watch(es) other entities or kinds",
        explanation.observers.len(),
        escape_control(&explanation.entity_type),
        explanation.event_kind,
        explanation.other_observers
    );
    for (position, observer) in explanation.observers.iter().enumerate() {
        let last = position + 1 == explanation.observers.len();
        let (branch, stem) = if last {
            ("└──", "    ")
        } else {
            ("├──", "│   ")
        };
        let condition = observer.condition.as_deref().map_or_else(
            || "no condition".to_owned(),
            |condition| {
                format!(
                    "condition `{}` {}",
                    escape_control(condition),
                    if observer.matches { "true" } else { "false" }
                )
            },
        );
        let mark = if observer.matches { '✓' } else { '✗' };
        let _ = writeln!(
            out,
            "{branch} {mark} {} ({condition})",
            escape_control(&observer.observer)
        );
        for (index, action) in observer.actions.iter().enumerate() {
            let last_action = index + 1 == observer.actions.len();
            let (action_branch, action_stem) = if last_action {
                ("└──", "    ")
            } else {
                ("├──", "│   ")
            };
            let _ = writeln!(
                out,
                "{stem}{action_branch} [{}] {}{} ({})",
                action.index,
                action.action_type,
                action
                    .target
                    .as_deref()
                    .map(|target| format!(" → {}", escape_control(target)))
                    .unwrap_or_default(),
                action.mode
            );
            for (text_index, text) in action.rendered.iter().enumerate() {
                let text_branch = if text_index + 1 == action.rendered.len() {
                    "└──"
                } else {
                    "├──"
                };
                let shown = match (&text.text, &text.error) {
                    (Some(text), _) => clipped(text),
                    (None, Some(error)) => format!("does not render: {}", escape_control(error)),
                    (None, None) => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{stem}{action_stem}{text_branch} {}: {shown}",
                    text.what
                );
            }
        }
    }
    out
}

/// A rendered text on one line, control characters escaped, cut to [`EXPLAIN_TEXT_BYTES`].
fn clipped(text: &str) -> String {
    let escaped = escape_control(text);
    if escaped.len() <= EXPLAIN_TEXT_BYTES {
        return escaped.into_owned();
    }
    let mut end = EXPLAIN_TEXT_BYTES;
    while !escaped.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &escaped[..end], text.len())
}

/// `dlq list`: a table (or JSON) of dead letters matching `filter`.
///
/// # Errors
/// The database failed.
pub async fn dlq_list(
    queue: &PostgresDeadLetterQueue,
    filter: &DeadLetterFilter,
    json: bool,
) -> anyhow::Result<String> {
    let letters = queue.list(filter).await?;
    if json {
        return Ok(format!("{:#}\n", serde_json::to_value(&letters)?));
    }
    // Counted up to a cap: a flood of dead letters costs a bounded read here too.
    let cap = crate::control::DEAD_LETTER_COUNT_CAP;
    let total = crate::dlq::count_dead_letters_up_to(queue.pool(), cap).await?;
    let total = if total >= cap {
        format!("{cap}+")
    } else {
        total.to_string()
    };
    let mut out = format!("Dead letters (showing {} of {total})\n", letters.len());
    let _ = writeln!(
        out,
        "{:<36}  {:<20}  {:<12}  {:<7}  {:>8}  {:<12}  error",
        "id", "observer", "entity", "code", "attempts", "age"
    );
    // Observer, entity and error come from the change log and the targets: escaped, so each
    // letter is one row and nothing reaches the terminal as a control sequence.
    for letter in &letters {
        let message: String = crate::dlq::last_error_line(&letter.letter.error_message)
            .chars()
            .take(60)
            .collect();
        let _ = writeln!(
            out,
            "{:<36}  {:<20}  {:<12}  {:<7}  {:>8}  {:<12}  {}",
            letter.id,
            format!(
                "{}[{}]",
                escape_control(&letter.letter.observer),
                letter.letter.action_index
            ),
            escape_control(&letter.letter.event.entity_type),
            letter.letter.error_code.as_str(),
            letter.letter.attempts,
            age(letter),
            escape_control(&message)
        );
    }
    Ok(out)
}

/// `dlq show ID`: everything stored for one dead letter, as JSON whose strings hold no raw
/// control characters (see [`json_for_terminal`]).
///
/// # Errors
/// No such letter, or the database failed.
pub async fn dlq_show(queue: &PostgresDeadLetterQueue, id: Uuid) -> anyhow::Result<String> {
    let letter = queue
        .get(id)
        .await?
        .with_context(|| format!("no dead letter with id {id}"))?;
    let json = format!("{:#}\n", serde_json::to_value(&letter)?);
    Ok(json_for_terminal(&json).into_owned())
}

/// `dlq purge`: deletes the letters matching `filter`.
///
/// # Errors
/// The database failed.
pub async fn dlq_purge(
    queue: &PostgresDeadLetterQueue,
    filter: &DeadLetterFilter,
) -> anyhow::Result<String> {
    let deleted = queue.purge(filter).await?;
    Ok(format!(
        "✓ deleted {deleted} dead letter{}\n",
        if deleted == 1 { "" } else { "s" }
    ))
}

/// `dlq stats` (and `dlq retry --dry-run`): the letters matching `filter` counted per observer
/// action and error code, largest groups first, each with its newest letter's last error.
///
/// # Errors
/// The database failed.
pub async fn dlq_stats(
    pool: &PgPool,
    filter: &DeadLetterFilter,
    json: bool,
) -> anyhow::Result<String> {
    let groups = crate::dlq::letter_groups(pool, filter).await?;
    if json {
        return Ok(format!("{:#}\n", serde_json::to_value(&groups)?));
    }
    let total: u64 = groups.iter().map(|group| group.count).sum();
    let mut out = format!(
        "{total} dead letter{} in {} group{}{}\n",
        if total == 1 { "" } else { "s" },
        groups.len(),
        if groups.len() == 1 { "" } else { "s" },
        if i64::try_from(groups.len()).unwrap_or(i64::MAX) >= crate::dlq::MAX_LETTER_GROUPS {
            " (the largest only)"
        } else {
            ""
        }
    );
    if groups.is_empty() {
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "{:>8}  {:<24}  {:<9}  {:<7}  {:<12}  {:<12}  last error",
        "letters", "observer", "action", "code", "oldest", "newest"
    );
    for group in &groups {
        let error: String = group.last_error.chars().take(60).collect();
        let _ = writeln!(
            out,
            "{:>8}  {:<24}  {:<9}  {:<7}  {:<12}  {:<12}  {}",
            group.count,
            format!(
                "{}[{}]",
                escape_control(&group.observer),
                group.action_index
            ),
            escape_control(&group.action_type),
            escape_control(&group.error_code),
            ago(group.oldest),
            ago(group.newest),
            escape_control(&error)
        );
    }
    Ok(out)
}

/// `dlq retry` without an id: hands the letters `filter` selects back to the job queue (see
/// [`crate::requeue`]) with progress on stderr; exit 5 (interrupted) after Ctrl-C, the batches
/// done so far staying done.
///
/// # Errors
/// The run was interrupted, or the database failed.
pub async fn dlq_requeue(
    pool: &PgPool,
    observers: &[crate::observers::ObserverDefinition],
    filter: &DeadLetterFilter,
    style: ProgressStyle,
    json: bool,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<String> {
    let mut progress = Progress::new(style, "letters");
    let on_progress = |report: &crate::requeue::RequeueReport| {
        progress.update(
            report.letters,
            report.matching,
            || format!("{} kept", report.kept),
            |seconds| {
                format!(
                    "dlq retry: {}/{} letters, {} requeued, {} new jobs, {} kept, {:.0} letters/s",
                    report.letters,
                    report.matching,
                    report.requeued,
                    report.enqueued,
                    report.kept,
                    f64_from(report.letters) / seconds
                )
            },
        );
    };
    let result =
        crate::requeue::requeue_letters(pool, observers, filter, cancel, on_progress).await;
    progress.finish();
    let report = result?;
    if report.interrupted {
        return Err(crate::requeue::RequeueError::Interrupted {
            letters: report.letters,
            matching: report.matching,
            handed_back: report.requeued + report.enqueued + report.already_queued_or_done,
        }
        .into());
    }
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    let handed_back = report.requeued + report.enqueued + report.already_queued_or_done;
    let mut out = format!(
        "✓ {handed_back} dead letter{} handed back to the job queue in {:.1}s: {} failed jobs pending again, {} new jobs, {} already queued or delivered\n",
        if handed_back == 1 { "" } else { "s" },
        progress.seconds(),
        report.requeued,
        report.enqueued,
        report.already_queued_or_done,
    );
    if report.kept > 0 {
        let _ = writeln!(
            out,
            "✗ {} letter{} kept:",
            report.kept,
            if report.kept == 1 { "" } else { "s" }
        );
        for kept in &report.kept_letters {
            let _ = writeln!(out, "  {}  {}", kept.id, escape_control(&kept.reason));
        }
        if report.kept > report.kept_letters.len() as u64 {
            let _ = writeln!(
                out,
                "  … and {} more",
                report.kept - report.kept_letters.len() as u64
            );
        }
    }
    Ok(out)
}

/// `dlq retry ID`: runs the letter's action again now, under its observer's retry policy, with
/// the same idempotency key; on success the letter is removed, on failure it stays. `database`
/// actions call their function through the queue's database; `cache` actions need `redis`.
///
/// # Errors
/// No such letter, its observer or action is no longer configured, the action failed again, or
/// the database failed.
pub async fn dlq_retry(
    queue: &PostgresDeadLetterQueue,
    config: ObserversConfig,
    id: Uuid,
    redis: Option<crate::redis_client::SharedConnection>,
) -> anyhow::Result<String> {
    let letter = queue
        .get(id)
        .await?
        .with_context(|| format!("no dead letter with id {id}"))?;
    anyhow::ensure!(
        !letter.event_is_unreadable(),
        "dead letter {id} holds no event that can be sent again ({}); purge it, or replay the change from the change log",
        letter.letter.event.data[crate::dlq::EVENT_OMITTED]
            .as_str()
            .unwrap_or("its stored event does not decode")
    );
    let observer = config
        .observers
        .iter()
        .find(|observer| observer.name.as_str() == letter.letter.observer)
        .with_context(|| {
            format!(
                "observer {:?} is not in {}",
                letter.letter.observer, config.origin
            )
        })?
        .clone();
    let action = observer
        .actions
        .iter()
        .find(|action| action.index == letter.letter.action_index)
        .with_context(|| {
            format!(
                "observer {} has no action {}",
                observer.name, letter.letter.action_index
            )
        })?;
    let mut runner = ActionRunner::new(Arc::new(config.templates))?
        .with_private_targets_allowed(&config.executor.private_targets_allowed)?
        .with_database(queue.pool().clone());
    if let Some(connection) = redis {
        runner = runner.with_redis(connection);
    }
    let event = &letter.letter.event;
    let envelope = event.envelope(observer.name.as_str());
    let context = ActionContext {
        event,
        observer: &observer.name,
        action_index: action.index,
        envelope: &envelope,
        lease: None,
    };
    let timeout = action.kind.timeout();
    let outcome = run_with_retry(&observer.retry, |_| async {
        match tokio::time::timeout(timeout, runner.attempt(action, &context)).await {
            Ok(result) => result,
            Err(_) => Err(crate::retry::AttemptError::new(
                crate::error::ErrorCode::ActionTimeout,
                "attempt timed out",
            )),
        }
    })
    .await;
    match outcome.result {
        Ok(success) => {
            queue.remove(id).await?;
            Ok(format!(
                "✓ retried {id}: {} after {} attempt(s); removed from the dead-letter queue\n",
                escape_control(&success.detail),
                outcome.attempts
            ))
        }
        Err(error) => anyhow::bail!(
            "retry of {id} failed again after {} attempt(s): {}; the letter stays",
            outcome.attempts,
            escape_control(&error.to_string())
        ),
    }
}

/// A scraped `/metrics` larger than this is refused (a node renders a few tens of KiB).
pub const MAX_METRICS_BYTES: usize = 16 * 1024 * 1024;
/// How long one scrape may take.
pub const METRICS_SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/metrics` URL of a node's HTTP endpoint given as `host:port` or an `http(s)://` URL
/// (without a path, `/metrics` is added).
///
/// # Errors
/// The endpoint is not a `host:port` or an http(s) URL.
pub fn metrics_url(endpoint: &str) -> anyhow::Result<reqwest::Url> {
    let with_scheme = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let mut url = reqwest::Url::parse(&with_scheme).with_context(|| {
        format!(
            "--http-endpoint {:?} is neither host:port nor an http(s) URL",
            escape_control(endpoint)
        )
    })?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
        "--http-endpoint {:?} is neither host:port nor an http(s) URL",
        escape_control(endpoint)
    );
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/metrics");
    }
    Ok(url)
}

/// The text of one node's `/metrics`, read up to [`MAX_METRICS_BYTES`] within
/// [`METRICS_SCRAPE_TIMEOUT`].
///
/// # Errors
/// The node is unreachable, answered with an error status, or sent too much.
pub async fn scrape_metrics(
    client: &reqwest::Client,
    url: &reqwest::Url,
) -> anyhow::Result<String> {
    let mut response = client
        .get(url.clone())
        .timeout(METRICS_SCRAPE_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("scraping {url} failed"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "scraping {url} failed: HTTP {}",
        response.status()
    );
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading {url} failed"))?
    {
        anyhow::ensure!(
            body.len() + chunk.len() <= MAX_METRICS_BYTES,
            "{url} sent more than {MAX_METRICS_BYTES} bytes of metrics"
        );
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).with_context(|| format!("{url} sent metrics that are not UTF-8"))
}

/// `metrics`: every endpoint's `/metrics` — as scraped (`raw`), or summarized, with events and
/// actions per second between two scrapes `sample_interval` apart (zero: totals only), as text
/// or JSON.
///
/// # Errors
/// An endpoint is malformed or unreachable, or its text does not parse.
pub async fn metrics(
    endpoints: &[String],
    raw: bool,
    json: bool,
    sample_interval: Duration,
) -> anyhow::Result<String> {
    let urls = endpoints
        .iter()
        .map(|endpoint| metrics_url(endpoint))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = reqwest::Client::builder()
        .build()
        .context("building the HTTP client failed")?;
    let mut out = String::new();
    if raw {
        for url in &urls {
            out.push_str(&scrape_metrics(&client, url).await?);
        }
        return Ok(out);
    }
    let summarize = |url: &reqwest::Url, text: &str| {
        crate::metrics_text::parse(text)
            .map(|samples| crate::metrics_text::summarize(&samples))
            .with_context(|| format!("{url} sent metrics that do not parse"))
    };
    let mut first = Vec::with_capacity(urls.len());
    for url in &urls {
        first.push(summarize(url, &scrape_metrics(&client, url).await?)?);
    }
    let started = std::time::Instant::now();
    let mut nodes = Vec::with_capacity(urls.len());
    if sample_interval.is_zero() {
        nodes.extend(
            urls.iter()
                .zip(first)
                .map(|(url, summary)| (url, summary, None)),
        );
    } else {
        tokio::time::sleep(sample_interval).await;
        let elapsed = started.elapsed().as_secs_f64();
        for (url, before) in urls.iter().zip(first) {
            let after = summarize(url, &scrape_metrics(&client, url).await?)?;
            let rates = crate::report::ScrapeRates::between(&before, &after, elapsed);
            nodes.push((url, after, Some(rates)));
        }
    }
    for (url, summary, rates) in &nodes {
        if json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({
                    "endpoint": url.as_str(),
                    "rates": rates,
                    "summary": summary,
                })
            );
        } else {
            out.push_str(&crate::report::metrics_summary_text(
                url.as_str(),
                summary,
                rates.as_ref(),
            ));
        }
    }
    Ok(out)
}

/// How `backfill` reports its progress on stderr while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressStyle {
    /// An `indicatif` bar (count, rate, ETA), redrawn in place: for a terminal.
    Bar,
    /// A plain line at most every [`PLAIN_PROGRESS_INTERVAL`]: for logs and pipes.
    Lines,
    /// Nothing.
    Quiet,
}

/// How often plain progress lines are printed.
pub const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Synthetic entries `backfill --dry-run` shows.
pub const BACKFILL_SAMPLE_SIZE: u32 = 5;

/// `backfill --dry-run`: what a backfill of `table` would write (counts and a sample); writes
/// nothing.
///
/// # Errors
/// The table cannot be backfilled or the database failed.
pub async fn backfill_preview(pool: &PgPool, table: &str, json: bool) -> anyhow::Result<String> {
    crate::migrate::run(pool)
        .await
        .context("migrate the database")?;
    let preview = crate::backfill::preview(pool, table, BACKFILL_SAMPLE_SIZE).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&preview)?));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run: backfill of {} (entity {}, id column {}, walked by primary key {})",
        escape_control(&preview.table),
        escape_control(&preview.entity_type),
        escape_control(&preview.id_column),
        escape_control(&preview.key_columns.join(", "))
    );
    let _ = writeln!(
        out,
        "  {} rows, {} would get a synthetic INSERT ({} already have changes in the log)",
        preview.rows,
        preview.rows_to_write,
        preview.rows - preview.rows_to_write.min(preview.rows)
    );
    if let Some(previous) = &preview.previous_run {
        let _ = writeln!(
            out,
            "  an earlier run {} after {} rows ({} written){}",
            if previous.finished {
                "finished"
            } else {
                "stopped"
            },
            previous.rows_scanned,
            previous.rows_written,
            if previous.finished {
                "; backfill does nothing unless --restart"
            } else {
                "; backfill resumes it"
            }
        );
    }
    for entry in &preview.sample {
        let _ = writeln!(out, "  sample: {}", json_for_terminal(&entry.to_string()));
    }
    let _ = writeln!(out, "nothing written");
    Ok(out)
}

/// `backfill`: writes synthetic INSERT change-log rows for `table`'s existing rows, reporting
/// progress on stderr in `style`, until done or `cancel` fires; returns the summary to print.
///
/// # Errors
/// Bad settings, a table that cannot be backfilled, the database failed, or the run was
/// interrupted (run again to resume).
pub async fn backfill(
    pool: &PgPool,
    table: &str,
    settings: &crate::backfill::BackfillSettings,
    style: ProgressStyle,
    json: bool,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<String> {
    crate::migrate::run(pool)
        .await
        .context("migrate the database")?;
    let mut progress = Progress::new(style, "rows");
    let mut on_progress = |done: &crate::backfill::BackfillProgress| {
        progress.update(
            done.rows_scanned,
            done.total_rows,
            || format!("{} written", done.rows_written),
            |seconds| {
                format!(
                    "backfill {}: {}/{} rows scanned, {} written, {:.0} rows/s",
                    escape_control(table),
                    done.rows_scanned,
                    done.total_rows,
                    done.rows_written,
                    f64_from(done.rows_scanned) / seconds
                )
            },
        );
    };
    let result = crate::backfill::run(pool, table, settings, cancel, &mut on_progress).await;
    progress.finish();
    let summary = result?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&summary)?));
    }
    if summary.already_complete {
        return Ok(format!(
            "{} was already backfilled ({} rows scanned, {} written); nothing to do (--restart scans it again)\n",
            escape_control(&summary.table),
            summary.total_rows_scanned,
            summary.total_rows_written
        ));
    }
    Ok(format!(
        "✓ backfilled {} (entity {}{}): {} rows scanned, {} synthetic INSERTs written, {} skipped (already in the change log), {:.1}s, {:.0} rows/s\n",
        escape_control(&summary.table),
        escape_control(&summary.entity_type),
        if summary.resumed { ", resumed" } else { "" },
        summary.rows_scanned,
        summary.rows_written,
        summary.rows_skipped,
        summary.elapsed_seconds,
        summary.rows_per_second
    ))
}

/// A progress bar counting `unit` (count, rate, ETA, a message), for a terminal.
fn progress_bar(unit: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {{bar:40}} {{human_pos}}/{{human_len}} {unit}  {{rate}}  ETA {{eta}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "rate",
            move |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.0} {unit}/s", state.per_sec());
            },
        ),
    );
    bar
}

/// A long command's progress on stderr, in its [`ProgressStyle`]: a bar redrawn in place, or a
/// plain line at most every [`PLAIN_PROGRESS_INTERVAL`].
struct Progress {
    style: ProgressStyle,
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last_line: Option<std::time::Instant>,
}

impl Progress {
    fn new(style: ProgressStyle, unit: &'static str) -> Progress {
        Progress {
            style,
            bar: (style == ProgressStyle::Bar).then(|| progress_bar(unit)),
            started: std::time::Instant::now(),
            last_line: None,
        }
    }

    /// `done` of `total`: the bar with `message` beside it, or — when a line is due — `line`
    /// given the seconds since the start.
    fn update(
        &mut self,
        done: u64,
        total: u64,
        message: impl FnOnce() -> String,
        line: impl FnOnce(f64) -> String,
    ) {
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(message());
        } else if self.style == ProgressStyle::Lines
            && self
                .last_line
                .is_none_or(|at| at.elapsed() >= PLAIN_PROGRESS_INTERVAL)
        {
            self.last_line = Some(std::time::Instant::now());
            eprintln!("{}", line(self.seconds().max(0.001)));
        }
    }

    /// Seconds since the start.
    fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Changes `replay --dry-run` shows.
pub const REPLAY_SAMPLE_SIZE: usize = 5;

/// `replay --dry-run`: what replaying `request` would enqueue (counts and a sample); enqueues
/// nothing.
///
/// # Errors
/// An unknown observer, or the database failed.
pub async fn replay_preview(
    pool: &PgPool,
    matcher: &crate::matcher::Matcher,
    request: &crate::replay::ReplayRequest,
    json: bool,
) -> anyhow::Result<String> {
    crate::migrate::run(pool)
        .await
        .context("migrate the database")?;
    let preview = crate::replay::preview(pool, matcher, request, REPLAY_SAMPLE_SIZE).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&preview)?));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run: replay of {}",
        describe_request(
            request.entity_type.as_deref(),
            request.entity_id.as_deref(),
            (request.since, request.until),
            request.observer.as_deref()
        )
    );
    let _ = writeln!(
        out,
        "  {} changes selected, {} matched by an observer → {} jobs would be enqueued{}",
        preview.changes,
        preview.matching_changes,
        preview.jobs,
        if preview.undecodable > 0 {
            format!(
                " ({} changes do not decode and would be skipped)",
                preview.undecodable
            )
        } else {
            String::new()
        }
    );
    for change in &preview.sample {
        let _ = writeln!(
            out,
            "  sample: position {} {} {} {} → {}",
            change.position,
            change.event,
            escape_control(&change.entity_type),
            escape_control(&change.entity_id),
            escape_control(&change.actions.join(", "))
        );
    }
    let _ = writeln!(out, "nothing enqueued");
    Ok(out)
}

/// A replay's selection in words.
fn describe_request(
    entity_type: Option<&str>,
    entity_id: Option<&str>,
    (since, until): (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>),
    observer: Option<&str>,
) -> String {
    let mut parts = Vec::new();
    parts.push(match (entity_type, entity_id) {
        (Some(kind), Some(id)) => format!("{} {}", escape_control(kind), escape_control(id)),
        (Some(kind), None) => format!("every {}", escape_control(kind)),
        (None, Some(id)) => format!("entity id {}", escape_control(id)),
        (None, None) => "every entity".to_owned(),
    });
    if let Some(since) = since {
        parts.push(format!("since {}", since.to_rfc3339()));
    }
    if let Some(until) = until {
        parts.push(format!("until {}", until.to_rfc3339()));
    }
    parts.push(match observer {
        Some(name) => format!("observer {}", escape_control(name)),
        None => "every observer".to_owned(),
    });
    parts.join(", ")
}

/// How a `replay` begins.
pub enum ReplayStart<'request> {
    New {
        request: &'request crate::replay::ReplayRequest,
        rate: u32,
    },
    Resume(Uuid),
}

/// `replay`: enqueues the selected changes' jobs, reporting progress on stderr in `style`, until
/// done or `cancel` fires; returns the summary to print.
///
/// # Errors
/// An unknown observer or run, the database failed, or the run was interrupted (resume it).
pub async fn replay(
    pool: &PgPool,
    matcher: &crate::matcher::Matcher,
    start: ReplayStart<'_>,
    style: ProgressStyle,
    json: bool,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<String> {
    crate::migrate::run(pool)
        .await
        .context("migrate the database")?;
    let run = match start {
        ReplayStart::New { request, rate } => {
            crate::replay::start(pool, matcher, request, rate).await?
        }
        ReplayStart::Resume(id) => crate::replay::resume(pool, id).await?,
    };
    let id = run.id;
    if style != ProgressStyle::Quiet {
        eprintln!(
            "replay {id}: {} changes selected (up to change-log position {}), at most {} changes/s",
            run.total_changes, run.selection.upto, run.rate
        );
    }
    let mut progress = Progress::new(style, "changes");
    let done_before = run.changes_done;
    let on_progress = |done: &crate::replay::ReplayRun| {
        progress.update(
            done.changes_done,
            done.total_changes,
            || format!("{} jobs", done.jobs_enqueued),
            |seconds| {
                format!(
                    "replay {id}: {}/{} changes, {} jobs enqueued, {:.0} changes/s",
                    done.changes_done,
                    done.total_changes,
                    done.jobs_enqueued,
                    f64_from(done.changes_done - done_before.min(done.changes_done)) / seconds
                )
            },
        );
    };
    let result = crate::replay::run(pool, matcher, run, cancel, on_progress).await;
    progress.finish();
    let run = result?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&run)?));
    }
    let seconds = progress.seconds();
    Ok(format!(
        "✓ replay {id} completed: {} changes, {} jobs enqueued{}, {seconds:.1}s ({:.0} changes/s); idempotency keys end in :replay:{id}\n",
        run.changes_done,
        run.jobs_enqueued,
        if run.changes_skipped > 0 {
            format!(
                ", {} changes skipped (they do not decode)",
                run.changes_skipped
            )
        } else {
            String::new()
        },
        if seconds > 0.0 {
            f64_from(run.changes_done - done_before.min(run.changes_done)) / seconds
        } else {
            0.0
        }
    ))
}

/// `replay status`: runs, newest first, with their progress.
///
/// # Errors
/// No such run, or the database failed.
pub async fn replay_status(
    pool: &PgPool,
    run: Option<Uuid>,
    limit: i64,
    json: bool,
) -> anyhow::Result<String> {
    crate::migrate::run(pool)
        .await
        .context("migrate the database")?;
    let runs = crate::replay::runs(pool, run, limit).await?;
    if let (Some(id), true) = (run, runs.is_empty()) {
        return Err(crate::replay::ReplayError::UnknownRun(id).into());
    }
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&runs)?));
    }
    if runs.is_empty() {
        return Ok("no replay runs\n".to_owned());
    }
    let mut out = String::new();
    for run in &runs {
        let share = if run.total_changes > 0 {
            f64_from(run.changes_done) * 100.0 / f64_from(run.total_changes)
        } else {
            100.0
        };
        let _ = writeln!(
            out,
            "{} {:<11} {}/{} changes ({share:.0} %), {} jobs, {} skipped, {:.0} changes/s, started {} ago, updated {} ago",
            run.id,
            run.status,
            run.changes_done,
            run.total_changes,
            run.jobs_enqueued,
            run.changes_skipped,
            run.changes_per_second(),
            ago(run.started_at),
            ago(run.updated_at),
        );
        let _ = writeln!(
            out,
            "    {}; up to position {}, at most {}/s{}",
            describe_request(
                run.selection.entity_type.as_deref(),
                run.selection.entity_id.as_deref(),
                (run.selection.since, run.selection.until),
                run.observer.as_deref()
            ),
            run.selection.upto,
            run.rate,
            if run.status == "completed" {
                String::new()
            } else {
                format!("; resume: fraiseql-observers replay --resume {}", run.id)
            }
        );
    }
    Ok(out)
}

/// How long ago `moment` was, in words (`3m 2s`).
fn ago(moment: chrono::DateTime<Utc>) -> String {
    let seconds = u64::try_from((Utc::now() - moment).num_seconds().max(0)).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// A count as a float, for rates.
#[allow(clippy::cast_precision_loss)] // a rate needs no exactness beyond 2^52 rows
fn f64_from(count: u64) -> f64 {
    count as f64
}
