//! The writer thread: the only connection that writes, batching and retrying
//! (the SQL of each op is in [`super::write_sql`]).
//!
//! Control ops (a new workload, a status change, …) arrive on a channel; lines
//! wait in the [`LineQueue`]. A commit takes the ops in hand, every line of each
//! workload an op ends (so a terminal status always follows its lines), and,
//! when ops come back to back, a small fair share of everyone else's lines,
//! and writes them in one `BEGIN IMMEDIATE` transaction. Only then are the
//! lines published live and their room given back. A workload whose guest started before its creation
//! committed has its lane held until the commit that takes the creation,
//! where its lines go in right after it.
//!
//! Someone waits on almost every op, so an op is never held behind a flood: a
//! transaction of lines alone grows chunk by chunk, and an op that arrives
//! meanwhile ends its growth and joins it (see [`Joining`]), so that op waits
//! for one chunk and one commit. A workload that ends with a long backlog of
//! lines has them committed first in those transactions, before its terminal
//! status, while other ops go ahead. The exception, a creation or end
//! nobody waits on (a cluster node's copy, [`Haste::Linger`]), waits for
//! the linger, or for the next op someone waits on, and shares its commit.
//!
//! Faults: `SQLITE_BUSY`/`LOCKED` are retried until they pass. Any other failure
//! is permanent for what was in the transaction: its lines are dropped and their
//! workloads fail (`failure: store`), with every later line of theirs, so what
//! is stored of a workload is always a prefix of its lines. The ops are tried
//! once more without lines, and a terminal status that still cannot be
//! written is kept and retried until the store accepts it, so no workload
//! stays `running` because of a fault. A full disk also gives back the
//! [`StorageReserve`] and refuses lines and new workloads until there is room
//! again, so that the ends of the workloads it failed can be written.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};

use super::queue::{LineQueue, Taken};
use super::reserve::StorageReserve;
use super::usage::{LogUsage, UsageDelta};
use super::write_op::{Applied, Haste, WriteOp};
use super::write_sql::{WorkloadKeys, apply, insert_lines};
use super::{StoreError, StoreResult};
use crate::workload::{Completion, WorkloadId};

/// How often a terminal status that could not be written is tried again.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Most of other workloads' lines a commit takes along when it carries ops
/// right after another that did; also the most lines of its own a terminal
/// status or a creation is committed with (more go first, or after).
const LINES_WITH_OPS: usize = 256;

/// Lines a transaction of lines alone takes at a time, checking between two
/// for an op that waits: an op waits for at most one chunk (a few hundred
/// microseconds) before it joins that transaction. Half a full multi-row
/// insert: much smaller chunks cost a flood's throughput more (a fifth at 32
/// lines) than they save the op.
pub(super) const LINES_PER_CHUNK: usize = 128;

/// Most ops that wait for the linger (see [`Haste::Linger`]) before they are
/// committed without waiting for it: a transaction stays short however
/// fast they come.
pub(super) const MAX_LINGERING: usize = 256;

/// Longest pause between two attempts of a transaction that found the database busy.
const MAX_BUSY_BACKOFF: Duration = Duration::from_millis(200);

/// Counters the writer keeps.
#[derive(Default)]
pub(super) struct WriterStats {
    /// Attempts that found the database busy and were retried.
    pub(super) busy_retries: AtomicU64,
    /// Transactions committed.
    pub(super) commits: AtomicU64,
    /// Log lines committed.
    pub(super) lines: AtomicU64,
    /// Ops sent and not yet taken by the writer (lines not counted).
    pub(super) ops_waiting: AtomicUsize,
}

