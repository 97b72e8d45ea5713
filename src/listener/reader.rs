//! The node's change-log reader: one statement reads a page for every partition of the node that
//! asks for one at the same position, and routes each row to its partition's listener.
//!
//! Without it every partition reads on its own: a notification that wakes eight partitions runs
//! eight page statements, each ranging over the same transactions and keeping its eighth of the
//! rows. Listeners built [`Listener::with_reader`](super::Listener::with_reader) send their page
//! requests here instead; the reader waits [`READ_LINGER`] for the other partitions woken by the
//! same notification, groups the requests by checkpoint position, and reads each group with one
//! `read_page` call (`read_batch`'s rows as bounded text) over the group's partitions.
//!
//! Invariants:
//! - A group's members stand at the same position (snapshot, batch end, position inside the
//!   batch), so the page is exactly each member's own page, cut at the group's bound: a member
//!   whose rows the page did not reach has none of them before the page's last position. Each
//!   member moves to the position the page ends at, rows or not, so members read together stay
//!   together.
//! - Groups at a batch boundary read in the same round end their batches at one snapshot (the
//!   first such group takes it, the others read up to it), so partitions whose positions drifted
//!   apart (one read alone while the others were busy) meet again at the next boundary.
//! - A partition is never twice in one group (a second request for it, from a listener being
//!   replaced, goes to a group of its own).
//! - The members' row-budget shares are pooled and split again by the rows each received; what
//!   the page did not fill returns to the budget at once.
//! - A failed read fails every member's request; each listener retries as after its own read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::change_log::{self, ChangeLogError, PageQuery, RawRow};
use crate::checkpoint::BatchPosition;

/// How long the reader waits, after a request, for the other partitions woken by the same
/// notification to ask too.
pub const READ_LINGER: Duration = Duration::from_millis(1);

/// Requests that may wait for the reader (a node's partitions each have at most one waiting).
const REQUEST_QUEUE: usize = 4096;

/// How the node's reader bounds what it reads.
#[derive(Clone, Copy, Debug)]
pub struct ReaderSettings {
    /// The cluster's partition count: a row belongs to partition `entity_hash % partition_count`.
    pub partition_count: i32,
    /// Rows over this many bytes of JSON come as an excerpt.
    pub max_row_bytes: u32,
    /// A page (of all its partitions) ends before the row that would take its text past this.
    pub max_page_bytes: u64,
}

/// One partition's share of a group's page.
#[derive(Debug)]
pub struct PartitionPage {
    /// The end snapshot of the batch the page belongs to.
    pub upto: String,
    /// The partition's lease epoch as the page statement saw it.
    pub epoch: Option<i64>,
    /// The partition's rows, in change order.
    pub rows: Vec<RawRow>,
    /// The group's page was full (by rows or bytes): more of the batch may follow.
    pub full: bool,
    /// The last change-log position the group's page read (any partition's).
    pub last_position: Option<i64>,
    /// The partition's row-budget share, holding exactly its rows.
    pub share: Option<OwnedSemaphorePermit>,
}

/// A listener's request for its next page.
#[derive(Debug)]
struct PageRequest {
    partition: i32,
    position: BatchPosition,
    /// The rows this partition's page may hold (what its share holds when it has one).
    rows: u32,
    share: Option<OwnedSemaphorePermit>,
    reply: oneshot::Sender<Result<PartitionPage, Arc<ChangeLogError>>>,
}

/// A handle on the node's reader; clones share it.
#[derive(Clone, Debug)]
pub struct NodeReader {
    requests: mpsc::Sender<PageRequest>,
    counts: Arc<ReadCounts>,
}

/// What the reader did: page statements run, and partition pages answered by them.
#[derive(Debug, Default)]
struct ReadCounts {
    statements: AtomicU64,
    pages: AtomicU64,
}

