//! History search latency on a large history: `HISTORY_ROWS` rows (default 10,000,000) in
//! `fraiseql_observers.history`, spread over ten day partitions as ten days of a busy node leave
//! them, then the five searches operators run most, each `HISTORY_RUNS` times (default 200) with
//! varying values, through `history::search` (the code `events search`, `SearchEvents` and
//! `debug-event` use): p50, p99 and max per search.
//!
//! The rows: 200,000 orders and 50,000 invoices, ten observers, 1 in 50 events with a failed
//! or dead-lettered action and its error text, 1 in 10 with a queued action; the generated
//! database (`fraiseql_observers_history_bench`) is kept between runs and rebuilt when its row
//! count differs (`HISTORY_REBUILD=1` forces it).
//!
//! Run: `cargo bench --bench history_search` (needs the local PostgreSQL; `TEST_DATABASE_URL`
//! names the server). Prints a Markdown table and writes it to `target/history-search-report.md`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use fraiseql_observers::history::{self, HistoryOutcome, HistoryQuery};
use sqlx::postgres::PgPoolOptions;

const DATABASE: &str = "fraiseql_observers_history_bench";
const DAYS: i64 = 10;
const ORDERS: i64 = 200_000;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: a whole number"))
    })
}

fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn database_url() -> String {
    let server = server_url();
    let base = server
        .rsplit_once('/')
        .map_or(server.as_str(), |(base, _)| base);
    format!("{base}/{DATABASE}")
}

/// Creates (or reuses) the database with `rows` history rows.
async fn prepare(rows: i64) -> sqlx::PgPool {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server_url())
        .await
        .expect("the local PostgreSQL");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&admin)
            .await
            .unwrap();
    let rebuild = std::env::var("HISTORY_REBUILD").is_ok_and(|value| value == "1");
    if exists && !rebuild {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&database_url())
            .await
            .unwrap();
        let count: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.history")
                .fetch_one(&pool)
                .await
                .ok();
        if count == Some(rows) {
            eprintln!("reusing {DATABASE}: {rows} history rows");
            // Indexes a newer migration adds are built on the rows already there.
            fraiseql_observers::migrate::run(&pool).await.unwrap();
            sqlx::query("ANALYZE fraiseql_observers.history")
                .execute(&pool)
                .await
                .unwrap();
            return pool;
        }
        pool.close().await;
    }
    for statement in [
        format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {DATABASE}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .unwrap();
    fraiseql_observers::migrate::run(&pool).await.unwrap();
    fill(&pool, rows).await;
    pool
}

/// Writes `rows` history rows over the last [`DAYS`] days, into day partitions as the
/// coordinator keeps them.
async fn fill(pool: &sqlx::PgPool, rows: i64) {
    let started = Instant::now();
    for day in 0..=DAYS {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {day}; BEGIN
               IF to_regclass('fraiseql_observers.history_p' || to_char(d, 'YYYYMMDD')) IS NULL THEN
                 EXECUTE format('CREATE TABLE fraiseql_observers.%I PARTITION OF fraiseql_observers.history FOR VALUES FROM (%L) TO (%L)',
                   'history_p' || to_char(d, 'YYYYMMDD'), (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
               END IF; END $$;"
        )))
        .execute(pool)
        .await
        .unwrap();
    }
    let chunk = 500_000;
    let mut from = 1;
    while from <= rows {
        let to = (from + chunk - 1).min(rows);
        sqlx::query(
            "INSERT INTO fraiseql_observers.history
                 (history_id, processed_at, record_kind, event_id, entity_type, entity_id, event_kind,
                  change_log_id, event_at, matched_observers, unmatched_observers, outcomes, actions,
                  errors, node_id, partition, epoch, processing_ms)
             SELECT g,
                    now() - make_interval(secs => ($2 - g)::float8 * $3),
                    CASE WHEN g % 10 = 5 THEN 'job' ELSE 'event' END,
                    md5(g::text)::uuid,
                    CASE WHEN g % 5 = 0 THEN 'Invoice' ELSE 'Order' END,
                    (g % $4)::text,
                    (ARRAY['insert', 'update', 'update', 'delete'])[1 + g % 4],
                    g,
                    now() - make_interval(secs => ($2 - g)::float8 * $3),
                    ARRAY['observer-' || (g % 10), 'audit'],
                    CASE WHEN g % 3 = 0 THEN ARRAY['big-orders'] ELSE '{}' END,
                    CASE WHEN g % 50 = 0 THEN ARRAY['succeeded', 'dead_lettered']
                         WHEN g % 50 = 1 THEN ARRAY['failed']
                         WHEN g % 10 = 2 THEN ARRAY['queued']
                         ELSE ARRAY['succeeded'] END,
                    jsonb_build_array(jsonb_build_object(
                        'observer', 'observer-' || (g % 10), 'action_index', 0, 'type', 'webhook',
                        'outcome', 'succeeded', 'attempts', 1, 'latency_ms', 12.5)),
                    CASE WHEN g % 50 = 0 THEN 'HTTP 410: Gone (empty body) from the billing gateway'
                         WHEN g % 50 = 1 THEN 'attempt timed out after 10s waiting for the crm endpoint'
                         END,
                    'node-' || (g % 3), (g % 8)::int, 1, 3.5
               FROM generate_series($1::bigint, $5::bigint) AS g",
        )
        .bind(from)
        .bind(rows)
        .bind(f64_from(DAYS * 86_400) / f64_from(rows))
        .bind(ORDERS)
        .bind(to)
        .execute(pool)
        .await
        .unwrap();
        eprintln!(
            "{to} of {rows} rows written ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        from = to + 1;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT setval('fraiseql_observers.history_id_seq', {rows}); ANALYZE fraiseql_observers.history;"
    )))
    .execute(pool)
    .await
    .unwrap();
    eprintln!(
        "{rows} history rows in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

#[allow(
    clippy::cast_precision_loss,
    reason = "a rate needs no exactness beyond 2^52"
)]
fn f64_from(count: i64) -> f64 {
    count as f64
}

