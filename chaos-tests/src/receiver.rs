//! The webhook target: a real HTTP/1.1 server (hyper, keep-alive) that records every delivery,
//! and can go down (listener closed, open connections reset) and come back on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    serving: Option<JoinHandle<()>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("receiver port");
        let address = listener.local_addr().expect("receiver address");
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let serving = Some(tokio::spawn(serve(listener, deliveries.clone())));
        Receiver {
            address,
            deliveries,
            serving,
        }
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
            match TcpListener::bind(self.address).await {
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
        self.serving = Some(tokio::spawn(serve(listener, self.deliveries.clone())));
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
    let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let (Some(entity_id), Some(version)) = (
        envelope["entity_id"].as_str(),
        envelope["data"]["version"].as_i64(),
    ) else {
        return status(StatusCode::BAD_REQUEST, "no entity_id / data.version");
    };
    deliveries
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Delivery {
            at: SystemTime::now(),
            node,
            idempotency_key,
            entity_id: entity_id.to_owned(),
            version,
        });
    status(StatusCode::OK, "ok")
}

fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
}
