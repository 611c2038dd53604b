//! The HTTP edge: routes, authentication, request parsing and responses.
//!
//! Owns everything HTTP (only this module imports axum) and nothing else: it
//! turns requests into calls on the registry, runner and store, and their
//! results and typed errors into JSON, SSE and status codes.

mod boundary;
mod caller;
mod conn;
mod console;
mod error;
mod logs;
mod modules;
mod request;
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
pub use workloads::LimitPolicy;

use crate::cluster::Cluster;
use crate::node::Node;
use crate::tenants::Tenants;

use caller::Caller;

/// Everything a request handler can reach: the node and the API's own config.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    node: Arc<Node>,
    config: ApiConfig,
    cluster: Option<Arc<Cluster>>,
    followers: logs::FollowerGate,
}

/// What the operator decides about the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Whose bearer tokens every endpoint but `/healthz` (and the console's
    /// pages) requires; none: the API is open.
    pub tenants: Arc<Tenants>,
    /// Largest request body.
    pub max_upload: usize,
    /// Most bytes of args, env, stdin and input one workload may be given.
    pub max_spec: usize,
    /// Limits a request gets when it names none, and the most it may ask for.
    pub limits: LimitPolicy,
    /// How long a client may stall (send nothing, or read nothing) before
    /// its connection is closed.
    pub client_timeout: std::time::Duration,
    /// How long finished workloads' lines are kept.
    pub retention: crate::retention::RetentionPolicy,
    /// The names this server answers for, besides IP literals and `localhost`.
    pub allowed_hosts: Arc<AllowedHosts>,
    /// Most log followers (SSE streams) open at once on this node.
    pub max_followers: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tenants: Arc::default(),
            max_upload: 64 << 20,
            max_spec: 1 << 20,
            limits: LimitPolicy::default(),
            client_timeout: std::time::Duration::from_secs(30),
            retention: Default::default(),
            allowed_hosts: Arc::default(),
            max_followers: 4096,
        }
    }
}

impl AppState {
    /// The API over `node`.
    pub fn new(node: Arc<Node>, config: ApiConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                node,
                followers: logs::FollowerGate::new(config.max_followers),
                config,
                cluster: None,
            }),
        }
    }

    /// The API of a cluster member: workloads are the cluster's, run on
    /// whichever node has room.
    pub fn clustered(cluster: Arc<Cluster>, config: ApiConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                node: Arc::clone(cluster.node_arc()),
                followers: logs::FollowerGate::new(config.max_followers),
                config,
                cluster: Some(cluster),
            }),
        }
    }

    /// The cluster, when this node is a member of one.
    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    fn node(&self) -> &Node {
        &self.inner.node
    }

    fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    fn followers(&self) -> &logs::FollowerGate {
        &self.inner.followers
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
    let node = Arc::clone(&state.inner.node);
    let client_timeout = state.config().client_timeout;
    let sampler = tokio::spawn(sample_every_second(Arc::clone(&node)));
    let pruner = tokio::spawn(crate::retention::run(
        node.db().clone(),
        state.config().retention.clone(),
        std::time::Duration::from_secs(1),
    ));
    let app = router(state);
    conn::serve(
        listener,
        app,
        client_timeout,
        async move {
            shutdown.await;
            node.runner().kill_all("killed: the server shut down");
        },
        std::time::Duration::from_secs(10),
    )
    .await;
    sampler.abort();
    pruner.abort();
    Ok(())
}

/// Closes one interval of the health figures a second, for `/v1/stats`.
async fn sample_every_second(node: Arc<Node>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lines = node.db().committed_lines();
        node.metrics().sample(crate::workload::now_ms(), lines);
    }
}

/// `GET /v1/stats`: this node's activity over the last minutes, one sample a
/// second (running workloads, workloads ended and lines written per second).
async fn stats(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    // Server-wide figures say what other tenants do.
    caller.require_admin("/v1/stats")?;
    Ok(axum::Json(serde_json::json!({
        "interval_ms": 1000,
        "samples": state.node().metrics().samples(),
    })))
}

/// `GET /v1/whoami`: the caller's tenant, role and quota use.
async fn whoami(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> impl IntoResponse {
    let db = state.node().db();
    let body = match caller.tenant() {
        None => serde_json::json!({
            "tenant": null,
            "admin": true,
            // A node's store holds only its own workloads' lines.
            "log_bytes": state.cluster().is_none().then(|| db.log_bytes_total()),
        }),
        Some(t) => serde_json::json!({
            "tenant": t.name(),
            "admin": t.is_admin(),
            "max_concurrent": t.entry.max_concurrent,
            "running": t.running(),
            "max_limits": t.max_limits(),
            "log_bytes": db.log_bytes(Some(t.name())),
            "max_log_bytes": t.entry.max_log_bytes,
            "on_log_quota": t.entry.max_log_bytes.map(|_| t.entry.on_log_quota.unwrap_or_default()),
        }),
    };
    axum::Json(body)
}

async fn healthz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.node().db().ping().await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin("/metrics")?;
    // The store keeps these counts; they are copied in when asked for.
    let (db, metrics) = (state.node().db(), state.node().metrics());
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    metrics.lost_lines.set(gauge(db.lost_lines()));
    let channels = state.node().broker().open_channels();
    metrics.live_channels.set(gauge(channels as u64));
    metrics.busy_retries.set(gauge(db.busy_retries()));
    metrics.commits.set(gauge(db.commits()));
    (metrics.dropped_diagnostics).set(gauge(crate::diagnostics::dropped_writes()));
    metrics.storage_full.set(i64::from(db.storage_full()));
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    ))
}

/// Names the caller from its bearer token (401 without a known one), unless
/// the API is open.
async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let tenants = &state.config().tenants;
    let caller = match tenants.is_open() {
        true => Caller(None),
        false => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token)
                .unwrap_or("");
            match tenants.authenticate(given) {
                Some(tenant) => Caller(Some(tenant)),
                None => return ApiError::Unauthorized.into_response(),
            }
        }
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