impl NodeReader {
    /// The handle, and the reader to run ([`ReaderTask::run`]).
    #[must_use]
    pub fn new(pool: PgPool, settings: ReaderSettings) -> (NodeReader, ReaderTask) {
        let (requests, receiver) = mpsc::channel(REQUEST_QUEUE);
        let counts = Arc::new(ReadCounts::default());
        (
            NodeReader {
                requests,
                counts: counts.clone(),
            },
            ReaderTask {
                pool,
                settings,
                receiver,
                counts,
            },
        )
    }

    /// Page statements the reader has run, and the partition pages they answered (more pages
    /// than statements: partitions were read together).
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.statements.load(Ordering::Relaxed),
            self.counts.pages.load(Ordering::Relaxed),
        )
    }

    /// Reads `partition`'s page after `position`: at most `rows` rows (the rows `share` holds,
    /// when there is one), read together with the other partitions that ask at the same
    /// position.
    ///
    /// # Errors
    /// The page statement failed, or the reader has stopped.
    pub async fn read(
        &self,
        partition: i32,
        position: BatchPosition,
        rows: u32,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<PartitionPage, ChangeLogError> {
        let (reply, answer) = oneshot::channel();
        let request = PageRequest {
            partition,
            position,
            rows: rows.max(1),
            share,
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return Err(ChangeLogError::ReaderStopped);
        }
        match answer.await {
            Ok(Ok(page)) => Ok(page),
            Ok(Err(error)) => Err(ChangeLogError::Shared(error)),
            Err(_) => Err(ChangeLogError::ReaderStopped),
        }
    }
}

/// The node's reader, to run beside its listeners.
#[derive(Debug)]
pub struct ReaderTask {
    pool: PgPool,
    settings: ReaderSettings,
    receiver: mpsc::Receiver<PageRequest>,
    counts: Arc<ReadCounts>,
}

impl ReaderTask {
    /// Serves page requests until `stop` is cancelled or every handle is dropped.
    pub async fn run(self, stop: CancellationToken) {
        let reader = Reader {
            pool: self.pool,
            settings: self.settings,
            counts: self.counts,
        };
        serve(reader, self.receiver, stop).await;
    }
}

/// What every read of the reader needs.
#[derive(Clone, Debug)]
struct Reader {
    pool: PgPool,
    settings: ReaderSettings,
    counts: Arc<ReadCounts>,
}

/// Serves page requests: after the first of a round, gathers the others ([`gather`]), then
/// reads the round's groups (concurrently with the rounds that follow).
async fn serve(reader: Reader, mut receiver: mpsc::Receiver<PageRequest>, stop: CancellationToken) {
    let mut rounds = tokio::task::JoinSet::new();
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => break,
            request = receiver.recv() => match request {
                Some(request) => request,
                None => break,
            },
            Some(_) = rounds.join_next(), if !rounds.is_empty() => continue,
        };
        if stop.is_cancelled() {
            break;
        }
        let requests = gather(first, &mut receiver).await;
        rounds.spawn(read_round(reader.clone(), requests));
    }
    // Requests still waiting get no answer: their listeners see the reader stopped.
    rounds.shutdown().await;
}

/// The round that starts with `first`: partitions woken by the same notification ask within
/// moments of each other, so the reader waits [`READ_LINGER`] for them.
async fn gather(
    first: PageRequest,
    receiver: &mut mpsc::Receiver<PageRequest>,
) -> Vec<PageRequest> {
    tokio::time::sleep(READ_LINGER).await;
    let mut requests = vec![first];
    while let Ok(request) = receiver.try_recv() {
        requests.push(request);
    }
    requests
}

