//! The change-log listener: reads committed changes in batches, hands them to the executor in
//! change order, and moves the partition's checkpoint only past what is settled.
//!
//! Batches are PgQ-style (see `migrations/0004_batch_reader.sql` and ARCHITECTURE.md): the rows
//! of transactions that became visible between the checkpoint's snapshot and a new snapshot taken
//! on the reading connection. A late-committing transaction lands in the batch after its commit
//! whatever its ids; a long-running transaction elsewhere holds nothing back. A batch larger than
//! one page is walked by change-log id, the position saved after every page.
//!
//! Invariants:
//! - Pages are executed one after another, so one entity's changes run in change order. With job
//!   routing, the page first asks the job queue (one query) which of its actions' ordering keys
//!   have unfinished jobs; those actions queue behind them instead of running inline, so a change
//!   never overtakes an earlier one of its entity that is waiting in the queue.
//! - The checkpoint moves only after every action of the page is settled (succeeded, or failed
//!   for good and dead-lettered/logged). The completed-actions ledger holds the settled
//!   (event, observer, action) triples of pages that will be read again — a page still in flight
//!   (the early writer) or one that did not settle — so that a replay does not repeat them; a
//!   saved page is covered by its checkpoint and adds no ledger row.
//! - A row that cannot be decoded goes to the dead-letter queue with its reason and the raw row
//!   (an excerpt of it when it is over the row limit or nests too deep); the rest of the page
//!   flows on. A page holds at most `max_page_bytes` of row text (and always at least one row),
//!   so no row and no page can exhaust the node's memory.
//! - Every checkpoint write is fenced by the lease epoch: after another node claims the
//!   partition, this listener stops with [`ListenerError::FencedOut`].

mod decode;
mod reader;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use decode::{
    DEFAULT_MAX_ROW_BYTES, MAX_IDENTITY_CHARS, MAX_ROW_DEPTH, MalformedRow, ROW_EXCERPT_CHARS,
    decode_row, decode_row_owned, decode_row_text, nests_deeper_than, parse_row_text,
};

pub use reader::{NodeReader, PartitionPage, READ_LINGER, ReaderSettings, ReaderTask};

use crate::change_log::{self, ChangeLogError, PageQuery, RawRow};
use crate::checkpoint::{
    ActionKey, BatchPosition, Checkpoint, CheckpointError, CheckpointStore, PendingCompletions,
};
use crate::dlq::{DeadLetterError, NewDeadLetter};
use crate::domain::{EntityEvent, EventKind};
use crate::error::ErrorCode;
use crate::executor::{EventSummary, Executor};
use crate::history::{HistoryContext, HistoryRecord};
use crate::jobs::{JobError, NewJob, unfinished_ordering_keys};

/// A row that is not an event: the identity it is dead-lettered under, its position, what its
/// dead letter keeps of it, and why.
type MalformedEntry = (Uuid, i64, Value, MalformedRow);

/// Default bound of the row text one page holds (`--max-page-bytes`); a page always holds at
/// least one row.
pub const DEFAULT_MAX_PAGE_BYTES: u64 = 16 * 1024 * 1024;

/// The channel the change log's statement trigger notifies.
pub const NOTIFY_CHANNEL: &str = "fraiseql_observers_change_log";
/// Observer name under which undecodable change-log rows are dead-lettered.
pub const DECODE_OBSERVER: &str = "(change-log)";
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
/// Default of the rows all partitions of a node may hold at once (`--max-rows-in-flight`).
pub const DEFAULT_MAX_ROWS_IN_FLIGHT: u32 = 4000;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between checkpoint writes that only move an idle partition's snapshot forward.
const IDLE_ADVANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a failed page before trying it again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How one listener reads.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    /// The partition whose checkpoint this listener owns.
    pub partition: i32,
    /// `Some(count)` to read only rows with `entity_hash % count == partition`; `None` for all.
    pub partition_count: Option<i32>,
    /// Rows per page.
    pub batch_size: u32,
    /// How often to look for changes when no notification arrives.
    pub poll_interval: Duration,
    /// This node's name, recorded as the partition's leader.
    pub node_id: String,
    /// Largest change-log row accepted, in bytes of JSON text; a larger one is dead-lettered
    /// with an excerpt.
    pub max_row_bytes: u32,
    /// Row text one page may hold: a page ends before the row that would pass this (it always
    /// holds one row, so at most this plus one row).
    pub max_page_bytes: u64,
    /// Whether delivered pages write their events' history rows with the checkpoint.
    pub record_history: bool,
    /// The rows this listener's page may hold, shared with every partition of the node (clones
    /// of these settings share it).
    pub row_budget: RowBudget,
}

