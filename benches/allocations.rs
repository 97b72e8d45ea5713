//! Heap allocations per event on the node's in-process path, stage by stage: decoding the
//! change-log row's JSON text (as the batch read returns it) into an event, matching it against
//! the observers, building its envelope, serializing the default webhook body, and sending the
//! webhook (one attempt of the action as the node makes it: headers, the adaptive limiter's slot,
//! reqwest and hyper over a kept-alive connection, the answer). Counted with dhat's allocator over
//! `ALLOC_EVENTS` events (default 2,000) of an order-shaped row: an UPDATE with before and after
//! images, one matching observer with a condition among 100.
//!
//! The webhook's receiver runs in this process on its own thread and allocates nothing per
//! request (it reads into a fixed buffer and writes a fixed answer), so what the last stage counts
//! is the client's. Not counted: reading the page from PostgreSQL (sqlx), and everything per page
//! rather than per event (checkpoint, ledger, history).
//!
//! Run: `cargo bench --bench allocations`. Prints a Markdown table.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use fraiseql_observers::actions::webhook::envelope_body;
use fraiseql_observers::actions::{ActionContext, ActionRunner};
use fraiseql_observers::template::Templates;

use fraiseql_observers::listener::{DEFAULT_MAX_ROW_BYTES, decode_row_text};
use fraiseql_observers::matcher::Matcher;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[path = "support/observers.rs"]
mod observers;
#[path = "support/rows.rs"]
mod rows;

/// The 100 observers of the other benchmarks and `order-paid`, the one that matches, whose
/// webhook calls the receiver at `port`.
fn matcher(port: u16) -> Matcher {
    observers::large_config(&format!(
        "  - name: order-paid\n    entity: Order\n    events: [update]\n    condition: \"data.status == 'paid' && field_changed('status')\"\n    actions: [{{type: webhook, url: 'http://127.0.0.1:{port}/orders'}}]\n"
    ))
}

/// An HTTP/1.1 receiver that answers every request `200` with an empty body, keeping the
/// connection open, and allocates nothing per request: one thread per connection, one fixed
/// buffer. Requests are read to the end of their body (`content-length`, as reqwest sends).
fn receiver() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
    let port = listener.local_addr().expect("receiver address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_requests(stream));
        }
    });
    port
}

fn answer_requests(mut stream: TcpStream) {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut filled = 0;
    loop {
        let Ok(read) = stream.read(&mut buffer[filled..]) else {
            return;
        };
        if read == 0 {
            return;
        }
        filled += read;
        // Every complete request in the buffer gets its answer.
        while let Some(length) = request_length(&buffer[..filled]) {
            if stream.write_all(ANSWER).is_err() {
                return;
            }
            buffer.copy_within(length..filled, 0);
            filled -= length;
        }
        assert!(
            filled < buffer.len(),
            "a request larger than the receiver's buffer"
        );
    }
}

/// The length of the complete request at the start of `bytes` (head and body), if it is all there.
fn request_length(bytes: &[u8]) -> Option<usize> {
    let head = bytes.windows(4).position(|window| window == b"\r\n\r\n")? + 4;
    let body = std::str::from_utf8(&bytes[..head])
        .ok()?
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (bytes.len() >= head + body).then_some(head + body)
}

#[derive(Default, Clone, Copy)]
struct Counted {
    blocks: u64,
    bytes: u64,
}

fn counted(work: impl FnOnce()) -> Counted {
    let before = dhat::HeapStats::get();
    work();
    let after = dhat::HeapStats::get();
    Counted {
        blocks: after.total_blocks - before.total_blocks,
        bytes: after.total_bytes - before.total_bytes,
    }
}

fn main() {
    let events: i64 = std::env::var("ALLOC_EVENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000);
    let observers = matcher(receiver());
    let texts: Vec<String> = (1..=events).map(rows::order_update_text).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runner = ActionRunner::new(Arc::new(Templates::default())).unwrap();
    let _profiler = dhat::Profiler::builder()
        .testing()
        .trim_backtraces(Some(4))
        .build();

    let mut stages = [Counted::default(); 5];
    let mut bodies = 0_usize;
    for (position, text) in (1..=events).zip(&texts) {
        let size = u64::try_from(text.len()).unwrap();
        let mut event = None;
        let decode = counted(|| {
            event = Some(decode_row_text(position, size, text, DEFAULT_MAX_ROW_BYTES).unwrap());
        });
        let event = event.unwrap();
        let mut matched = Vec::new();
        let matching = counted(|| {
            matched = observers.matching(&event).collect();
        });
        assert_eq!(matched.len(), 1, "the order-paid observer matches");
        let mut envelope = None;
        let build = counted(|| envelope = Some(event.envelope(matched[0].name.as_str())));
        let envelope = envelope.unwrap();
        let serialize = counted(|| bodies += black_box(envelope_body(&envelope).unwrap()).len());
        let observer = matched[0];
        let context = ActionContext {
            event: &event,
            observer: &observer.name,
            action_index: 0,
            envelope: &envelope,
            lease: None,
        };
        let send = counted(|| {
            runtime
                .block_on(runner.attempt(&observer.actions[0], &context))
                .expect("the receiver answers 200");
        });
        for (total, stage) in stages
            .iter_mut()
            .zip([decode, matching, build, serialize, send])
        {
            total.blocks += stage.blocks;
            total.bytes += stage.bytes;
        }
    }
    assert!(bodies > 0);
    let per_event = |total: u64| {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let value = total as f64 / events as f64;
        value
    };
    println!("| stage (per event, {events} events) | allocations | bytes allocated |");
    println!("|---|---:|---:|");
    let names = [
        "decode the row's JSON text into an event",
        "match (100 observers, one condition)",
        "build the envelope",
        "serialize the default webhook body (as the webhook does)",
        "send the webhook (one attempt: headers, limiter, reqwest, hyper)",
    ];
    let mut all = Counted::default();
    for (name, stage) in names.iter().zip(stages) {
        println!(
            "| {name} | {:.1} | {:.0} |",
            per_event(stage.blocks),
            per_event(stage.bytes)
        );
        all.blocks += stage.blocks;
        all.bytes += stage.bytes;
    }
    println!(
        "| **in-process total** | **{:.1}** | **{:.0}** |",
        per_event(all.blocks),
        per_event(all.bytes)
    );
}