fn percentile(sorted: &[Duration], share: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a few hundred samples"
    )]
    let index = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A search, given the run's number (to vary its values).
type Search = Box<dyn Fn(u64) -> HistoryQuery>;

/// The five searches operators run most, and a full-text search for words that are in no error.
fn searches(
    now: chrono::DateTime<chrono::Utc>,
    event_ids: Vec<uuid::Uuid>,
) -> Vec<(&'static str, Search)> {
    vec![
        (
            "one entity's events (debug-event, `--entity-type Order --entity-id N`)",
            Box::new(|run| HistoryQuery {
                entity_type: Some("Order".to_owned()),
                entity_id: Some(((run * 7919 + 1) % 200_000).to_string()),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
        (
            "one event by id (`--event-id`)",
            Box::new(move |run| HistoryQuery {
                event_id: Some(event_ids[usize::try_from(run).unwrap_or(0) % event_ids.len()]),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
        (
            "dead-lettered in the last 24 h (`--outcome dead_lettered --since 24h`)",
            Box::new(move |_| HistoryQuery {
                outcome: Some(HistoryOutcome::DeadLettered),
                since: Some(now - chrono::Duration::hours(24)),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
        (
            "one observer, last hour (`--observer observer-N --since 1h`)",
            Box::new(move |run| HistoryQuery {
                observer: Some(format!("observer-{}", run % 10)),
                since: Some(now - chrono::Duration::hours(1)),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
        (
            "full text in errors, last 7 days (`--text 'crm timed out' --since 7d`)",
            Box::new(move |run| HistoryQuery {
                text: Some(
                    if run % 2 == 0 {
                        "crm timed out"
                    } else {
                        "billing gateway"
                    }
                    .to_owned(),
                ),
                since: Some(now - chrono::Duration::days(7)),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
        (
            "full text, words in no error (`--text 'unicorn saddle'`: the walk, then the GIN index)",
            Box::new(|_| HistoryQuery {
                text: Some("unicorn saddle".to_owned()),
                limit: 50,
                ..HistoryQuery::default()
            }),
        ),
    ]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rows = i64::try_from(env_number("HISTORY_ROWS", 10_000_000)).expect("fits i64");
    let runs = env_number("HISTORY_RUNS", 200);
    let pool = prepare(rows).await;
    let size: String = sqlx::query_scalar(
        "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits
          WHERE inhparent = 'fraiseql_observers.history'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let now = chrono::Utc::now();
    // Event ids to ask for, sampled across the whole table.
    let event_ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM fraiseql_observers.history TABLESAMPLE SYSTEM (0.05) LIMIT 1000",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!event_ids.is_empty(), "no event id sampled");
    let searches = searches(now, event_ids);
    let mut report = format!(
        "History search on {rows} rows ({size}, {DAYS} day partitions), {runs} runs each, 50 rows a page\n\n\
         | search | p50 ms | p99 ms | max ms | rows found (first run) |\n|---|---:|---:|---:|---:|\n"
    );
    for (name, query) in &searches {
        // One warm-up run, as a node that has been serving searches has its indexes cached.
        let found = history::search(&pool, &query(0))
            .await
            .unwrap()
            .entries
            .len();
        let mut took = Vec::new();
        for run in 1..=runs {
            let query = query(run);
            let started = Instant::now();
            history::search(&pool, &query).await.unwrap();
            took.push(started.elapsed());
        }
        took.sort_unstable();
        let _ = writeln!(
            report,
            "| {name} | {:.2} | {:.2} | {:.2} | {found} |",
            millis(percentile(&took, 0.50)),
            millis(percentile(&took, 0.99)),
            millis(*took.last().unwrap())
        );
    }
    println!("{report}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/history-search-report.md");
    std::fs::write(&path, &report).expect("write the report");
    eprintln!("written to {}", path.display());
}
