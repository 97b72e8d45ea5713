//! `target/chaos-report.md`: one row per scenario run by this test process, rewritten after each.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The measured result of one scenario.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    /// Changes committed that an observer matches.
    pub events: usize,
    pub lost: usize,
    pub duplicates: usize,
    /// The most duplicates the fault allows (deliveries in flight when it struck).
    pub duplicate_bound: usize,
    pub out_of_order: usize,
    pub checkpoint_regressions: usize,
    /// Deliveries by a node after it was fenced off (must be 0).
    pub fenced_deliveries: usize,
    /// Fault (or heal) to the first delivery of a later change on each affected partition; the
    /// worst partition.
    pub recovery: Option<Duration>,
    /// Time from the end of the load to the last delivery.
    pub drain: Duration,
    pub passed: bool,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// Adds `row`, prints it, and rewrites the report file with every row of this run.
pub fn record(row: Row) {
    let mut rows = ROWS.lock().unwrap_or_else(PoisonError::into_inner);
    rows.retain(|existing| existing.scenario != row.scenario);
    println!("{}", render(std::slice::from_ref(&row)));
    rows.push(row);
    rows.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    let path = crate::target_dir().join("chaos-report.md");
    if let Err(error) = std::fs::write(&path, render(&rows)) {
        eprintln!("cannot write {}: {error}", path.display());
    }
}

fn render(rows: &[Row]) -> String {
    let mut text = String::from(
        "| scenario | events | lost | duplicates (allowed) | out of order | checkpoint regressions | fenced deliveries | recovery | drain after load | result |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        let recovery = row
            .recovery
            .map_or_else(|| "—".to_owned(), |took| format!("{} ms", took.as_millis()));
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} ms | {} |",
            row.scenario,
            row.events,
            row.lost,
            row.duplicates,
            row.duplicate_bound,
            row.out_of_order,
            row.checkpoint_regressions,
            row.fenced_deliveries,
            recovery,
            row.drain.as_millis(),
            if row.passed { "pass" } else { "FAIL" }
        );
    }
    text
}
