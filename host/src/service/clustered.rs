//! The cluster backend: records, module bytes and owners, lines and quota
//! places in NATS JetStream (see [`crate::cluster`]), runs on whichever node
//! has room.
//!
//! Does what the service asks after admission and scoping; never checks a
//! caller itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ListRequest, QuotaSlot, Resolved, ServiceError, Terms};
use crate::cluster::{Cluster, LogChunk};
use crate::logs::LogRecord;
use crate::retention::RetentionPolicy;
use crate::schedule::Schedule;
use crate::store::{KeyedWorkload, ModuleInfo};
use crate::tenants::Tenant;
use crate::view::{KillOutcome, TenantQueue, WorkloadList, WorkloadView};
use crate::workload::{WorkloadId, WorkloadSpec};

/// A cluster as the deployment, seen from one member.
pub(super) struct Clustered {
    cluster: Arc<Cluster>,
    max_queued: usize,
}

impl Clustered {
    pub(super) fn new(cluster: Arc<Cluster>, max_queued: usize) -> Self {
        Self {
            cluster,
            max_queued,
        }
    }

    /// 503 `queue_full` when the cluster's queue, as last seen, holds
    /// `--max-queued` already and no slot here is free to start at once.
    fn check_room(&self) -> Result<(), ServiceError> {
        let queued = self.cluster.queued_as_last_seen();
        let free_here = self.cluster.node_arc().runner().has_free_slot();
        if queued as usize >= self.max_queued && !free_here {
            return Err(ServiceError::QueueFull(format!(
                "the cluster's queue holds {queued} workloads, its maximum is {} \
                 (--max-queued); retry later",
                self.max_queued
            )));
        }
        Ok(())
    }

    /// The membership (for the follower's cursor).
    pub(super) fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub(super) async fn upload_module(
        &self,
        owner: Option<&str>,
        bytes: Bytes,
    ) -> Result<(ModuleInfo, bool), ServiceError> {
        let (info, new) = self.cluster.share_module(owner, bytes).await?;
        match owner {
            Some(tenant) => {
                let (first, new) = self.cluster.own_module(tenant, &info.hash).await?;
                Ok((
                    ModuleInfo {
                        created_at: first,
                        ..info
                    },
                    new,
                ))
            }
            None => Ok((info, new)),
        }
    }

    /// Stores a module that came with a run for `owner`: its hash.
    pub(super) async fn upload_for_run(
        &self,
        owner: Option<&str>,
        bytes: Bytes,
    ) -> Result<Resolved, ServiceError> {
        let (info, _) = self.upload_module(owner, bytes).await?;
        Ok(Resolved::hash(info.hash))
    }

    pub(super) async fn module(
        &self,
        scope: Option<&str>,
        hash: &str,
    ) -> Result<ModuleInfo, ServiceError> {
        let not_found = || ServiceError::NotFound(format!("module {hash} not found"));
        let info = self
            .cluster
            .module_info(hash)
            .await?
            .ok_or_else(not_found)?;
        match scope {
            Some(tenant) => match self.cluster.module_owned(tenant, hash).await? {
                Some(first) => Ok(ModuleInfo {
                    created_at: first,
                    ..info
                }),
                None => Err(not_found()),
            },
            None => Ok(info),
        }
    }

    /// 404 unless `tenant` uploaded `hash` (whether the cluster still has
    /// the bytes is found out as the run is admitted).
    pub(super) async fn check_owned(&self, tenant: &str, hash: &str) -> Result<(), ServiceError> {
        match self.cluster.module_owned(tenant, hash).await? {
            Some(_) => Ok(()),
            None => Err(ServiceError::NotFound(format!("module {hash} not found"))),
        }
    }

    pub(super) async fn modules(
        &self,
        scope: Option<&str>,
        limit: u64,
        offset: u64,
    ) -> Result<(Vec<ModuleInfo>, u64), ServiceError> {
        let (limit, offset) = (
            limit as usize,
            usize::try_from(offset).unwrap_or(usize::MAX),
        );
        Ok(match scope {
            Some(tenant) => {
                (self.cluster)
                    .list_owned_modules(tenant, limit, offset)
                    .await?
            }
            None => self.cluster.list_modules(limit, offset).await?,
        })
    }

    pub(super) async fn delete_module(
        &self,
        scope: Option<&str>,
        hash: &str,
    ) -> Result<(), ServiceError> {
        match scope {
            Some(tenant) => self.cluster.disown_module(tenant, hash).await?,
            None => self.cluster.delete_module(hash).await?,
        }
        Ok(())
    }

    /// A tenant's stored bytes are not counted on a cluster (see the README).
    pub(super) fn stored_log_bytes(&self, _tenant: &str) -> Option<u64> {
        None
    }

    /// A node's store holds only its own copy of its runs' lines.
    pub(super) fn stored_log_bytes_total(&self) -> Option<u64> {
        None
    }

    /// A place of `tenant`'s quota, counted cluster-wide.
    pub(super) async fn take_slot(
        &self,
        tenant: &Tenant,
        id: WorkloadId,
    ) -> Result<Option<QuotaSlot>, ServiceError> {
        let Some(max) = tenant.entry.max_concurrent else {
            return Ok(None);
        };
        match self.cluster.take_slot(tenant.name(), max, id).await? {
            true => Ok(Some(QuotaSlot::Cluster)),
            false => Err(super::admission::over_quota(tenant)),
        }
    }

    /// What a cluster cannot run yet: a retry policy (its attempts would
    /// need a claim that outlives one node's run).
    pub(super) fn check_spec(&self, spec: &WorkloadSpec) -> Result<(), ServiceError> {
        match spec.retry {
            Some(_) => Err(ServiceError::BadRequest(
                "retry policies are not available in cluster mode yet; submit without `retry`"
                    .into(),
            )),
            None => Ok(()),
        }
    }

