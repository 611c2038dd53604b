//! Work across nodes: submitting and claiming (running is in `execute`,
//! killing in `kill`).
//!
//! A submission to a node with a free slot runs there, its record created
//! `running` (a sync one's only if it still runs after [`UNLISTED_FOR`],
//! else written once, final). Otherwise it creates the `pending` record, then queues the
//! work. Every node pulls from one durable consumer, one message at a time
//! and only while it holds a free slot, so no node takes more than it can
//! start now. A claim swaps the record from `pending` to `running` at the
//! revision the submission created: of two nodes handed the same message, one
//! wins, and a killed workload is never started. A workload counts as claimed
//! by its node from before its record says it runs there (see the node's
//! orphan sweep). The record becomes terminal only after every line is stored
//! in the cluster.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Cluster, ClusterError, QUEUE_SUBJECT, now_ms, until_done};
use crate::outbound::OutboundRule;
use crate::runner::Slot;
use crate::view::WorkloadView;
use crate::workload::{
    FailureKind, Limits, LogLevel, Status, Stdin, WorkloadId, WorkloadRecord, WorkloadSpec,
};

/// A queued workload: everything a node needs to run it.
#[derive(Debug, Serialize, Deserialize)]
struct QueuedWork {
    id: WorkloadId,
    module: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdin_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_base64: Option<String>,
    limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed_hosts: Vec<OutboundRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    enqueued_ms: i64,
    /// When it fails `queue_timeout` if no node has started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline_ms: Option<i64>,
    /// The schedule whose firing created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule: Option<String>,
}

impl QueuedWork {
    fn spec(&self) -> Result<WorkloadSpec, base64::DecodeError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let stdin = match &self.stdin_base64 {
            Some(s) => Stdin::Bytes(b64.decode(s)?),
            None => Stdin::Empty,
        };
        Ok(WorkloadSpec {
            args: self.args.clone(),
            env: self.env.clone(),
            stdin,
            preopens: Vec::new(),
            limits: self.limits.clone(),
            input: self
                .input_base64
                .as_ref()
                .map(|s| b64.decode(s))
                .transpose()?,
            log_level: self.log_level,
            allowed_hosts: self.allowed_hosts.clone(),
            tenant: self.tenant.clone(),
            schedule: self.schedule.clone(),
            // A cluster refuses a retry policy at submission.
            retry: None,
        })
    }
}

/// The header of queued work naming the revision its pending record was
/// created at: a claim swaps from exactly that.
const REVISION_HEADER: &str = "Vulcan-Revision";

/// How long a sync run started on the node that took it may go without a
/// record in the cluster: one that ends sooner (most do) writes its record
/// once, final, instead of running and then final; until then it is not
/// listed, and nobody outside its node can know its id.
pub(super) const UNLISTED_FOR: Duration = Duration::from_millis(20);

/// A record as it looks before any node has claimed it.
fn pending_view(
    id: WorkloadId,
    module: &str,
    spec: &WorkloadSpec,
    created_at: i64,
) -> WorkloadView {
    let mut view = WorkloadView::from(WorkloadRecord {
        id,
        status: Status::Pending,
        module_hash: module.to_owned(),
        args: spec.args.clone(),
        env: Vec::new(),
        limits: spec.limits.clone(),
        allowed_hosts: spec.allowed_hosts.clone(),
        log_level: spec.log_level,
        exit_code: None,
        error: None,
        failure: None,
        output: None,
        duration_ms: None,
        line_count: 0,
        created_at,
        started_at: None,
        finished_at: None,
        tenant: spec.tenant.clone(),
        pruned_at: None,
        queued_at: None,
        schedule: spec.schedule.clone(),
        retry: None,
        attempt: 0,
        attempts: Vec::new(),
    });
    view.summary.attempt = Some(0);
    view
}

/// `view` ended now with `status`, `failure` and `error`.
pub(super) fn ended(
    mut view: WorkloadView,
    status: Status,
    failure: FailureKind,
    error: String,
) -> WorkloadView {
    view.summary.status = status;
    view.summary.failure = Some(failure);
    view.summary.error = Some(error);
    view.summary.finished_at = Some(crate::view::rfc3339(now_ms()));
    view
}

