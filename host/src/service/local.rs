//! The single-node backend: records, modules and lines in this node's
//! SQLite store, live lines from its broker, runs on its runner.
//!
//! Does what the service asks after admission and scoping; never checks a
//! caller itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{QuotaSlot, Resolved, ServiceError};
use crate::logs::LogRecord;
use crate::node::Node;
use crate::retention::RetentionPolicy;
use crate::runner::{Creation, StartError};
use crate::store::{ModuleInfo, StoreError};
use crate::tenants::Tenant;
use crate::view::{KillOutcome, WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{WorkloadId, WorkloadRecord, WorkloadSpec};

use super::ListRequest;

/// One node as the whole deployment.
pub(super) struct Local {
    node: Arc<Node>,
}

impl Local {
    pub(super) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    pub(super) async fn upload_module(
        &self,
        owner: Option<&str>,
        bytes: Bytes,
    ) -> Result<(ModuleInfo, bool), ServiceError> {
        let registry = self.node.registry();
        let (info, _, new) = registry.register_for(owner, bytes).await?;
        match owner {
            Some(tenant) => {
                let db = self.node.db();
                let new = db.own_module(tenant, &info.hash).await?;
                Ok((db.tenant_module_info(tenant, &info.hash).await?, new))
            }
            None => Ok((info, new)),
        }
    }

    /// Stores a module that came with a run for `owner`: its hash and
    /// compiled form, compiled once for both.
    pub(super) async fn upload_for_run(
        &self,
        owner: Option<&str>,
        bytes: Bytes,
    ) -> Result<Resolved, ServiceError> {
        let (info, compiled, _) = self.node.registry().register_for(owner, bytes).await?;
        if let Some(tenant) = owner {
            self.node.db().own_module(tenant, &info.hash).await?;
        }
        Ok(Resolved {
            hash: info.hash,
            compiled: Some(compiled),
        })
    }

    pub(super) async fn module(
        &self,
        scope: Option<&str>,
        hash: &str,
    ) -> Result<ModuleInfo, ServiceError> {
        let db = self.node.db();
        Ok(match scope {
            Some(tenant) => db.tenant_module_info(tenant, hash).await?,
            None => db.module_info(hash).await?,
        })
    }

    /// 404 unless `tenant` uploaded `hash` (cached: ownership is never
    /// taken back while a run could use it).
    pub(super) async fn check_owned(&self, tenant: &str, hash: &str) -> Result<(), ServiceError> {
        Ok(self.node.db().check_owned(tenant, hash).await?)
    }

    pub(super) async fn modules(
        &self,
        scope: Option<&str>,
        limit: u64,
        offset: u64,
    ) -> Result<(Vec<ModuleInfo>, u64), ServiceError> {
        Ok(self.node.db().list_modules(limit, offset, scope).await?)
    }

    pub(super) async fn delete_module(
        &self,
        scope: Option<&str>,
        hash: &str,
    ) -> Result<(), ServiceError> {
        if self.node.db().delete_module(hash, scope).await? {
            self.node.registry().forget(hash);
        }
        Ok(())
    }

    /// What `tenant` stores now.
    pub(super) fn stored_log_bytes(&self, tenant: &str) -> Option<u64> {
        Some(self.node.db().log_bytes(Some(tenant)))
    }

    /// What everyone stores now.
    pub(super) fn stored_log_bytes_total(&self) -> Option<u64> {
        Some(self.node.db().log_bytes_total())
    }

    /// A place of `tenant`'s quota, held until its workload ends.
    pub(super) async fn take_slot(
        &self,
        tenant: &Tenant,
        _id: WorkloadId,
    ) -> Result<Option<QuotaSlot>, ServiceError> {
        let Some(slots) = &tenant.slots else {
            return Ok(None);
        };
        match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => Ok(Some(QuotaSlot::Local { _permit: permit })),
            Err(_) => Err(super::admission::over_quota(tenant)),
        }
    }

    /// Gives back a place taken for a run that did not start (dropping
    /// the permit does).
    pub(super) async fn give_back(
        &self,
        _tenant: Option<&str>,
        slot: Option<QuotaSlot>,
        _id: WorkloadId,
    ) {
        drop(slot);
    }

    /// How many of `tenant`'s workloads hold a place of its quota.
    pub(super) async fn running_of(&self, tenant: &Tenant) -> usize {
        tenant.running()
    }

    /// Starts a workload here, with `creation` saying when its guest starts
    /// relative to its record; the end, with the quota place held until then.
    async fn start(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Option<QuotaSlot>,
        creation: Creation,
    ) -> Result<tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>>, ServiceError> {
        let compiled = match module.compiled {
            Some(compiled) => compiled,
            None => {
                let registry = self.node.registry();
                registry
                    .get_for(spec.tenant.as_deref(), &module.hash)
                    .await?
            }
        };
        let started = self
            .node
            .runner()
            .start_as(id, compiled, module.hash, spec, None, creation)
            .await?;
        Ok(hold(started.done, slot))
    }

    pub(super) async fn run(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Option<QuotaSlot>,
    ) -> Result<WorkloadView, ServiceError> {
        // If the caller goes away the workload still finishes: it runs in a
        // task of its own (and the quota place is given back by `hold`).
        let done = self
            .start(id, module, spec, slot, Creation::Overlapped)
            .await?;
        let ended = done
            .await
            .map_err(|e| anyhow::anyhow!("workload task failed: {e}"))?;
        match ended {
            Ok(record) => Ok(WorkloadView::from(record)),
            Err(e) => Err(ended_unrecorded(id, e)),
        }
    }

    pub(super) async fn submit(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Option<QuotaSlot>,
    ) -> Result<(), ServiceError> {
        let done = self
            .start(id, module, spec, slot, Creation::Committed)
            .await?;
        drop(done);
        Ok(())
    }

    pub(super) async fn record(&self, id: WorkloadId) -> Result<WorkloadView, ServiceError> {
        Ok(WorkloadView::from(self.node.db().workload(id).await?))
    }

    pub(super) async fn list(&self, request: ListRequest) -> Result<WorkloadList, ServiceError> {
        let page = self.node.db().list_workloads(&request).await?;
        Ok(WorkloadList {
            items: page.items.into_iter().map(WorkloadSummary::from).collect(),
            total: page.total,
            limit: request.limit,
            offset: request.offset,
        })
    }

    pub(super) async fn kill(
        &self,
        id: WorkloadId,
        reason: &str,
        wait: Duration,
    ) -> Result<KillOutcome, ServiceError> {
        let runner = Arc::clone(self.node.runner());
        if runner.kill(id, reason) {
            if tokio::time::timeout(wait, runner.ended(id)).await.is_err() {
                return Ok(KillOutcome::Stopping);
            }
            // Its end may still be on its way to the store (a full disk):
            // until it is there, the record says it is stopping.
            let record = self.node.db().workload(id).await?;
            return Ok(match record.status.is_terminal() {
                true => KillOutcome::Ended(Box::new(WorkloadView::from(record))),
                false => KillOutcome::Stopping,
            });
        }
        let record = self.node.db().workload(id).await?;
        Ok(KillOutcome::AlreadyEnded(record.status))
    }

    pub(super) async fn history(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
    ) -> Result<Vec<LogRecord>, ServiceError> {
        Ok(self.node.db().read_lines(id, after, limit).await?)
    }

    pub(super) fn start_retention(&self, policy: RetentionPolicy) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::retention::run(
            self.node.db().clone(),
            policy,
            Duration::from_secs(1),
        ))
    }

    pub(super) async fn stop(&self, reason: &str, grace: Duration) {
        self.node.shutdown(reason, grace).await
    }
}

