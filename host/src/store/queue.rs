//! Lines waiting for the writer's next commit: one lane per workload, bounded.
//!
//! A guest writes faster than SQLite commits only for as long as its lane has
//! room: each lane holds at most `lane_bytes` of lines and all lanes together
//! `total_bytes` (a line costs its length, with any fields, plus [`LINE_OVERHEAD`]), and a guest
//! whose lane is full is made to wait in [`LineLane`]'s `poll_room` until the
//! writer has committed some of it. Room is given back only after the commit, so
//! the bound covers every line the process holds for the store. The writer takes
//! lines lane by lane ([`LineQueue::take_fair`]), so one flooding workload never
//! delays another workload's lines or a lifecycle change by more than one batch.
//!
//! Owns no SQL: the writer decides what to commit and reports back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::task::{Context, Poll, Waker};

use super::write_op::WriteOp;
use crate::logs::{LineSink, LivePublisher, LogRecord};
use crate::workload::WorkloadId;

/// What a queued line is counted as beyond its text: the record, its `Arc` and
/// the allocator's share, so that a flood of empty lines is bounded too.
pub const LINE_OVERHEAD: usize = 96;

/// What a field of a `log` record is counted as beyond its key and value.
const FIELD_OVERHEAD: usize = 48;

/// The cost of one record against the queue's bounds.
fn cost(record: &LogRecord) -> usize {
    // A log record's fields are held too (two strings each, hence the
    // overhead per field): a guest must not get past the bound by putting its
    // bytes there.
    let fields = record.fields.bytes() + record.fields.0.len() * FIELD_OVERHEAD;
    record.line.len() + fields + LINE_OVERHEAD
}

/// One workload's lines and what it shares with its guest.
struct Lane {
    lines: Vec<Arc<LogRecord>>,
    /// Its record's creation is not in hand yet: the writer takes none of
    /// its lines (they would name an unknown workload), and they are not
    /// counted in the queue's lines.
    held: bool,
    budget: Arc<LaneBudget>,
    /// Committed lines are published here; dropped (closing the workload's
    /// live channel) when the lane closes with the terminal status.
    live: Option<Arc<dyn LivePublisher>>,
}

/// The part of a lane its guest's writer reads without the queue's lock.
#[derive(Default)]
pub(super) struct LaneBudget {
    /// Cost of this workload's lines queued or being committed.
    queued: AtomicUsize,
    /// Why this workload's lines can no longer be stored, once that
    /// happened, and how many of its lines were stored before (its stored
    /// lines are always the prefix `0..stored`).
    failed: OnceLock<(String, u64)>,
}

#[derive(Default)]
struct QueueState {
    lanes: HashMap<WorkloadId, Lane>,
    /// Lines in all lanes, for the writer's wake-ups.
    lines: usize,
}

/// Every lane, and the guests waiting for room.
pub(super) struct LineQueue {
    state: Mutex<QueueState>,
    /// Cost of all lines queued or being committed.
    total: AtomicUsize,
    lane_bytes: usize,
    total_bytes: usize,
    /// Lines that make a full batch: the writer is woken when they are queued.
    full: usize,
    waiters: Mutex<Vec<Waker>>,
    /// Lines that could not be stored (unknown workload, closed lane, failed store).
    pub(super) lost: AtomicU64,
}

/// Lines the writer took for one commit, lane by lane.
#[derive(Default)]
pub(super) struct Taken {
    pub(super) lanes: Vec<TakenLane>,
}

/// One lane's share of a commit.
pub(super) struct TakenLane {
    pub(super) workload: WorkloadId,
    pub(super) lines: Vec<Arc<LogRecord>>,
    cost: usize,
    budget: Arc<LaneBudget>,
    live: Option<Arc<dyn LivePublisher>>,
}

impl Taken {
    /// True when no line was taken.
    pub(super) fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| l.lines.is_empty())
    }

    /// How many lines were taken.
    pub(super) fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.lines.len()).sum()
    }

    /// Moves `workload`'s lines out into a `Taken` of their own.
    pub(super) fn split_workload(&mut self, workload: WorkloadId) -> Taken {
        let (theirs, rest) = std::mem::take(&mut self.lanes)
            .into_iter()
            .partition(|l| l.workload == workload);
        self.lanes = rest;
        Taken { lanes: theirs }
    }
}

