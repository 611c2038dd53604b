//! The HTTP edge: routes, authentication, request parsing and responses.
//!
//! Owns everything HTTP (only this module imports axum) and nothing else: it
//! turns requests into calls on the [`Service`] (the same whichever backend
//! serves it), and their results and typed errors into JSON, SSE and status
//! codes.

mod boundary;
mod conn;
mod console;
mod error;
mod logs;
mod modules;
mod request;
mod schedules;
mod sse;
mod workloads;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::timeout::RequestBodyTimeoutLayer;

pub use boundary::AllowedHosts;
pub use error::ApiError;

use crate::service::{Caller, Service};

/// Everything a request handler can reach: the service and the API's own config.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    service: Service,
    config: ApiConfig,
}

/// What the operator decides about the HTTP edge.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body.
    pub max_upload: usize,
    /// Most bytes of args, env, stdin and input one workload may be given.
    pub max_spec: usize,
    /// How long a client may stall (send nothing, or read nothing) before
    /// its connection is closed.
    pub client_timeout: std::time::Duration,
    /// The names this server answers for, besides IP literals and `localhost`.
    pub allowed_hosts: Arc<AllowedHosts>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_upload: 64 << 20,
            max_spec: 1 << 20,
            client_timeout: std::time::Duration::from_secs(30),
            allowed_hosts: Arc::default(),
        }
    }
}

impl AppState {
    /// The API over `service`.
    pub fn new(service: Service, config: ApiConfig) -> Self {
        Self {
            inner: Arc::new(Shared { service, config }),
        }
    }

    fn service(&self) -> &Service {
        &self.inner.service
    }

    fn config(&self) -> &ApiConfig {
        &self.inner.config
    }
}

/// The whole API; `/healthz` stays open when a token is set.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/modules", post(modules::upload).get(modules::list))
        .route(
            "/v1/modules/{hash}",
            get(modules::get).delete(modules::delete),
        )
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
        .route("/v1/stats", get(stats))
        .route("/v1/whoami", get(whoami))
        .route("/v1/queue", get(queue))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{name}",
            get(schedules::get).delete(schedules::delete),
        )
        .route("/v1/schedules/{name}/pause", post(schedules::pause))
        .route("/v1/schedules/{name}/resume", post(schedules::resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .merge(console::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        // Bodies are read with their own limit and a precise 413; this lifts
        // axum's 2 MiB default so the multipart reader uses the same limit.
        .layer(DefaultBodyLimit::max(state.config().max_upload))
        .layer(RequestBodyTimeoutLayer::new(state.config().client_timeout))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.config().allowed_hosts),
            boundary::guard,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(close_after_refused_body))
        .with_state(state)
}

/// Gives every error answer the API's JSON shape, including those axum makes
/// itself (a malformed path or query, a wrong method).
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("error").to_owned(),
        false => text,
    };
    let code = match status {
        axum::http::StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        axum::http::StatusCode::NOT_FOUND => "not_found",
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        axum::http::StatusCode::REQUEST_TIMEOUT => "request_timeout",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut fixed = (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// Marks an error answer to a request whose body was not read to its end
/// `Connection: close`.
///
/// Such answers (401, 413, 415, …) often come before the body is read; hyper
/// then drops the connection, and a client that reuses it for its next request
/// sees that request fail. Said up front, the client opens a new one instead.
/// An error after the whole body was read (a 429, a malformed spec) keeps the
/// connection: a client retrying over quota does not reconnect each time.
async fn close_after_refused_body(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0");
    let read = Arc::new(AtomicBool::new(false));
    let req = match has_body {
        true => req.map(|body| {
            axum::body::Body::new(ReadToEnd {
                body,
                read: Arc::clone(&read),
            })
        }),
        false => req,
    };
    let mut response = next.run(req).await;
    let status = response.status();
    let refused = status.is_client_error() || status.is_server_error();
    if has_body && refused && !read.load(Ordering::Acquire) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    body: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // The end, or the last frame of a body that knows it was the last
        // (a reader may stop there).
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `router(state)` on `listener` until `shutdown` resolves; then kills
/// running workloads, so that open requests (sync runs, SSE streams) end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = state.service().clone();
    let client_timeout = state.config().client_timeout;
    let app = router(state);
    conn::serve(
        listener,
        app,
        client_timeout,
        async move {
            shutdown.await;
            service.kill_running("killed: the server shut down");
        },
        std::time::Duration::from_secs(10),
    )
    .await;
    Ok(())
}

/// `GET /v1/stats`: this node's activity over the last minutes, one sample a
/// second (running workloads, workloads ended and lines written per second).
async fn stats(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.service().stats(&caller)?))
}

/// `GET /v1/queue`: how many workloads wait, per tenant, and the oldest wait.
async fn queue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<axum::Json<crate::service::QueueView>, ApiError> {
    Ok(axum::Json(state.service().queue(&caller).await?))
}

/// `GET /v1/whoami`: the caller's tenant, role and quota use.
async fn whoami(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> impl IntoResponse {
    axum::Json(state.service().whoami(&caller).await)
}

async fn healthz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.service().health().await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.service().metrics(&caller)?,
    ))
}

/// Names the caller from its bearer token (401 without a known one), unless
/// the API is open.
async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    let Some(caller) = state.service().authenticate(given) else {
        return ApiError::Unauthorized.into_response();
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The token of an `Authorization: Bearer …` value; the scheme is
/// case-insensitive (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod token_tests {
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer t0k", "bearer t0k", "BEARER  t0k", " bEaReR t0k"] {
            assert_eq!(super::bearer_token(value), Some("t0k"), "{value}");
        }
        assert_eq!(super::bearer_token("Basic t0k"), None);
        assert_eq!(super::bearer_token("Bearer"), None);
    }
}
