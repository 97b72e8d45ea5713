//! The HTTP endpoints on their own port: `/metrics` (OpenMetrics text; the database-read gauges
//! as the control façade's background refresh left them, so a scrape runs no query), `/healthz`
//! (the process and its loops are alive), `/readyz` (connected and not draining).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::control::Control;

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(control): State<Control>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        control.render_metrics(),
    )
        .into_response()
}

async fn healthz(State(control): State<Control>) -> Response {
    match control.live() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response(),
    }
}

async fn readyz(State(control): State<Control>) -> Response {
    match control.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(problem) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {problem}\n"),
        )
            .into_response(),
    }
}

/// Serves the endpoints on `listener` until `shutdown`.
///
/// # Errors
/// The server failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Control,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(control);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
