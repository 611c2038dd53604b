//! Schedules: make, list, show, pause, resume and delete them. The body of
//! `POST /v1/schedules` is `{"name", "cron", "timezone"?, "overlap"?,
//! "spec"}`, where `spec` is a workload's JSON spec naming a stored module.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use super::request::JsonSpec;
use super::{ApiError, AppState};
use crate::schedule::{Overlap, ScheduleView};
use crate::service::{Caller, NewSchedule};

/// The body of `POST /v1/schedules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewScheduleBody {
    name: String,
    cron: String,
    timezone: Option<String>,
    #[serde(default)]
    overlap: Overlap,
    spec: JsonSpec,
}

/// `POST /v1/schedules`: 201 with the schedule.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let config = state.config();
    let body: NewScheduleBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let submission = body.spec.into_submission(None, config.max_spec)?;
    let new = NewSchedule {
        name: body.name,
        cron: body.cron,
        timezone: body.timezone,
        submission,
        overlap: body.overlap,
    };
    let made = state.service().create_schedule(&caller, new).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

/// `GET /v1/schedules`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let items = state.service().schedules(&caller).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

/// `GET /v1/schedules/{name}`: with its last and next firing and its
/// latest workloads.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    Ok(Json(state.service().schedule(&caller, &name).await?))
}

/// `POST /v1/schedules/{name}/pause`.
pub async fn pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    Ok(Json(
        state.service().pause_schedule(&caller, &name, true).await?,
    ))
}

/// `POST /v1/schedules/{name}/resume`.
pub async fn resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    Ok(Json(
        state
            .service()
            .pause_schedule(&caller, &name, false)
            .await?,
    ))
}

/// `DELETE /v1/schedules/{name}`: 204.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service().delete_schedule(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