impl Cluster {
    /// Queues workload `id` for whichever node has a free slot; returns
    /// once it is accepted.
    pub async fn submit(
        self: &Arc<Self>,
        id: WorkloadId,
        module: &str,
        spec: WorkloadSpec,
        deadline_ms: Option<i64>,
    ) -> Result<(), ClusterError> {
        self.enqueue(id, module, spec, deadline_ms, None).await
    }

    /// Runs a workload on whichever node has a free slot and waits for its
    /// final record.
    pub async fn run(
        self: &Arc<Self>,
        id: WorkloadId,
        module: &str,
        spec: WorkloadSpec,
        deadline_ms: Option<i64>,
    ) -> Result<WorkloadView, ClusterError> {
        let (recorded_tx, mut recorded) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel();
        let here = Here {
            recorded: recorded_tx,
            ended: ended_tx,
        };
        self.enqueue(id, module, spec, deadline_ms, Some(here))
            .await?;
        // Run here: its final record as soon as it is stored, or, if NATS
        // does not take it in time, what this node holds, said as such.
        // Queued (or taken over): as its end is announced.
        let ended = tokio::select! {
            view = &mut recorded => return match view {
                Ok(view) => Ok(view),
                Err(_) => self.wait_end(id).await,
            },
            ended = ended => ended.ok(),
        };
        let answer = match ended {
            Some(local) => match tokio::time::timeout(RECORD_DEADLINE, &mut recorded).await {
                Ok(answer) => answer,
                Err(_) => return Err(ClusterError::Unrecorded(Box::new(local))),
            },
            None => recorded.await,
        };
        match answer {
            Ok(view) => Ok(view),
            Err(_) => self.wait_end(id).await,
        }
    }

    /// Starts `id` here if a slot is free, else creates its pending record and
    /// queues it; a failure leaves nothing that could run or stay pending
    /// (see [`Cluster::abandon`] and the orphan sweep). What creates anything
    /// runs in a task of its own, so a caller that goes away (a client
    /// hanging up) cannot leave a record created but never queued.
    ///
    /// With `here` (a sync caller, who learns the id only from the final
    /// record) a run started here gets its record in the cluster only once
    /// it has run for [`UNLISTED_FOR`], and `here` gets the final record.
    /// Such a run creates nothing before its own task takes over, so it
    /// starts from the caller's task, without a hop to another.
    async fn enqueue(
        self: &Arc<Self>,
        id: WorkloadId,
        module: &str,
        spec: WorkloadSpec,
        deadline_ms: Option<i64>,
        here: Option<Here>,
    ) -> Result<(), ClusterError> {
        let admitted = self.admit(id, module, &spec, deadline_ms).await?;
        let mut slot = self.node.runner().try_reserve();
        if here.is_some()
            && let Some(slot) = slot.take()
        {
            // Nobody else knows its id yet: its record can wait.
            let running = self.claim_here(&admitted.view);
            self.start_here(module, spec, running, None, here, slot);
            return Ok(());
        }
        // Queued, a sync caller waits for the end as announced (see `run`).
        drop(here);
        let (this, module) = (Arc::clone(self), module.to_owned());
        // Boxed, as every large future spawned here: a task moves its future
        // in several times, and writes its output over it; a box is a pointer.
        tokio::spawn(Box::pin(async move {
            this.create_and_queue(&module, spec, admitted, slot).await
        }))
        .await
        .map_err(|e| anyhow::anyhow!("submitting workload {id} failed: {e}"))?
    }