/// How many change-log rows all partitions of a node hold at once, read and not yet saved: a
/// page takes its share before it reads (its rows per page) and gives back what it did not
/// fill as soon as it has read, the rest when its checkpoint is saved. A node that falls behind
/// so holds at most this many events however many partitions it leads, instead of a full page
/// for every partition; a page never waits for more than the budget holds.
#[derive(Clone, Debug)]
pub struct RowBudget {
    rows: u32,
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl RowBudget {
    /// A budget of `rows` (at least 1).
    #[must_use]
    pub fn new(rows: u32) -> RowBudget {
        let rows = rows.max(1);
        RowBudget {
            rows,
            semaphore: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(rows).unwrap_or(usize::MAX),
            )),
        }
    }

    /// The rows the budget holds in all.
    #[must_use]
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Rows the budget has free now.
    #[must_use]
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Waits for `rows` of the budget (at most all of it).
    async fn take(&self, rows: u32) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.semaphore
            .clone()
            .acquire_many_owned(rows.min(self.rows))
            .await
            .ok()
    }
}

impl Default for RowBudget {
    fn default() -> Self {
        RowBudget::new(DEFAULT_MAX_ROWS_IN_FLIGHT)
    }
}

impl Default for ListenerSettings {
    fn default() -> Self {
        ListenerSettings {
            partition: 0,
            partition_count: None,
            batch_size: DEFAULT_BATCH_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            node_id: default_node_id(),
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
            max_page_bytes: DEFAULT_MAX_PAGE_BYTES,
            record_history: true,
            row_budget: RowBudget::default(),
        }
    }
}

/// `FRAISEQL_OBSERVERS_NODE_ID`, else the host name, else a random id.
#[must_use]
pub fn default_node_id() -> String {
    std::env::var("FRAISEQL_OBSERVERS_NODE_ID")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("node-{}", Uuid::new_v4().simple()))
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    FencedOut(CheckpointError),
    #[error("checkpoint storage failed: {0}")]
    Checkpoint(#[source] CheckpointError),
    #[error(transparent)]
    Read(#[from] ChangeLogError),
    #[error("a dead letter could not be stored: {0}")]
    DeadLetter(#[from] DeadLetterError),
    #[error("looking up the page's unfinished jobs failed: {0}")]
    Jobs(#[from] JobError),
    #[error(
        "{0} action(s) of this page are not settled (their dead letters could not be stored); the page will be retried"
    )]
    Unsettled(usize),
}

impl ListenerError {
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            ListenerError::FencedOut(_) => ErrorCode::FencedOut,
            _ => ErrorCode::StorageUnavailable,
        }
    }
}

impl From<CheckpointError> for ListenerError {
    fn from(error: CheckpointError) -> Self {
        match error {
            CheckpointError::FencedOut { .. } => ListenerError::FencedOut(error),
            CheckpointError::Storage(_) => ListenerError::Checkpoint(error),
        }
    }
}

