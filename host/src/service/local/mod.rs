//! The single-node backend: records, modules and lines in this node's
//! SQLite store, live lines from its broker, runs on its runner.
//!
//! Does what the service asks after admission and scoping; never checks a
//! caller itself. Work that finds no free slot (or its tenant at its cap)
//! waits in the node's queue (`queue`).

mod queue;
mod schedules;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{QuotaSlot, Resolved, ServiceError, Terms};
use crate::logs::LogRecord;
use crate::node::Node;
use crate::retention::RetentionPolicy;
use crate::runner::{Creation, Launch, LocalRecord, Slot, StartError};
use crate::schedule::Schedule;
use crate::store::{KeyedWorkload, ModuleInfo, StoreError};
use crate::tenants::{Tenant, Tenants};
use crate::view::TenantQueue;
use crate::view::{KillOutcome, WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{Stdin, WorkloadId, WorkloadSpec};
use queue::{LocalQueue, Running, Started};

use super::ListRequest;

/// One node as the whole deployment.
pub(super) struct Local {
    node: Arc<Node>,
    queue: Arc<LocalQueue>,
    schedules: anyhow::Result<schedules::ScheduleBook>,
}

impl Local {
    /// The node's backend, its queue holding at most `max_queued` jobs.
    pub(super) fn new(
        node: Arc<Node>,
        tenants: Arc<Tenants>,
        max_queued: usize,
        dies_at: Option<u64>,
    ) -> Self {
        let queue = LocalQueue::start(Arc::clone(&node), tenants, max_queued, dies_at);
        // A book that does not open fails each schedule call, not the node.
        let schedules = schedules::ScheduleBook::open(node.data_dir());
        if let Err(e) = &schedules {
            tracing::error!(error = format!("{e:#}"), "schedules are unavailable");
        }
        Self {
            node,
            queue,
            schedules,
        }
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

    /// A place of `tenant`'s quota: none here, as the queue holds a run
    /// whose tenant is at its cap until a place is free (see `queue`).
    pub(super) async fn take_slot(
        &self,
        _tenant: &Tenant,
        _id: WorkloadId,
    ) -> Result<Option<QuotaSlot>, ServiceError> {
        Ok(None)
    }

    /// Nothing to give back (see [`Local::take_slot`]).
    pub(super) async fn give_back(
        &self,
        _tenant: Option<&str>,
        _slot: Option<QuotaSlot>,
        _id: WorkloadId,
    ) {
    }

    /// How many of `tenant`'s workloads hold a place of its quota.
    pub(super) fn check_spec(&self, _spec: &WorkloadSpec) -> Result<(), ServiceError> {
        Ok(())
    }

    pub(super) async fn running_of(&self, tenant: &Tenant) -> usize {
        tenant.running()
    }

    /// Starts a workload here in `slot`, with `creation` saying when its
    /// guest starts relative to its record; the end, with its tenant's
    /// share held until then.
    #[expect(clippy::too_many_arguments, reason = "one start, said once")]
    async fn start(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        slot: Slot,
        running: Running,
        creation: Creation,
        terms: Terms,
    ) -> Result<queue::Done, ServiceError> {
        let compiled = match module.compiled {
            Some(compiled) => compiled,
            None => {
                let registry = self.node.registry();
                registry
                    .get_for(spec.tenant.as_deref(), &module.hash)
                    .await?
            }
        };
        // Seen through its retries, if it has a policy, without its bytes
        // (a retry reads them back from its record).
        let again = spec.retry.is_some().then(|| {
            let reload = !matches!(spec.stdin, Stdin::Empty) || spec.input.is_some();
            let mut bare = spec.clone();
            (bare.stdin, bare.input) = (Stdin::Empty, None);
            (module.hash.clone(), bare, reload)
        });
        let launch = Launch {
            id,
            slot,
            module_hash: module.hash,
            spec,
            tee: None,
            also: None,
            creation,
            ended: None,
            record: LocalRecord::Primary,
            idempotency: terms.idempotency,
            held: Some(Box::new(running)),
        };
        let started = self.node.runner().start_claimed(compiled, launch).await?;
        Ok(match again {
            Some((module, spec, reload)) => {
                (self.queue).after_attempts(id, module, spec, reload, started.done)
            }
            None => started.done,
        })
    }

    pub(super) async fn run(
        &self,
        id: WorkloadId,
        module: Resolved,
        spec: WorkloadSpec,
        _slot: Option<QuotaSlot>,
        terms: Terms,
    ) -> Result<WorkloadView, ServiceError> {
        // If the caller goes away the workload still finishes: it runs in a
        // task of its own (which gives its tenant's share back at the end).
        self.queue.check_room()?;
        let done = match self.queue.start_now(spec.tenant.as_deref()) {
            Some((slot, running)) => {
                let creation = Creation::Overlapped;
                (self.start(id, module, spec, slot, running, creation, terms)).await?
            }
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let (deadline, key) = (terms.deadline_ms, terms.idempotency);
                let queue = &self.queue;
                queue
                    .enqueue(id, module.hash, spec, deadline, key, Some(tx))
                    .await?;
                match rx.await {
                    Ok(Started::Running(done)) => done,
                    Ok(Started::Ended(ended)) => return Ok(WorkloadView::from((*ended)?)),
                    Err(_) => {
                        return Err(ServiceError::Internal(anyhow::anyhow!(
                            "workload {id} left the queue unheard of"
                        )));
                    }
                }
            }
        };
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
        _slot: Option<QuotaSlot>,
        terms: Terms,
    ) -> Result<(), ServiceError> {
        self.queue.check_room()?;
        match self.queue.start_now(spec.tenant.as_deref()) {
            Some((slot, running)) => {
                let creation = Creation::Committed;
                let done = (self.start(id, module, spec, slot, running, creation, terms)).await?;
                drop(done);
                Ok(())
            }
            None => {
                let (deadline, key) = (terms.deadline_ms, terms.idempotency);
                let queue = &self.queue;
                queue
                    .enqueue(id, module.hash, spec, deadline, key, None)
                    .await
            }
        }
    }

    /// Per tenant: queued, running and the oldest wait; and how many wait.
    pub(super) async fn queue_depth(&self) -> Result<(Vec<TenantQueue>, u64), ServiceError> {
        let (tenants, queued) = self.queue.depth();
        Ok((tenants, queued as u64))
    }

    /// Who used `key` first within the idempotency window, if anyone (the
    /// service holds this node's claims in flight, which are all of them).
    pub(super) async fn claim_key(
        &self,
        tenant: Option<&str>,
        key: &str,
        _fingerprint: &str,
        _id: WorkloadId,
    ) -> Result<Option<KeyedWorkload>, ServiceError> {
        Ok(self.node.db().keyed_workload(tenant, key).await?)
    }

    /// Nothing to give back: a refused submission stored no key.
    pub(super) async fn release_key(&self, _tenant: Option<&str>, _key: &str) {}

    /// Resolves when workload `id` may have moved on (it ended here, or a
    /// moment passed while it waits in the queue).
    pub(super) async fn until_changed(&self, id: WorkloadId) {
        let runner = self.node.runner();
        if runner.is_running(id) {
            return runner.ended(id).await;
        }
        // Queued or between attempts: until it starts or ends unstarted
        // (checked again now and then, for what no channel saw).
        let watch = self.node.broker().watch(id);
        let changed = watch.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if runner.is_running(id) {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }

    fn book(&self) -> Result<&schedules::ScheduleBook, ServiceError> {
        (self.schedules.as_ref()).map_err(|e| {
            ServiceError::StoreUnavailable(format!("schedules are unavailable: {e:#}"))
        })
    }

    pub(super) async fn create_schedule(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        self.book()?.create(schedule).await
    }

    pub(super) async fn put_schedule(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        self.book()?.put(schedule).await
    }

    pub(super) async fn schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Schedule>, ServiceError> {
        self.book()?.get(tenant, name).await
    }

    pub(super) async fn schedules(&self) -> Result<Vec<Schedule>, ServiceError> {
        self.book()?.list().await
    }

    pub(super) async fn delete_schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<(), ServiceError> {
        self.book()?.delete(tenant, name).await
    }

    /// Stops starting queued work (it stays queued for the next start).
    pub(super) fn stop_starting(&self) {
        self.queue.stop();
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
        if let Some(ended) = self.queue.kill(id).await {
            return Ok(KillOutcome::Ended(Box::new(WorkloadView::from(ended?))));
        }
        let runner = Arc::clone(self.node.runner());
        if runner.kill(id, reason) {
            self.queue.spare(id);
            if tokio::time::timeout(wait, runner.ended(id)).await.is_err() {
                return Ok(KillOutcome::Stopping);
            }
            // Its end may still be on its way to the store (a full disk):
            // until it is there, the record says it is stopping.
            let record = self.node.db().workload(id).await?;
            // Its attempt had ended already and is to be retried: the kill
            // stops the retries instead.
            if record.status == crate::workload::Status::Pending
                && let Some(ended) = self.queue.kill(id).await
            {
                return Ok(KillOutcome::Ended(Box::new(WorkloadView::from(ended?))));
            }
            return Ok(match record.status.is_terminal() {
                true => KillOutcome::Ended(Box::new(WorkloadView::from(record))),
                false => KillOutcome::Stopping,
            });
        }
        let record = self.node.db().workload(id).await?;
        if record.status == crate::workload::Status::Pending {
            // On its way into the queue or out of it: killed there.
            return Ok(KillOutcome::Stopping);
        }
        self.queue.spare(id);
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
        self.queue.stop();
        self.node.shutdown(reason, grace).await
    }
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