    /// Checks a submission before anything is created: NATS is there, the
    /// module is known, and the work fits a NATS message.
    async fn admit(
        &self,
        id: WorkloadId,
        module: &str,
        spec: &WorkloadSpec,
        deadline_ms: Option<i64>,
    ) -> Result<Admitted, ClusterError> {
        self.connected()?;
        // Known here or in the cluster; the node that runs it fetches it.
        let known = self.node.registry().has(module).await
            || self
                .modules
                .info(module.trim_start_matches("sha256:"))
                .await
                .is_ok_and(|i| !i.deleted);
        if !known {
            return Err(ClusterError::ModuleNotFound(module.to_owned()));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let work = QueuedWork {
            id,
            module: module.to_owned(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            stdin_base64: match &spec.stdin {
                Stdin::Bytes(b) => Some(b64.encode(b)),
                _ => None,
            },
            input_base64: spec.input.as_ref().map(|b| b64.encode(b)),
            limits: spec.limits.clone(),
            log_level: spec.log_level,
            allowed_hosts: spec.allowed_hosts.clone(),
            tenant: spec.tenant.clone(),
            enqueued_ms: now_ms(),
            deadline_ms,
            schedule: spec.schedule.clone(),
        };
        let payload = Bytes::from(serde_json::to_vec(&work).map_err(anyhow::Error::from)?);
        // Checked before anything is created; the rest is room for headers.
        let max = self.client.server_info().max_payload;
        if payload.len() + 512 > max {
            return Err(ClusterError::TooLarge(format!(
                "this workload's spec is {} bytes; the cluster carries at most {} \
                 (NATS max_payload)",
                payload.len(),
                max - 512
            )));
        }
        let view = pending_view(id, module, spec, work.enqueued_ms);
        Ok(Admitted {
            view,
            payload,
            deadline_ms,
        })
    }

    /// Runs `running` (claimed here, its record at `revision` if it has
    /// one) in `slot`, in a task of its own that the node tracks.
    fn start_here(
        self: &Arc<Self>,
        module: &str,
        spec: WorkloadSpec,
        running: WorkloadView,
        revision: Option<u64>,
        here: Option<Here>,
        slot: Slot,
    ) {
        let (this, module) = (Arc::clone(self), module.to_owned());
        let claim = Claim {
            view: running,
            revision,
            here,
        };
        self.tasks.spawn(Box::pin(async move {
            this.run_claimed(module, spec, claim, slot).await
        }));
    }

    /// Creates the record of an admitted submission: `running` here when a
    /// `slot` was reserved for it, else `pending`, and then queues it.
    async fn create_and_queue(
        self: &Arc<Self>,
        module: &str,
        spec: WorkloadSpec,
        admitted: Admitted,
        slot: Option<Slot>,
    ) -> Result<(), ClusterError> {
        let Admitted {
            view,
            payload,
            deadline_ms,
        } = admitted;
        let id = view.summary.id;
        // A slot free here: it runs here at once, created running, without a
        // trip through the queue (claimed before its record says so).
        if let Some(slot) = slot {
            let running = self.claim_here(&view);
            let revision = match self.create_record(&running).await {
                Ok(revision) => revision,
                Err(e) => {
                    // Created despite the error, it is an orphan this
                    // node's sweep fails.
                    self.unclaim(id);
                    self.doubt(id);
                    return Err(e);
                }
            };
            self.start_here(module, spec, running, Some(revision), None, slot);
            return Ok(());
        }
        let mut view = view;
        view.summary.queued_at = Some(view.summary.created_at.clone());
        let revision = match self.create_record(&view).await {
            Ok(revision) => revision,
            Err(e) => {
                self.abandon(id);
                return Err(e);
            }
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id.to_string())
            .header(REVISION_HEADER, revision.to_string().as_str());
        let queued = match self.js.send_publish(QUEUE_SUBJECT, publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        if let Err(e) = queued {
            self.abandon(id);
            return Err(ClusterError::unavailable(e));
        }
        if let Some(deadline) = deadline_ms {
            self.expire_at(id, deadline);
        }
        Ok(())
    }

    /// Fails `id` if it is still pending, retrying until NATS answers: its
    /// submitter was told it was not queued, so it must neither run nor stay
    /// pending (a record created, or a message queued, despite an error
    /// answer included).
    fn abandon(self: &Arc<Self>, id: WorkloadId) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let why = "the cluster was unavailable when it was submitted; it never ran";
            this.fail_pending(id, FailureKind::Host, why).await
        });
    }