/// A page as read: the batch's end snapshot, this partition's rows, whether the page was full
/// (more of the batch may follow), the last position it read (of any partition read with it),
/// and the row-budget share holding its rows.
struct PageRead {
    upto: String,
    rows: Vec<RawRow>,
    full: bool,
    last_position: Option<i64>,
    share: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What one page delivered.
#[derive(Debug, Default)]
pub struct PageOutcome {
    /// Change-log rows read.
    pub rows: usize,
    /// Rows that did not decode and were dead-lettered.
    pub malformed: usize,
    /// One summary per decoded event, in change order.
    pub summaries: Vec<EventSummary>,
    /// The page was full: more of the batch is waiting.
    pub more: bool,
}

/// Reads one partition of the change log and executes it.
#[derive(Debug)]
pub struct Listener {
    pool: PgPool,
    store: Arc<dyn CheckpointStore>,
    executor: Executor,
    settings: ListenerSettings,
    checkpoint: Checkpoint,
    /// Where the next page starts: the saved checkpoint's position, or past it by pages that held
    /// none of this partition's rows (read with other partitions, or empty), which are saved
    /// only now and then.
    position: BatchPosition,
    /// The node's reader, when pages are read with the node's other partitions; `None`: this
    /// listener reads its own pages.
    reader: Option<NodeReader>,
    last_idle_advance: std::time::Instant,
    /// The executor's settled actions not yet written; a checkpoint save covers them.
    pending: Option<Arc<PendingCompletions>>,
    /// The node's shared change-log notifications; `None`: this listener LISTENs itself.
    wake: Option<tokio::sync::watch::Receiver<u64>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Whether pages write history rows with their checkpoint.
    record_history: bool,
}

impl Listener {
    /// Claims the partition (bumping its epoch) and positions the listener at its checkpoint.
    ///
    /// # Errors
    /// The checkpoint store failed.
    pub async fn start(
        pool: PgPool,
        store: Arc<dyn CheckpointStore>,
        executor: Executor,
        settings: ListenerSettings,
    ) -> Result<Listener, ListenerError> {
        let checkpoint = store.claim(settings.partition, &settings.node_id).await?;
        tracing::info!(partition = checkpoint.partition, epoch = checkpoint.epoch, node = %settings.node_id, "partition claimed");
        Ok(Listener {
            pool,
            store,
            executor,
            position: checkpoint.position.clone(),
            reader: None,
            checkpoint,
            last_idle_advance: std::time::Instant::now(),
            pending: None,
            wake: None,
            metrics: None,
            record_history: settings.record_history,
            settings,
        })
    }

    /// Whether each delivered page writes its events' history rows with its checkpoint (on by
    /// default; `history: off` turns it off).
    #[must_use]
    pub fn with_history(mut self, record_history: bool) -> Listener {
        self.record_history = record_history;
        self
    }

    /// The buffer the executor notes settled actions in; every save of a page clears it.
    #[must_use]
    pub fn with_pending_completions(mut self, pending: Arc<PendingCompletions>) -> Listener {
        self.pending = Some(pending);
        self
    }

    /// Wakes on the node's shared notifications (see [`notification_fanout`]) instead of a
    /// LISTEN connection of its own.
    #[must_use]
    pub fn with_wake(mut self, wake: tokio::sync::watch::Receiver<u64>) -> Listener {
        self.wake = Some(wake);
        self
    }

    /// Reads pages through the node's reader, together with the node's other partitions at the
    /// same position (see [`NodeReader`]), instead of one statement per page of its own. Needs
    /// `partition_count` in the settings.
    #[must_use]
    pub fn with_reader(mut self, reader: NodeReader) -> Listener {
        if self.settings.partition_count.is_some() {
            self.reader = Some(reader);
        }
        self
    }

    /// Counts every delivered page's events and actions in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Listener {
        self.metrics = Some(metrics);
        self
    }

    fn clear_pending(&self) {
        if let Some(pending) = &self.pending {
            // Everything in it belongs to the page just saved (pages run one at a time).
            pending.clear();
        }
    }

    /// `settled` without what the background writer already stored.
    fn unwritten(&self, settled: Vec<ActionKey>) -> Vec<ActionKey> {
        match &self.pending {
            Some(pending) => pending.unwritten(settled),
            None => settled,
        }
    }