/// How the writer groups and retries.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most lines in one transaction (besides those of a workload that ends in it).
    pub max_batch: usize,
    /// Longest a line waits for companions before it is committed.
    pub linger: Duration,
    /// How long one attempt waits for a lock held by another connection.
    pub busy_timeout: Duration,
    /// Most bytes of lines one workload may have waiting for the store.
    pub lane_bytes: usize,
    /// Most bytes of lines all workloads of one file together may have waiting.
    pub total_bytes: usize,
    /// Room kept on the data directory's disk for the ends of workloads
    /// when it fills (see [`super::reserve`]); 0 keeps none.
    pub reserve_bytes: u64,
    /// Test-only fault switch: the main file's writer panics right after
    /// this commit (`vulcan serve` takes it from
    /// `VULCAN_TEST_FAULT_WRITER_DIES_AT_COMMIT`), to test what a dying
    /// writer does to the server.
    pub dies_at_commit: Option<u64>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            linger: Duration::from_millis(5),
            busy_timeout: Duration::from_secs(5),
            lane_bytes: 1 << 20,
            total_bytes: 64 << 20,
            reserve_bytes: super::reserve::DEFAULT_RESERVE_BYTES,
            dies_at_commit: None,
        }
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) config: WriterConfig,
    /// A new workload's module must be in this file (the main one).
    pub(super) checks_modules: bool,
    pub(super) queue: Arc<LineQueue>,
    pub(super) stats: Arc<WriterStats>,
    /// Integer keys of workloads that may still write lines, so a line never
    /// needs a lookup; a miss falls back to the table.
    pub(super) keys: WorkloadKeys,
    /// Terminal statuses that could not be written yet.
    pub(super) retained: Vec<(WorkloadId, Completion)>,
    /// Stored log bytes by tenant, changed after each commit.
    pub(super) usage: Arc<LogUsage>,
    /// What the transaction in progress changes in `usage`.
    pub(super) delta: UsageDelta,
    /// The last commit carried ops: lines that are not theirs only move on
    /// with the next ops, so those take a fair share along.
    pub(super) ops_in_a_row: bool,
    /// Ops that arrived while a transaction of lines was being written.
    pub(super) joining: Joining,
    /// Ops that wait for the linger (see [`Haste::Linger`]), taken by the
    /// next commit.
    pub(super) lingering: Vec<WriteOp>,
    /// Room kept on the disk for ends, and whether the disk is full.
    pub(super) reserve: Arc<StorageReserve>,
    /// Test-only fault: the thread panics at this commit (see [`WriterConfig`]).
    pub(super) dies_at_commit: Option<u64>,
}

/// Why lines and new workloads are refused while the disk is full.
const DISK_FULL: &str = "the database or disk is full";

