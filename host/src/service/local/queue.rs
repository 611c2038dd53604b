//! One node's job queue: accepted work that found no free slot waits here,
//! as a `pending` record in the store (so a restart finds it again) and in
//! a [`FairQueue`] (the order in which it gets slots). A dispatcher task
//! starts the next job whenever a slot is free and its tenant is under its
//! cap; a queued job that passes its deadline fails `queue_timeout`; a kill
//! takes one out before it starts.
//!
//! Owns the node's count of running workloads per tenant and the tenants'
//! `max_concurrent` permits; the runner owns the node's slots.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;

use super::super::ServiceError;
use super::super::queue::{Backoffs, FairQueue, Queued, Shares};
use crate::node::Node;
use crate::runner::{Creation, Launch, LocalRecord, Slot};
use crate::store::NewWorkload;
use crate::tenants::Tenants;
use crate::view::TenantQueue;
use crate::workload::{
    Completion, FailureKind, IdempotencyKey, QueuedInput, Status, Stdin, WorkloadId,
    WorkloadRecord, WorkloadSpec, now_ms,
};

/// A workload's end as the runner will record it.
pub(super) type Done = tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>>;

/// What a queued job needs to start. Its stdin and input stay in its
/// record and are read back when it starts: the queue holds up to
/// `--max-queued` jobs, each of which may carry `--max-spec-size` bytes.
pub(super) struct Job {
    module: String,
    /// Its spec without stdin and input.
    spec: WorkloadSpec,
    /// It has stdin or input, to read back from its record at its start.
    reload: bool,
    /// A sync caller waiting to hear that it started (or ended unstarted).
    waiter: Option<oneshot::Sender<Started>>,
    /// A later attempt, whose waiter sees it through its retries already.
    chained: bool,
}

/// What a sync caller of a queued job hears.
pub(super) enum Started {
    /// It runs: its end, once recorded.
    Running(Done),
    /// It ended without running (killed, timed out in the queue, or it
    /// could not start).
    Ended(Box<Result<WorkloadRecord, ServiceError>>),
}

/// The queue and its dispatcher's wake-up.
pub(super) struct LocalQueue {
    node: Arc<Node>,
    tenants: Arc<Tenants>,
    max_queued: usize,
    state: Mutex<State>,
    /// Poked when work is queued, a workload ends or a job is taken out.
    changed: Notify,
    /// Cancelled at shutdown: nothing more is started, so queued work
    /// stays queued (in the store) for the next start.
    stopping: CancellationToken,
}

struct State {
    queue: FairQueue<Job>,
    /// Being queued (their records are being created).
    incoming: usize,
    /// Killed while on their way into the queue or out of it.
    doomed: HashSet<WorkloadId>,
    /// Retries waiting out their backoff.
    backoffs: Backoffs<Job>,
}

/// A running workload's hold on its tenant's share: counted as running
/// (and holding one of its tenant's `max_concurrent` permits) until dropped.
pub(super) struct Running {
    queue: Arc<LocalQueue>,
    tenant: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.queue.ended(self.tenant.as_deref());
        // With nothing queued the dispatcher has nothing to start; it is
        // not woken for every end (a freed slot wakes it on its own).
        if state.queue.len() > 0 {
            self.queue.changed.notify_one();
        }
    }
}

/// Tenants' weights and caps as the fair share reads them.
struct TenantShares<'a>(&'a Tenants);

impl Shares for TenantShares<'_> {
    fn weight(&self, tenant: Option<&str>) -> u64 {
        let entry = tenant.and_then(|t| self.0.named(t)).map(|t| &t.entry);
        u64::from(entry.and_then(|e| e.weight).unwrap_or(1))
    }

    fn may_start(&self, tenant: Option<&str>) -> bool {
        match tenant.and_then(|t| self.0.named(t)?.slots.as_ref()) {
            Some(permits) => permits.available_permits() > 0,
            None => true,
        }
    }
}

