//! `POST /v1/modules`, `GET /v1/modules` (paged), `GET` and `DELETE
//! /v1/modules/{hash}`.
//!
//! With tenants, bytes are stored once however many tenants upload them, but
//! each tenant sees only the modules it uploaded, with the time it first did:
//! whether another tenant has the same bytes never shows (not in the status
//! of an upload, nor in a first-seen time). A tenant's delete takes back its
//! own upload; the bytes (and the compiled copies) go once no tenant has it.

use axum::Json;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::request::{media_type, parse_hash, read_body};
use super::{ApiError, AppState};
use crate::service::Caller;
use crate::view::ModuleView;

/// Validates and stores a module: 201 when new (to the caller's tenant), 200
/// when already known.
pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let ct = media_type(&req);
    if ct != "application/wasm" && ct != "application/octet-stream" {
        return Err(ApiError::UnsupportedMediaType(format!(
            "upload modules as application/wasm, not `{ct}`"
        )));
    }
    let bytes = read_body(req, state.config().max_upload).await?;
    let (info, new) = state.service().upload_module(&caller, bytes).await?;
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
    Extension(caller): Extension<Caller>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = parse_hash(&hash)?;
    let info = state.service().module(&caller, &hash).await?;
    Ok(Json(ModuleView::from(info)))
}

/// Most modules one list answer holds.
const MAX_MODULES: u64 = 1000;

/// `?limit=&offset=` of a module list.
#[derive(serde::Deserialize)]
pub struct ModuleListQuery {
    limit: Option<u64>,
    offset: Option<u64>,
}

/// `GET /v1/modules`: the stored modules' metadata, newest first, a page
/// at a time (`limit`, default and most 1000; `offset`), with the total.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ModuleListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(MAX_MODULES);
    if limit == 0 || limit > MAX_MODULES {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_MODULES}"
        )));
    }
    let offset = q.offset.unwrap_or(0).min(i64::MAX as u64);
    let (modules, total) = state.service().modules(&caller, limit, offset).await?;
    let items: Vec<ModuleView> = modules.into_iter().map(ModuleView::from).collect();
    Ok(Json(serde_json::json!({
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
    })))
}

/// `DELETE /v1/modules/{hash}`: 204. A tenant takes back its own upload
/// (404 if it has none); an admin (or an open server) deletes it for
/// everyone. 409 while a pending or running workload uses it.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = parse_hash(&hash)?;
    state.service().delete_module(&caller, &hash).await?;
    Ok(StatusCode::NO_CONTENT)
}