/// Ops that arrive while a transaction of lines alone is being written join
/// it, so that they wait for the chunk in hand and one commit, not for that
/// transaction's commit and then one of their own.
#[derive(Default)]
pub(super) struct Joining {
    /// Where ops arrive (set once the writer runs).
    pub(super) inbox: Option<mpsc::Receiver<WriteOp>>,
    /// Ops in the transaction in progress, after its own (answered with them).
    joined: Vec<WriteOp>,
    /// Ops that arrived but must wait for a commit of their own: a flush, or
    /// a terminal status whose workload still has a backlog of lines (still
    /// counted in `ops_waiting` until taken).
    deferred: Vec<WriteOp>,
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriteOp>) {
        self.joining.inbox = Some(rx);
        let mut ops: Vec<WriteOp> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let Some(rx) = self.joining.inbox.take() else {
                return;
            };
            // A backlog of full batches, or ops held back until their
            // workload's lines are in, is committed back to back; ops that
            // arrive meanwhile join the next commit.
            let backlog = self.queue.has_full_batch() || !ops.is_empty();
            let mut wake = match (deadline, self.retained.is_empty()) {
                (Some(d), true) => Some(d),
                (Some(d), false) => Some(d.min(Instant::now() + RETRY_INTERVAL)),
                (None, false) => Some(Instant::now() + RETRY_INTERVAL),
                (None, true) => None,
            };
            // A full disk is checked for room now and then, even when idle.
            if let Some(t) = self.reserve.next_try() {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            let next = if backlog {
                rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
                })
            } else {
                match wake {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                }
            };
            let (mut due, mut disconnected) = (backlog, false);
            match next {
                Ok(op) => {
                    due |= self.take(op, &mut ops);
                    // Ops that are already waiting join this commit.
                    loop {
                        match rx.try_recv() {
                            Ok(op) => due |= self.take(op, &mut ops),
                            Err(mpsc::TryRecvError::Empty) => break,
                            Err(mpsc::TryRecvError::Disconnected) => {
                                disconnected = true;
                                break;
                            }
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => due = true,
                Err(mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
            }
            self.joining.inbox = Some(rx);
            if due || disconnected {
                self.commit(&mut ops, disconnected);
                // Lines left behind by a fair batch, and ops that came to
                // linger during the commit, wait at most one more linger.
                let left = self.queue.lines() > 0 || !self.lingering.is_empty();
                deadline = left.then(|| Instant::now() + self.config.linger);
            } else {
                deadline.get_or_insert_with(|| Instant::now() + self.config.linger);
            }
            if disconnected {
                return;
            }
        }
    }

    /// Keeps `op` for the next commit; true if that commit is due now: someone
    /// waits on the op, or the line queue holds a full batch.
    pub(super) fn take(&mut self, op: WriteOp, ops: &mut Vec<WriteOp>) -> bool {
        if !matches!(op, WriteOp::LinesQueued) {
            self.stats.ops_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        match op {
            WriteOp::LinesQueued => self.queue.has_full_batch(),
            #[cfg(test)]
            WriteOp::PageLimit { pages, reply } => {
                // SQLite's default maximum, to lift the cap.
                if pages.is_none() {
                    // Room again: found at the next commit, not a second later.
                    self.reserve.try_soon();
                }
                let pages = pages.unwrap_or(4_294_967_294);
                if let Err(e) = self
                    .conn
                    .pragma_update(None, "max_page_count", pages as i64)
                {
                    tracing::error!(error = %e, "failed to set max_page_count");
                }
                let _ = reply.send(());
                false
            }
            op if op.lingers() => {
                self.lingering.push(op);
                self.lingering.len() >= MAX_LINGERING
            }
            op => {
                ops.push(op);
                true
            }
        }
    }

    /// Commits the ops in hand with the lines they need and a fair share of
    /// the rest, or, with no op ready, a batch of lines; `everything` takes
    /// every queued line (the last commit). Ops held back stay in `pending`.
    pub(super) fn commit(&mut self, pending: &mut Vec<WriteOp>, everything: bool) {
        self.reserve.try_restore();
        for (id, completion) in self.retained.drain(..) {
            pending.push(WriteOp::Transition {
                id,
                to: completion.status,
                completion: Some(completion),
                reply: None,
                haste: Haste::Now,
                retry: None,
            });
        }
        pending.append(&mut self.lingering);
        // Lines that waited for their workload's creation may come along:
        // they go in right after it (see `attempt`).
        for op in pending.iter() {
            if let WriteOp::Create { new, .. } = op {
                self.queue.unhold(new.id);
            }
        }
        let mut taken = Taken::default();
        let mut ops = Vec::with_capacity(pending.len());
        // With lines alone: the transaction grows, these workloads' backlogs
        // (which hold their terminal status back) first.
        let mut grow: Option<Vec<WorkloadId>> = None;
        if everything || pending.iter().any(|op| matches!(op, WriteOp::Flush { .. })) {
            self.queue.take_all(&mut taken);
            ops.append(pending);
        } else {
            // A terminal status waits while its workload has a backlog.
            let (now, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|op| {
                op.ends()
                    .is_none_or(|id| self.queue.lane_len(id) <= LINES_WITH_OPS)
            });
            (ops, *pending) = (now, later);
            for id in ops.iter().filter_map(WriteOp::ends) {
                self.queue.take_lane(id, &mut taken, usize::MAX);
            }
            // A sync run's first lines go in with its record (the rest of a
            // creation's lane, if any, was taken above with its end).
            for op in &ops {
                if let WriteOp::Create { new, .. } = op {
                    self.queue.take_lane(new.id, &mut taken, LINES_WITH_OPS);
                }
            }
            if ops.is_empty() {
                // Lines alone: the backlogs that hold a terminal status
                // back first, then everyone's, a chunk at a time.
                let draining: Vec<_> = pending.iter().filter_map(WriteOp::ends).collect();
                take_chunk(&self.queue, &draining, self.config.max_batch, &mut taken);
                grow = Some(draining);
            } else if self.ops_in_a_row {
                // Ops keep coming: without a share, the others' lines would
                // wait for a lull. After a commit of lines alone they do not,
                // and an op that waited for that commit is not made to wait
                // for the next chunk's lines as well.
                let share = self.config.max_batch.min(LINES_WITH_OPS);
                self.queue.take_fair(share, &mut taken);
            }
        }
        self.ops_in_a_row = !ops.is_empty();
        if self.reserve.is_full() {
            // Nothing that grows the file: lines fail their workloads, new
            // workloads are refused; ends and the rest still go in.
            if !taken.is_empty() {
                self.queue.failed(std::mem::take(&mut taken), DISK_FULL);
            }
            grow = None;
            let (refused, kept): (Vec<_>, Vec<_>) = ops
                .drain(..)
                .partition(|op| matches!(op, WriteOp::Create { .. }));
            ops = kept;
            for op in refused {
                // Its runner drops its lane when told.
                self.refuse(op, DISK_FULL, true);
            }
        }
        if taken.is_empty() && ops.is_empty() {
            // A wake-up whose lines went out with an earlier commit.
            return;
        }
        let ops = &mut ops;
        let attempt = self.attempt_until_not_busy(Some(&mut taken), ops, grow.as_deref());
        // Whatever joined is answered (or retried) with the transaction's own.
        ops.append(&mut self.joining.joined);
        for op in std::mem::take(&mut self.joining.deferred) {
            self.take(op, pending);
        }
        let error = match attempt {
            Ok(results) => {
                self.usage.apply(&self.delta);
                let commits = self.stats.commits.fetch_add(1, Ordering::Relaxed) + 1;
                if self.dies_at_commit.is_some_and(|n| commits >= n) {
                    panic!("test fault: the store writer dies at commit {commits}");
                }
                (self.stats.lines).fetch_add(taken.len() as u64, Ordering::Relaxed);
                self.queue.committed(taken);
                self.answer(ops, results);
                return;
            }
            Err(e) => e,
        };
        let why = describe(&error);
        if is_full(&error) {
            self.reserve.release();
        }
        if !taken.is_empty() {
            tracing::error!(error = %why, lines = taken.len(), "failed to commit a batch of log lines");
            self.queue.failed(taken, &why);
        }
        if ops.is_empty() {
            return;
        }
        // Without the lines, the ops may still go through (and a terminal status
        // now records the store failure of its workload).
        match self.attempt_until_not_busy(None, ops, None) {
            Ok(results) => {
                self.usage.apply(&self.delta);
                self.answer(ops, results)
            }
            Err(e) => {
                let why = describe(&e);
                tracing::error!(error = %why, ops = ops.len(), "failed to commit database changes");
                let full = is_full(&e);
                for op in ops.drain(..) {
                    self.refuse(op, &why, full);
                }
            }
        }
    }

    /// Tries the transaction until it fails for another reason than a busy database.
    fn attempt_until_not_busy(
        &mut self,
        mut lines: Option<&mut Taken>,
        ops: &[WriteOp],
        grow: Option<&[WorkloadId]>,
    ) -> Result<Vec<StoreResult<Applied>>, rusqlite::Error> {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.attempt(lines.as_deref_mut(), ops, grow) {
                Err(e) if is_busy(&e) => {
                    self.stats.busy_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "the database is busy; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BUSY_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// One transaction: the lines (with `grow`, more of them, a chunk at a
    /// time, up to a batch or until an op waits, the backlogs of the
    /// workloads it names first), then each op; an op's own
    /// refusal (e.g. an illegal transition) is its answer and does not fail
    /// the others. The lines of a workload created by one of `ops` (sent
    /// before that creation committed) go in right after its creation.
    fn attempt(
        &mut self,
        mut lines: Option<&mut Taken>,
        ops: &[WriteOp],
        grow: Option<&[WorkloadId]>,
    ) -> Result<Vec<StoreResult<Applied>>, rusqlite::Error> {
        self.delta.clear();
        let mut fresh = Taken::default();
        if let Some(lines) = lines.as_deref_mut().filter(|l| !l.is_empty()) {
            for op in ops.iter().chain(&self.joining.joined) {
                if let WriteOp::Create { new, .. } = op {
                    fresh.lanes.append(&mut lines.split_workload(new.id).lanes);
                }
            }
        }
        let mut inserted = Taken::default();
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut unknown = 0;
            if let Some(lines) = lines.as_deref_mut() {
                unknown += insert_lines(&tx, lines, &mut self.keys, &mut self.delta)?;
                while let Some(draining) = grow
                    && lines.len() < self.config.max_batch
                {
                    let mut more = Taken::default();
                    if self.stats.ops_waiting.load(Ordering::Acquire) > 0 {
                        // Stop growing; what waits goes in now, with its lines.
                        self.joining
                            .join(&self.queue, &self.stats, &mut more, &mut fresh);
                        unknown += insert_lines(&tx, &more, &mut self.keys, &mut self.delta)?;
                        lines.lanes.append(&mut more.lanes);
                        break;
                    }
                    let room = self.config.max_batch - lines.len();
                    take_chunk(&self.queue, draining, room, &mut more);
                    if more.is_empty() {
                        break;
                    }
                    unknown += insert_lines(&tx, &more, &mut self.keys, &mut self.delta)?;
                    lines.lanes.append(&mut more.lanes);
                }
            }
            let mut results = Vec::with_capacity(ops.len() + self.joining.joined.len());
            for op in ops.iter().chain(&self.joining.joined) {
                let result = apply(
                    &tx,
                    op,
                    &mut self.keys,
                    &self.queue,
                    &mut self.delta,
                    self.checks_modules,
                );
                if let Err(StoreError::StorageFull(_)) = result {
                    // SQLite may have rolled the whole transaction back: it
                    // fails as a whole, and the caller decides what to retry.
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                        None,
                    ));
                }
                if let WriteOp::Create { new, .. } = op
                    && !fresh.lanes.is_empty()
                {
                    // After a refused creation they count as lost, below.
                    let mut theirs = fresh.split_workload(new.id);
                    unknown += insert_lines(&tx, &theirs, &mut self.keys, &mut self.delta)?;
                    inserted.lanes.append(&mut theirs.lanes);
                }
                results.push(result);
            }
            if unknown > 0 {
                self.queue.lost.fetch_add(unknown, Ordering::Relaxed);
                tracing::error!(
                    lines = unknown,
                    "log lines of an unknown workload were not stored"
                );
            }
            tx.commit()?;
            Ok(results)
        })();
        if let Some(lines) = lines {
            // Given back with the rest: committed or failed together.
            lines.lanes.append(&mut fresh.lanes);
            lines.lanes.append(&mut inserted.lanes);
        }
        if result.is_err() {
            // Keys assigned in the rolled-back transaction may be reused.
            self.keys.clear();
        }
        result
    }

    /// Sends each op its result after a successful commit.
    fn answer(&mut self, ops: &mut Vec<WriteOp>, results: Vec<StoreResult<Applied>>) {
        for (op, result) in ops.drain(..).zip(results) {
            match (op, result) {
                // The statement itself hit the fault (e.g. a full disk): keep it.
                (
                    op @ WriteOp::Transition { .. },
                    Err(e @ (StoreError::StorageFull(_) | StoreError::Internal(_))),
                ) if op.ends().is_some() => {
                    let full = matches!(e, StoreError::StorageFull(_));
                    self.refuse(op, &e.to_string(), full);
                }
                (op @ WriteOp::Transition { .. }, r) => {
                    if let Some(id) = op.ends() {
                        // Its last line came before this; closing the lane ends live delivery.
                        self.keys.remove(id);
                        self.queue.close(id);
                    }
                    if let WriteOp::Transition {
                        reply: Some(reply), ..
                    } = op
                    {
                        let _ = reply.send(r.map(|a| match a {
                            Applied::Record(record) => Some(*record),
                            _ => None,
                        }));
                    }
                }
                (
                    WriteOp::PutModule { reply, .. }
                    | WriteOp::OwnModule { reply, .. }
                    | WriteOp::DeleteModule { reply, .. },
                    r,
                ) => {
                    let _ = reply.send(r.map(|a| matches!(a, Applied::Bool(true))));
                }
                (WriteOp::Create { reply, .. }, r) => {
                    let _ = reply.send(r.map(|_| ()));
                }
                (WriteOp::FailUnfinished { reply, .. } | WriteOp::Prune { reply, .. }, r) => {
                    let _ = reply.send(r.map(|a| match a {
                        Applied::Count(n) => n,
                        _ => 0,
                    }));
                }
                (WriteOp::Flush { reply }, _) => {
                    let _ = reply.send(());
                }
                (WriteOp::LinesQueued, _) => {}
                #[cfg(test)]
                (WriteOp::PageLimit { .. }, _) => {}
            }
        }
    }

    /// Answers an op that could not be committed; keeps a terminal status to
    /// write as soon as the store accepts it.
    fn refuse(&mut self, op: WriteOp, why: &str, full: bool) {
        let err = || -> StoreError {
            if full {
                StoreError::StorageFull(why.to_owned())
            } else {
                StoreError::Internal(anyhow::anyhow!("database write failed: {why}"))
            }
        };
        match op {
            // Its lane stays open, so a store failure of its lines is applied
            // again when it is retried.
            // A retry that cannot be recorded is given up: the attempt's
            // failure becomes final rather than leaving it running.
            WriteOp::Transition {
                id,
                to,
                completion: Some(completion),
                reply,
                retry,
                ..
            } if to.is_terminal() || retry.is_some() => {
                self.retained.push((id, completion));
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err()));
                }
            }
            WriteOp::Transition { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err()));
                }
            }
            WriteOp::PutModule { reply, .. }
            | WriteOp::OwnModule { reply, .. }
            | WriteOp::DeleteModule { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::Create { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::FailUnfinished { reply, .. } | WriteOp::Prune { reply, .. } => {
                drop(reply.send(Err(err())))
            }
            WriteOp::Flush { reply } => drop(reply.send(())),
            WriteOp::LinesQueued => {}
            #[cfg(test)]
            WriteOp::PageLimit { reply, .. } => drop(reply.send(())),
        }
    }
}