impl LocalQueue {
    /// The queue of `node`, holding at most `max_queued` jobs; its
    /// dispatcher starts with what a previous process left queued.
    /// `dies_at`: the tests' fault switch (see `ServiceConfig`).
    pub(super) fn start(
        node: Arc<Node>,
        tenants: Arc<Tenants>,
        max_queued: usize,
        dies_at: Option<u64>,
    ) -> Arc<Self> {
        let queue = Arc::new(Self {
            node,
            tenants,
            max_queued,
            state: Mutex::new(State {
                queue: FairQueue::default(),
                incoming: 0,
                doomed: HashSet::new(),
                backoffs: Backoffs::default(),
            }),
            changed: Notify::new(),
            stopping: CancellationToken::new(),
        });
        let dispatcher = Arc::clone(&queue).dispatch(dies_at);
        drop(
            queue
                .node
                .vital()
                .spawn("job queue's dispatcher", dispatcher),
        );
        queue
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot and `tenant`'s share to start a workload now, if it need not
    /// wait: a slot is free, the tenant is under its cap, and nothing of
    /// its own (or of another tenant that may start) waits before it.
    pub(super) fn start_now(self: &Arc<Self>, tenant: Option<&str>) -> Option<(Slot, Running)> {
        let mut state = self.lock();
        if self.stopping.is_cancelled()
            || state.queue.must_wait(tenant, &TenantShares(&self.tenants))
        {
            return None;
        }
        let (slot, running) = self.take_share(&mut state, tenant, None)?;
        Some((slot?, running))
    }

    /// 503 `queue_full` when `--max-queued` workloads wait already: queued,
    /// on their way in, or waiting out a retry's backoff (an accepted retry
    /// itself is never refused, but it bounds what is accepted next, or a
    /// stream of failing jobs that start at once could rest without bound).
    pub(super) fn check_room(&self) -> Result<(), ServiceError> {
        self.has_room(&self.lock())
    }

    fn has_room(&self, state: &State) -> Result<(), ServiceError> {
        let waiting = state.queue.len() + state.incoming + state.backoffs.len();
        match waiting >= self.max_queued {
            true => Err(ServiceError::QueueFull(format!(
                "{waiting} workloads wait, queued or to be retried: the most this server \
                 holds (--max-queued); retry later"
            ))),
            false => Ok(()),
        }
    }

    /// `tenant`'s permit (if it has a cap) and a slot (unless one is given
    /// or `None` is asked), counted as running; `None` if either is taken.
    fn take_share(
        self: &Arc<Self>,
        state: &mut State,
        tenant: Option<&str>,
        slot: Option<Slot>,
    ) -> Option<(Option<Slot>, Running)> {
        let permit = match tenant.and_then(|t| self.tenants.named(t)?.slots.clone()) {
            Some(permits) => Some(permits.try_acquire_owned().ok()?),
            None => None,
        };
        let slot = match slot {
            Some(slot) => Some(slot),
            None => Some(self.node.runner().try_reserve()?),
        };
        state.queue.started(tenant);
        let running = Running {
            queue: Arc::clone(self),
            tenant: tenant.map(str::to_owned),
            _permit: permit,
        };
        Some((slot, running))
    }

    /// Queues workload `id`: its `pending` record is committed first (it
    /// is in the queue from then, across restarts). `waiter` hears when it
    /// starts. 503 `queue_full` beyond `--max-queued`.
    pub(super) async fn enqueue(
        &self,
        id: WorkloadId,
        module: String,
        spec: WorkloadSpec,
        deadline_ms: Option<i64>,
        idempotency: Option<IdempotencyKey>,
        waiter: Option<oneshot::Sender<Started>>,
    ) -> Result<(), ServiceError> {
        {
            let mut state = self.lock();
            self.has_room(&state)?;
            state.incoming += 1;
        }
        let new = NewWorkload {
            id,
            module_hash: module.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            limits: spec.limits.clone(),
            allowed_hosts: spec.allowed_hosts.clone(),
            log_level: spec.log_level,
            running: false,
            tenant: spec.tenant.clone(),
            queued: Some(QueuedInput::of(&spec, deadline_ms)),
            idempotency,
            schedule: spec.schedule.clone(),
            retry: spec.retry.clone(),
        };
        let created = self.node.db().create_workload(new).await;
        let mut spec = spec;
        let reload = !matches!(spec.stdin, Stdin::Empty) || spec.input.is_some();
        (spec.stdin, spec.input) = (Stdin::Empty, None);
        let job = Job {
            module,
            spec,
            reload,
            waiter,
            chained: false,
        };
        let queued = Queued {
            id,
            tenant: job.spec.tenant.clone(),
            enqueued_ms: now_ms(),
            deadline_ms,
            job,
        };
        let doomed = {
            let mut state = self.lock();
            state.incoming -= 1;
            created?;
            match state.doomed.remove(&id) {
                true => Some(queued),
                false => {
                    state.queue.push(queued);
                    self.node.metrics().queued.set(state.queue.len() as i64);
                    None
                }
            }
        };
        match doomed {
            // Killed on its way in.
            Some(queued) => drop(self.end_unstarted(queued, killed()).await),
            None => self.changed.notify_one(),
        }
        Ok(())
    }

    /// Takes workload `id` out of the queue and records it killed, if it
    /// waits there: its final record. `None` when it does not wait (it
    /// runs, ended, or is on its way in or out: then it is killed there).
    pub(super) async fn kill(
        &self,
        id: WorkloadId,
    ) -> Option<Result<WorkloadRecord, ServiceError>> {
        let (taken, resting) = {
            let mut state = self.lock();
            let taken = state.queue.remove(id);
            let resting = match taken {
                Some(_) => None,
                None => state.backoffs.remove(id),
            };
            if taken.is_none() && resting.is_none() {
                state.doomed.insert(id);
            }
            self.node.metrics().queued.set(state.queue.len() as i64);
            (taken, resting)
        };
        if let Some(resting) = resting {
            return Some(self.end_unstarted(resting, killed_resting()).await);
        }
        let queued = taken?;
        Some(self.end_unstarted(queued, killed()).await)
    }

    /// `done`, or, for a workload with a retry policy, a handle that sees
    /// it through its retries: each failed attempt that its policy retries
    /// waits out its backoff here, then queues again, and the handle
    /// resolves to the last attempt's record. Runs whether or not anyone
    /// waits for it. `spec` is without stdin and input; `reload` says it
    /// had them (they wait in its record).
    pub(super) fn after_attempts(
        self: &Arc<Self>,
        id: WorkloadId,
        module: String,
        spec: WorkloadSpec,
        reload: bool,
        done: Done,
    ) -> Done {
        if spec.retry.is_none() {
            return done;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut done = done;
            loop {
                let ended = done
                    .await
                    .map_err(|e| anyhow::anyhow!("workload task failed: {e}"))??;
                if ended.status != Status::Pending {
                    return Ok(ended);
                }
                let at = ended.attempts.last().map_or_else(now_ms, |a| a.retry_at);
                let (tx, rx) = oneshot::channel();
                let queued = Queued {
                    id,
                    tenant: ended.tenant.clone(),
                    enqueued_ms: at,
                    deadline_ms: None,
                    job: Job {
                        module: module.clone(),
                        spec: spec.clone(),
                        reload,
                        waiter: Some(tx),
                        chained: true,
                    },
                };
                if let Some(killed) = this.rest(queued, at) {
                    let ended = this.end_unstarted(killed, killed_resting()).await;
                    return ended.map_err(anyhow::Error::from);
                }
                done = match rx.await {
                    Ok(Started::Running(next)) => next,
                    Ok(Started::Ended(ended)) => return (*ended).map_err(anyhow::Error::from),
                    Err(_) => anyhow::bail!("workload {id} waits for its next attempt"),
                };
            }
        })
    }

