//! Running, inspecting, listing and killing workloads.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::request::{ModuleRef, parse_submission};
use super::{ApiError, AppState};
use crate::runner::StartedWorkload;
use crate::workload::{Limits, Status, WorkloadId, WorkloadRecord};

/// A workload as the API shows it.
#[derive(Debug, Serialize)]
pub struct WorkloadView {
    id: WorkloadId,
    status: Status,
    module: String,
    args: Vec<String>,
    limits: Limits,
    exit_code: Option<i32>,
    error: Option<String>,
    duration_ms: Option<u64>,
    line_count: u64,
    /// An SDK workload's returned output: JSON when it parses as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<serde_json::Value>,
    /// The output as base64 when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_base64: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl From<WorkloadRecord> for WorkloadView {
    fn from(w: WorkloadRecord) -> Self {
        let (output, output_base64) = match &w.output {
            None => (None, None),
            Some(bytes) => match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(json) => (Some(json), None),
                Err(_) => {
                    use base64::Engine as _;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    (None, Some(b64))
                }
            },
        };
        Self {
            output,
            output_base64,
            id: w.id,
            status: w.status,
            module: w.module_hash,
            args: w.args,
            limits: w.limits,
            exit_code: w.exit_code,
            error: w.error,
            duration_ms: w.duration_ms,
            line_count: w.line_count,
            created_at: rfc3339(w.created_at),
            started_at: w.started_at.map(rfc3339),
            finished_at: w.finished_at.map(rfc3339),
        }
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an id from the path, as a 404 (a malformed id names no workload).
pub fn parse_id(id: &str) -> Result<WorkloadId, ApiError> {
    id.parse()
        .map_err(|e: crate::workload::BadWorkloadId| ApiError::NotFound(e.to_string()))
}

async fn start(state: &AppState, req: Request) -> Result<StartedWorkload, ApiError> {
    let submission = parse_submission(req, state.inner.max_upload).await?;
    let (hash, compiled) = match submission.module {
        ModuleRef::Hash(hash) => {
            let compiled = state.inner.registry.get(&hash).await?;
            (hash, compiled)
        }
        ModuleRef::Bytes(bytes) => {
            let (info, compiled, _) = state.inner.registry.register(bytes.into()).await?;
            (info.hash, compiled)
        }
    };
    Ok(state
        .inner
        .runner
        .start(compiled, hash, submission.spec, None)
        .await?)
}

/// `POST /v1/workloads`: runs and waits; 200 with the final record.
pub async fn run_sync(
    State(state): State<AppState>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let started = start(&state, req).await?;
    // If the client goes away the workload still finishes: it runs in its own task.
    let (record, _) = started
        .done
        .await
        .map_err(|e| anyhow::anyhow!("workload task failed: {e}"))??;
    Ok(Json(WorkloadView::from(record)))
}

/// `POST /v1/workloads/async`: 202 with the id at once.
pub async fn run_async(
    State(state): State<AppState>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let started = start(&state, req).await?;
    let id = started.id;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/workloads/{id}"))],
        Json(json!({"id": id, "status": "pending"})),
    ))
}

/// `GET /v1/workloads/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(WorkloadView::from(state.db().workload(id)?)))
}

/// Query of the list endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u64>,
    offset: Option<u64>,
    status: Option<String>,
}

/// Most workloads one list page returns.
const MAX_PAGE: u64 = 500;

/// `GET /v1/workloads?limit=&offset=&status=`: newest first.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let offset = q.offset.unwrap_or(0);
    let status = q
        .status
        .map(|s| s.parse::<Status>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let page = state.db().list_workloads(limit, offset, status)?;
    let items: Vec<WorkloadView> = page.items.into_iter().map(WorkloadView::from).collect();
    Ok(Json(json!({
        "items": items,
        "total": page.total,
        "limit": limit,
        "offset": offset,
    })))
}

/// `DELETE /v1/workloads/{id}`: 202 while it stops, 409 if it had ended.
pub async fn kill(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let runner = Arc::clone(&state.inner.runner);
    if runner.kill(id, "killed on request") {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "killing"})),
        ));
    }
    let record = state.db().workload(id)?;
    Err(ApiError::Conflict(format!(
        "workload {id} has already ended ({})",
        record.status
    )))
}
