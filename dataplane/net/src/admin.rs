//! The admin HTTP server: `/metrics` (Prometheus text from `render`), `/healthz` (always 200 while
//! the process runs), `/readyz` (200 once `ready` is true, else 503).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::NetError;

/// The Prometheus text exposition format version our `render` closures produce.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the Prometheus text for `/metrics`.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    render: Render,
    ready: Arc<AtomicBool>,
}

/// Binds the admin port; a taken port is [`NetError::AddrInUse`].
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, NetError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| NetError::from_bind(addr, e))
}

/// The admin routes, for serving or for in-process tests.
pub fn router(render: Render, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { render, ready })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Arc<AtomicBool>,
) -> Result<(), NetError> {
    axum::serve(listener, router(render, ready)).await?;
    Ok(())
}

/// [`serve`] until `shutdown` completes, then finish in-flight requests and return.
pub async fn serve_with_shutdown(
    listener: tokio::net::TcpListener,
    render: Render,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NetError> {
    axum::serve(listener, router(render, ready))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let body = (state.render)();
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
