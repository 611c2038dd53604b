//! The one error shape of the HTTP API: `{"error":{"code":"…","message":"…"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::cluster::ClusterError;
use crate::registry::RegistryError;
use crate::runner::StartError;
use crate::store::StoreError;

/// Every way a request can fail, each with its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a bad parameter or spec.
    #[error("{0}")]
    BadRequest(String),
    /// The uploaded bytes are not a runnable module.
    #[error("{0}")]
    InvalidModule(String),
    /// Unknown workload or module.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the resource's state (e.g. killing a finished workload).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than `--max-upload`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A content type the endpoint does not accept.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The spec lists a host the operator's `--allow-outbound` does not cover.
    #[error("{0}")]
    OutboundNotPermitted(String),
    /// The request's `Host` is not a name this server answers for (a page
    /// rebinding its name to this server).
    #[error("{0}")]
    MisdirectedHost(String),
    /// A state-changing request from another origin's page.
    #[error("{0}")]
    CrossSite(String),
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Retention deleted what was asked for (a workload's lines).
    #[error("{0}")]
    Gone(String),
    /// The caller's tenant may not do this (e.g. read `/metrics`).
    #[error("{0}")]
    Forbidden(String),
    /// The caller's tenant already runs all the workloads its quota allows.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The caller's tenant stores all the log bytes its quota allows, and
    /// its quota refuses new runs then (no `Retry-After`: only retention
    /// frees room, on its own schedule).
    #[error("{0}")]
    LogQuotaExceeded(String),
    /// `--max-concurrent` workloads are running.
    #[error("{0}")]
    Busy(String),
    /// The database or its disk is full: nothing was changed.
    #[error("{0}")]
    StorageFull(String),
    /// The store cannot write (a writer thread stopped): the server is
    /// going down and a supervisor restarts it.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The client stopped sending its request body.
    #[error("{0}")]
    RequestTimeout(String),
    /// Cluster mode, and NATS cannot be reached now: nothing was changed.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// Cluster mode: a sync run ended on this node, but NATS did not take
    /// its record in time (503 `cluster_unavailable`, with its id and this
    /// node's record: it ran, and is not to be submitted again).
    #[error("{0}")]
    RanUnrecorded(String, Box<crate::view::WorkloadView>),
    /// A server-side failure; details are logged, not sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidModule(_) => (StatusCode::BAD_REQUEST, "invalid_module"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::OutboundNotPermitted(_) => (StatusCode::FORBIDDEN, "outbound_not_permitted"),
            ApiError::MisdirectedHost(_) => (StatusCode::MISDIRECTED_REQUEST, "misdirected_host"),
            ApiError::CrossSite(_) => (StatusCode::FORBIDDEN, "cross_site_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::LogQuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "log_quota_exceeded"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            ApiError::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::ClusterUnavailable(_) | ApiError::RanUnrecorded(..) => {
                (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// 507 `storage_full` for a run that started: beside the error, its id
    /// and (when its end is recorded) its final record.
    pub fn storage_full_run(
        id: crate::workload::WorkloadId,
        message: String,
        record: Option<&crate::view::WorkloadView>,
    ) -> Response {
        let (status, code) = (StatusCode::INSUFFICIENT_STORAGE, "storage_full");
        Self::about_workload(status, code, message, id, record)
    }

    /// An error about a run that did start: the error, its id, and its
    /// record as far as it is known.
    fn about_workload(
        status: StatusCode,
        code: &str,
        message: String,
        id: crate::workload::WorkloadId,
        record: Option<&crate::view::WorkloadView>,
    ) -> Response {
        let body = serde_json::json!({
            "error": {"code": code, "message": message},
            "id": id,
            "workload": record,
        });
        (status, Json(body)).into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::RanUnrecorded(message, view) = self {
            return Self::about_workload(status, code, message, view.summary.id, Some(&view));
        }
        let message = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        let mut response = (status, Json(body)).into_response();
        match self {
            ApiError::Busy(_) | ApiError::QuotaExceeded(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::NotFound(format!("workload {id} not found")),
            StoreError::ModuleNotFound(h) => ApiError::NotFound(format!("module {h} not found")),
            StoreError::IllegalTransition { .. } | StoreError::ModuleInUse(_) => {
                ApiError::Conflict(e.to_string())
            }
            StoreError::StorageFull(why) => ApiError::StorageFull(storage_full(&why)),
            e @ StoreError::Unavailable(_) => ApiError::StoreUnavailable(store_unavailable(&e)),
            StoreError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Unavailable(_) => ApiError::ClusterUnavailable(e.to_string()),
            ClusterError::Unrecorded(ref view) => {
                ApiError::RanUnrecorded(e.to_string(), view.clone())
            }
            ClusterError::NotFound(id) => ApiError::NotFound(format!("workload {id} not found")),
            ClusterError::ModuleNotFound(h) => ApiError::NotFound(format!("module {h} not found")),
            ClusterError::TooLarge(why) => ApiError::PayloadTooLarge(why),
            ClusterError::Registry(e) => e.into(),
            ClusterError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(e) => ApiError::InvalidModule(e.0),
            RegistryError::NotFound(h) => ApiError::NotFound(format!("module {h} not found")),
            RegistryError::TooExpensive(why) => ApiError::PayloadTooLarge(why),
            e @ RegistryError::InUse(_) => ApiError::Conflict(e.to_string()),
            RegistryError::StorageFull(why) => ApiError::StorageFull(storage_full(&why)),
            RegistryError::StoreUnavailable(why) => {
                ApiError::StoreUnavailable(store_unavailable(&why))
            }
            RegistryError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::AtCapacity(_) => ApiError::Busy(e.to_string()),
            StartError::ModuleNotFound(h) => ApiError::NotFound(format!("module {h} not found")),
            StartError::StorageFull(why) => ApiError::StorageFull(storage_full(&why)),
            StartError::StoreUnavailable(why) => {
                ApiError::StoreUnavailable(store_unavailable(&why))
            }
            StartError::Internal(e) => ApiError::Internal(e),
        }
    }
}

/// The message of a 503 from a store that cannot write.
fn store_unavailable(why: &dyn std::fmt::Display) -> String {
    format!("{why}; nothing was changed. The server is shutting down to be restarted; retry then")
}

/// The message of a 507: what is full, that nothing changed, what to do.
fn storage_full(why: &str) -> String {
    format!(
        "the server's storage is full ({why}); nothing was changed. Free disk space on the \
         server (or remove old data); it recovers by itself, no restart needed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_store_is_507_storage_full_in_the_one_error_shape() {
        let e = ApiError::from(StoreError::StorageFull(
            "the database or disk is full".into(),
        ));
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::INSUFFICIENT_STORAGE);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "storage_full");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("disk is full") && message.contains("nothing was changed"),
            "{message}"
        );
    }
}
