//! The service: what a client (the HTTP API, the CLI through it) asks of a
//! deployment, written once for one node and for a cluster.
//!
//! Owns admission (limits, quotas, outbound rules, module ownership) and the
//! tenant scoping of every read and kill: another tenant's workload or module
//! is, to a caller, no workload or module at all, on every backend. Each
//! backend (`local` over a [`Node`], `clustered` over a [`Cluster`]) does
//! only what differs — where records, modules and lines live — behind the
//! same calls, in the read model's types ([`crate::view`]). Also owns what
//! makes it a job host, written once: the queue's fair-share order
//! (`queue`; one node's dispatcher is the local backend's), idempotent
//! submits (`idempotency`) and schedules (`schedules`); and the
//! deployment's housekeeping (retention, the stats sampler, the
//! scheduler). Knows nothing of HTTP.

mod admission;
mod caller;
mod clustered;
mod error;
mod follow;
mod local;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use crate::view::TenantQueue;
pub use admission::{Admission, LimitPolicy};
pub use caller::Caller;
pub use error::ServiceError;
pub use follow::LineEncoding;
pub use idempotency::check_key as check_idempotency_key;

use crate::cluster::Cluster;
use crate::logs::LogRecord;
use crate::node::Node;
use crate::retention::RetentionPolicy;
use crate::store::ModuleInfo;
use crate::tenants::Tenants;
use crate::view::{KillOutcome, WorkloadList, WorkloadView};
pub use crate::workload::ListRequest;
use crate::workload::{IdempotencyKey, WorkloadId, WorkloadSpec};

/// Which module to run.
pub enum ModuleRef {
    /// A stored module, by `sha256:<hex>`.
    Hash(String),
    /// Bytes uploaded with the request, as received (never copied on the
    /// way to the hash, the store and the compiler).
    Bytes(Bytes),
}

/// A parsed workload submission.
pub struct Submission {
    /// The module.
    pub module: ModuleRef,
    /// Everything else; limits and tenant are filled in by admission.
    pub spec: WorkloadSpec,
    /// Fail it `queue_timeout` if it waited this long in the queue without
    /// starting.
    pub queue_timeout_ms: Option<u64>,
    /// A repeat with this key (and the same tenant) within 24 h answers
    /// the first submission's workload and creates nothing.
    pub idempotency_key: Option<String>,
}

impl Submission {
    /// A submission of `module` with `spec` and nothing else asked.
    pub fn new(module: ModuleRef, spec: WorkloadSpec) -> Self {
        Self {
            module,
            spec,
            queue_timeout_ms: None,
            idempotency_key: None,
        }
    }
}

/// What an accepted submission carries to its backend besides its spec.
#[derive(Debug, Clone, Default)]
pub(crate) struct Terms {
    /// When it fails `queue_timeout` if it has not started, ms since the
    /// Unix epoch.
    deadline_ms: Option<i64>,
    /// Its key, kept with its record.
    idempotency: Option<IdempotencyKey>,
}

/// How deep the queue is, as `GET /v1/queue` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueView {
    /// Workloads waiting (those the caller sees).
    pub queued: u64,
    /// Most workloads that may wait (`--max-queued`).
    pub max_queued: u64,
    /// Per tenant: queued, running and the oldest wait.
    pub tenants: Vec<TenantQueue>,
}

/// What the operator decides about the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Whose tokens are accepted, with their quotas; none: open.
    pub tenants: Arc<Tenants>,
    /// Limits a run gets when it names none, and the most it may ask for.
    pub limits: LimitPolicy,
    /// How long finished workloads' lines (and records) are kept.
    pub retention: RetentionPolicy,
    /// Most log followers open at once on this node.
    pub max_followers: usize,
    /// Most workloads waiting for a slot; beyond, 503 `queue_full`.
    pub max_queued: usize,
    /// Tests of a dying vital task: the queue's dispatcher panics as it
    /// takes its Nth job (`VULCAN_TEST_FAULT_DISPATCHER_DIES_AT`).
    pub dispatcher_dies_at: Option<u64>,
}

/// `--max-queued`'s default.
pub const DEFAULT_MAX_QUEUED: usize = 100_000;

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            tenants: Arc::default(),
            limits: LimitPolicy::default(),
            retention: RetentionPolicy::default(),
            max_followers: 4096,
            max_queued: DEFAULT_MAX_QUEUED,
            dispatcher_dies_at: None,
        }
    }
}