    /// The checkpoint as last saved by this listener.
    #[must_use]
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Reads the next page, executes it and saves the checkpoint. Returns an empty outcome when
    /// nothing new has committed.
    ///
    /// # Errors
    /// Reading, dead-lettering or checkpointing failed (the page will be read again), or another
    /// node took the partition over ([`ListenerError::FencedOut`]).
    pub async fn deliver_page(&mut self) -> Result<PageOutcome, ListenerError> {
        let position = self.position.clone();
        // This page's share of the node's row budget, held until the page is saved.
        let share = self.settings.row_budget.take(self.page_rows()).await;
        let page_started = std::time::Instant::now();
        let PageRead {
            upto,
            rows,
            full: full_page,
            last_position,
            share: _share,
        } = self.read_page(&position, share).await?;
        let read_took = page_started.elapsed();
        let next = next_position(position, upto, full_page, last_position);
        if rows.is_empty() {
            // Nothing of this partition's up to where the page ended. Keeping the saved position
            // is exact, but the next reads would range over every change-log row committed since
            // (other partitions' too), so the next page starts where this one ended; that is
            // saved at most once per interval, so that an idle node writes almost nothing.
            self.position = next.clone();
            if next.batch_upto.is_none()
                && next != self.checkpoint.position
                && self.last_idle_advance.elapsed() >= IDLE_ADVANCE_INTERVAL
            {
                self.checkpoint = self.store.save(&self.checkpoint, next, &[]).await?;
                self.last_idle_advance = std::time::Instant::now();
            }
            return Ok(PageOutcome {
                more: full_page,
                ..PageOutcome::default()
            });
        }

        let row_count = rows.len();
        let (events, malformed_rows) = self.decode_page(rows).await?;
        let malformed = malformed_rows.len();

        let (completed, unfinished_jobs) = self.page_state(&events, &malformed_rows).await?;
        let mut settled = Vec::new();
        self.dead_letter_malformed(malformed_rows, &completed, &mut settled)
            .await?;

        let execute_started = std::time::Instant::now();
        let summaries = self
            .executor
            .execute_page(&events, &completed, &unfinished_jobs)
            .await;
        let execute_took = execute_started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.record_page(&summaries);
        }
        let unsettled = summaries
            .iter()
            .flat_map(|summary| &summary.actions)
            .filter(|report| !report.settled)
            .count();
        let jobs: Vec<NewJob> = summaries
            .iter()
            .flat_map(EventSummary::jobs)
            .cloned()
            .collect();
        if unsettled > 0 {
            // Keep what did settle, so the retried page does not repeat it — but not the actions
            // handed to the job queue: their jobs are not stored yet, the retried page hands them
            // over again.
            settled.extend(
                summaries
                    .iter()
                    .flat_map(EventSummary::settled_keys)
                    .filter(|key| !completed.contains(key)),
            );
            let handed_over: HashSet<ActionKey> = jobs.iter().map(NewJob::action_key).collect();
            settled.retain(|key| !handed_over.contains(key));
            let settled = self.unwritten(settled);
            self.store.record_completed(&settled).await?;
            self.clear_pending();
            return Err(ListenerError::Unsettled(unsettled));
        }