    /// A next attempt waits until `at`, then queues; given back when a
    /// kill came for it while its last attempt ended.
    fn rest(&self, queued: Queued<Job>, at: i64) -> Option<Queued<Job>> {
        let mut state = self.lock();
        if state.doomed.remove(&queued.id) {
            return Some(queued);
        }
        state.backoffs.rest(queued, at);
        self.changed.notify_one();
        None
    }

    /// Moves the retries whose backoff is over into the queue.
    fn release(&self) {
        let mut state = self.lock();
        for queued in state.backoffs.ready(now_ms()) {
            state.queue.push(queued);
        }
        self.node.metrics().queued.set(state.queue.len() as i64);
    }

    /// Forgets a kill of `id` that found it neither queued nor on its way.
    pub(super) fn spare(&self, id: WorkloadId) {
        self.lock().doomed.remove(&id);
    }

    /// Records the end of workload `id`, which never started this time:
    /// its followers, who waited for it to start, hear of it at once.
    async fn finish_unstarted(
        &self,
        id: WorkloadId,
        completion: Completion,
    ) -> Result<WorkloadRecord, ServiceError> {
        let ended = self.node.db().finish(id, completion).await;
        self.node.broker().touch(id);
        ended.map_err(ServiceError::from)
    }

    /// Records a queued job's end before it ran, and tells its waiter.
    async fn end_unstarted(
        &self,
        queued: Queued<Job>,
        completion: Completion,
    ) -> Result<WorkloadRecord, ServiceError> {
        let ended = self.finish_unstarted(queued.id, completion).await;
        if let Some(waiter) = queued.job.waiter {
            let again = match &ended {
                Ok(record) => Ok(record.clone()),
                Err(e) => Err(ServiceError::Internal(anyhow::anyhow!("{e}"))),
            };
            let _ = waiter.send(Started::Ended(Box::new(again)));
        }
        ended
    }

