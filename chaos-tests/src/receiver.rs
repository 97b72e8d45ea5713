//! The webhook target: a real HTTP/1.1 server that records every delivery, and can go down
//! (listener closed, open connections reset) and come back on the same port.
//!
//! Two kinds: [`Receiver::start`] serves every connection at once (hyper, keep-alive), a receiver
//! that never runs out of room; [`Receiver::start_small`] has a fixed number of workers, a fixed
//! service time and a short accept queue (see [`Capacity`]), as a thread-per-request service
//! (Python's `http.server`, a sync Flask or gunicorn worker pool) has — the kind that overflows
//! when flooded with connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// The largest request head plus body a small receiver reads (a webhook envelope is far smaller).
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// What a small receiver can take: `workers` requests at once, each answered after `service`;
/// connections beyond those being served wait in the kernel's accept queue, `backlog` long (past
/// it the kernel drops the SYN and the client retransmits it a second later). Each connection
/// carries one request and is closed after the answer (`connection: close`), as an HTTP/1.0
/// handler does.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub workers: usize,
    pub service: Duration,
    pub backlog: u32,
}

impl Capacity {
    /// Requests per second the receiver can answer at most.
    #[must_use]
    pub fn per_second(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "a handful of workers")]
        let workers = self.workers as f64;
        workers / self.service.as_secs_f64()
    }
}

/// One request the receiver answered 200 to.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub at: SystemTime,
    /// The sending node (the `x-chaos-node` header its observers file sets).
    pub node: String,
    pub idempotency_key: String,
    pub entity_id: String,
    /// The order's version counter in the delivered change.
    pub version: i64,
}

pub struct Receiver {
    address: SocketAddr,
    /// `None`: serves every connection at once.
    capacity: Option<Capacity>,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    serving: Option<JoinHandle<()>>,
}

impl Receiver {
    /// A receiver that serves every connection at once (keep-alive).
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("receiver port");
        Receiver::serving_on(listener, None)
    }

    /// A receiver of limited [`Capacity`].
    #[must_use]
    pub fn start_small(capacity: Capacity) -> Receiver {
        let listener = small_listener("127.0.0.1:0".parse().expect("address"), capacity.backlog)
            .expect("small receiver port");
        Receiver::serving_on(listener, Some(capacity))
    }

    fn serving_on(listener: TcpListener, capacity: Option<Capacity>) -> Receiver {
        let address = listener.local_addr().expect("receiver address");
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let serving = Some(tokio::spawn(serve_any(
            listener,
            capacity,
            deliveries.clone(),
        )));
        Receiver {
            address,
            capacity,
            deliveries,
            serving,
        }
    }

    /// Its capacity, if it is a small one.
    #[must_use]
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// `http://127.0.0.1:<port>/orders`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}/orders", self.address)
    }

    /// Down: the port refuses connections and every open connection is reset.
    pub fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }

    /// Back on the same port.
    pub async fn start_again(&mut self) {
        self.stop();
        let mut attempts = 0;
        let listener = loop {
            let bound = match self.capacity {
                Some(capacity) => small_listener(self.address, capacity.backlog),
                None => TcpListener::bind(self.address).await,
            };
            match bound {
                Ok(listener) => break listener,
                Err(error) => {
                    attempts += 1;
                    assert!(
                        attempts < 100,
                        "cannot bind {} again: {error}",
                        self.address
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serving = Some(tokio::spawn(serve_any(
            listener,
            self.capacity,
            self.deliveries.clone(),
        )));
    }

    /// Every delivery so far, in arrival order.
    #[must_use]
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[must_use]
    pub fn delivery_count(&self) -> usize {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening socket with an accept queue `backlog` long.
fn small_listener(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

async fn serve_any(
    listener: TcpListener,
    capacity: Option<Capacity>,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
) {
    match capacity {
        Some(capacity) => serve_small(listener, capacity, deliveries).await,
        None => serve(listener, deliveries).await,
    }
}

/// `capacity.workers` workers, each accepting one connection, reading one request, waiting the
/// service time, answering and closing the connection.
async fn serve_small(
    listener: TcpListener,
    capacity: Capacity,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
) {
    let listener = Arc::new(listener);
    // Owned here: aborting this task drops the set, which aborts every worker and its connection.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..capacity.workers {
        let listener = listener.clone();
        let deliveries = deliveries.clone();
        workers.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                serve_one(stream, capacity.service, &deliveries).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Reads one HTTP/1.1 request (head, then `content-length` bytes of body), waits `service`,
/// answers and closes. Recorded as delivered once the answer is written.
async fn serve_one(mut stream: TcpStream, service: Duration, deliveries: &Mutex<Vec<Delivery>>) {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > MAX_REQUEST_BYTES {
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST_BYTES);
    while buffer.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    tokio::time::sleep(service).await;
    let recorded = parse_delivery(
        header("x-chaos-node").unwrap_or_default(),
        header("idempotency-key").unwrap_or_default(),
        head.starts_with("POST /orders "),
        &buffer[head_end..head_end + length],
    );
    let answer: &[u8] = match &recorded {
        Ok(_) => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        Err(_) => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbad",
    };
    // Counted once answered: a request whose caller gave up is not delivered.
    if stream.write_all(answer).await.is_ok()
        && let Ok(delivery) = recorded
    {
        deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(delivery);
    }
    let _ = stream.shutdown().await;
}

/// The delivery a request body describes, or why it does not describe one.
fn parse_delivery(
    node: String,
    idempotency_key: String,
    path_ok: bool,
    body: &[u8],
) -> Result<Delivery, &'static str> {
    if !path_ok {
        return Err("no such path");
    }
    let envelope =
        serde_json::from_slice::<serde_json::Value>(body).map_err(|_| "body is not JSON")?;
    let (Some(entity_id), Some(version)) = (
        envelope["entity_id"].as_str(),
        envelope["data"]["version"].as_i64(),
    ) else {
        return Err("no entity_id / data.version");
    };
    Ok(Delivery {
        at: SystemTime::now(),
        node,
        idempotency_key,
        entity_id: entity_id.to_owned(),
        version,
    })
}

async fn serve(listener: TcpListener, deliveries: Arc<Mutex<Vec<Delivery>>>) {
    // Owned here: aborting this task drops the set, which aborts every connection.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let deliveries = deliveries.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let deliveries = deliveries.clone();
                async move { Ok::<_, Infallible>(answer(request, &deliveries).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(
    request: Request<Incoming>,
    deliveries: &Mutex<Vec<Delivery>>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (node, idempotency_key) = (header("x-chaos-node"), header("idempotency-key"));
    let path_ok = request.uri().path() == "/orders";
    let Ok(body) = request.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "unreadable body");
    };
    if !path_ok {
        return status(StatusCode::NOT_FOUND, "no such path");
    }
    match parse_delivery(node, idempotency_key, true, &body.to_bytes()) {
        Ok(delivery) => {
            deliveries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(delivery);
            status(StatusCode::OK, "ok")
        }
        Err(problem) => status(StatusCode::BAD_REQUEST, problem),
    }
}

fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
}
