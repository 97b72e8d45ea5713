//! Keep-alive connections a receiver closes while they are idle: the next delivery goes out on a
//! fresh connection and spends no attempt. The receiver is a raw HTTP/1.1 server on a tokio
//! `TcpListener` (no framework between the test and the socket), which answers every request with
//! `Connection: keep-alive` and then closes the connection once it has been idle for a while — as
//! Node's `keepAliveTimeout` (5 s) or gunicorn's `keepalive` (2 s) do.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::executor_from_yaml;
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::ActionStatus;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head the server reads (the test's requests are far smaller).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What the idle-closing server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
    closed_idle: AtomicUsize,
    /// Woken each time an idle connection is closed, so the test sends at that very moment.
    idle_closed: tokio::sync::Notify,
    /// Idle connections the client closed in turn after the server's FIN (it saw the close).
    client_let_go: AtomicUsize,
    /// Bytes of a request that arrived on a connection after the server's FIN.
    written_after_close: AtomicUsize,
}

/// How the server ends a connection that stayed idle.
#[derive(Clone, Copy)]
enum IdleClose {
    /// Close the socket at once (most servers).
    Close,
    /// Send FIN, then wait for the client to close its side: the test learns that the client saw
    /// the close before it sends the next delivery.
    FinThenWait,
}

/// An HTTP/1.1 server that keeps each connection open for `idle` after an answer, then closes it.
struct IdleClosingServer {
    url: String,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdleClosingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IdleClosingServer {
    async fn start(idle: Duration, how: IdleClose) -> IdleClosingServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let counters = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                counters.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket, idle, how, counters.clone()));
            }
        });
        IdleClosingServer { url, seen, task }
    }

    fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    fn closed_idle(&self) -> usize {
        self.seen.closed_idle.load(Ordering::SeqCst)
    }

    fn client_let_go(&self) -> usize {
        self.seen.client_let_go.load(Ordering::SeqCst)
    }

    fn written_after_close(&self) -> usize {
        self.seen.written_after_close.load(Ordering::SeqCst)
    }
}

