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
use crate::workload::{FailureKind, Limits, Status, WorkloadId, WorkloadRecord};

/// A workload as the API shows it: its summary, whole error, spec and output.
#[derive(Debug, Serialize)]
pub struct WorkloadView {
    #[serde(flatten)]
    summary: WorkloadSummary,
    args: Vec<String>,
    limits: Limits,
    /// An SDK workload's returned output: JSON when it parses as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<serde_json::Value>,
    /// The output as base64 when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_base64: Option<String>,
}

impl From<WorkloadRecord> for WorkloadView {
    fn from(mut w: WorkloadRecord) -> Self {
        let (output, output_base64) = match w.output.take() {
            None => (None, None),
            Some(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(json) => (Some(json), None),
                Err(_) => {
                    use base64::Engine as _;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    (None, Some(b64))
                }
            },
        };
        let (args, limits, error) = (
            std::mem::take(&mut w.args),
            std::mem::take(&mut w.limits),
            w.error.clone(),
        );
        let mut summary = WorkloadSummary::from(w);
        summary.error = error;
        Self {
            summary,
            args,
            limits,
            output,
            output_base64,
        }
    }
}

/// A workload as a list shows it: its state and result, without its spec or
/// output, so that a page stays small whatever the workloads were given.
#[derive(Debug, Serialize)]
pub struct WorkloadSummary {
    id: WorkloadId,
    status: Status,
    module: String,
    exit_code: Option<i32>,
    /// The first line of the error, at most [`SUMMARY_ERROR_CHARS`] characters.
    error: Option<String>,
    failure: Option<FailureKind>,
    duration_ms: Option<u64>,
    line_count: u64,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

/// Longest error a list item carries; the record has the whole one.
pub const SUMMARY_ERROR_CHARS: usize = 200;

impl From<WorkloadRecord> for WorkloadSummary {
    fn from(w: WorkloadRecord) -> Self {
        Self {
            id: w.id,
            status: w.status,
            module: w.module_hash,
            exit_code: w.exit_code,
            error: w.error.map(|e| {
                let first = e.lines().next().unwrap_or("");
                first.chars().take(SUMMARY_ERROR_CHARS).collect()
            }),
            failure: w.failure,
            duration_ms: w.duration_ms,
            line_count: w.line_count,
            created_at: rfc3339(w.created_at),
            started_at: w.started_at.map(rfc3339),
            finished_at: w.finished_at.map(rfc3339),
        }
    }
}

/// The limits a server gives a workload that asks for none, and the most one
/// may ask for (`None`: unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitPolicy {
    /// Limits of a request that names none.
    pub default: Limits,
    /// The most a request may ask for, limit by limit.
    pub max: Limits,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        Self {
            default: Limits {
                timeout_ms: Some(5 * 60 * 1000),
                max_memory_bytes: Some(256 << 20),
                fuel: None,
                max_output_bytes: Some(256 << 20),
            },
            max: Limits {
                timeout_ms: Some(60 * 60 * 1000),
                max_memory_bytes: Some(4 << 30),
                fuel: None,
                max_output_bytes: Some(4 << 30),
            },
        }
    }
}

impl LimitPolicy {
    /// Checks that every default is within its maximum.
    pub fn validate(&self) -> Result<(), String> {
        for (name, default, max) in self.each(&self.default) {
            match (default, max) {
                (_, None) => {}
                (None, Some(max)) => {
                    return Err(format!(
                        "--default-{name} is unlimited but --max-{name} is {max}"
                    ));
                }
                (Some(d), Some(m)) if d > m => {
                    return Err(format!("--default-{name} ({d}) exceeds --max-{name} ({m})"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `asked`, with defaults for what it leaves open; a limit above its
    /// maximum is refused.
    pub fn apply(&self, asked: &Limits) -> Result<Limits, ApiError> {
        for (name, value, max) in self.each(asked) {
            if let (Some(v), Some(m)) = (value, max)
                && v > m
            {
                return Err(ApiError::BadRequest(format!(
                    "limits.{} of {v} exceeds this server's maximum of {m}",
                    api_name(name)
                )));
            }
        }
        Ok(Limits {
            timeout_ms: asked.timeout_ms.or(self.default.timeout_ms),
            max_memory_bytes: asked.max_memory_bytes.or(self.default.max_memory_bytes),
            fuel: asked.fuel.or(self.default.fuel),
            max_output_bytes: asked.max_output_bytes.or(self.default.max_output_bytes),
        })
    }

    /// Each limit of `limits` by its flag name, with its maximum.
    fn each(&self, limits: &Limits) -> [(&'static str, Option<u64>, Option<u64>); 4] {
        [
            ("timeout", limits.timeout_ms, self.max.timeout_ms),
            ("memory", limits.max_memory_bytes, self.max.max_memory_bytes),
            ("fuel", limits.fuel, self.max.fuel),
            ("output", limits.max_output_bytes, self.max.max_output_bytes),
        ]
    }
}

/// How the API (in bytes and milliseconds) names a limit.
fn api_name(flag: &str) -> &'static str {
    match flag {
        "timeout" => "timeout_ms (ms)",
        "memory" => "max_memory (bytes)",
        "fuel" => "fuel",
        _ => "max_output_bytes",
    }
}

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
    let config = &state.inner.config;
    let mut submission = parse_submission(req, config.max_upload, config.max_spec).await?;
    submission.spec.limits = config.limits.apply(&submission.spec.limits)?;
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
    let offset = in_range("offset", q.offset)?.unwrap_or(0);
    let status = q
        .status
        .map(|s| s.parse::<Status>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let db = state.db().clone();
    let page = tokio::task::spawn_blocking(move || db.list_workloads(limit, offset, status))
        .await
        .map_err(|e| anyhow::anyhow!("list task failed: {e}"))??;
    let items: Vec<WorkloadSummary> = page.items.into_iter().map(WorkloadSummary::from).collect();
    Ok(Json(json!({
        "items": items,
        "total": page.total,
        "limit": limit,
        "offset": offset,
    })))
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
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let id = parse_id(&id)?;
    let runner = Arc::clone(&state.inner.runner);
    if runner.kill(id, "killed on request") {
        if tokio::time::timeout(KILL_WAIT, runner.ended(id))
            .await
            .is_err()
        {
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "status": "killing"})),
            )
                .into_response());
        }
        // Its end may still be on its way to the store (a full disk): until it
        // is there, the record says it is stopping.
        let record = state.db().workload(id)?;
        return Ok(match record.status.is_terminal() {
            true => Json(WorkloadView::from(record)).into_response(),
            false => (
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "status": "killing"})),
            )
                .into_response(),
        });
    }
    let record = state.db().workload(id)?;
    Err(ApiError::Conflict(format!(
        "workload {id} has already ended ({})",
        record.status
    )))
}