        let save_started = std::time::Instant::now();
        // The page's settled actions are not written to the ledger: the checkpoint that this
        // save moves past the page covers them (the page is never read again), and the ledger
        // is consulted only for pages that are. A handed-over action must not be there either:
        // its job runs it later, and an action that checks the ledger before its effect (the
        // `database` action) would take its own key for "already done".
        let history = self.history_records(&events, &summaries);
        self.checkpoint = self
            .store
            .save_page(&self.checkpoint, next, &[], &jobs, &history)
            .await?;
        self.position = self.checkpoint.position.clone();
        if let Some(metrics) = self.metrics.as_ref().filter(|_| !history.is_empty()) {
            metrics.record_history_rows("event", history.len());
        }
        self.clear_pending();
        tracing::debug!(
            rows = row_count,
            read_ms = read_took.as_secs_f64() * 1000.0,
            execute_ms = execute_took.as_secs_f64() * 1000.0,
            save_ms = save_started.elapsed().as_secs_f64() * 1000.0,
            "page delivered"
        );
        Ok(PageOutcome {
            rows: row_count,
            malformed,
            summaries,
            more: full_page,
        })
    }

    /// The history rows of a page's events (none when history is off). The executor returns one
    /// summary per event, in the events' order.
    fn history_records(
        &self,
        events: &[EntityEvent],
        summaries: &[EventSummary],
    ) -> Vec<HistoryRecord> {
        if !self.record_history {
            return Vec::new();
        }
        let context = HistoryContext {
            node_id: self.settings.node_id.clone(),
            partition: self.checkpoint.partition,
            epoch: self.checkpoint.epoch,
        };
        events
            .iter()
            .zip(summaries)
            .map(|(event, summary)| HistoryRecord::for_event(event, summary, &context))
            .collect()
    }

    /// The page's rows as events, and the rows that are not events (each with its identity, its
    /// position, what its dead letter keeps of it, and why).
    async fn decode_page(
        &self,
        rows: Vec<RawRow>,
    ) -> Result<(Vec<EntityEvent>, Vec<MalformedEntry>), ListenerError> {
        let mut events = Vec::with_capacity(rows.len());
        let mut malformed_rows = Vec::new();
        for raw in rows {
            let position = raw.position;
            match decode_row_text(position, raw.size, &raw.text, self.settings.max_row_bytes) {
                Ok(event) => events.push(event),
                Err((Some(row), problem)) => {
                    malformed_rows.push((malformed_row_id(position, &row), position, row, problem));
                }
                Err((None, problem)) => {
                    // Not parsed: keep the row's identity and an excerpt, never the row itself.
                    let row = self.refused_row(&raw).await?;
                    malformed_rows.push((malformed_row_id(position, &row), position, row, problem));
                }
            }
        }
        Ok((events, malformed_rows))
    }

    /// Before a page runs, in parallel: which of its actions already completed (the ledger), and
    /// which of its actions' ordering keys have jobs still pending or running (the job queue;
    /// asked only with job routing), which its actions must queue behind.
    async fn page_state(
        &self,
        events: &[EntityEvent],
        malformed_rows: &[MalformedEntry],
    ) -> Result<(HashSet<ActionKey>, HashSet<String>), ListenerError> {
        let ids: Vec<Uuid> = events
            .iter()
            .map(|event| event.id)
            .chain(malformed_rows.iter().map(|(id, ..)| *id))
            .collect();
        let ordering_keys = self.executor.ordering_keys(events);
        tokio::try_join!(
            async {
                self.store
                    .completed_among(&ids)
                    .await
                    .map_err(ListenerError::from)
            },
            async {
                unfinished_ordering_keys(&self.pool, &ordering_keys)
                    .await
                    .map_err(ListenerError::from)
            },
        )
    }

    /// The page after `position`, read by this listener or by the node's reader. Another
    /// holder's epoch ends the page here, before anything is dispatched.
    async fn read_page(
        &self,
        position: &BatchPosition,
        share: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<PageRead, ListenerError> {
        let partition = self.checkpoint.partition;
        let (epoch, read) = if let Some(reader) = &self.reader {
            let page = reader
                .read(partition, position.clone(), self.page_rows(), share)
                .await?;
            let read = PageRead {
                upto: page.upto,
                rows: page.rows,
                full: page.full,
                last_position: page.last_position,
                share: page.share,
            };
            (page.epoch, read)
        } else {
            let page = change_log::read_page(
                &self.pool,
                &PageQuery {
                    partitions: &[partition],
                    snapshot: position.snapshot.as_deref(),
                    batch_upto: position.batch_upto.as_deref(),
                    batch_position: position.batch_position,
                    batch_size: self.page_rows(),
                    partition_count: self.settings.partition_count,
                    max_row_bytes: self.settings.max_row_bytes,
                    excerpt_chars: ROW_EXCERPT_CHARS,
                    max_page_bytes: self.settings.max_page_bytes,
                },
            )
            .await?;
            let mut share = share;
            if let Some(share) = share.as_mut() {
                // What the page did not fill goes back at once.
                let unused = share.num_permits().saturating_sub(page.rows.len());
                drop(share.split(unused));
            }
            let full = page.cut_short
                || u32::try_from(page.rows.len()).unwrap_or(u32::MAX) >= self.page_rows();
            let read = PageRead {
                upto: page.upto,
                last_position: page.rows.last().map(|row| row.position),
                rows: page.rows,
                full,
                share,
            };
            (page.epochs.first().copied().flatten(), read)
        };
        if epoch != Some(self.checkpoint.epoch) {
            return Err(ListenerError::FencedOut(CheckpointError::FencedOut {
                partition,
                epoch: self.checkpoint.epoch,
                version: self.checkpoint.version,
            }));
        }
        Ok(read)
    }

    /// Rows one page reads: the batch size, within the node's row budget.
    fn page_rows(&self) -> u32 {
        self.settings
            .batch_size
            .min(self.settings.row_budget.rows())
    }

    /// What a dead letter keeps of a row refused before parsing (over the row limit, or nested
    /// too deep): its identity columns (each cut to 256 characters) read again by position, its
    /// size, and an excerpt of its text.
    async fn refused_row(&self, raw: &RawRow) -> Result<Value, ListenerError> {
        let identity = change_log::row_identity(&self.pool, raw.position).await?;
        Ok(serde_json::json!({
            "pk_entity_change_log": raw.position,
            "id": identity.id,
            "object_type": identity.object_type,
            "object_id": identity.object_id,
            "modification_type": identity.modification_type,
            "row_bytes": raw.size,
            "row_excerpt": decode::excerpt(&raw.text),
        }))
    }

    /// Dead-letters the rows that did not decode, unless a previous reading of the page already
    /// did; notes each as settled.
    async fn dead_letter_malformed(
        &self,
        malformed_rows: Vec<MalformedEntry>,
        completed: &std::collections::HashSet<crate::checkpoint::ActionKey>,
        settled: &mut Vec<crate::checkpoint::ActionKey>,
    ) -> Result<(), ListenerError> {
        for (id, position, row, problem) in malformed_rows {
            let key = crate::checkpoint::ActionKey {
                event_id: id,
                observer: DECODE_OBSERVER.to_owned(),
                action_index: 0,
            };
            if !completed.contains(&key) {
                self.dead_letter_row(id, position, row, &problem).await?;
                settled.push(key);
            }
        }
        Ok(())
    }

    async fn dead_letter_row(
        &self,
        id: Uuid,
        position: i64,
        row: Value,
        problem: &MalformedRow,
    ) -> Result<(), ListenerError> {
        tracing::warn!(position, column = problem.column, problem = %problem.problem, "change-log row does not decode; dead-lettered");
        // Cut short: the row may be malformed precisely by its length.
        let field = |name: &str| {
            row.get(name)
                .and_then(Value::as_str)
                .map(|text| text.chars().take(256).collect::<String>())
        };
        let event = EntityEvent {
            id,
            kind: EventKind::Custom,
            entity_type: field("object_type").unwrap_or_else(|| "(unknown)".to_owned()),
            entity_id: field("object_id").unwrap_or_else(|| position.to_string()),
            data: row,
            before: None,
            changes: std::collections::BTreeMap::new(),
            tenant_id: None,
            actor: None,
            timestamp: chrono::Utc::now(),
            position: Some(position),
            trace_id: None,
            replay: None,
        };
        self.executor
            .dead_letters()
            .push(NewDeadLetter {
                event,
                observer: DECODE_OBSERVER.to_owned(),
                action_index: 0,
                action_type: "decode".to_owned(),
                error_code: ErrorCode::MalformedEvent,
                error_message: problem.to_string(),
                attempts: 1,
            })
            .await?;
        Ok(())
    }

    /// Delivers until `shutdown` is cancelled: drains what is committed, then waits for a
    /// notification or the poll interval. A page in progress is finished and checkpointed before
    /// returning.
    ///
    /// # Errors
    /// Another node took the partition over; every other failure is retried.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ListenerError> {
        let mut wake = self.wake.take();
        let mut notifications = match wake {
            Some(_) => None,
            None => own_notifications(&self.pool).await,
        };
        let mut failed_in_a_row = 0_u32;
        while !shutdown.is_cancelled() {
            if let Some(wake) = wake.as_mut() {
                // Whatever was notified so far, the page below reads.
                wake.borrow_and_update();
            }
            let delivered = self.deliver_page().await;
            if let Some(metrics) = &self.metrics {
                match &delivered {
                    Ok(_) if failed_in_a_row > 0 => {
                        failed_in_a_row = 0;
                        metrics.set_consecutive_errors(self.checkpoint.partition, 0);
                    }
                    Err(error) if !matches!(error, ListenerError::FencedOut(_)) => {
                        failed_in_a_row = failed_in_a_row.saturating_add(1);
                        metrics.record_page_error(
                            self.checkpoint.partition,
                            error.code().as_str(),
                            matches!(error, ListenerError::Checkpoint(_)),
                            failed_in_a_row,
                        );
                    }
                    _ => {}
                }
            }
            // After a page that held rows but did not fill, a listener that is woken by
            // notifications waits for the next one: a change committed after the page's
            // snapshot was taken notifies after the wake-up was marked seen above, so it wakes
            // this listener at once. Reading again at once would cost a page statement that
            // finds nothing (at 3,000 events/s, most of the reads). Polling alone reads on.
            let woken_by_notifications = wake.is_some() || notifications.is_some();
            let pause = match delivered {
                Ok(outcome) if outcome.more || (outcome.rows > 0 && !woken_by_notifications) => {
                    continue;
                }
                Ok(_) => self.settings.poll_interval,
                Err(error @ ListenerError::FencedOut(_)) => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, code = %error.code(), "page not delivered; retrying");
                    RETRY_PAUSE
                }
            };
            let woken = async {
                if let Some(wake) = wake.as_mut() {
                    if wake.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } else if let Some(listener) = notifications.as_mut() {
                    if let Err(error) = listener.recv().await {
                        tracing::warn!(%error, "notification connection lost; it reconnects on the next wait");
                        tokio::time::sleep(pause).await;
                    }
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = woken => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!(partition = self.checkpoint.partition, "listener stopped");
        Ok(())
    }
}