/// Answers requests on one connection until it stays idle for `idle` (then closes it) or the
/// client closes it.
async fn serve(mut socket: TcpStream, idle: Duration, how: IdleClose, seen: Arc<Seen>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_until_head_end(&mut socket, &mut buffer, idle, &seen).await
        else {
            if let IdleClose::FinThenWait = how {
                fin_then_wait(socket, &seen).await;
            }
            return;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let body_length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + body_length {
            let mut chunk = [0_u8; 8192];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
        buffer.drain(..head_end + body_length);
        seen.requests.fetch_add(1, Ordering::SeqCst);
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=1\r\n\r\nok";
        if socket.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// After an idle timeout: FIN, then wait (bounded) for the client to close its side too.
async fn fin_then_wait(mut socket: TcpStream, seen: &Seen) {
    if socket.shutdown().await.is_err() {
        return;
    }
    let mut chunk = [0_u8; 8192];
    match tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk)).await {
        Ok(Ok(0)) => {
            seen.client_let_go.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Ok(_)) => {
            seen.written_after_close.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Err(_)) | Err(_) => {}
    }
}

/// Reads until the end of a request head (`\r\n\r\n`), returning its length with the separator;
/// `None` when the client closed the connection or it stayed idle for `idle` (then counted and
/// closed).
async fn read_until_head_end(
    socket: &mut TcpStream,
    buffer: &mut Vec<u8>,
    idle: Duration,
    seen: &Seen,
) -> Option<usize> {
    loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            return Some(position + 4);
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return None;
        }
        let mut chunk = [0_u8; 8192];
        match tokio::time::timeout(idle, socket.read(&mut chunk)).await {
            // Idle for too long with nothing read of a next request: close it, as a server's
            // keep-alive timeout does.
            Err(_) if buffer.is_empty() => {
                seen.closed_idle.fetch_add(1, Ordering::SeqCst);
                seen.idle_closed.notify_waiters();
                return None;
            }
            Err(_) | Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(read)) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

fn order(id: usize) -> EntityEvent {
    EntityEvent::new(
        EventKind::Insert,
        "Order",
        id.to_string(),
        json!({"id": id}),
        None,
    )
}

/// One attempt per delivery.
fn one_attempt_yaml(url: &str) -> String {
    format!(
        "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 1}}\n    actions: [{{type: webhook, url: '{url}'}}]\n"
    )
}

/// Waits until `check` holds, polling every 5 ms, for at most 10 s.
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_receiver_closed_while_idle_costs_the_next_delivery_no_attempt() {
    const ROUNDS: usize = 20;
    let server = IdleClosingServer::start(Duration::from_millis(100), IdleClose::FinThenWait).await;
    // One attempt only: a delivery that failed on the closed connection would be dead-lettered.
    let (executor, dead_letters) = executor_from_yaml(&one_attempt_yaml(&server.url), &[]);

    for round in 0..ROUNDS {
        let summary = executor.execute_event(&order(round)).await;
        let report = &summary.actions[0];
        assert!(
            matches!(report.status, ActionStatus::Succeeded { .. }) && report.attempts == 1,
            "round {round}: {:?} after {} attempts",
            report.status,
            report.attempts
        );
        // The server closes the idle connection, and the client lets its pooled connection go
        // without being asked to send anything on it.
        wait_for("the client to let the closed connection go", || {
            server.client_let_go() > round
        })
        .await;
    }
    assert_eq!(server.requests(), ROUNDS, "each change sent once");
    assert_eq!(
        server.connections(),
        ROUNDS,
        "each delivery on a fresh connection, since the server closed the last one"
    );
    assert_eq!(server.written_after_close(), 0);
    assert!(
        dead_letters
            .list(&DeadLetterFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

/// The race no client can win: the next delivery is written at the very moment the server
/// closes the connection it reuses. The request bytes were written, so whether the server read
/// them cannot be known: that attempt counts (it is not retried behind the policy's back), and
/// the policy's next attempt goes out on a fresh connection. Nothing is lost or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_racing_the_receiver_s_idle_close_is_retried_on_a_fresh_connection() {
    const ROUNDS: usize = 20;
    let server = IdleClosingServer::start(Duration::from_millis(100), IdleClose::Close).await;
    let (executor, dead_letters) = executor_from_yaml(
        &format!(
            "observers:\n  - name: orders\n    entity: Order\n    events: [insert]\n    retry: {{max_attempts: 3, initial_delay: 10ms, max_delay: 20ms}}\n    actions: [{{type: webhook, url: '{}'}}]\n",
            server.url
        ),
        &[],
    );
    let mut spent_on_the_race = 0;
    for round in 0..ROUNDS {
        // Sent the moment the server closes the connection (woken by the close itself).
        let closed = server.seen.idle_closed.notified();
        let summary = executor.execute_event(&order(round)).await;
        let report = &summary.actions[0];
        assert!(
            matches!(report.status, ActionStatus::Succeeded { .. }) && report.attempts <= 2,
            "round {round}: {:?} after {} attempts",
            report.status,
            report.attempts
        );
        spent_on_the_race += report.attempts - 1;
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the server closes the idle connection");
    }
    eprintln!(
        "{spent_on_the_race} of {ROUNDS} deliveries sent at the moment of the receiver's idle close spent an attempt"
    );
    assert_eq!(server.requests(), ROUNDS, "each change answered once");
    assert!(
        server.closed_idle() >= ROUNDS,
        "the server closed after every round"
    );
    assert!(
        dead_letters
            .list(&DeadLetterFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_deliveries_share_one_keep_alive_connection() {
    let server = IdleClosingServer::start(Duration::from_secs(5), IdleClose::Close).await;
    let (executor, _dead_letters) = executor_from_yaml(&one_attempt_yaml(&server.url), &[]);
    for round in 0..10 {
        let summary = executor.execute_event(&order(round)).await;
        assert!(matches!(
            summary.actions[0].status,
            ActionStatus::Succeeded { .. }
        ));
    }
    assert_eq!(server.requests(), 10);
    // Reused: a delivery sent before the last connection went back to the pool opens another.
    assert!(
        server.connections() <= 3,
        "{} connections for 10 deliveries",
        server.connections()
    );
}
