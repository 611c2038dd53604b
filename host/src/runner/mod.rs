//! Drives one workload from creation to its terminal status.
//!
//! Glue between the stages: creates the record (already `running`: a
//! workload is only created once it holds a slot; for a sync caller the
//! guest starts while that commits, see [`Creation`]), opens the workload's live
//! channel and LogWriter, runs the engine, then commits every line before the
//! terminal status and only then ends live delivery — so whoever sees a final
//! status also finds every line in the store; that commit answers the final
//! record, so nothing is read back. Also holds the kill switches of
//! running workloads and the concurrency limit. Used identically by `vulcan run`
//! and the server.

mod guest_threads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::engine::{CompiledModule, GuestIdentity, LimitHit, Outcome, RunReport, Runtime};
use crate::logs::{LineSink, LogBroker, LogWriter, SinkPair};
use crate::metrics::Metrics;
use crate::store::{Db, Haste, NewWorkload, RetryLater, StoreError};
use crate::workload::{Attempt, RetryPolicy};
use crate::workload::{
    Completion, FailureKind, IdempotencyKey, QueuedInput, Status, WorkloadId, WorkloadRecord,
    WorkloadSpec,
};
pub use guest_threads::GuestThreads;

/// A run expected to take less than this (its module's last one did) starts
/// on the thread that starts it rather than on the guest threads.
const RUN_HERE_BELOW: std::time::Duration = std::time::Duration::from_millis(1);

/// Raw copies of guest stdout and stderr (for `vulcan run`'s terminal).
pub struct Tee {
    /// Receives the guest's stdout bytes.
    pub stdout: Box<dyn std::io::Write + Send>,
    /// Receives the guest's stderr bytes.
    pub stderr: Box<dyn std::io::Write + Send>,
}

/// A slot to run one workload in, held until it ends (empty without a limit).
pub struct Slot(Option<OwnedSemaphorePermit>);

/// What [`Runner::start_claimed`] starts.
pub struct Launch {
    /// The workload's id.
    pub id: WorkloadId,
    /// The slot it runs in, from [`Runner::reserve`].
    pub slot: Slot,
    /// `sha256:<hex>` of its module.
    pub module_hash: String,
    /// What it is given.
    pub spec: WorkloadSpec,
    /// Raw copies of its output.
    pub tee: Option<Tee>,
    /// A second sink that must keep every record too (the cluster's copy).
    pub also: Option<Arc<dyn LineSink>>,
    /// Whether its guest waits for its record.
    pub creation: Creation,
    /// Told how the guest ended as soon as it did, while that end commits:
    /// the cluster sends its own copy of the record meanwhile.
    pub ended: Option<tokio::sync::oneshot::Sender<Completion>>,
    /// What this node's record of it is to its readers.
    pub record: LocalRecord,
    /// The key it was submitted with, kept with its record.
    pub idempotency: Option<IdempotencyKey>,
    /// Held until it has ended and its end is recorded (e.g. its tenant's
    /// share of the node), whether or not anyone waits for it.
    pub held: Option<Box<dyn Send>>,
}

/// What this node's record of a workload is to those who read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRecord {
    /// What the API reads: committed at once, and whoever asked to hear of
    /// the end hears of it only once the record exists.
    Primary,
    /// A copy of a record kept elsewhere (the cluster's, which the API
    /// reads), with [`Creation::Overlapped`]: nobody waits on it, so its
    /// creation and end share commits with other runs' (see
    /// [`Haste::Linger`]), its end is told as soon as the guest ended, and
    /// its slot is free from then. A creation that fails still stops a
    /// guest that runs; one that ended was told as it ended.
    Copy,
}

/// When a workload's guest starts, relative to its record's creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// The record is committed before the guest starts and before the
    /// start returns: for a caller that hands the id out at once.
    Committed,
    /// The guest starts while its record's creation commits, its lines
    /// waiting for it: for a caller that learns the id only from the final
    /// record (a sync run), which so saves a commit's wait. A creation that
    /// fails kills the guest, and `done` answers the [`StartError`].
    Overlapped,
    /// The record exists already, `pending` (a queued run): it is marked
    /// running before the guest starts and before the start returns.
    Queued,
}

/// A started workload: its id and a handle that resolves to its final record.
pub struct StartedWorkload {
    /// The new workload's id.
    pub id: WorkloadId,
    /// Resolves to its final record once it has ended and everything about it
    /// is stored.
    pub done: tokio::task::JoinHandle<anyhow::Result<WorkloadRecord>>,
}

