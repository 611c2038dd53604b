//! The one error type of the service: every way a request of a client can
//! fail, whichever backend served it. The HTTP edge maps each to its status
//! and code; nothing here knows HTTP.

use crate::cluster::ClusterError;
use crate::registry::RegistryError;
use crate::runner::StartError;
use crate::store::StoreError;
use crate::view::WorkloadView;
use crate::workload::WorkloadId;

/// Every way a request can fail, each with its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
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
    /// `--max-queued` workloads wait already.
    #[error("{0}")]
    QueueFull(String),
    /// An idempotency key was used before for another submission.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The database or its disk is full: nothing was changed.
    #[error("{0}")]
    StorageFull(String),
    /// The store cannot write (a writer thread stopped): the server is
    /// going down and a supervisor restarts it.
    #[error("{0}")]
    StoreUnavailable(String),
    /// A task the server cannot live without failed: it is going down
    /// and a supervisor restarts it.
    #[error("{0}")]
    NodeFailed(String),
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
    RanUnrecorded(String, Box<WorkloadView>),
    /// A run started but its log could not be kept whole, or its end could
    /// not be recorded, because the storage is full (507 `storage_full`,
    /// with its id and, when recorded, its final record).
    #[error("{message}")]
    StorageFullRun {
        /// The workload that ran.
        id: WorkloadId,
        /// What happened.
        message: String,
        /// Its final record, when it is recorded.
        workload: Option<Box<WorkloadView>>,
    },
    /// A server-side failure; details are logged, not sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ServiceError::NotFound(format!("workload {id} not found")),
            StoreError::ModuleNotFound(h) => {
                ServiceError::NotFound(format!("module {h} not found"))
            }
            StoreError::IllegalTransition { .. } | StoreError::ModuleInUse(_) => {
                ServiceError::Conflict(e.to_string())
            }
            StoreError::StorageFull(why) => ServiceError::StorageFull(storage_full(&why)),
            e @ StoreError::Unavailable(_) => ServiceError::StoreUnavailable(store_unavailable(&e)),
            StoreError::Internal(e) => ServiceError::Internal(e),
        }
    }
}

impl From<ClusterError> for ServiceError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Unavailable(_) => ServiceError::ClusterUnavailable(e.to_string()),
            ClusterError::Unrecorded(ref view) => {
                ServiceError::RanUnrecorded(e.to_string(), view.clone())
            }
            ClusterError::NotFound(id) => {
                ServiceError::NotFound(format!("workload {id} not found"))
            }
            ClusterError::ModuleNotFound(h) => {
                ServiceError::NotFound(format!("module {h} not found"))
            }
            ClusterError::TooLarge(why) => ServiceError::PayloadTooLarge(why),
            ClusterError::Registry(e) => e.into(),
            ClusterError::Internal(e) => ServiceError::Internal(e),
        }
    }
}

impl From<RegistryError> for ServiceError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(e) => ServiceError::InvalidModule(e.0),
            RegistryError::NotFound(h) => ServiceError::NotFound(format!("module {h} not found")),
            RegistryError::TooExpensive(why) => ServiceError::PayloadTooLarge(why),
            e @ RegistryError::InUse(_) => ServiceError::Conflict(e.to_string()),
            RegistryError::StorageFull(why) => ServiceError::StorageFull(storage_full(&why)),
            RegistryError::StoreUnavailable(why) => {
                ServiceError::StoreUnavailable(store_unavailable(&why))
            }
            RegistryError::Internal(e) => ServiceError::Internal(e),
        }
    }
}

impl From<StartError> for ServiceError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::AtCapacity(_) => ServiceError::Busy(e.to_string()),
            StartError::ModuleNotFound(h) => {
                ServiceError::NotFound(format!("module {h} not found"))
            }
            StartError::StorageFull(why) => ServiceError::StorageFull(storage_full(&why)),
            StartError::StoreUnavailable(why) => {
                ServiceError::StoreUnavailable(store_unavailable(&why))
            }
            StartError::Internal(e) => ServiceError::Internal(e),
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
