//! The one error shape of the HTTP API: `{"error":{"code":"…","message":"…"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use crate::service::ServiceError as ApiError;

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
            ApiError::QueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            ApiError::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::StorageFull(_) | ApiError::StorageFullRun { .. } => {
                (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
            }
            ApiError::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::NodeFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "node_failed"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::ClusterUnavailable(_) | ApiError::RanUnrecorded(..) => {
                (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
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
        match self {
            ApiError::RanUnrecorded(message, view) => {
                return Self::about_workload(status, code, message, view.summary.id, Some(&view));
            }
            ApiError::StorageFullRun {
                id,
                message,
                workload,
            } => return Self::about_workload(status, code, message, id, workload.as_deref()),
            _ => {}
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
            ApiError::Busy(_) | ApiError::QuotaExceeded(_) | ApiError::QueueFull(_) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_store_is_507_storage_full_in_the_one_error_shape() {
        let e = ApiError::from(crate::store::StoreError::StorageFull(
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
