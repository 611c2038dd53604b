//! Running, inspecting, listing and killing workloads.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use tokio::sync::OwnedSemaphorePermit;

use super::caller::Caller;
use super::request::{ModuleRef, parse_submission};
use super::{ApiError, AppState};
use crate::cluster::{Cluster, KillOutcome};
use crate::runner::{Creation, StartError, StartedWorkload};
use crate::store::StoreError;
use crate::tenants::Tenant;
use crate::view::{WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{FailureKind, Limits, Status, WorkloadId, WorkloadRecord, WorkloadSpec};

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

/// Parses an id from the path, as a 404 (a malformed id names no workload).
pub fn parse_id(id: &str) -> Result<WorkloadId, ApiError> {
    id.parse()
        .map_err(|e: crate::workload::BadWorkloadId| ApiError::NotFound(e.to_string()))
}

/// A submission that was accepted: started here, or for the cluster to
/// queue (sync and async runs submit it differently).
enum Accepted {
    /// Started here; the tenant's quota slot, if it has a quota, is held
    /// until the workload ends.
    Started(StartedWorkload, Option<OwnedSemaphorePermit>),
    ForCluster {
        cluster: Arc<Cluster>,
        module: String,
        spec: Box<WorkloadSpec>,
    },
}

/// With `creation`, when the guest starts relative to its record (see
/// [`Creation`]): a sync caller need not wait for the record.
async fn start(
    state: &AppState,
    caller: &Caller,
    req: Request,
    creation: Creation,
) -> Result<Accepted, ApiError> {
    let config = state.config();
    let mut submission = parse_submission(req, config.max_upload, config.max_spec).await?;
    let asked = submission.spec.limits.clone();
    submission.spec.limits = config.limits.apply(&asked)?;
    let quota = match caller.tenant() {
        Some(tenant) => {
            submission.spec.limits = tenant_limits(tenant, &asked, &submission.spec.limits)?;
            submission.spec.tenant = Some(tenant.name().to_owned());
            if let Some(max) = tenant.refuses_at_log_bytes() {
                let stored = state.node().db().log_bytes(Some(tenant.name()));
                if stored >= max {
                    return Err(ApiError::LogQuotaExceeded(format!(
                        "tenant `{}` stores {stored} bytes of logs, its quota is {max}; \
                         runs are refused until retention deletes old logs",
                        tenant.name()
                    )));
                }
            }
            match &tenant.slots {
                Some(slots) => Some(Arc::clone(slots).try_acquire_owned().map_err(|_| {
                    ApiError::QuotaExceeded(format!(
                        "tenant `{}` already runs {} workloads, its quota",
                        tenant.name(),
                        tenant.entry.max_concurrent.unwrap_or(0)
                    ))
                })?),
                None => None,
            }
        }
        None => None,
    };
    state
        .node()
        .outbound_policy()
        .check_spec(&submission.spec.allowed_hosts)
        .map_err(ApiError::OutboundNotPermitted)?;
    if let Some(cluster) = state.cluster() {
        let hash = match submission.module {
            ModuleRef::Hash(hash) => hash,
            ModuleRef::Bytes(bytes) => cluster.share_module(bytes).await?.0.hash,
        };
        return Ok(Accepted::ForCluster {
            cluster: Arc::clone(cluster),
            module: hash,
            spec: Box::new(submission.spec),
        });
    }
    let db = state.node().db();
    let (hash, compiled) = match submission.module {
        ModuleRef::Hash(hash) => {
            // Another tenant's module is, to this one, no module at all.
            if let Some(tenant) = caller.scope() {
                db.check_owned(tenant, &hash).await?;
            }
            let owner = caller.owner();
            let compiled = state
                .node()
                .registry()
                .get_for(owner.as_deref(), &hash)
                .await?;
            (hash, compiled)
        }
        ModuleRef::Bytes(bytes) => {
            let owner = caller.owner();
            let registry = state.node().registry();
            let (info, compiled, _) = registry.register_for(owner.as_deref(), bytes).await?;
            if let Some(tenant) = owner {
                db.own_module(&tenant, &info.hash).await?;
            }
            (info.hash, compiled)
        }
    };
    let started = state
        .node()
        .runner()
        .start(compiled, hash, submission.spec, None, creation)
        .await?;
    Ok(Accepted::Started(started, quota))
}

/// The limits a run of `tenant` gets: what it `asked` for is refused above
/// the tenant's maximum; the server's defaults (`applied`) are lowered to it,
/// and a limit left open gets it.
fn tenant_limits(tenant: &Tenant, asked: &Limits, applied: &Limits) -> Result<Limits, ApiError> {
    let max = tenant.max_limits();
    let fit = |name: &str, asked: Option<u64>, applied: Option<u64>, max: Option<u64>| match (
        asked, applied, max,
    ) {
        (Some(v), _, Some(m)) if v > m => Err(ApiError::BadRequest(format!(
            "limits.{} of {v} exceeds the maximum of {m} for tenant `{}`",
            api_name(name),
            tenant.name()
        ))),
        (_, Some(v), Some(m)) => Ok(Some(v.min(m))),
        (_, None, Some(m)) => Ok(Some(m)),
        (_, v, None) => Ok(v),
    };
    Ok(Limits {
        timeout_ms: fit(
            "timeout",
            asked.timeout_ms,
            applied.timeout_ms,
            max.timeout_ms,
        )?,
        max_memory_bytes: fit(
            "memory",
            asked.max_memory_bytes,
            applied.max_memory_bytes,
            max.max_memory_bytes,
        )?,
        fuel: fit("fuel", asked.fuel, applied.fuel, max.fuel)?,
        max_output_bytes: fit(
            "output",
            asked.max_output_bytes,
            applied.max_output_bytes,
            max.max_output_bytes,
        )?,
    })
}

/// `POST /v1/workloads`: runs and waits; 200 with the final record.
pub async fn run_sync(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    // If the client goes away the workload still finishes: it runs in its own
    // task, or on its node (and a quota slot is released by `hold`).
    let view = match start(&state, &caller, req, Creation::Overlapped).await? {
        Accepted::Started(started, quota) => {
            let id = started.id;
            let ended = hold(started.done, quota)
                .await
                .map_err(|e| anyhow::anyhow!("workload task failed: {e}"))?;
            match ended {
                Ok(record) => WorkloadView::from(record),
                Err(e) => return Ok(ended_unrecorded(id, e)),
            }
        }
        Accepted::ForCluster {
            cluster,
            module,
            spec,
        } => cluster.run(&module, *spec).await?,
    };
    if view.summary.failure == Some(FailureKind::Store) {
        // It ran, but its log could not be kept whole: the caller learns
        // that it is the storage, and which workload (its record says how
        // many lines were stored).
        let message = view.summary.error.clone().unwrap_or_default();
        return Ok(ApiError::storage_full_run(
            view.summary.id,
            message,
            Some(&view),
        ));
    }
    Ok(Json(view).into_response())
}

/// The answer to a sync run whose end could not be recorded (or whose
/// creation failed after its guest started, answered as a failed start).
fn ended_unrecorded(id: WorkloadId, e: anyhow::Error) -> Response {
    let store = e.chain().find_map(|c| c.downcast_ref::<StoreError>());
    match store {
        // The store keeps its end and writes it when there is room.
        Some(StoreError::StorageFull(why)) => ApiError::storage_full_run(
            id,
            format!(
                "workload {id} ended, but the store is full ({why}); its end is recorded \
                 as soon as there is room"
            ),
            None,
        ),
        Some(StoreError::Unavailable(why)) => {
            ApiError::StoreUnavailable(format!("workload {id} ended unrecorded: {why}"))
                .into_response()
        }
        _ => match e.downcast::<StartError>() {
            Ok(e) => ApiError::from(e).into_response(),
            Err(e) => ApiError::Internal(e).into_response(),
        },
    }
}

/// `POST /v1/workloads/async`: 202 with the id at once.
pub async fn run_async(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let id = match start(&state, &caller, req, Creation::Committed).await? {
        Accepted::Started(started, quota) => {
            drop(hold(started.done, quota));
            started.id
        }
        Accepted::ForCluster {
            cluster,
            module,
            spec,
        } => cluster.submit(&module, *spec).await?,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/workloads/{id}"))],
        Json(json!({"id": id, "status": "pending"})),
    ))
}

