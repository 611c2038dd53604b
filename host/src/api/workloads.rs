//! Running, inspecting, listing and killing workloads.

use axum::Json;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::request::parse_submission;
use super::{ApiError, AppState};
use crate::service::{Caller, ListRequest};
use crate::view::KillOutcome;
use crate::workload::{Status, WorkloadId};

/// Refuses a position or offset that SQLite's signed 64-bit integers cannot hold.
pub fn in_range(name: &str, value: Option<u64>) -> Result<Option<u64>, ApiError> {
    match value {
        Some(v) if v > i64::MAX as u64 => Err(ApiError::BadRequest(format!(
            "`{name}` must be at most {}, got {v}",
            i64::MAX
        ))),
        v => Ok(v),
    }
}

/// Parses an id from the path, as a 404 (a malformed id names no workload).
pub fn parse_id(id: &str) -> Result<WorkloadId, ApiError> {
    id.parse()
        .map_err(|e: crate::workload::BadWorkloadId| ApiError::NotFound(e.to_string()))
}

/// `POST /v1/workloads`: runs and waits; 200 with the final record.
pub async fn run_sync(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let config = state.config();
    let submission = parse_submission(req, config.max_upload, config.max_spec).await?;
    Ok(Json(state.service().run(&caller, submission).await?))
}

/// `POST /v1/workloads/async`: 202 with the id at once.
pub async fn run_async(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let config = state.config();
    let submission = parse_submission(req, config.max_upload, config.max_spec).await?;
    let id = state.service().submit(&caller, submission).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/workloads/{id}"))],
        Json(json!({"id": id, "status": "pending"})),
    ))
}

/// `GET /v1/workloads/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(state.service().workload(&caller, id).await?))
}

/// Query of the list endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u64>,
    offset: Option<u64>,
    before: Option<String>,
    status: Option<String>,
    tenant: Option<String>,
}

/// Most workloads one list page returns.
const MAX_PAGE: u64 = 500;

/// `GET /v1/workloads?limit=&offset=&before=&status=&tenant=`: newest first.
/// `before` (the last id of the previous page) pages by key, at the same
/// cost however deep; `offset` skips within what `before` leaves.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let offset = in_range("offset", q.offset)?.unwrap_or(0);
    let status = q
        .status
        .map(|s| s.parse::<Status>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let before = q
        .before
        .map(|b| b.parse::<WorkloadId>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("`before`: {e}")))?;
    let request = ListRequest {
        limit,
        offset,
        before,
        status,
        tenant: q.tenant,
    };
    Ok(Json(state.service().list(&caller, request).await?))
}

/// How long DELETE waits for the workload to stop before answering 202.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `DELETE /v1/workloads/{id}`: stops it and answers with what happened.
///
/// 200 with the final record once it has ended: `killed`, or the status it
/// reached on its own if it ended before the kill took effect; 202 if it is
/// still stopping after a few seconds; 409 if it had ended before the request.
pub async fn kill(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match state.service().kill(&caller, id, KILL_WAIT).await? {
        KillOutcome::Ended(view) => Ok(Json(*view).into_response()),
        KillOutcome::Stopping => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "killing"})),
        )
            .into_response()),
        KillOutcome::AlreadyEnded(status) => Err(ApiError::Conflict(format!(
            "workload {id} has already ended ({status})"
        ))),
    }
}
