//! The two places a workload's records go, as traits the pipeline defines and
//! other stages implement: the store implements [`LineSink`] (durable, bounded),
//! the broker implements [`LivePublisher`] (live followers). Keeping them here
//! is what lets `logs` know nothing of SQLite, and where a cluster publisher
//! plugs in.

use std::sync::Arc;
use std::task::{Context, Poll};

use super::LogRecord;

/// Where a [`super::LogWriter`] hands each numbered record to be kept.
///
/// Bounded: a sink says when it has room, and the guest's output waits for it
/// before writing, so memory stays bounded however fast a guest writes.
pub trait LineSink: Send + Sync {
    /// Queues one record; never waits (callers wait for room before writing).
    fn send(&self, record: Arc<LogRecord>);
    /// True when the sink can take more of this workload's records now.
    fn has_room(&self) -> bool;
    /// Ready once the sink can take more (or can never again: see [`LineSink::failure`]).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()>;
    /// Why this workload's records can no longer be kept, once that happened.
    fn failure(&self) -> Option<String>;
}

/// Where records go live once they are kept; dropping it ends live delivery.
pub trait LivePublisher: Send + Sync {
    /// Hands one kept record to whoever follows its workload now.
    fn publish(&self, record: &Arc<LogRecord>);
}

/// Two sinks that must both keep every record (a node's store and the
/// cluster's copy): a record is sent to both, and there is room only when
/// both have it, so the slower one bounds the guest.
pub struct SinkPair<A, B>(pub A, pub B);

impl<A: LineSink, B: LineSink> LineSink for SinkPair<A, B> {
    fn send(&self, record: Arc<LogRecord>) {
        self.0.send(Arc::clone(&record));
        self.1.send(record);
    }

    fn has_room(&self) -> bool {
        self.0.has_room() && self.1.has_room()
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self.0.poll_room(cx) {
            Poll::Ready(()) => self.1.poll_room(cx),
            Poll::Pending => Poll::Pending,
        }
    }

    fn failure(&self) -> Option<String> {
        self.0.failure().or_else(|| self.1.failure())
    }
}

impl<T: LineSink + ?Sized> LineSink for Arc<T> {
    fn send(&self, record: Arc<LogRecord>) {
        (**self).send(record)
    }

    fn has_room(&self) -> bool {
        (**self).has_room()
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        (**self).poll_room(cx)
    }

    fn failure(&self) -> Option<String> {
        (**self).failure()
    }
}