/// A LISTEN connection on the change-log channel; `None` (polling only) when it cannot be had.
async fn own_notifications(pool: &PgPool) -> Option<PgListener> {
    match PgListener::connect_with(pool).await {
        Ok(mut listener) => match listener.listen(NOTIFY_CHANNEL).await {
            Ok(()) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "LISTEN failed; polling only");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "LISTEN connection failed; polling only");
            None
        }
    }
}

/// Change-log notifications per partition. A notification's payload names the partitions its
/// transaction wrote to (`3,5`; see `migrations/0021_notify_partitions.sql`), so only their
/// listeners wake; one that names none (an empty payload: the partition count is not recorded
/// yet, or a writer of an older release) wakes every partition.
#[derive(Clone, Debug)]
pub struct PartitionWakes {
    senders: Arc<Vec<tokio::sync::watch::Sender<u64>>>,
}

impl PartitionWakes {
    /// Wake-ups for `partition_count` partitions (at least one).
    #[must_use]
    pub fn new(partition_count: u32) -> PartitionWakes {
        let senders = (0..partition_count.max(1))
            .map(|_| tokio::sync::watch::channel(0_u64).0)
            .collect();
        PartitionWakes {
            senders: Arc::new(senders),
        }
    }

    /// What a listener of `partition` waits on (bumped on every notification naming it).
    #[must_use]
    pub fn receiver(&self, partition: i32) -> tokio::sync::watch::Receiver<u64> {
        let index = usize::try_from(partition).unwrap_or(0) % self.senders.len();
        self.senders[index].subscribe()
    }

