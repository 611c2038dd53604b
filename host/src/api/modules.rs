//! `POST /v1/modules`, `GET /v1/modules` and `GET /v1/modules/{hash}`.
//!
//! With tenants, bytes are stored once however many tenants upload them, but
//! each tenant sees only the modules it uploaded, with the time it first did:
//! whether another tenant has the same bytes never shows (not in the status
//! of an upload, nor in a first-seen time).

use axum::Json;
use axum::extract::{Extension, Path, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::caller::Caller;
use super::request::{media_type, parse_hash, read_body};
use super::{ApiError, AppState};
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
    let (info, new) = match state.cluster() {
        Some(cluster) => cluster.share_module(bytes).await?,
        None => {
            let owner = caller.owner();
            let registry = state.node().registry();
            let (info, _, new) = registry.register_for(owner.as_deref(), bytes).await?;
            match owner {
                Some(tenant) => {
                    let db = state.node().db();
                    let new = db.own_module(&tenant, &info.hash).await?;
                    (db.tenant_module_info(&tenant, &info.hash).await?, new)
                }
                None => (info, new),
            }
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
    Extension(caller): Extension<Caller>,
    Path(hash): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let hash = parse_hash(&hash)?;
    if let Some(cluster) = state.cluster() {
        // Uploaded to another node: fetched, checked and stored here.
        cluster.module(&hash).await?;
    }
    let db = state.node().db();
    let info = match caller.scope() {
        Some(tenant) => db.tenant_module_info(tenant, &hash).await?,
        None => db.module_info(&hash).await?,
    };
    Ok(Json(ModuleView::from(info)))
}

/// Most modules one list answer holds.
const MAX_MODULES: u64 = 1000;

/// `GET /v1/modules`: the stored modules' metadata, newest first.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse, ApiError> {
    let modules = match state.cluster() {
        Some(cluster) => cluster.list_modules(MAX_MODULES as usize).await?,
        None => {
            let db = state.node().db();
            db.list_modules(MAX_MODULES, caller.scope()).await?
        }
    };
    let items: Vec<ModuleView> = modules.into_iter().map(ModuleView::from).collect();
    Ok(Json(serde_json::json!({ "items": items })))
}