    pub(super) async fn running_of(&self, tenant: &Tenant) -> usize {
        match tenant.entry.max_concurrent {
            Some(_) => self.cluster.slots_held(tenant.name()).await.unwrap_or(0),
            None => 0,
        }
    }

    /// Gives back a place taken for a submission that failed, unless the
    /// workload lives on (its end gives it back then).
    pub(super) async fn give_back(
        &self,
        tenant: Option<&str>,
        slot: Option<QuotaSlot>,
        id: WorkloadId,
    ) {
        if let (Some(tenant), Some(QuotaSlot::Cluster)) = (tenant, slot) {
            self.cluster.give_back_unless_live(tenant, id).await;
        }
    }

    pub(super) async fn run(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Option<QuotaSlot>,
        terms: Terms,
    ) -> Result<WorkloadView, ServiceError> {
        let tenant = spec.tenant.clone();
        if let Err(e) = self.check_room() {
            self.give_back(tenant.as_deref(), slot, id).await;
            return Err(e);
        }
        let ran = (self.cluster.run(id, &module.hash, spec, terms.deadline_ms)).await;
        if ran.is_err() {
            self.give_back(tenant.as_deref(), slot, id).await;
        }
        Ok(ran?)
    }

    pub(super) async fn submit(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Option<QuotaSlot>,
        terms: Terms,
    ) -> Result<(), ServiceError> {
        let tenant = spec.tenant.clone();
        if let Err(e) = self.check_room() {
            self.give_back(tenant.as_deref(), slot, id).await;
            return Err(e);
        }
        let submitted = (self
            .cluster
            .submit(id, &module.hash, spec, terms.deadline_ms))
        .await;
        if submitted.is_err() {
            self.give_back(tenant.as_deref(), slot, id).await;
        }
        Ok(submitted?)
    }

    /// Who used `key` first within the idempotency window, if anyone; else
    /// it is claimed for `id` across the cluster.
    pub(super) async fn claim_key(
        &self,
        tenant: Option<&str>,
        key: &str,
        fingerprint: &str,
        id: WorkloadId,
    ) -> Result<Option<KeyedWorkload>, ServiceError> {
        Ok(self.cluster.claim_key(tenant, key, fingerprint, id).await?)
    }

    /// Gives a claimed key back (its submission was refused).
    pub(super) async fn release_key(&self, tenant: Option<&str>, key: &str) {
        self.cluster.release_key(tenant, key).await
    }

    /// Resolves when workload `id` has ended (or could not be followed).
    pub(super) async fn until_changed(&self, id: WorkloadId) {
        if self.cluster.wait_end(id).await.is_err() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Per tenant: queued, running and the oldest wait; and how many wait.
    pub(super) async fn queue_depth(&self) -> Result<(Vec<TenantQueue>, u64), ServiceError> {
        Ok(self.cluster.queue_depth().await?)
    }

    pub(super) async fn create_schedule(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        match self.cluster.create_schedule(schedule).await? {
            true => Ok(()),
            false => Err(ServiceError::Conflict(format!(
                "a schedule named {} exists",
                schedule.name
            ))),
        }
    }

    pub(super) async fn put_schedule(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        Ok(self.cluster.put_schedule(schedule).await?)
    }

    pub(super) async fn schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Schedule>, ServiceError> {
        Ok(self.cluster.schedule(tenant, name).await?)
    }

    pub(super) async fn schedules(&self) -> Result<Vec<Schedule>, ServiceError> {
        Ok(self.cluster.schedules().await?)
    }

    pub(super) async fn delete_schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<(), ServiceError> {
        Ok(self.cluster.delete_schedule(tenant, name).await?)
    }

    /// Nothing to stop here: the cluster's dispatch stops with the node.
    pub(super) fn stop_starting(&self) {}

    pub(super) async fn record(&self, id: WorkloadId) -> Result<WorkloadView, ServiceError> {
        Ok(self.cluster.record(id).await?.view)
    }

    pub(super) async fn list(&self, request: ListRequest) -> Result<WorkloadList, ServiceError> {
        Ok(self.cluster.list(request).await?)
    }

    pub(super) async fn kill(
        &self,
        id: WorkloadId,
        reason: &str,
        wait: Duration,
    ) -> Result<KillOutcome, ServiceError> {
        Ok(self.cluster.kill(id, reason, wait).await?)
    }

    pub(super) async fn history(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
    ) -> Result<Vec<LogRecord>, ServiceError> {
        let mut cursor = self.cluster.read_history(id, after).await?;
        let mut lines = Vec::new();
        while !cursor.caught_up() && (lines.len() as u64) < limit {
            match cursor.next().await? {
                LogChunk::Lines(batch) => lines.extend(
                    batch
                        .into_iter()
                        .filter(|r| after.is_none_or(|a| r.seq > a))
                        .take((limit as usize).saturating_sub(lines.len())),
                ),
                LogChunk::End => break,
            }
        }
        Ok(lines)
    }

    /// The cluster's retention (one node at a time, under a lease) and this
    /// node's own copy of its runs' lines, pruned as on one node.
    pub(super) fn start_retention(&self, policy: RetentionPolicy) -> tokio::task::JoinHandle<()> {
        let cluster = Arc::clone(&self.cluster);
        let every = Duration::from_secs(1);
        tokio::spawn(async move {
            let db = cluster.node_arc().db().clone();
            tokio::join!(
                Arc::clone(&cluster).prune_forever(policy.clone(), every),
                crate::retention::run(db, policy, every),
            );
        })
    }

    pub(super) async fn stop(&self, reason: &str, grace: Duration) {
        self.cluster.leave(reason, grace).await
    }
}