    /// Wakes the partitions `payload` names; every partition when it names none, or names one
    /// this node does not know (a different partition count).
    pub fn wake(&self, payload: &str) {
        let named: Option<Vec<usize>> = payload
            .split(',')
            .map(|part| {
                part.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|partition| *partition < self.senders.len())
            })
            .collect();
        match named {
            Some(partitions) if !payload.is_empty() => {
                for partition in partitions {
                    self.senders[partition].send_modify(|count| *count = count.wrapping_add(1));
                }
            }
            _ => self.wake_all(),
        }
    }

    /// Wakes every partition.
    pub fn wake_all(&self) {
        for sender in self.senders.iter() {
            sender.send_modify(|count| *count = count.wrapping_add(1));
        }
    }
}

/// One LISTEN connection for every partition of a node: wakes the partitions each change-log
/// notification names until `stop` is cancelled. Listeners built [`Listener::with_wake`] with a
/// [`PartitionWakes::receiver`] wait on it.
pub async fn notification_fanout(pool: PgPool, wakes: PartitionWakes, stop: CancellationToken) {
    loop {
        let Some(mut listener) = own_notifications(&pool).await else {
            // Listeners poll meanwhile.
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETRY_PAUSE) => continue,
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(notification) => wakes.wake(notification.payload()),
                    Err(error) => {
                        tracing::warn!(%error, "change-log notifications lost; reconnecting");
                        // Changes may have been missed meanwhile: wake everyone once.
                        wakes.wake_all();
                        break;
                    }
                },
            }
        }
    }
}