    /// Depth, running and oldest wait per tenant, and in all.
    pub(super) fn depth(&self) -> (Vec<TenantQueue>, usize) {
        let state = self.lock();
        (state.queue.depth(now_ms()), state.queue.len())
    }

    /// Stops starting queued work (shutdown): it stays queued in the store.
    pub(super) fn stop(&self) {
        self.node.vital().stop();
        self.stopping.cancel();
        self.changed.notify_one();
    }

    /// Starts queued work whenever a slot is free, in fair-share order;
    /// fails what passed its deadline.
    async fn dispatch(self: Arc<Self>, dies_at: Option<u64>) {
        self.requeue().await;
        let mut taken = 0;
        loop {
            self.expire().await;
            self.release();
            // Woken at the next queue deadline or end of a backoff.
            let (waiting, wake_at) = {
                let state = self.lock();
                let wake_at = [state.queue.next_deadline(), state.backoffs.next_due()];
                (state.queue.len() > 0, wake_at.into_iter().flatten().min())
            };
            let until_deadline = async {
                match wake_at {
                    Some(at) => {
                        let wait = (at - now_ms()).max(0) as u64;
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(until_deadline);
            if !waiting {
                tokio::select! {
                    biased;
                    () = self.stopping.cancelled() => return,
                    () = self.changed.notified() => continue,
                    () = &mut until_deadline => continue,
                }
            }
            let slot = tokio::select! {
                biased;
                () = self.stopping.cancelled() => return,
                slot = self.node.runner().reserve() => slot,
                () = self.changed.notified() => continue,
                () = &mut until_deadline => continue,
            };
            // A slot freed by the shutdown's kills is not for queued work.
            if self.stopping.is_cancelled() {
                return;
            }
            let picked = {
                let mut state = self.lock();
                let shares = TenantShares(&self.tenants);
                let picked = match state.queue.pick(&shares) {
                    None => None,
                    Some(queued) => {
                        let tenant = queued.tenant.clone();
                        match self.take_share(&mut state, tenant.as_deref(), Some(slot)) {
                            Some((Some(slot), running)) => Some((queued, slot, running)),
                            // Its tenant's permit went meanwhile: it waits on.
                            _ => {
                                state.queue.put_back(queued);
                                None
                            }
                        }
                    }
                };
                self.node.metrics().queued.set(state.queue.len() as i64);
                picked
            };
            if picked.is_some() {
                taken += 1;
                assert!(dies_at != Some(taken), "test fault: the dispatcher dies");
            }
            let Some((queued, slot, running)) = picked else {
                // Every tenant with work waits at its cap: until one ends.
                tokio::select! {
                    biased;
                    () = self.stopping.cancelled() => return,
                    () = self.changed.notified() => {}
                    () = &mut until_deadline => {}
                }
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(Box::pin(async move {
                this.start_queued(queued, slot, running).await
            }));
        }
    }

    /// Puts back what a previous process left queued, oldest first.
    async fn requeue(&self) {
        let found = match self.node.db().queued_workloads().await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the queued workloads back; they stay pending");
                return;
            }
        };
        if !found.is_empty() {
            tracing::info!(
                count = found.len(),
                "queued workloads from before the restart wait again"
            );
        }
        for (record, input) in found {
            // Read back without its stdin and input (see `Job`).
            let spec = match input.spec(&record) {
                Ok(spec) => spec,
                Err(e) => {
                    let why = format!("its queued input could not be read back: {e}");
                    let _ =
                        (self.finish_unstarted(record.id, Completion::host_failure(why, 0))).await;
                    continue;
                }
            };
            let queued = Queued {
                id: record.id,
                tenant: record.tenant.clone(),
                enqueued_ms: record.queued_at.unwrap_or(record.created_at),
                deadline_ms: input.deadline_ms,
                job: Job {
                    module: record.module_hash,
                    spec,
                    reload: input.has_bytes,
                    waiter: None,
                    chained: false,
                },
            };
            let mut state = self.lock();
            match input.not_before_ms {
                // A retry still in its backoff.
                Some(at) if at > now_ms() => state.backoffs.rest(queued, at),
                _ => state.queue.push(queued),
            }
        }
        self.node
            .metrics()
            .queued
            .set(self.lock().queue.len() as i64);
    }

    /// Fails every queued job whose deadline passed.
    async fn expire(&self) {
        let now = now_ms();
        let expired = self.lock().queue.expired(now);
        for queued in expired {
            let waited = now - queued.enqueued_ms;
            let completion = Completion {
                status: Status::Failed,
                exit_code: None,
                error: Some(format!(
                    "it waited {waited} ms in the queue, past its queue_timeout_ms, and never started"
                )),
                failure: Some(FailureKind::QueueTimeout),
                output: None,
                duration_ms: 0,
                line_count: 0,
            };
            let _ = self.end_unstarted(queued, completion).await;
        }
    }

    /// Starts a job taken from the queue in `slot`.
    async fn start_queued(self: Arc<Self>, queued: Queued<Job>, slot: Slot, running: Running) {
        let waited = (now_ms() - queued.enqueued_ms).max(0) as f64 / 1000.0;
        self.node.metrics().queue_wait.observe(waited);
        let (id, tenant) = (queued.id, queued.tenant.clone());
        let registry = self.node.registry();
        let compiled = match registry
            .get_for(tenant.as_deref(), &queued.job.module)
            .await
        {
            Ok(compiled) => compiled,
            Err(e) => {
                let why = format!("failed to start: {}", ServiceError::from(e));
                let _ = self
                    .end_unstarted(queued, Completion::host_failure(why, 0))
                    .await;
                return;
            }
        };
        if self.lock().doomed.remove(&id) {
            let _ = self.end_unstarted(queued, killed()).await;
            return;
        }
        let Queued { mut job, .. } = queued;
        // What seeing it through its retries needs (a later attempt's
        // waiter does that already), before its stdin and input are back.
        let again = (job.spec.retry.is_some() && !job.chained)
            .then(|| (job.module.clone(), job.spec.clone(), job.reload));
        if job.reload {
            let input = self.node.db().queued_input(id).await;
            match input.map(|i| i.map(|i| i.bytes())) {
                Ok(Some(Ok((stdin, input)))) => (job.spec.stdin, job.spec.input) = (stdin, input),
                failed => {
                    let why = match failed {
                        Err(e) => format!("failed to start: its input could not be read: {e}"),
                        Ok(Some(Err(e))) => format!("failed to start: its input is corrupt: {e}"),
                        _ => "failed to start: its input is gone".to_owned(),
                    };
                    let ended = (self.finish_unstarted(id, Completion::host_failure(why, 0))).await;
                    if let Some(waiter) = job.waiter {
                        let _ = waiter.send(Started::Ended(Box::new(ended)));
                    }
                    return;
                }
            }
        }
        let launch = Launch {
            id,
            slot,
            module_hash: job.module,
            spec: job.spec,
            tee: None,
            also: None,
            creation: Creation::Queued,
            ended: None,
            record: LocalRecord::Primary,
            idempotency: None,
            held: Some(Box::new(running)),
        };
        let started = self.node.runner().start_claimed(compiled, launch).await;
        let answer = match started {
            Ok(started) => Started::Running(match again {
                Some((module, spec, reload)) => {
                    self.after_attempts(id, module, spec, reload, started.done)
                }
                None => started.done,
            }),
            Err(e) => {
                // Not started: it must not stay pending.
                let why = format!("failed to start: {e}");
                let ended = (self.finish_unstarted(id, Completion::host_failure(why, 0))).await;
                Started::Ended(Box::new(ended))
            }
        };
        if let Some(waiter) = job.waiter {
            let _ = waiter.send(answer);
        }
    }
}

/// The end of a workload killed while it waited to be retried.
fn killed_resting() -> Completion {
    Completion {
        error: Some(
            "killed on request while it waited to be retried; no further attempt ran".into(),
        ),
        ..killed()
    }
}

/// The end of a workload killed before it started.
fn killed() -> Completion {
    Completion {
        status: Status::Killed,
        exit_code: None,
        error: Some("killed on request while it waited in the queue; it never started".into()),
        failure: Some(FailureKind::Killed),
        output: None,
        duration_ms: 0,
        line_count: 0,
    }
}