impl Joining {
    /// Takes the ops waiting now into the transaction in progress: the lines
    /// an ending workload still has go into `ends` (before its status), a new
    /// workload's first lines into `created` (after its creation). A flush or
    /// an end with a backlog waits for a commit of its own.
    fn join(
        &mut self,
        queue: &LineQueue,
        stats: &WriterStats,
        ends: &mut Taken,
        created: &mut Taken,
    ) {
        let Some(inbox) = &self.inbox else { return };
        while let Ok(op) = inbox.try_recv() {
            if matches!(op, WriteOp::LinesQueued) {
                continue;
            }
            let waits = match &op {
                WriteOp::Flush { .. } => true,
                #[cfg(test)]
                WriteOp::PageLimit { .. } => true,
                op => op
                    .ends()
                    .is_some_and(|id| queue.lane_len(id) > LINES_WITH_OPS),
            };
            if waits {
                // Counted off when it is taken for its own commit.
                self.deferred.push(op);
                continue;
            }
            stats.ops_waiting.fetch_sub(1, Ordering::AcqRel);
            match &op {
                WriteOp::Create { new, .. } => {
                    queue.unhold(new.id);
                    queue.take_lane(new.id, created, LINES_WITH_OPS);
                }
                op => {
                    if let Some(id) = op.ends() {
                        // Created in this transaction too: its lines can
                        // only go in after its creation.
                        let created_here = self
                            .joined
                            .iter()
                            .any(|j| matches!(j, WriteOp::Create { new, .. } if new.id == id));
                        let into = if created_here {
                            &mut *created
                        } else {
                            &mut *ends
                        };
                        queue.take_lane(id, into, usize::MAX);
                    }
                }
            }
            self.joined.push(op);
        }
    }
}

/// The next chunk of a transaction of lines alone, at most `room` lines:
/// the `draining` workloads' first, then a fair share of everyone's.
fn take_chunk(queue: &LineQueue, draining: &[WorkloadId], room: usize, into: &mut Taken) {
    let mut room = room.min(LINES_PER_CHUNK);
    for &id in draining {
        room -= queue.take_lane(id, into, room);
    }
    if room > 0 {
        queue.take_fair(room, into);
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// A failure as the workloads it ends will report it.
fn describe(e: &rusqlite::Error) -> String {
    if is_full(e) {
        "the database or disk is full".to_owned()
    } else {
        e.to_string()
    }
}
