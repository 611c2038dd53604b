//! The lines of a workload running here, waiting to be published: bounded
//! in bytes (the guest waits when it is full), handed out a batch at a
//! time, and closed when the workload ends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::logs::{LineSink, LogRecord};
use crate::workload::WorkloadId;

use super::*;

/// One workload's lines on their way to the cluster.
pub struct ClusterLines {
    pub(in crate::cluster) id: WorkloadId,
    pub(in crate::cluster) state: Mutex<Lines>,
    pub(in crate::cluster) more: Notify,
    /// Told once, when the lines outgrow [`INLINE_BYTES`] (not on every line).
    pub(in crate::cluster) beyond_inline: Notify,
}

#[derive(Default)]
pub(in crate::cluster) struct Lines {
    pub(in crate::cluster) waiting: VecDeque<Arc<LogRecord>>,
    pub(in crate::cluster) bytes: usize,
    pub(in crate::cluster) closed: bool,
    /// Closed by [`ClusterLines::close_unlisted`].
    pub(in crate::cluster) unlisted: bool,
    pub(in crate::cluster) failure: Option<String>,
    pub(in crate::cluster) room: Vec<Waker>,
}

pub(in crate::cluster) fn cost(r: &LogRecord) -> usize {
    r.line.len() + 64
}

impl ClusterLines {
    /// An empty buffer for `id`.
    pub fn new(id: WorkloadId) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(Lines::default()),
            more: Notify::new(),
            beyond_inline: Notify::new(),
        })
    }

    pub(in crate::cluster) fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more records will come: the publisher ends once it has sent them.
    pub fn close(&self) {
        self.lock().closed = true;
        self.more.notify_one();
    }

    /// As [`ClusterLines::close`], for a workload nobody else knows of yet:
    /// if none of its lines has been published and they are few, the
    /// publisher hands them back to travel inside its final record.
    pub fn close_unlisted(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            state.unlisted = true;
        }
        self.more.notify_one();
    }

    /// True when the lines may go inside the final record.
    pub(in crate::cluster) fn may_inline(&self) -> bool {
        let state = self.lock();
        state.unlisted && state.failure.is_none()
    }

    /// Resolves once more lines have come than a record carries inside it
    /// (see [`INLINE_BYTES`]), or the lines failed.
    pub(in crate::cluster) async fn until_beyond_inline(&self) {
        loop {
            let beyond = self.beyond_inline.notified();
            {
                let state = self.lock();
                if state.bytes > INLINE_BYTES || state.failure.is_some() {
                    return;
                }
            }
            beyond.await;
        }
    }

    /// Resolves once the lines are closed.
    pub(in crate::cluster) async fn until_closed(&self) {
        loop {
            let more = self.more.notified();
            if self.lock().closed {
                return;
            }
            more.await;
        }
    }

    pub(in crate::cluster) fn fail(&self, why: String) {
        let wakers = {
            let mut state = self.lock();
            state.failure.get_or_insert(why);
            std::mem::take(&mut state.room)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Marks the lines as no longer kept: the workload was taken over.
    pub(in crate::cluster) fn fenced(&self) -> Fenced {
        self.fail(format!(
            "workload {} was taken over by the cluster (its node was presumed lost); its \
             further lines are not kept",
            self.id
        ));
        Fenced
    }

    /// The batch at the front (not removed until it is stored).
    pub(in crate::cluster) fn front(&self) -> Option<Vec<Arc<LogRecord>>> {
        let state = self.lock();
        let mut size = 0;
        let batch: Vec<_> = state
            .waiting
            .iter()
            .take_while(|r| {
                size += cost(r);
                size <= BATCH_BYTES || size == cost(r)
            })
            .cloned()
            .collect();
        (!batch.is_empty()).then_some(batch)
    }

    pub(in crate::cluster) fn stored(&self, n: usize) {
        let wakers = {
            let mut state = self.lock();
            for r in state.waiting.drain(..n).collect::<Vec<_>>() {
                state.bytes -= cost(&r);
            }
            match state.bytes < BUFFER_BYTES {
                true => std::mem::take(&mut state.room),
                false => Vec::new(),
            }
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl LineSink for ClusterLines {
    fn send(&self, record: Arc<LogRecord>) {
        {
            let mut state = self.lock();
            if state.failure.is_some() {
                // Nobody publishes them any more.
                return;
            }
            let before = state.bytes;
            state.bytes += cost(&record);
            state.waiting.push_back(record);
            if before <= INLINE_BYTES && state.bytes > INLINE_BYTES {
                self.beyond_inline.notify_one();
            }
        }
        self.more.notify_one();
    }

    fn has_room(&self) -> bool {
        let state = self.lock();
        state.failure.is_some() || state.bytes < BUFFER_BYTES
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.lock();
        if state.failure.is_some() || state.bytes < BUFFER_BYTES {
            return Poll::Ready(());
        }
        if !state.room.iter().any(|w| w.will_wake(cx.waker())) {
            state.room.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }
}

/// The workload moved on without this node (it was failed over): its lines
/// must not be appended, nor its record written.
#[derive(Debug)]
pub struct Fenced;

/// What a finished publisher stored.
pub struct Published {
    /// The subject's last stream sequence (what the end marker expects).
    pub sequence: u64,
    /// Lines stored (the seq after the last one).
    pub lines: u64,
    /// The lines, encoded, when they were not published but go inside the
    /// final record (see [`ClusterLines::close_unlisted`]).
    pub inline: Option<Bytes>,
}