/// Why a workload could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `max_concurrent` workloads are already running.
    #[error("the server is running its maximum of {0} workloads; retry shortly")]
    AtCapacity(usize),
    /// Its module is not stored.
    #[error("module {0} not found")]
    ModuleNotFound(String),
    /// The store is full; nothing was created.
    #[error("cannot create a workload: {0}")]
    StorageFull(String),
    /// The store cannot write any more; nothing was created.
    #[error("cannot create a workload: {0}")]
    StoreUnavailable(String),
    /// Anything else.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What a kill request left for the workload's final record.
#[derive(Clone, Default)]
struct KillSwitch {
    cancel: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

/// Starts, tracks and kills workloads.
pub struct Runner {
    runtime: Arc<Runtime>,
    db: Db,
    broker: LogBroker,
    running: Mutex<HashMap<WorkloadId, KillSwitch>>,
    slots: Option<(Arc<Semaphore>, usize)>,
    metrics: Arc<Metrics>,
    /// Woken whenever a workload leaves `running`.
    ended: tokio::sync::Notify,
    /// Where guests run; `None`: on the caller's runtime.
    guests: Option<tokio::runtime::Handle>,
}

/// What a runner is built from.
pub struct RunnerParts {
    /// Runs guests.
    pub runtime: Arc<Runtime>,
    /// Where records and lines are stored.
    pub db: Db,
    /// Where committed lines go live.
    pub broker: LogBroker,
    /// Counts running and finished workloads.
    pub metrics: Arc<Metrics>,
    /// Most workloads running at once; `None`: no limit.
    pub max_concurrent: Option<usize>,
    /// Threads of their own for guests (see [`GuestThreads`]); `None`: the
    /// caller's runtime.
    pub guests: Option<tokio::runtime::Handle>,
}

impl Runner {
    /// A runner over these parts.
    pub fn new(parts: RunnerParts) -> Arc<Self> {
        Arc::new(Self {
            runtime: parts.runtime,
            db: parts.db,
            broker: parts.broker,
            running: Mutex::new(HashMap::new()),
            slots: parts
                .max_concurrent
                .map(|n| (Arc::new(Semaphore::new(n)), n)),
            metrics: parts.metrics,
            ended: tokio::sync::Notify::new(),
            guests: parts.guests,
        })
    }

