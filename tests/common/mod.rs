//! Test harness: a real HTTP receiver on 127.0.0.1:0 that records every request and answers as
//! scripted, and helpers to build an executor from YAML.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fraiseql_observers::actions::ActionRunner;
use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::dlq::InMemoryDeadLetterQueue;
use fraiseql_observers::executor::Executor;
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::load_str;
use tokio::net::TcpListener;

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub arrived: Instant,
    pub answered: Option<Instant>,
    /// The status it was answered with (known on arrival: replies are chosen then).
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(&'static str, String)>,
    /// The response body; `reply <status>` when `None`.
    pub body: Option<String>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: None,
        }
    }

    /// Answers `status` with `body`.
    pub fn with_body(status: u16, body: &str) -> Reply {
        Reply {
            body: Some(body.to_owned()),
            ..Reply::status(status)
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A live HTTP server; paths `/delay/<ms>` answer 200 after that many milliseconds, scripted
/// paths answer their queued replies in turn, everything else answers 200 at once.
pub struct Receiver {
    pub base_url: String,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    state: Arc<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    // The reply is chosen and the request recorded under one lock, so the recorded order is the
    // order replies were handed out in.
    let (index, reply) = {
        let mut requests = state.requests.lock().unwrap();
        let scripted = state
            .scripts
            .lock()
            .unwrap()
            .get_mut(&path)
            .and_then(VecDeque::pop_front);
        let reply = scripted.unwrap_or_else(|| {
            let delay = path
                .strip_prefix("/delay/")
                .and_then(|rest| rest.split('/').next())
                .and_then(|millis| millis.parse().ok())
                .map_or(Duration::ZERO, Duration::from_millis);
            Reply {
                delay,
                ..Reply::status(200)
            }
        });
        requests.push(Recorded {
            method,
            path,
            headers,
            body,
            arrived: Instant::now(),
            answered: None,
            status: reply.status,
        });
        (requests.len() - 1, reply)
    };
    tokio::time::sleep(reply.delay).await;
    state.requests.lock().unwrap()[index].answered = Some(Instant::now());
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let body = reply
        .body
        .unwrap_or_else(|| format!("reply {}", reply.status));
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0").await
    }

    /// A receiver listening on `address` (`[::1]:0` for IPv6 loopback).
    pub async fn start_on(address: &str) -> Receiver {
        let listener = TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let handler_state = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                handle(handler_state.clone(), method, uri, headers, body)
            },
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            base_url: format!("http://{address}"),
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Queues replies for `path`, answered in order before falling back to 200.
    pub fn script(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default()
            .extend(replies);
    }

    /// How many requests arrived (cheap; `requests()` copies them all).
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|request| request.path == path)
            .collect()
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

/// Standard base64 of `text`, to check the basic-auth header independently of the client.
pub fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let triple = u32::from(bytes[0]) << 16 | u32::from(bytes[1]) << 8 | u32::from(bytes[2]);
        for position in 0..4 {
            if position <= chunk.len() {
                out.push(char::from(
                    ALPHABET[(triple >> (18 - 6 * position) & 63) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `Authorization` value of HTTP basic auth, computed independently of the client.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(&format!("{user}:{password}")))
}

/// Loads an observers file from YAML with an empty environment; panics with the errors.
pub fn config_from_yaml(yaml: &str) -> fraiseql_observers::observers::ObserversConfig {
    let no_env = |_: &str| None;
    let options = LoadOptions {
        env: &no_env,
        missing_env: MissingEnv::Error,
    };
    load_str(yaml, Format::Yaml, "test.yaml", &options).unwrap_or_else(|errors| panic!("{errors}"))
}

/// Loads an observers file from YAML with `env` as the environment, expecting it to be refused;
/// returns every error as `file:line:column: path: message` lines.
pub fn config_errors_from_yaml(yaml: &str, env: &[(&str, &str)]) -> Vec<String> {
    let variables: HashMap<String, String> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let lookup = move |name: &str| variables.get(name).cloned();
    let options = LoadOptions {
        env: &lookup,
        missing_env: MissingEnv::Error,
    };
    match load_str(yaml, Format::Yaml, "test.yaml", &options) {
        Ok(_) => panic!("expected the configuration to be refused:\n{yaml}"),
        Err(errors) => errors.errors.iter().map(ToString::to_string).collect(),
    }
}

/// Builds an executor from YAML, with `env` as the environment and an in-memory DLQ.
pub fn executor_from_yaml(
    yaml: &str,
    env: &[(&str, &str)],
) -> (Executor, Arc<InMemoryDeadLetterQueue>) {
    executor_from_yaml_with(yaml, env, |runner| runner)
}

/// [`executor_from_yaml`] with an action runner that `customize` equips (a database pool, a
/// Redis connection).
pub fn executor_from_yaml_with(
    yaml: &str,
    env: &[(&str, &str)],
    customize: impl FnOnce(ActionRunner) -> ActionRunner,
) -> (Executor, Arc<InMemoryDeadLetterQueue>) {
    let variables: HashMap<String, String> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let lookup = move |name: &str| variables.get(name).cloned();
    let options = LoadOptions {
        env: &lookup,
        missing_env: MissingEnv::Warn,
    };
    let config = load_str(yaml, Format::Yaml, "test.yaml", &options)
        .unwrap_or_else(|errors| panic!("{errors}"));
    let dead_letters = Arc::new(InMemoryDeadLetterQueue::default());
    let executor = build_executor(config, dead_letters.clone(), customize);
    (executor, dead_letters)
}

/// An executor for `yaml` (no environment) whose action runner `customize` equips (breakers,
/// limits, cache), dead-lettering in memory.
pub fn executor_with_runner(
    yaml: &str,
    customize: impl FnOnce(ActionRunner) -> ActionRunner,
) -> Executor {
    let options = LoadOptions {
        env: &|_: &str| None,
        missing_env: MissingEnv::Error,
    };
    let config = load_str(yaml, Format::Yaml, "test.yaml", &options)
        .unwrap_or_else(|errors| panic!("{errors}"));
    build_executor(
        config,
        Arc::new(InMemoryDeadLetterQueue::default()),
        customize,
    )
}

fn build_executor(
    config: fraiseql_observers::observers::ObserversConfig,
    dead_letters: Arc<InMemoryDeadLetterQueue>,
    customize: impl FnOnce(ActionRunner) -> ActionRunner,
) -> Executor {
    let runner = customize(ActionRunner::new(Arc::new(config.templates)).unwrap());
    Executor::new(
        Arc::new(Matcher::new(config.observers)),
        runner,
        dead_letters,
        &config.executor,
    )
}

/// Runs one job worker (queue `default`) for `config` until no job is pending or running; panics
/// after 30 s.
pub async fn deliver_jobs(
    pool: &sqlx::PgPool,
    config: fraiseql_observers::observers::ObserversConfig,
) {
    let worker = fraiseql_observers::worker::JobWorker::new(
        fraiseql_observers::jobs::PostgresJobQueue::new(
            pool.clone(),
            "w".to_owned(),
            Duration::from_secs(30),
        ),
        "default",
        ActionRunner::new(Arc::new(config.templates)).unwrap(),
        Arc::new(Matcher::new(config.observers)),
        Duration::from_millis(50),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fraiseql_observers.jobs WHERE status IN ('waiting', 'pending', 'running')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if unfinished == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unfinished} jobs still unfinished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
}

pub mod nodes;
pub mod postgres;
pub mod redis;
pub mod search;
pub mod tools;