/// Where the deployment's records, modules and lines live.
enum Backend {
    /// One node: its SQLite store, broker and runner.
    Local(local::Local),
    /// A member of a cluster: NATS JetStream, runs on any node.
    Cluster(clustered::Clustered),
}

/// Calls `$call` on whichever backend serves.
macro_rules! on_backend {
    ($self:expr, $b:ident => $call:expr) => {
        match &$self.inner.backend {
            Backend::Local($b) => $call,
            Backend::Cluster($b) => $call,
        }
    };
}

mod idempotency;
mod schedules;

pub use schedules::NewSchedule;

/// The deployment as clients see it; cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    node: Arc<Node>,
    backend: Backend,
    admission: Admission,
    followers: follow::FollowerGate,
    retention: RetentionPolicy,
    keys: idempotency::KeyClaims,
    max_queued: usize,
    /// Poked when a schedule is made, paused, resumed or deleted here.
    schedules_changed: tokio::sync::Notify,
}

/// A module a run is admitted with: its hash, and (on a node that just
/// compiled it for this request) its compiled form, so it is not looked up
/// again.
pub(crate) struct Resolved {
    hash: String,
    compiled: Option<Arc<crate::engine::CompiledModule>>,
}

impl Resolved {
    fn hash(hash: String) -> Self {
        Self {
            hash,
            compiled: None,
        }
    }
}

/// A tenant's hold on one of its `max_concurrent` places, from submission
/// to the workload's end (a cluster's; one node's queue holds a run whose
/// tenant is at its cap until a place is free).
pub(crate) enum QuotaSlot {
    /// The cluster's count: given back by whoever records the end.
    Cluster,
}

impl Service {
    /// The service of one node.
    pub fn local(node: Arc<Node>, config: ServiceConfig) -> Self {
        let tenants = Arc::clone(&config.tenants);
        let local = local::Local::new(
            Arc::clone(&node),
            tenants,
            config.max_queued,
            config.dispatcher_dies_at,
        );
        let backend = Backend::Local(local);
        Self::with(node, backend, config)
    }

    /// The service of a cluster member: workloads are the cluster's, run on
    /// whichever node has room.
    pub fn clustered(cluster: Arc<Cluster>, config: ServiceConfig) -> Self {
        let node = Arc::clone(cluster.node_arc());
        let backend = Backend::Cluster(clustered::Clustered::new(cluster, config.max_queued));
        Self::with(node, backend, config)
    }

    fn with(node: Arc<Node>, backend: Backend, config: ServiceConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                node,
                backend,
                admission: Admission {
                    tenants: config.tenants,
                    limits: config.limits,
                },
                followers: follow::FollowerGate::new(config.max_followers),
                retention: config.retention,
                keys: idempotency::KeyClaims::default(),
                max_queued: config.max_queued,
                schedules_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The node this service runs workloads on.
    pub fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }

    /// Whose tokens are accepted.
    pub fn tenants(&self) -> &Tenants {
        &self.inner.admission.tenants
    }