/// Where the checkpoint goes after a page: inside the batch (a full page: more may follow), or to
/// the batch's end snapshot.
fn next_position(
    position: BatchPosition,
    upto: String,
    full_page: bool,
    last_position: Option<i64>,
) -> BatchPosition {
    if full_page {
        BatchPosition {
            snapshot: position.snapshot,
            batch_upto: Some(upto),
            batch_position: last_position,
        }
    } else {
        BatchPosition {
            snapshot: Some(upto),
            batch_upto: None,
            batch_position: None,
        }
    }
}

/// The identity a malformed row is dead-lettered under: its own `id` when that is a UUID, else
/// one derived from its change-log position, so that reading the row again finds it settled.
fn malformed_row_id(position: i64, row: &Value) -> Uuid {
    row.get("id")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| Uuid::from_u64_pair(0, position.cast_unsigned()))
}

/// How long settled actions may wait for their page's checkpoint before being written on their own
/// (checked as often).
pub const EARLY_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Writes settled actions that have waited [`EARLY_FLUSH_INTERVAL`] without a checkpoint save
/// taking them (a slow page), so that a crash in the middle of such a page repeats little. Stops
/// when `stop` is cancelled, after a last flush.
pub async fn flush_pending_completions(
    store: Arc<dyn CheckpointStore>,
    pending: Arc<PendingCompletions>,
    stop: CancellationToken,
) {
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(EARLY_FLUSH_INTERVAL) => false,
        };
        // On the way out everything goes: the last page's save may never come.
        let age = if stopping {
            Duration::ZERO
        } else {
            EARLY_FLUSH_INTERVAL
        };
        let keys = pending.take_waited(age);
        if !keys.is_empty() {
            match store.record_completed(&keys).await {
                Ok(()) => pending.mark_written(keys),
                Err(error) => {
                    tracing::warn!(%error, "recording settled actions early failed; the checkpoint will record them");
                }
            }
        }
        if stopping {
            return;
        }
    }
}