    /// Whether a slot is free now (always, without a limit).
    pub fn has_free_slot(&self) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|(sem, _)| sem.available_permits() > 0)
    }

    /// Workloads currently executing.
    pub fn running_count(&self) -> usize {
        self.lock().len()
    }

    /// Resolves once no workload is running (e.g. after `kill_all`).
    pub async fn idle(&self) {
        self.until_ended(|running| running.is_empty()).await
    }

    /// Resolves once `done` holds of the running workloads; checked again
    /// whenever one ends.
    async fn until_ended(&self, done: impl Fn(&HashMap<WorkloadId, KillSwitch>) -> bool) {
        loop {
            // Registered before the check, so an end in between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            ended.await;
        }
    }

    /// Creates the workload record and starts it in the background.
    ///
    /// Cancellation-safe: once this future has been polled, the workload's task
    /// exists and takes it to a terminal status whether or not the caller
    /// (e.g. a request whose client hung up) waits for the answer.
    pub async fn start(
        self: &Arc<Self>,
        module: Arc<CompiledModule>,
        module_hash: String,
        spec: WorkloadSpec,
        tee: Option<Tee>,
        creation: Creation,
    ) -> Result<StartedWorkload, StartError> {
        let id = WorkloadId::new();
        self.start_as(id, module, module_hash, spec, tee, creation)
            .await
    }

    /// [`Runner::start`] under an id given by the caller (the service,
    /// which counts a tenant's quota by workload id).
    pub async fn start_as(
        self: &Arc<Self>,
        id: WorkloadId,
        module: Arc<CompiledModule>,
        module_hash: String,
        spec: WorkloadSpec,
        tee: Option<Tee>,
        creation: Creation,
    ) -> Result<StartedWorkload, StartError> {
        let permit: Option<OwnedSemaphorePermit> = match &self.slots {
            Some((sem, max)) => Some(
                Arc::clone(sem)
                    .try_acquire_owned()
                    .map_err(|_| StartError::AtCapacity(*max))?,
            ),
            None => None,
        };
        let launch = Launch {
            id,
            slot: Slot(permit),
            module_hash,
            spec,
            tee,
            also: None,
            creation,
            ended: None,
            record: LocalRecord::Primary,
            idempotency: None,
            held: None,
        };
        self.start_claimed(module, launch).await
    }

    /// Waits for a free slot (at once without a limit): a cluster node takes
    /// work only once it holds one, so it never claims what it cannot start.
    pub async fn reserve(&self) -> Slot {
        match &self.slots {
            Some((sem, _)) => Slot(Arc::clone(sem).acquire_owned().await.ok()),
            None => Slot(None),
        }
    }

    /// A free slot now, if there is one.
    pub fn try_reserve(&self) -> Option<Slot> {
        match &self.slots {
            Some((sem, _)) => Arc::clone(sem)
                .try_acquire_owned()
                .ok()
                .map(|p| Slot(Some(p))),
            None => Some(Slot(None)),
        }
    }

    /// Starts a workload whose id was given elsewhere (a cluster claim) in the
    /// slot reserved for it; its records also go to `also`.
    pub async fn start_claimed(
        self: &Arc<Self>,
        module: Arc<CompiledModule>,
        launch: Launch,
    ) -> Result<StartedWorkload, StartError> {
        let Launch {
            id,
            slot: Slot(permit),
            module_hash,
            spec,
            tee,
            also,
            creation,
            ended,
            record,
            idempotency,
            held,
        } = launch;
        let haste = match record {
            LocalRecord::Primary => Haste::Now,
            LocalRecord::Copy => Haste::Linger,
        };
        // Killable from the moment the record exists.
        let switch = KillSwitch::default();
        self.lock().insert(id, switch.clone());
        let (created_tx, created_rx) = tokio::sync::oneshot::channel();
        let execution = tokio::spawn({
            let this = Arc::clone(self);
            async move {
                let mut permit = permit;
                let new = NewWorkload {
                    id,
                    module_hash: module_hash.clone(),
                    args: spec.args.clone(),
                    env: spec.env.clone(),
                    limits: spec.limits.clone(),
                    allowed_hosts: spec.allowed_hosts.clone(),
                    log_level: spec.log_level,
                    // It holds its slot, so it starts now: the record is
                    // created running, in one commit.
                    running: true,
                    tenant: spec.tenant.clone(),
                    queued: None,
                    idempotency,
                    schedule: spec.schedule.clone(),
                    retry: spec.retry.clone(),
                };
                // Its first attempt, unless it was queued: then its record
                // says which, and where its lines go on from.
                let mut attempt = AttemptStart {
                    attempt: 1,
                    first_seq: 0,
                    started_at: crate::workload::now_ms(),
                };
                let (local, created) = match creation {
                    Creation::Committed | Creation::Queued => {
                        let created = match creation {
                            Creation::Queued => this.db.mark_running(id).await.map(|record| {
                                attempt = AttemptStart {
                                    attempt: record.attempt,
                                    first_seq: record.line_count,
                                    started_at: record.started_at.unwrap_or(attempt.started_at),
                                };
                            }),
                            _ => this.db.create_workload(new).await,
                        };
                        if let Err(e) = created {
                            let _ = created_tx.send(Err(e));
                            return Ok(None);
                        }
                        // Live from creation: a follower that arrives before
                        // the guest starts still gets every line.
                        let publisher = this.broker.open(id);
                        let _ = created_tx.send(Ok(()));
                        (this.db.line_sink(id, Some(Box::new(publisher))), None)
                    }
                    Creation::Overlapped => {
                        let publisher = this.broker.open(id);
                        match this.db.create_workload_with_lane(
                            new,
                            Some(Box::new(publisher)),
                            haste,
                        ) {
                            Ok((lane, created)) => {
                                let _ = created_tx.send(Ok(()));
                                (Ok(lane), Some(created))
                            }
                            Err(e) => {
                                this.broker.close(id);
                                let _ = created_tx.send(Err(e));
                                return Ok(None);
                            }
                        }
                    }
                };
                let identity = GuestIdentity {
                    workload_id: id.to_string(),
                    module_hash,
                };
                let sink: Arc<dyn LineSink> = match (local, also) {
                    (Ok(local), None) => Arc::new(local),
                    (Ok(local), Some(also)) => Arc::new(SinkPair(local, also)),
                    // Without a sink it cannot run, and it must not stay running.
                    (Err(e), _) => {
                        let failure = Completion::host_failure(format!("failed to start: {e}"), 0);
                        return Ok(Some(this.db.finish(id, failure).await?));
                    }
                };
                let writer = LogWriter::new(id, spec.limits.max_output_bytes, Some(sink))
                    .with_min_level(spec.log_level)
                    .starting_at(attempt.first_seq);
                // What a retry needs of it once the spec is the guest's.
                let retry = (spec.retry.clone())
                    .map(|policy| (policy, attempt, QueuedInput::of(&spec, None)));
                let (writer, _tee_flusher) = with_tee(writer, tee);
                // Whoever asked to hear of its end hears it once its record
                // exists too, so never of a run whose creation failed (a
                // copy's, at once: nobody reads the copy).
                let (copy_tx, copy_rx) = tokio::sync::oneshot::channel();
                let (exists_tx, exists_rx) = tokio::sync::oneshot::channel();
                let wants_copy = ended.is_some();
                let run = async {
                    let completion = this
                        .run_guest(module, spec, identity, &writer, &switch)
                        .await;
                    if record == LocalRecord::Copy {
                        drop(permit.take());
                    }
                    if wants_copy {
                        let _ = copy_tx.send(completion.clone());
                    }
                    completion
                };
                let tell = async {
                    let Some(ended) = ended else { return };
                    let exists =
                        async { record == LocalRecord::Copy || exists_rx.await == Ok(true) };
                    if let (true, Ok(completion)) = tokio::join!(exists, copy_rx) {
                        let _ = ended.send(completion);
                    }
                };
                let Some(created) = created else {
                    let _ = exists_tx.send(true);
                    let (ended, ()) =
                        tokio::join!(this.record_end(id, run.await, haste, retry), tell);
                    return Ok(Some(ended?));
                };
                // A creation that fails stops the guest at once.
                let created = async {
                    let created = created.await;
                    let _ = exists_tx.send(created.is_ok());
                    if let Err(e) = &created {
                        let _ = switch.reason.set(format!("failed to create: {e}"));
                        switch.cancel.cancel();
                    }
                    created
                };
                // Its end is sent as soon as it ended: the writer takes it
                // after the creation, so a short run's creation, lines and
                // end can share one commit.
                let ended = async { this.record_end(id, run.await, haste, retry).await };
                let (created, ended, ()) = tokio::join!(created, ended, tell);
                if let Err(e) = created {
                    this.db.drop_lines(id);
                    this.broker.close(id);
                    return Err(anyhow::Error::from(start_error(id, e)));
                }
                Ok(Some(ended?))
            }
        });
        // A second task watches the first, so that even a panic inside the
        // engine ends the workload with a status instead of leaving it running.
        let done = tokio::spawn({
            let this = Arc::clone(self);
            async move {
                let result = match execution.await {
                    Ok(result) => result,
                    Err(join_error) => {
                        let error =
                            format!("internal error while running the workload: {join_error}");
                        tracing::error!(workload = %id, %error);
                        let completion = Completion::host_failure(error.clone(), 0);
                        this.db.finish(id, completion).await.ok();
                        this.broker.close(id);
                        Err(anyhow::anyhow!(error))
                    }
                };
                this.lock().remove(&id);
                drop(held);
                this.ended.notify_waiters();
                // The final record as its end was committed: no read back.
                result?.ok_or_else(|| anyhow::anyhow!("workload {id} was not created"))
            }
        });
        match created_rx.await {
            Ok(Ok(())) => Ok(StartedWorkload { id, done }),
            Ok(Err(e)) => Err(start_error(id, e)),
            Err(_) => Err(StartError::Internal(anyhow::anyhow!(
                "workload {id} stopped before it was created"
            ))),
        }
    }

    /// Asks a running workload to stop, recording `reason` as its error; false if
    /// it is not running here.
    pub fn kill(&self, id: WorkloadId, reason: &str) -> bool {
        match self.lock().get(&id) {
            Some(switch) => {
                let _ = switch.reason.set(reason.to_owned());
                switch.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether `id` runs here (or is starting).
    pub fn is_running(&self, id: WorkloadId) -> bool {
        self.lock().contains_key(&id)
    }

    /// Resolves once `id` is no longer running here (at once if it never was).
    pub async fn ended(&self, id: WorkloadId) {
        self.until_ended(|running| !running.contains_key(&id)).await
    }

    /// Kills every running workload (server shutdown).
    pub fn kill_all(&self, reason: &str) {
        for switch in self.lock().values() {
            let _ = switch.reason.set(reason.to_owned());
            switch.cancel.cancel();
        }
    }

    /// Runs a workload's guest to its end: how it ended, to be recorded.
    async fn run_guest(
        &self,
        module: Arc<CompiledModule>,
        spec: WorkloadSpec,
        identity: GuestIdentity,
        writer: &LogWriter,
        switch: &KillSwitch,
    ) -> Completion {
        let (outcome, mut completion) = if switch.cancel.is_cancelled() {
            // Killed before its guest started: the guest never runs.
            let report = RunReport {
                outcome: Outcome::Killed,
                duration: std::time::Duration::ZERO,
            };
            (Outcome::Killed, completion(&report, 0))
        } else {
            self.metrics.running.inc();
            let expected = module.last_run();
            let stats = Arc::clone(&module);
            let run = {
                let (runtime, writer) = (Arc::clone(&self.runtime), writer.clone());
                let cancel = switch.cancel.clone();
                async move { (runtime.run(&module, &spec, &identity, &writer, &cancel)).await }
            };
            // Most guests end within their first epoch tick: when the
            // module's last run was short, that slice runs here, with no hop
            // to another thread, and a guest still running after it moves to
            // the guest threads (wasmtime's fibers may resume on any thread).
            // A module that runs long goes there at once, so that no request
            // waits behind its first tick. Creating and ending the record stay
            // here either way, out of the guests' competition.
            let mut run = Box::pin(run);
            let report = match &self.guests {
                None => run.await,
                Some(guests) if expected < RUN_HERE_BELOW => {
                    match futures_util::poll!(run.as_mut()) {
                        std::task::Poll::Ready(report) => report,
                        std::task::Poll::Pending => on_guest_threads(guests, run).await,
                    }
                }
                Some(guests) => on_guest_threads(guests, run).await,
            };
            self.metrics.running.dec();
            if let Ok(report) = &report {
                stats.record_run(report.duration);
            }
            let line_count = writer.finish();
            match report {
                Ok(report) => (report.outcome.clone(), completion(&report, line_count)),
                Err(e) => {
                    let message = format!("{e:#}");
                    let completion = Completion::host_failure(message.clone(), line_count);
                    (Outcome::HostFailure(message), completion)
                }
            }
        };
        if outcome == Outcome::Killed
            && let Some(reason) = switch.reason.get()
        {
            completion.error = Some(reason.clone());
        }
        completion
    }

    /// Records how a workload ended and returns the final record; an error
    /// means that end could not be recorded yet (the store keeps trying).
    async fn record_end(
        &self,
        id: WorkloadId,
        completion: Completion,
        haste: Haste,
        retry: Option<(RetryPolicy, AttemptStart, QueuedInput)>,
    ) -> anyhow::Result<WorkloadRecord> {
        if let Some((policy, attempt, input)) = retry
            && let Some(backoff) = policy.backoff_after(attempt.attempt, &completion)
        {
            // Not its end: the record goes back to pending, this attempt
            // in its history, and the queue starts the next one.
            let now = crate::workload::now_ms();
            let retry_at = now + backoff as i64;
            let later = RetryLater {
                attempt: Attempt::of(
                    attempt.attempt,
                    Some(attempt.started_at),
                    attempt.first_seq,
                    &completion,
                    now,
                    retry_at,
                ),
                queued: QueuedInput {
                    not_before_ms: Some(retry_at),
                    ..input
                },
            };
            self.metrics.retries.inc();
            let retried = self.db.retry_later(id, completion, later, haste).await;
            return retried.map_err(|e| {
                anyhow::Error::from(e).context(format!("workload {id}'s retry was not recorded"))
            });
        }
        // Committed after every line of the workload, in the same transaction
        // as its last ones; that commit also ends live delivery.
        let (status, duration_ms, lines) = (
            completion.status,
            completion.duration_ms,
            completion.line_count,
        );
        let stored = self.db.finish_with(id, completion, haste).await;
        // A workload whose record was never created (its creation failed
        // while the guest ran) is answered as not started, and not counted.
        if !matches!(stored, Err(StoreError::NotFound(_))) {
            self.metrics.workload_finished(status, duration_ms, lines);
        }
        stored.map_err(|e| {
            anyhow::Error::from(e).context(format!(
                "workload {id} ended, but its end could not be recorded yet \
                 (it will be recorded as soon as the store accepts writes)"
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkloadId, KillSwitch>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which attempt of a workload a start is, and where its lines begin.
#[derive(Debug, Clone, Copy)]
struct AttemptStart {
    attempt: u32,
    first_seq: u64,
    started_at: i64,
}

/// Why the store would not create workload `id`.
fn start_error(id: WorkloadId, e: StoreError) -> StartError {
    match e {
        StoreError::ModuleNotFound(h) => StartError::ModuleNotFound(h),
        StoreError::StorageFull(why) => StartError::StorageFull(why),
        e @ StoreError::Unavailable(_) => StartError::StoreUnavailable(e.to_string()),
        e => StartError::Internal(
            anyhow::Error::from(e).context(format!("failed to create workload {id}")),
        ),
    }
}

/// Runs (the rest of) a guest's run on the guest threads.
async fn on_guest_threads(
    guests: &tokio::runtime::Handle,
    run: impl Future<Output = anyhow::Result<RunReport>> + Send + 'static,
) -> anyhow::Result<RunReport> {
    // Boxed: the engine's future is large, and a task moves its future in
    // several times and writes its output over it; a box is a pointer.
    (guests.spawn(Box::pin(run)).await).unwrap_or_else(|e| {
        Err(anyhow::anyhow!(
            "internal error while running the guest: {e}"
        ))
    })
}

/// The writer, teeing to `tee` if given, and then also the task that flushes
/// the tee every tick (the tee buffers), which stops when dropped.
fn with_tee(writer: LogWriter, tee: Option<Tee>) -> (LogWriter, Option<AbortOnDrop>) {
    let Some(tee) = tee else {
        return (writer, None);
    };
    let writer = writer.with_tee(Some(tee.stdout), Some(tee.stderr));
    let flushed = writer.clone();
    let flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::engine::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            flushed.flush_tee();
        }
    });
    (writer, Some(AbortOnDrop(flusher)))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Maps how a run ended onto the stored result.
pub fn completion(report: &RunReport, line_count: u64) -> Completion {
    let mut output = None;
    let failed = |kind: FailureKind, error: String| (Status::Failed, None, Some(error), Some(kind));
    let (status, exit_code, error, failure) = match &report.outcome {
        Outcome::Exited(0) => (Status::Completed, Some(0), None, None),
        Outcome::Returned(bytes) => {
            output = Some(bytes.clone());
            (Status::Completed, Some(0), None, None)
        }
        // Exit code 1, as for a command whose `run` fails: scripts see failure
        // the same way for every kind of workload.
        Outcome::ReturnedError(message) => (
            Status::Failed,
            Some(1),
            Some(message.clone()),
            Some(FailureKind::ReturnedError),
        ),
        Outcome::Exited(code) => (
            Status::Failed,
            Some(*code),
            Some(format!("exited with code {code}")),
            Some(FailureKind::Exit),
        ),
        Outcome::Trapped { message, backtrace } => {
            let error = match backtrace {
                Some(bt) => format!("{message}\n{bt}"),
                None => message.clone(),
            };
            failed(FailureKind::Trap, error)
        }
        Outcome::TimedOut(limit) => failed(
            FailureKind::Timeout,
            format!("timed out after {}", humantime::format_duration(*limit)),
        ),
        Outcome::Killed => (
            Status::Killed,
            None,
            Some("killed".to_owned()),
            Some(FailureKind::Killed),
        ),
        Outcome::LimitExceeded(LimitHit::Memory(limit)) => failed(
            FailureKind::Memory,
            format!("memory limit of {limit} bytes exceeded"),
        ),
        Outcome::LimitExceeded(LimitHit::Fuel(limit)) => failed(
            FailureKind::Fuel,
            format!("fuel limit of {limit} exhausted"),
        ),
        Outcome::LimitExceeded(LimitHit::Output(limit)) => failed(
            FailureKind::Output,
            format!("output limit of {limit} bytes exceeded"),
        ),
        Outcome::LinesNotStored(why) => failed(
            FailureKind::Store,
            format!("its log lines could not be stored: {why}"),
        ),
        Outcome::HostFailure(message) => failed(FailureKind::Host, message.clone()),
    };
    Completion {
        status,
        exit_code,
        error,
        failure,
        output,
        duration_ms: report.duration.as_millis() as u64,
        line_count,
    }
}

#[cfg(test)]
mod tests;
