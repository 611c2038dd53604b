//! The HTTP edge: routes, authentication, request parsing and responses.
//!
//! Owns everything HTTP (only this module imports axum) and nothing else: it
//! turns requests into calls on the registry, runner and store, and their
//! results and typed errors into JSON, SSE and status codes.

mod error;
mod logs;
mod modules;
mod request;
mod workloads;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};

pub use error::ApiError;

use crate::metrics::Metrics;
use crate::registry::ModuleRegistry;
use crate::runner::Runner;
use crate::store::Db;

/// Everything a request handler can reach.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    runner: Arc<Runner>,
    registry: Arc<ModuleRegistry>,
    metrics: Arc<Metrics>,
    token: Option<String>,
    max_upload: usize,
}

impl AppState {
    /// State over these stages; `token` enables bearer authentication.
    pub fn new(
        runner: Arc<Runner>,
        registry: Arc<ModuleRegistry>,
        metrics: Arc<Metrics>,
        token: Option<String>,
        max_upload: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                runner,
                registry,
                metrics,
                token: token.filter(|t| !t.is_empty()),
                max_upload,
            }),
        }
    }

    fn db(&self) -> &Db {
        self.inner.runner.db()
    }
}

/// The whole API; `/healthz` stays open when a token is set.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/modules", post(modules::upload))
        .route("/v1/modules/{hash}", get(modules::get))
        .route(
            "/v1/workloads",
            post(workloads::run_sync).get(workloads::list),
        )
        .route("/v1/workloads/async", post(workloads::run_async))
        .route(
            "/v1/workloads/{id}",
            get(workloads::get).delete(workloads::kill),
        )
        .route("/v1/workloads/{id}/logs", get(logs::follow))
        .route("/v1/workloads/{id}/logs/history", get(logs::history))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        // Bodies are read with their own limit and a precise 413; this lifts
        // axum's 2 MiB default so the multipart reader uses the same limit.
        .layer(DefaultBodyLimit::max(state.inner.max_upload))
        .layer(middleware::from_fn(close_after_refused_body))
        .with_state(state)
}

/// Marks an error answer to a request with a body `Connection: close`.
///
/// Such answers (401, 413, 415, …) often come before the body is read; hyper
/// then drops the connection, and a client that reuses it for its next request
/// sees that request fail. Said up front, the client opens a new one instead.
async fn close_after_refused_body(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0");
    let mut response = next.run(req).await;
    let status = response.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Serves `router(state)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let runner = Arc::clone(&state.inner.runner);
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Open requests (sync runs, SSE streams) end when their workloads do.
            runner.kill_all("killed: the server shut down");
        })
        .await?;
    Ok(())
}

async fn healthz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.db().ping()?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.inner.metrics.render(),
    )
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.inner.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !tokens_match(given, expected) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Compares two tokens in time independent of where they differ (and of their
/// lengths: both are hashed to the same size first).
fn tokens_match(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_match_only_when_equal() {
        assert!(super::tokens_match("s3cret", "s3cret"));
        assert!(!super::tokens_match("s3cres", "s3cret"));
        assert!(!super::tokens_match("", "s3cret"));
        assert!(!super::tokens_match("s3cret-and-more", "s3cret"));
    }
}