    /// The caller a bearer token names: `Some(anyone)` on an open service,
    /// `None` for a token no tenant has.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let tenants = self.tenants();
        match tenants.is_open() {
            true => Some(Caller(None)),
            false => tenants.authenticate(token).map(|t| Caller(Some(t))),
        }
    }

    /// Stores a module for `caller`: its info as the caller sees it, and
    /// whether it is new to the caller.
    pub async fn upload_module(
        &self,
        caller: &Caller,
        bytes: Bytes,
    ) -> Result<(ModuleInfo, bool), ServiceError> {
        let owner = caller.owner();
        on_backend!(self, b => b.upload_module(owner.as_deref(), bytes).await)
    }

    /// A module's info, if `caller` may see it.
    pub async fn module(&self, caller: &Caller, hash: &str) -> Result<ModuleInfo, ServiceError> {
        on_backend!(self, b => b.module(caller.scope(), hash).await)
    }

    /// A page of the modules `caller` sees, newest first, and their total.
    pub async fn modules(
        &self,
        caller: &Caller,
        limit: u64,
        offset: u64,
    ) -> Result<(Vec<ModuleInfo>, u64), ServiceError> {
        on_backend!(self, b => b.modules(caller.scope(), limit, offset).await)
    }

    /// Takes back `caller`'s upload (an admin's: everyone's); the bytes go
    /// once nobody has it. 409 while a pending or running workload uses it.
    pub async fn delete_module(&self, caller: &Caller, hash: &str) -> Result<(), ServiceError> {
        on_backend!(self, b => b.delete_module(caller.scope(), hash).await)
    }

    /// Admits a submission: its spec's limits and tenant filled in, the
    /// module resolved to a hash the caller may run, and a quota place
    /// taken for `id` when its tenant has a quota.
    async fn admit(
        &self,
        caller: &Caller,
        id: WorkloadId,
        submission: Submission,
    ) -> Result<(Resolved, WorkloadSpec, Option<QuotaSlot>), ServiceError> {
        let Submission {
            module, mut spec, ..
        } = submission;
        let outbound = self.inner.node.outbound_policy();
        on_backend!(self, b => self.inner.admission.admit(caller, &mut spec, outbound, |t| {
            b.stored_log_bytes(t)
        }))?;
        let hash = match module {
            ModuleRef::Hash(hash) => {
                // Another tenant's module is, to this one, no module at all;
                // an unknown one is found out as it starts.
                if let Some(tenant) = caller.scope() {
                    on_backend!(self, b => b.check_owned(tenant, &hash).await)?;
                }
                hash
            }
            ModuleRef::Bytes(bytes) => {
                let owner = caller.owner();
                return self
                    .with_slot(caller, id, spec, async {
                        on_backend!(self, b => b.upload_for_run(owner.as_deref(), bytes).await)
                    })
                    .await;
            }
        };
        self.with_slot(caller, id, spec, async { Ok(Resolved::hash(hash)) })
            .await
    }

    /// A quota place taken for `id` when the caller's tenant has a quota,
    /// then `module` resolved (uploaded, when it came with the request): a
    /// run refused for its quota stores nothing.
    async fn with_slot(
        &self,
        caller: &Caller,
        id: WorkloadId,
        spec: WorkloadSpec,
        module: impl Future<Output = Result<Resolved, ServiceError>>,
    ) -> Result<(Resolved, WorkloadSpec, Option<QuotaSlot>), ServiceError> {
        let slot = match caller.tenant() {
            Some(tenant) => on_backend!(self, b => b.take_slot(tenant, id).await)?,
            None => None,
        };
        match module.await {
            Ok(module) => Ok((module, spec, slot)),
            Err(e) => {
                on_backend!(self, b => b.give_back(spec.tenant.as_deref(), slot, id).await);
                Err(e)
            }
        }
    }

    /// Runs a workload and waits for its final record (in the queue
    /// first, while no slot is free).
    pub async fn run(
        &self,
        caller: &Caller,
        submission: Submission,
    ) -> Result<WorkloadView, ServiceError> {
        on_backend!(self, b => b.check_spec(&submission.spec))?;
        let id = WorkloadId::new();
        let terms = match self.claim_key(caller, id, &submission).await? {
            idempotency::Claim::Repeat(first) => return self.wait_end(caller, first).await,
            idempotency::Claim::New(terms) => terms,
        };
        let key = terms.idempotency.clone();
        let ran = async {
            let (module, spec, slot) = self.admit(caller, id, submission).await?;
            on_backend!(self, b => b.run(id, module, spec, slot, terms).await)
        }
        .await;
        self.settle_key(caller, key, ran.is_ok()).await;
        let view = ran?;
        if view.summary.failure == Some(crate::workload::FailureKind::Store) {
            // It ran, but its log could not be kept whole: the caller learns
            // that it is the storage, and which workload (its record says
            // how many lines were stored).
            return Err(ServiceError::StorageFullRun {
                id: view.summary.id,
                message: view.summary.error.clone().unwrap_or_default(),
                workload: Some(Box::new(view)),
            });
        }
        Ok(view)
    }

    /// Submits a workload to run; its id once it is accepted (started, or
    /// queued while no slot is free).
    pub async fn submit(
        &self,
        caller: &Caller,
        submission: Submission,
    ) -> Result<WorkloadId, ServiceError> {
        on_backend!(self, b => b.check_spec(&submission.spec))?;
        let id = WorkloadId::new();
        let terms = match self.claim_key(caller, id, &submission).await? {
            idempotency::Claim::Repeat(first) => return Ok(first),
            idempotency::Claim::New(terms) => terms,
        };
        let key = terms.idempotency.clone();
        let submitted = async {
            let (module, spec, slot) = self.admit(caller, id, submission).await?;
            on_backend!(self, b => b.submit(id, module, spec, slot, terms).await)
        }
        .await;
        self.settle_key(caller, key, submitted.is_ok()).await;
        submitted.map(|()| id)
    }

    /// Waits for the end of workload `id` (a repeated idempotent run's
    /// first): its final record.
    async fn wait_end(
        &self,
        caller: &Caller,
        id: WorkloadId,
    ) -> Result<WorkloadView, ServiceError> {
        loop {
            let view = self.workload(caller, id).await?;
            if view.summary.status.is_terminal() {
                return Ok(view);
            }
            on_backend!(self, b => b.until_changed(id).await);
        }
    }

    /// The queue: how many wait, per tenant, and the oldest wait (a
    /// tenant sees its own line only).
    pub async fn queue(&self, caller: &Caller) -> Result<QueueView, ServiceError> {
        let (mut tenants, mut queued) = on_backend!(self, b => b.queue_depth().await)?;
        if let Some(own) = caller.scope() {
            tenants.retain(|t| t.tenant.as_deref() == Some(own));
            queued = tenants.iter().map(|t| t.queued).sum();
        }
        Ok(QueueView {
            queued,
            max_queued: self.inner.max_queued as u64,
            tenants,
        })
    }

    /// Workload `id`'s record, if `caller` may see it (404 otherwise).
    pub async fn workload(
        &self,
        caller: &Caller,
        id: WorkloadId,
    ) -> Result<WorkloadView, ServiceError> {
        let view = on_backend!(self, b => b.record(id).await)?;
        caller.check_workload(id, view.summary.tenant.as_deref())?;
        Ok(view)
    }

    /// Workload `id`'s record if its lines are still kept: 410 once
    /// retention deleted them, 404 as [`Service::workload`].
    async fn workload_with_lines(
        &self,
        caller: &Caller,
        id: WorkloadId,
    ) -> Result<WorkloadView, ServiceError> {
        let view = self.workload(caller, id).await?;
        if view.summary.pruned_at.is_some() {
            return Err(ServiceError::Gone(format!(
                "the lines of workload {id} were deleted by retention"
            )));
        }
        Ok(view)
    }

    /// A page of the workloads `caller` sees, newest first.
    pub async fn list(
        &self,
        caller: &Caller,
        mut request: ListRequest,
    ) -> Result<WorkloadList, ServiceError> {
        if let Some(own) = caller.scope() {
            request.tenant = Some(own.to_owned());
        }
        on_backend!(self, b => b.list(request).await)
    }

    /// Stops workload `id` within `wait`, if `caller` may see it.
    pub async fn kill(
        &self,
        caller: &Caller,
        id: WorkloadId,
        wait: Duration,
    ) -> Result<KillOutcome, ServiceError> {
        self.workload(caller, id).await?;
        on_backend!(self, b => b.kill(id, "killed on request", wait).await)
    }

    /// Up to `limit` stored lines of workload `id` after `after`.
    pub async fn history(
        &self,
        caller: &Caller,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
        attempt: Option<u32>,
    ) -> Result<Vec<LogRecord>, ServiceError> {
        let view = self.workload_with_lines(caller, id).await?;
        let Some(n) = attempt else {
            return on_backend!(self, b => b.history(id, after, limit).await);
        };
        // Seqs go on across attempts: attempt `n`'s lines are a range.
        let (before, end) = view.attempt_lines(n).map_err(ServiceError::NotFound)?;
        let after = match (after, before) {
            (Some(a), Some(before)) => Some(a.max(before)),
            (a, before) => a.or(before),
        };
        let mut lines = on_backend!(self, b => b.history(id, after, limit).await)?;
        if let Some(end) = end {
            lines.retain(|r| r.seq < end);
        }
        Ok(lines)
    }

    /// Follows workload `id`'s log from after `after`: every stored line,
    /// then each as it is committed, then its end, encoded by `encoding`
    /// into chunks ready to send. The follower holds one of the node's (and
    /// its tenant's) follower places while it streams.
    pub async fn follow<E: LineEncoding>(
        &self,
        caller: &Caller,
        id: WorkloadId,
        after: Option<u64>,
        encoding: E,
    ) -> Result<mpsc::Receiver<Bytes>, ServiceError> {
        self.workload_with_lines(caller, id).await?;
        let places = self.inner.followers.admit(caller)?;
        Ok(follow::start(self.clone(), id, after, encoding, places))
    }

    /// The caller's tenant, role and quota use.
    pub async fn whoami(&self, caller: &Caller) -> serde_json::Value {
        match caller.tenant() {
            None => serde_json::json!({
                "tenant": null,
                "admin": true,
                "log_bytes": on_backend!(self, b => b.stored_log_bytes_total()),
            }),
            Some(t) => serde_json::json!({
                "tenant": t.name(),
                "admin": t.is_admin(),
                "max_concurrent": t.entry.max_concurrent,
                "running": on_backend!(self, b => b.running_of(t).await),
                "max_limits": t.max_limits(),
                "log_bytes": on_backend!(self, b => b.stored_log_bytes(t.name())),
                "max_log_bytes": t.entry.max_log_bytes,
                "on_log_quota": t.entry.max_log_bytes.map(|_| t.entry.on_log_quota.unwrap_or_default()),
            }),
        }
    }

    /// This node's activity over the last minutes (admins only).
    pub fn stats(&self, caller: &Caller) -> Result<serde_json::Value, ServiceError> {
        // Server-wide figures say what other tenants do.
        caller.require_admin("/v1/stats")?;
        Ok(serde_json::json!({
            "interval_ms": 1000,
            "samples": self.inner.node.metrics().samples(),
        }))
    }

    /// The Prometheus text of this node's figures (admins only).
    pub fn metrics(&self, caller: &Caller) -> Result<String, ServiceError> {
        caller.require_admin("/metrics")?;
        let node = &self.inner.node;
        // The store keeps these counts; they are copied in when asked for.
        let (db, metrics) = (node.db(), node.metrics());
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.lost_lines.set(gauge(db.lost_lines()));
        let channels = node.broker().open_channels();
        metrics.live_channels.set(gauge(channels as u64));
        metrics.busy_retries.set(gauge(db.busy_retries()));
        metrics.commits.set(gauge(db.commits()));
        (metrics.dropped_diagnostics).set(gauge(crate::diagnostics::dropped_writes()));
        metrics.storage_full.set(i64::from(db.storage_full()));
        Ok(metrics.render())
    }

    /// Whether this node can serve: its store answers.
    pub async fn health(&self) -> Result<(), ServiceError> {
        if let Some(why) = self.inner.node.vital().failure() {
            return Err(ServiceError::NodeFailed(format!(
                "{why}; the server is going down"
            )));
        }
        Ok(self.inner.node.db().ping().await?)
    }

    /// Starts the deployment's periodic work (the stats sampler, retention,
    /// the schedules' firings);
    /// it stops when the returned handle is dropped.
    pub fn start_housekeeping(&self) -> Housekeeping {
        let node = Arc::clone(&self.inner.node);
        let mut tasks = vec![tokio::spawn(sample_every_second(node))];
        let policy = self.inner.retention.clone();
        tasks.push(on_backend!(self, b => b.start_retention(policy)));
        let vital = self.inner.node.vital();
        tasks.push(vital.spawn("scheduler", self.clone().run_schedules()));
        Housekeeping(tasks)
    }

    /// Kills every workload running on this node with `reason` (at
    /// shutdown: open sync runs and followers then end).
    pub fn kill_running(&self, reason: &str) {
        // Queued work is not started now: it stays queued for the next start.
        on_backend!(self, b => b.stop_starting());
        self.inner.node.runner().kill_all(reason);
    }

    /// Stops this node's part of the deployment: what runs here ends with
    /// `reason` (within `grace`) and is recorded, then the node leaves.
    pub async fn stop(&self, reason: &str, grace: Duration) {
        on_backend!(self, b => b.stop(reason, grace).await)
    }
}

/// The periodic tasks of a service; they stop when this is dropped.
pub struct Housekeeping(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Housekeeping {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Closes one interval of the health figures a second, for `/v1/stats`.
async fn sample_every_second(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lines = node.db().committed_lines();
        node.metrics().sample(crate::workload::now_ms(), lines);
    }
}

#[cfg(test)]
mod tests;