/// The workload's end, with a tenant's quota place (if it has a quota) held
/// until then by a task of its own, so that the place is given back at the
/// end even when nobody waits for it. Without a quota no task is added.
fn hold(
    done: tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>>,
    slot: Option<QuotaSlot>,
) -> tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>> {
    let Some(slot) = slot else { return done };
    tokio::spawn(async move {
        let ended = done.await;
        drop(slot);
        ended.map_err(|e| anyhow::anyhow!("workload task failed: {e}"))?
    })
}

/// The error of a sync run whose end could not be recorded (or whose
/// creation failed after its guest started, answered as a failed start).
fn ended_unrecorded(id: WorkloadId, e: anyhow::Error) -> ServiceError {
    let store = e.chain().find_map(|c| c.downcast_ref::<StoreError>());
    match store {
        // The store keeps its end and writes it when there is room.
        Some(StoreError::StorageFull(why)) => ServiceError::StorageFullRun {
            id,
            message: format!(
                "workload {id} ended, but the store is full ({why}); its end is recorded \
                 as soon as there is room"
            ),
            workload: None,
        },
        Some(StoreError::Unavailable(why)) => {
            ServiceError::StoreUnavailable(format!("workload {id} ended unrecorded: {why}"))
        }
        _ => match e.downcast::<StartError>() {
            Ok(e) => ServiceError::from(e),
            Err(e) => ServiceError::Internal(e),
        },
    }
}
