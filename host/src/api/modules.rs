//! `POST /v1/modules`, `GET /v1/modules` and `GET /v1/modules/{hash}`.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::request::{media_type, parse_hash, read_body};
use super::{ApiError, AppState};
use crate::view::ModuleView;

/// Validates and stores a module: 201 when new, 200 when already known.
pub async fn upload(
    State(state): State<AppState>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let ct = media_type(&req);
    if ct != "application/wasm" && ct != "application/octet-stream" {
        return Err(ApiError::UnsupportedMediaType(format!(
            "upload modules as application/wasm, not `{ct}`"
        )));
    }
    let bytes = read_body(req, state.config().max_upload).await?;
    let (info, new) = match state.cluster() {
        Some(cluster) => cluster.share_module(bytes).await?,
        None => {
            let (info, _, new) = state.node().registry().register(bytes).await?;
            (info, new)
        }
    };
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ModuleView::from(info))))
}

/// A stored module's metadata.
pub async fn get(
    State(state): State<AppState>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = parse_hash(&hash)?;
    if let Some(cluster) = state.cluster() {
        // Uploaded to another node: fetched, checked and stored here.
        cluster.module(&hash).await?;
    }
    let info = state.node().db().module_info(&hash).await?;
    Ok(Json(ModuleView::from(info)))
}

/// Most modules one list answer holds.
const MAX_MODULES: u64 = 1000;

/// `GET /v1/modules`: the stored modules' metadata, newest first.
pub async fn list(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let modules = match state.cluster() {
        Some(cluster) => cluster.list_modules(MAX_MODULES as usize).await?,
        None => state.node().db().list_modules(MAX_MODULES).await?,
    };
    let items: Vec<ModuleView> = modules.into_iter().map(ModuleView::from).collect();
    Ok(Json(serde_json::json!({ "items": items })))
}