/// The requests of one round, grouped: members of a group stand at the same position, and no
/// partition is twice in a group.
fn groups_of(requests: Vec<PageRequest>) -> Vec<(BatchPosition, Vec<PageRequest>)> {
    let mut groups: Vec<(BatchPosition, Vec<PageRequest>)> = Vec::new();
    for request in requests {
        let joined = groups.iter_mut().find(|(position, members)| {
            *position == request.position
                && members
                    .iter()
                    .all(|member| member.partition != request.partition)
        });
        match joined {
            Some((_, members)) => members.push(request),
            None => groups.push((request.position.clone(), vec![request])),
        }
    }
    groups
}

/// Reads a round's groups. Groups inside a batch read at once; of the groups at a batch
/// boundary, the first takes the batch's end snapshot and the others read up to it.
async fn read_round(reader: Reader, requests: Vec<PageRequest>) {
    let (at_boundary, inside): (Vec<_>, Vec<_>) = groups_of(requests)
        .into_iter()
        .partition(|(position, _)| position.batch_upto.is_none());
    let inside = futures::future::join_all(
        inside
            .into_iter()
            .map(|(position, members)| read_group(&reader, position, None, members)),
    );
    let boundary = async {
        let mut groups = at_boundary.into_iter();
        let Some((position, members)) = groups.next() else {
            return;
        };
        let upto = read_group(&reader, position, None, members).await;
        futures::future::join_all(
            groups.map(|(position, members)| read_group(&reader, position, upto.clone(), members)),
        )
        .await;
    };
    tokio::join!(inside, boundary);
}

/// Reads one group's page and answers its members; returns the batch's end snapshot (`None`
/// when the read failed).
async fn read_group(
    reader: &Reader,
    position: BatchPosition,
    upto: Option<String>,
    mut members: Vec<PageRequest>,
) -> Option<String> {
    let partitions: Vec<i32> = members.iter().map(|member| member.partition).collect();
    let rows = members
        .iter()
        .fold(0_u32, |total, member| total.saturating_add(member.rows));
    let batch_upto = position.batch_upto.as_deref().or(upto.as_deref());
    let settings = reader.settings;
    let page = change_log::read_page(
        &reader.pool,
        &PageQuery {
            partitions: &partitions,
            snapshot: position.snapshot.as_deref(),
            batch_upto,
            batch_position: position.batch_position,
            batch_size: rows,
            partition_count: Some(settings.partition_count),
            max_row_bytes: settings.max_row_bytes,
            excerpt_chars: super::ROW_EXCERPT_CHARS,
            max_page_bytes: settings.max_page_bytes,
        },
    )
    .await;
    reader.counts.statements.fetch_add(1, Ordering::Relaxed);
    let page = match page {
        Ok(page) => page,
        Err(error) => {
            let error = Arc::new(error);
            for member in members {
                // A listener that gave up waiting has nothing to be told.
                let _ = member.reply.send(Err(error.clone()));
            }
            return None;
        }
    };
    let full = page.cut_short || page.rows.len() >= usize::try_from(rows).unwrap_or(usize::MAX);
    let last_position = page.rows.last().map(|row| row.position);
    // The members' shares, pooled and split again by the rows each received.
    let mut pooled: Option<OwnedSemaphorePermit> = None;
    for member in &mut members {
        if let Some(share) = member.share.take() {
            match pooled.as_mut() {
                Some(pooled) => pooled.merge(share),
                None => pooled = Some(share),
            }
        }
    }
    reader.counts.pages.fetch_add(
        u64::try_from(members.len()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    let mut routed: HashMap<i32, Vec<RawRow>> = HashMap::with_capacity(members.len());
    for row in page.rows {
        routed.entry(row.partition).or_default().push(row);
    }
    for (index, member) in members.into_iter().enumerate() {
        let rows = routed.remove(&member.partition).unwrap_or_default();
        let share = pooled.as_mut().and_then(|pooled| pooled.split(rows.len()));
        let _ = member.reply.send(Ok(PartitionPage {
            upto: page.upto.clone(),
            epoch: page.epochs.get(index).copied().flatten(),
            rows,
            full,
            last_position,
            share,
        }));
    }
    Some(page.upto)
}