    /// Fails `id` `queue_timeout` at `deadline` if no node has started it
    /// by then (if this node is gone by then, the node that takes it does).
    fn expire_at(self: &Arc<Self>, id: WorkloadId, deadline: i64) {
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            let wait = Duration::from_millis((deadline - now_ms()).max(0) as u64);
            tokio::select! {
                () = this.stop.cancelled() => {}
                () = tokio::time::sleep(wait) => {
                    let why = "it waited in the queue past its queue_timeout_ms and never started";
                    this.fail_pending(id, FailureKind::QueueTimeout, why).await;
                }
            }
        });
    }

    /// Fails `id` with `failure` and `error` if it is still pending,
    /// retrying until NATS answers.
    async fn fail_pending(&self, id: WorkloadId, failure: FailureKind, error: &str) {
        until_done("failing a pending workload", id, || async {
            let current = match self.record(id).await {
                Err(ClusterError::NotFound(_)) => return Ok(()),
                other => other?,
            };
            if current.view.summary.status != Status::Pending {
                return Ok(());
            }
            let view = ended(current.view, Status::Failed, failure, error.to_owned());
            // Moved on meanwhile: looked at again.
            match self.swap(&view, current.revision).await? {
                Some(_) => Ok(()),
                None => Err(ClusterError::Unavailable("the record changed".into())),
            }
        })
        .await
    }

    /// Pulls work while this node has a free slot, one message at a time.
    pub(super) async fn dispatch(self: Arc<Self>, consumer: jetstream::consumer::PullConsumer) {
        loop {
            let slot = tokio::select! {
                () = self.stop.cancelled() => return,
                slot = self.node.runner().reserve() => slot,
            };
            let batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot pull work yet");
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            let message = tokio::select! {
                () = self.stop.cancelled() => return,
                m = batch.next() => m,
            };
            match message {
                Some(Ok(message)) => {
                    let this = Arc::clone(&self);
                    self.tasks
                        .spawn(Box::pin(async move { this.take(message, slot).await }));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "pulling work failed"),
                None => {}
            }
        }
    }

    /// Claims one queued workload and runs it to its end.
    async fn take(self: Arc<Self>, message: jetstream::Message, slot: Slot) {
        let work: QueuedWork = match serde_json::from_slice(&message.payload) {
            Ok(work) => work,
            Err(e) => {
                tracing::warn!(error = %e, "dropping queued work that does not parse");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let id = work.id;
        let revision = message
            .headers
            .as_ref()
            .and_then(|h| h.get(REVISION_HEADER))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let Some(revision) = revision else {
            tracing::warn!(workload = %id, "dropping queued work without its record's revision");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let spec = match work.spec() {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(workload = %id, error = %e, "dropping queued work with bad base64");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        if let Some(deadline) = work.deadline_ms
            && now_ms() > deadline
        {
            let waited = now_ms() - work.enqueued_ms;
            let why = format!(
                "it waited {waited} ms in the queue, past its queue_timeout_ms, and never started"
            );
            self.fail_pending(id, FailureKind::QueueTimeout, &why).await;
            let _ = message.ack().await;
            return;
        }
        let claim = match self.claim(&work, &spec, revision).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                // Killed, failed or claimed elsewhere meanwhile: not ours to run.
                let _ = message.ack().await;
                return;
            }
            Err(e) => {
                tracing::debug!(workload = %id, error = %e, "claim failed; the work goes back to the queue");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                    .await;
                return;
            }
        };
        let _ = message.ack().await;
        let latency = (now_ms() - work.enqueued_ms).max(0) as f64 / 1000.0;
        self.metrics.dispatch_latency.observe(latency);
        self.run_claimed(work.module, spec, claim, slot).await;
    }

    /// Swaps `work`'s record from pending to running here, at the revision
    /// its submission created (read again only if that moved); `None` when
    /// it is no longer pending. It counts as claimed here from before the
    /// swap, so this node's sweep never takes it for an orphan.
    async fn claim(
        &self,
        work: &QueuedWork,
        spec: &WorkloadSpec,
        revision: u64,
    ) -> Result<Option<Claim>, ClusterError> {
        self.claimed_here(work.id);
        let claimed = async {
            let mut revision = revision;
            let mut view = pending_view(work.id, &work.module, spec, work.enqueued_ms);
            view.summary.queued_at = Some(view.summary.created_at.clone());
            loop {
                let running = self.running_here(&view);
                if let Some(revision) = self.swap(&running, revision).await? {
                    return Ok(Some(Claim {
                        view: running,
                        revision: Some(revision),
                        here: None,
                    }));
                }
                let current = self.record(work.id).await?;
                if current.view.summary.status != Status::Pending {
                    return Ok(None);
                }
                (view, revision) = (current.view, current.revision);
            }
        }
        .await;
        if !matches!(claimed, Ok(Some(_))) {
            self.unclaim(work.id);
        }
        if claimed.is_err() {
            // The swap may have been stored all the same.
            self.doubt(work.id);
        }
        claimed
    }

    /// `pending` as it runs here from now.
    fn running_here(&self, pending: &WorkloadView) -> WorkloadView {
        let mut running = pending.clone();
        running.summary.status = Status::Running;
        running.summary.node = Some(self.node_id.clone());
        running.summary.attempt = Some(pending.summary.attempt.unwrap_or(0) + 1);
        running.summary.started_at = Some(crate::view::rfc3339(now_ms()));
        running
    }

    /// Claims `pending` here: it as it runs here from now.
    fn claim_here(&self, pending: &WorkloadView) -> WorkloadView {
        self.claimed_here(pending.summary.id);
        self.running_here(pending)
    }

    pub(super) fn claimed_here(&self, id: WorkloadId) {
        let mut claimed = self.lock_claimed();
        claimed.insert(id, None);
        self.metrics.claimed.set(claimed.len() as i64);
    }

    /// Has the liveness sweep check `id`'s record (see `doubtful`).
    pub(super) fn doubt(&self, id: WorkloadId) {
        let mut doubtful = self.lock_doubtful();
        if !doubtful.contains(&id) {
            doubtful.push(id);
        }
    }

    pub(super) fn lock_doubtful(&self) -> std::sync::MutexGuard<'_, Vec<WorkloadId>> {
        self.doubtful.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn unclaim(&self, id: WorkloadId) {
        let mut claimed = self.lock_claimed();
        claimed.remove(&id);
        self.metrics.claimed.set(claimed.len() as i64);
    }

    pub(super) fn lock_claimed(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<WorkloadId, Option<String>>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn claimed_ids(&self) -> Vec<WorkloadId> {
        self.lock_claimed().keys().copied().collect()
    }
}

/// A submission that passed [`Cluster::admit`]: its pending record and its
/// queued message.
struct Admitted {
    view: WorkloadView,
    payload: Bytes,
    /// When it fails `queue_timeout` if it has not started.
    deadline_ms: Option<i64>,
}

/// A workload this node has claimed: its running record and that revision.
pub(super) struct Claim {
    pub(super) view: WorkloadView,
    /// `None`: not in the cluster yet (see [`UNLISTED_FOR`]).
    pub(super) revision: Option<u64>,
    /// Who waits here for its final record.
    pub(super) here: Option<Here>,
}

/// A sync caller on this node, waiting for a run started here.
pub(super) struct Here {
    /// Its final record, once the cluster holds it.
    pub(super) recorded: oneshot::Sender<WorkloadView>,
    /// How it ended, as this node knows it, as soon as it did: the answer
    /// if the cluster does not take the record within [`RECORD_DEADLINE`].
    pub(super) ended: oneshot::Sender<WorkloadView>,
}

/// How long a sync caller waits, after its run ended here, for the cluster
/// to take the final record before it is answered with this node's
/// (503 `cluster_unavailable`, saying that it ran).
pub(super) const RECORD_DEADLINE: Duration = Duration::from_secs(3);