/// The workload's end, with a tenant's quota slot (if it has a quota) held
/// until then by a task of its own, so that the slot is released at the end
/// even when nobody waits for it. Without a quota no task is added.
fn hold(
    done: tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>>,
    quota: Option<OwnedSemaphorePermit>,
) -> tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>> {
    let Some(quota) = quota else { return done };
    tokio::spawn(async move {
        let ended = done.await;
        drop(quota);
        ended.map_err(|e| anyhow::anyhow!("workload task failed: {e}"))?
    })
}

/// The record of workload `id`, as `caller` may see it (404 otherwise).
pub async fn visible_record(
    state: &AppState,
    caller: &Caller,
    id: WorkloadId,
) -> Result<WorkloadRecord, ApiError> {
    let record = state.node().db().workload(id).await?;
    caller.check_workload(id, record.tenant.as_deref())?;
    Ok(record)
}

/// The record of workload `id` if its lines are still kept: 410 once
/// retention deleted them, 404 as [`visible_record`].
pub async fn record_with_lines(
    state: &AppState,
    caller: &Caller,
    id: WorkloadId,
) -> Result<WorkloadRecord, ApiError> {
    let record = visible_record(state, caller, id).await?;
    if record.pruned_at.is_some() {
        return Err(ApiError::Gone(format!(
            "the lines of workload {id} were deleted by retention"
        )));
    }
    Ok(record)
}

