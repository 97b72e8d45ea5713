//! Adaptive concurrency per endpoint against real receivers shaped like users' services: a small
//! one that serves a few requests at once from a short accept queue (as a thread-pool server or
//! Python's standard library server does), one that slows down and recovers, and one that answers
//! 429 and 503.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use common::{Receiver, Reply};
use fraiseql_observers::cluster::ClusterSettings;
use fraiseql_observers::concurrency::{EndpointLimiter, LimiterSettings};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::executor::ActionStatus;
use fraiseql_observers::listener::ListenerSettings;
use fraiseql_observers::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// A receiver with `workers` threads of service: each accepts one connection, reads one
/// request, sleeps the service time, answers 200 and closes the connection. Connections beyond
/// those being served wait in the kernel's accept queue, `backlog` long; past it, the kernel
/// drops the SYN and the client retransmits it a second later.
struct SmallReceiver {
    address: std::net::SocketAddr,
    service_millis: Arc<AtomicU64>,
    /// Requests seen, per idempotency key.
    seen: Arc<Mutex<HashMap<String, usize>>>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SmallReceiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl SmallReceiver {
    fn start(workers: usize, backlog: u32, service: Duration) -> SmallReceiver {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = Arc::new(socket.listen(backlog).unwrap());
        let address = listener.local_addr().unwrap();
        let service_millis = Arc::new(AtomicU64::new(u64::try_from(service.as_millis()).unwrap()));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let listener = listener.clone();
                let service_millis = service_millis.clone();
                let seen = seen.clone();
                let in_flight = in_flight.clone();
                let most_in_flight = most_in_flight.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        most_in_flight.fetch_max(now, Ordering::SeqCst);
                        let service = Duration::from_millis(service_millis.load(Ordering::SeqCst));
                        serve_one(stream, service, &seen).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        SmallReceiver {
            address,
            service_millis,
            seen,
            in_flight,
            most_in_flight,
            tasks,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    fn set_service_time(&self, service: Duration) {
        self.service_millis.store(
            u64::try_from(service.as_millis()).unwrap(),
            Ordering::SeqCst,
        );
    }

    fn delivered(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn repeated(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .values()
            .filter(|count| **count > 1)
            .count()
    }
}

/// Reads one HTTP/1.1 request (headers, then `Content-Length` bytes of body), waits `service`,
/// answers 200 with `Connection: close`.
async fn serve_one(mut stream: TcpStream, service: Duration, seen: &Mutex<HashMap<String, usize>>) {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0_u8; 4096];
    let header_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(name).map(|value| value.trim().to_owned()))
    };
    let length: usize = header("content-length:")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    tokio::time::sleep(service).await;
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
    if stream.write_all(answer).await.is_ok() {
        // Counted once answered: a request whose caller gave up is not delivered.
        if let Some(key) = header("idempotency-key:") {
            *seen.lock().unwrap().entry(key).or_default() += 1;
        }
    }
    let _ = stream.shutdown().await;
}

/// The value of the limit gauge for `endpoint` in the node's metrics text.
fn gauge(metrics: &str, name: &str, endpoint: &str) -> Option<i64> {
    let prefix = format!("fraiseql_observers_{name}{{endpoint=\"{endpoint}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_small_receiver_is_delivered_without_timeouts_breakers_or_dead_letters() {
    let database = TestDatabase::migrated().await;
    common::nodes::prepare_orders(&database.pool).await;
    // Four at a time, 20 ms each (200 requests/s at most), four more connections queued.
    let receiver = SmallReceiver::start(4, 4, Duration::from_millis(20));
    let config = common::config_from_yaml(&format!(
        "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 5, initial_delay: 100ms, max_delay: 2s}}
    actions: [{{type: webhook, url: '{}', timeout: 5s}}]
",
        receiver.url()
    ));
    let node = Node::build(
        database.pool.clone(),
        config,
        ListenerSettings {
            poll_interval: Duration::from_millis(50),
            ..ListenerSettings::default()
        },
        ClusterSettings::default(),
    )
    .await
    .unwrap();
    let metrics = node.metrics();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node.run_until_stopped(shutdown.clone()));

    let changes = 2_000;
    let started = Instant::now();
    common::nodes::write_orders(&database.pool, 0..changes, 1).await;
    let mut limits = Vec::new();
    let deadline = Instant::now() + Duration::from_mins(3);
    while receiver.delivered() < usize::try_from(changes).unwrap() {
        assert!(
            Instant::now() < deadline,
            "{} of {changes} delivered",
            receiver.delivered()
        );
        if let Some(limit) = gauge(
            &metrics.render(),
            "endpoint_concurrency_limit",
            &receiver.endpoint(),
        ) {
            limits.push(limit);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let text = metrics.render();
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let settled = gauge(&text, "endpoint_concurrency_limit", &receiver.endpoint())
        .expect("the endpoint's limit is exported");
    println!(
        "{changes} changes delivered in {took:?}; limit samples every 100 ms: {limits:?}; settled at {settled}; at most {} in service at the receiver",
        receiver.most_in_flight.load(Ordering::SeqCst)
    );
    assert_eq!(
        receiver.repeated(),
        0,
        "no request was given up and sent again"
    );
    let dead_letters: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fraiseql_observers.dead_letters")
            .fetch_one(&database.pool)
            .await
            .unwrap();
    assert_eq!(dead_letters, 0);
    let (timeouts, refused): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE errors::text LIKE '%OB004%'),
                count(*) FILTER (WHERE errors::text LIKE '%OB015%')
         FROM (SELECT errors FROM fraiseql_observers.jobs
               UNION ALL
               SELECT errors FROM fraiseql_observers.jobs_completed) AS every_job",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(timeouts, 0, "no attempt timed out");
    assert_eq!(refused, 0, "no circuit opened");
    assert!(
        !text.contains("outcome=\"circuit_open\""),
        "no job met an open circuit"
    );
    assert!(
        !text.contains("transition=\"opened\""),
        "the breaker counted no failure of the burst toward opening"
    );
    // Where the limit settles depends on how the machine schedules the receiver's threads; it
    // must stay well under the node-wide ceiling (256) a burst would otherwise reach.
    println!("the limit settled at {settled}");
    assert!(
        (1..=32).contains(&settled),
        "the limit stays within a few multiples of the receiver's capacity: {settled}"
    );
    assert_eq!(receiver.in_flight.load(Ordering::SeqCst), 0);
}

fn order_event(id: usize) -> EntityEvent {
    EntityEvent::new(
        EventKind::Insert,
        "Order",
        id.to_string(),
        serde_json::json!({"id": id}),
        None,
    )
}

/// Runs batches of `entities` events until `phase` has passed; every action must succeed.
async fn deliver_for(
    executor: &fraiseql_observers::executor::Executor,
    phase: Duration,
    entities: usize,
    next_id: &mut usize,
) {
    let until = Instant::now() + phase;
    while Instant::now() < until {
        let events: Vec<EntityEvent> = (0..entities)
            .map(|offset| order_event(*next_id + offset))
            .collect();
        *next_id += entities;
        for summary in executor.execute_batch(&events).await {
            for action in summary.actions {
                assert!(
                    matches!(action.status, ActionStatus::Succeeded { .. }),
                    "{:?}",
                    action.status
                );
            }
        }
    }
}

fn limiter() -> EndpointLimiter {
    EndpointLimiter::new(
        LimiterSettings {
            adaptive: true,
            initial_limit: 12,
            max_limit: 256,
            queue_wait: Duration::from_secs(30),
        },
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_shrinks_while_a_receiver_is_slow_and_grows_back_when_it_recovers() {
    let receiver = SmallReceiver::start(64, 64, Duration::from_millis(5));
    let limiter = limiter();
    let executor = common::executor_with_runner(
        &format!(
            "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 1}}
    actions: [{{type: webhook, url: '{}', timeout: 5s}}]
",
            receiver.url()
        ),
        |runner| runner.with_limiter(limiter.clone()),
    );
    let endpoint = receiver.endpoint();
    let limit = || limiter.snapshot(&endpoint).unwrap().limit;
    let mut next_id = 0;

    deliver_for(&executor, Duration::from_secs(2), 48, &mut next_id).await;
    let fast = limit();
    receiver.set_service_time(Duration::from_millis(500));
    deliver_for(&executor, Duration::from_secs(8), 48, &mut next_id).await;
    let slow = limit();
    receiver.set_service_time(Duration::from_millis(5));
    deliver_for(&executor, Duration::from_secs(3), 48, &mut next_id).await;
    let recovered = limit();
    println!("limit: {fast} at 5 ms, {slow} at 500 ms, {recovered} after recovering");
    assert!(slow < fast, "shrinks while slow: {fast} → {slow}");
    assert!(recovered > slow, "grows back: {slow} → {recovered}");
    assert_eq!(receiver.delivered(), next_id, "nothing lost");
    assert_eq!(receiver.repeated(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_holds_the_endpoint_and_a_503_halves_the_limit() {
    let receiver = Receiver::start().await;
    receiver.script(
        "/hook",
        [
            Reply::status(429).header("retry-after", "1"),
            Reply::status(503),
        ],
    );
    let limiter = limiter();
    let executor = common::executor_with_runner(
        &format!(
            "observers:
  - name: orders
    entity: Order
    events: [insert]
    retry: {{max_attempts: 4, initial_delay: 10ms, max_delay: 5s}}
    actions: [{{type: webhook, url: '{}', timeout: 5s}}]
",
            receiver.url("/hook")
        ),
        |runner| runner.with_limiter(limiter.clone()),
    );
    let endpoint = receiver.base_url.clone();

    let first = executor.execute_event(&order_event(1)).await;
    assert!(matches!(
        first.actions[0].status,
        ActionStatus::Succeeded { .. }
    ));
    let requests = receiver.requests_to("/hook");
    assert_eq!(
        requests
            .iter()
            .map(|request| request.status)
            .collect::<Vec<_>>(),
        [429, 503, 200]
    );
    let held = requests[1].arrived - requests[0].arrived;
    assert!(
        held >= Duration::from_millis(950),
        "the next call waited for Retry-After: {held:?}"
    );
    let after = limiter.snapshot(&endpoint).unwrap();
    assert_eq!(after.limit, 3, "12 halved by the 429, then by the 503");

    // The hold is the endpoint's, not the one action's: another event waits it out too.
    receiver.script("/hook", [Reply::status(429).header("retry-after", "1")]);
    let answered = Instant::now();
    let (second, third) = (order_event(2), order_event(3));
    let (held_back, other) = tokio::join!(executor.execute_event(&second), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        executor.execute_event(&third).await
    });
    assert!(matches!(
        held_back.actions[0].status,
        ActionStatus::Succeeded { .. }
    ));
    assert!(matches!(
        other.actions[0].status,
        ActionStatus::Succeeded { .. }
    ));
    let requests = receiver.requests_to("/hook");
    let answered_429 = requests
        .iter()
        .position(|request| request.status == 429 && request.arrived >= answered)
        .unwrap();
    for later in &requests[answered_429 + 1..] {
        assert!(
            later.arrived - requests[answered_429].arrived >= Duration::from_millis(950),
            "no call to the endpoint before its Retry-After passed"
        );
    }
}