impl LineQueue {
    pub(super) fn new(lane_bytes: usize, total_bytes: usize, full: usize) -> Self {
        Self {
            state: Mutex::default(),
            total: AtomicUsize::new(0),
            lane_bytes: lane_bytes.max(1),
            total_bytes: total_bytes.max(1),
            full: full.max(1),
            waiters: Mutex::default(),
            lost: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // Every update below is complete before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a workload's lane; lines committed from it go to `live`. A
    /// `held` lane gives the writer nothing until [`LineQueue::unhold`].
    pub(super) fn open(
        &self,
        workload: WorkloadId,
        live: Option<Box<dyn LivePublisher>>,
        held: bool,
    ) -> Arc<LaneBudget> {
        let budget = Arc::new(LaneBudget::default());
        self.lock().lanes.insert(
            workload,
            Lane {
                lines: Vec::new(),
                held,
                budget: Arc::clone(&budget),
                live: live.map(Arc::from),
            },
        );
        budget
    }

    /// Lets the writer take a held lane's lines: its workload's creation is
    /// in the transaction being built, ahead of any line.
    pub(super) fn unhold(&self, workload: WorkloadId) {
        let mut state = self.lock();
        let QueueState { lanes, lines } = &mut *state;
        if let Some(lane) = lanes.get_mut(&workload)
            && lane.held
        {
            lane.held = false;
            *lines += lane.lines.len();
        }
    }

    /// Closes a lane once its terminal status is committed; lines still in it
    /// (there are none when the runner ends a workload normally) are lost.
    pub(super) fn close(&self, workload: WorkloadId) {
        let lane = {
            let mut state = self.lock();
            let lane = state.lanes.remove(&workload);
            if let Some(lane) = &lane
                && !lane.held
            {
                state.lines -= lane.lines.len();
            }
            lane
        };
        if let Some(lane) = lane {
            if !lane.lines.is_empty() {
                self.lost
                    .fetch_add(lane.lines.len() as u64, Ordering::Relaxed);
                tracing::error!(workload = %workload, lines = lane.lines.len(),
                    "log lines arrived after the workload's end and were not stored");
            }
            let cost: usize = lane.lines.iter().map(|r| cost(r)).sum();
            self.release(&lane.budget, cost);
        }
    }

    /// Why a workload's lines could not be stored, if they could not, and
    /// how many were stored before.
    pub(super) fn failure(&self, workload: WorkloadId) -> Option<(String, u64)> {
        self.lock()
            .lanes
            .get(&workload)
            .and_then(|l| l.budget.failed.get().cloned())
    }

    /// Takes up to `max` of one workload's lines, oldest first; how many.
    pub(super) fn take_lane(&self, workload: WorkloadId, into: &mut Taken, max: usize) -> usize {
        let mut state = self.lock();
        let QueueState { lanes, lines } = &mut *state;
        match lanes.get_mut(&workload) {
            Some(lane) if !lane.held && !lane.lines.is_empty() && max > 0 => {
                let taken = take(workload, lane, max);
                let n = taken.lines.len();
                *lines -= n;
                into.lanes.push(taken);
                n
            }
            _ => 0,
        }
    }

    /// Lines one workload has waiting.
    pub(super) fn lane_len(&self, workload: WorkloadId) -> usize {
        self.lock()
            .lanes
            .get(&workload)
            .filter(|l| !l.held)
            .map_or(0, |l| l.lines.len())
    }

    /// Takes every queued line (none of a held lane).
    pub(super) fn take_all(&self, into: &mut Taken) {
        let mut state = self.lock();
        for (&workload, lane) in &mut state.lanes {
            if !lane.held && !lane.lines.is_empty() {
                into.lanes.push(take(workload, lane, usize::MAX));
            }
        }
        state.lines = 0;
    }

    /// Takes about `max` lines, an equal share from each lane that has some, so
    /// a lane with a backlog cannot crowd out the others.
    pub(super) fn take_fair(&self, max: usize, into: &mut Taken) {
        let mut state = self.lock();
        let QueueState { lanes, lines } = &mut *state;
        let ready = |l: &Lane| !l.held && !l.lines.is_empty();
        let busy = lanes.values().filter(|l| ready(l)).count();
        if busy == 0 {
            return;
        }
        let share = (max / busy).max(64);
        for (&workload, lane) in lanes.iter_mut() {
            if ready(lane) {
                let taken = take(workload, lane, share);
                *lines -= taken.lines.len();
                into.lanes.push(taken);
            }
        }
    }

    /// Lines waiting in all lanes.
    pub(super) fn lines(&self) -> usize {
        self.lock().lines
    }

    /// True when the queue holds a full batch.
    pub(super) fn has_full_batch(&self) -> bool {
        self.lock().lines >= self.full
    }

    /// After a commit: publishes the committed lines to live followers and gives
    /// their room back to the guests.
    pub(super) fn committed(&self, taken: Taken) {
        for lane in taken.lanes {
            if let Some(live) = &lane.live {
                for record in &lane.lines {
                    live.publish(record);
                }
            }
            self.release(&lane.budget, lane.cost);
        }
    }

    /// After a commit that failed for good (or lines refused on a full
    /// disk): these lines are lost, and their workloads fail with `why`
    /// (they cannot complete with a partial log). Their later lines, queued
    /// or still to come, are dropped too, so that what is stored of each is
    /// a prefix.
    pub(super) fn failed(&self, taken: Taken, why: &str) {
        let mut first_lost: HashMap<WorkloadId, u64> = HashMap::new();
        for lane in &taken.lanes {
            if let Some(seq) = lane.lines.iter().map(|r| r.seq).min() {
                let first = first_lost.entry(lane.workload).or_insert(seq);
                *first = (*first).min(seq);
            }
        }
        for lane in taken.lanes {
            if lane.lines.is_empty() {
                continue;
            }
            self.lost
                .fetch_add(lane.lines.len() as u64, Ordering::Relaxed);
            if let Some(stored) = first_lost.remove(&lane.workload) {
                let _ = lane.budget.failed.set((why.to_owned(), stored));
                tracing::error!(workload = %lane.workload, stored, error = why,
                    "failed to store log lines; the workload fails");
                self.drop_queued(lane.workload);
            }
            self.release(&lane.budget, lane.cost);
        }
    }

    /// Drops the lines a workload whose lines failed still has queued.
    fn drop_queued(&self, workload: WorkloadId) {
        let dropped = {
            let mut state = self.lock();
            let QueueState { lanes, lines } = &mut *state;
            let Some(lane) = lanes.get_mut(&workload) else {
                return;
            };
            if !lane.held {
                *lines -= lane.lines.len();
            }
            (std::mem::take(&mut lane.lines), Arc::clone(&lane.budget))
        };
        let (records, budget) = dropped;
        if records.is_empty() {
            return;
        }
        self.lost.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.release(&budget, records.iter().map(|r| cost(r)).sum());
    }

    fn release(&self, budget: &LaneBudget, cost: usize) {
        if cost == 0 {
            return;
        }
        budget.queued.fetch_sub(cost, Ordering::AcqRel);
        self.total.fetch_sub(cost, Ordering::AcqRel);
        // Taken under the waiters' lock: a guest that checked for room before
        // this release has registered its waker by now and is woken.
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiters {
            waker.wake();
        }
    }

    fn has_room(&self, budget: &LaneBudget) -> bool {
        budget.queued.load(Ordering::Acquire) < self.lane_bytes
            && self.total.load(Ordering::Acquire) < self.total_bytes
    }
}

fn take(workload: WorkloadId, lane: &mut Lane, max: usize) -> TakenLane {
    let lines: Vec<_> = if lane.lines.len() <= max {
        std::mem::take(&mut lane.lines)
    } else {
        lane.lines.drain(..max).collect()
    };
    TakenLane {
        workload,
        cost: lines.iter().map(|r| cost(r)).sum(),
        lines,
        budget: Arc::clone(&lane.budget),
        live: lane.live.clone(),
    }
}

/// One workload's lane, as the [`LineSink`] its `LogWriter` feeds: the store
/// commits its lines in batches and only then publishes them to live followers.
pub struct LineLane {
    workload: WorkloadId,
    budget: Arc<LaneBudget>,
    queue: Arc<LineQueue>,
    tx: mpsc::Sender<WriteOp>,
}

impl LineLane {
    pub(super) fn new(
        workload: WorkloadId,
        live: Option<Box<dyn LivePublisher>>,
        queue: Arc<LineQueue>,
        tx: mpsc::Sender<WriteOp>,
        held: bool,
    ) -> Self {
        Self {
            workload,
            budget: queue.open(workload, live, held),
            queue,
            tx,
        }
    }

    /// Waits until this workload may write more.
    #[cfg(test)]
    pub async fn room(&self) {
        std::future::poll_fn(|cx| self.poll_room(cx)).await
    }
}

impl LineSink for LineLane {
    /// Queues one line. Never waits: a guest waits for room before it writes
    /// ([`LineSink::poll_room`]), so a single write can overshoot a full lane
    /// by at most one write's lines.
    fn send(&self, record: Arc<LogRecord>) {
        let c = cost(&record);
        let queued = {
            let mut state = self.queue.lock();
            // Checked under the lock that `failed` drops queued lines under:
            // no line of a failed workload is queued after that.
            if self.budget.failed.get().is_some() {
                drop(state);
                self.queue.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let QueueState { lanes, lines } = &mut *state;
            let Some(lane) = lanes.get_mut(&self.workload) else {
                drop(state);
                self.queue.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(workload = %self.workload, "a log line arrived after its workload ended");
                return;
            };
            // Counted before the writer can take the line and give its room back.
            self.budget.queued.fetch_add(c, Ordering::AcqRel);
            self.queue.total.fetch_add(c, Ordering::AcqRel);
            lane.lines.push(record);
            if lane.held {
                // The creation the writer waits for brings these along.
                return;
            }
            *lines += 1;
            *lines
        };
        if queued == 1 || queued == self.queue.full {
            // Fails only after the writer thread is gone, which the writer logs itself.
            let _ = self.tx.send(WriteOp::LinesQueued);
        }
    }

    /// True when this workload may write more now.
    fn has_room(&self) -> bool {
        self.queue.has_room(&self.budget)
    }

    /// Ready once this workload may write more (at once if it may, or if its
    /// lines can no longer be stored: the write then reports that).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_room() || self.budget.failed.get().is_some() {
            return Poll::Ready(());
        }
        let mut waiters = self.queue.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock that `release` takes after freeing room.
        if self.has_room() {
            return Poll::Ready(());
        }
        waiters.push(cx.waker().clone());
        Poll::Pending
    }

    /// Why this workload's lines can no longer be stored, once that happened.
    fn failure(&self) -> Option<String> {
        self.budget.failed.get().map(|(why, _)| why.clone())
    }
}