/// `GET /v1/workloads/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    if let Some(cluster) = state.cluster() {
        return Ok(Json(cluster.record(id).await?.view));
    }
    Ok(Json(WorkloadView::from(
        visible_record(&state, &caller, id).await?,
    )))
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
    if let Some(cluster) = state.cluster() {
        return Ok(Json(cluster.list(limit, offset, status).await));
    }
    let page = state
        .node()
        .db()
        .list_workloads(limit, offset, status, caller.scope())
        .await?;
    Ok(Json(WorkloadList {
        items: page.items.into_iter().map(WorkloadSummary::from).collect(),
        total: page.total,
        limit,
        offset,
    }))
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
) -> Result<axum::response::Response, ApiError> {
    let id = parse_id(&id)?;
    if state.cluster().is_none() && !caller.sees_all() {
        visible_record(&state, &caller, id).await?;
    }
    if let Some(cluster) = state.cluster() {
        return match cluster.kill(id, "killed on request", KILL_WAIT).await? {
            KillOutcome::Ended(view) => Ok(Json(*view).into_response()),
            KillOutcome::Stopping => Ok((
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "status": "killing"})),
            )
                .into_response()),
            KillOutcome::AlreadyEnded(status) => Err(ApiError::Conflict(format!(
                "workload {id} has already ended ({status})"
            ))),
        };
    }
    let runner = Arc::clone(state.node().runner());
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
        let record = state.node().db().workload(id).await?;
        return Ok(match record.status.is_terminal() {
            true => Json(WorkloadView::from(record)).into_response(),
            false => (
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "status": "killing"})),
            )
                .into_response(),
        });
    }
    let record = state.node().db().workload(id).await?;
    Err(ApiError::Conflict(format!(
        "workload {id} has already ended ({})",
        record.status
    )))
}
