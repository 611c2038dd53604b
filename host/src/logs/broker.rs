//! Live fan-out of log records to the clients following a workload.
//!
//! A map from workload to a bounded `tokio::sync::broadcast` channel behind a std
//! `Mutex`; nothing awaits while holding it. The channel is made by the first
//! subscriber, so a workload nobody follows costs no buffer. The broker holds
//! the only strong sender, so [`LogBroker::close`] ends every subscriber's
//! stream at once; the [`LogPublisher`] holds a weak one and closes the
//! channel when dropped, so nothing outlives its workload.
//!
//! History is not kept here: a late subscriber sees only later lines, and a
//! subscriber that falls more than the channel capacity behind gets
//! [`BrokerEvent::Lagged`] and is expected to catch up from the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{Notify, broadcast};

use super::LogRecord;
use crate::workload::WorkloadId;

/// Records buffered per workload for its slowest subscriber, by default.
pub const DEFAULT_CAPACITY: usize = 16 * 1024;

type Channel = broadcast::Sender<Arc<LogRecord>>;

/// Where a publisher finds its channel once a subscriber has made it.
type ChannelSlot = Arc<OnceLock<broadcast::WeakSender<Arc<LogRecord>>>>;

/// One live workload: its channel, once someone follows it.
struct Live {
    tx: Option<Channel>,
    slot: ChannelSlot,
}

/// Routes each workload's records to its live subscribers.
#[derive(Clone)]
pub struct LogBroker {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    channels: Mutex<HashMap<WorkloadId, Live>>,
    /// Followers of workloads that are not live (queued, or between two
    /// attempts), woken when their workload's channel opens or closes.
    watched: Mutex<HashMap<WorkloadId, Arc<Notify>>>,
    /// How many watches are open: with none (the common case) an open or
    /// close does not take the lock above.
    watches: std::sync::atomic::AtomicUsize,
}

impl Default for LogBroker {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl LogBroker {
    /// A broker whose subscribers may fall `capacity` records behind before lagging.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                channels: Mutex::new(HashMap::new()),
                watched: Mutex::new(HashMap::new()),
                watches: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// Opens the channel of a starting workload and returns its only publisher.
    pub fn open(&self, workload: WorkloadId) -> LogPublisher {
        let slot = ChannelSlot::default();
        let live = Live {
            tx: None,
            slot: Arc::clone(&slot),
        };
        self.lock().insert(workload, live);
        self.touch(workload);
        LogPublisher {
            workload,
            tx: slot,
            broker: self.clone(),
        }
    }

    /// Follows a workload's future records, or `None` when it is not live.
    pub fn subscribe(&self, workload: WorkloadId) -> Option<LogSubscription> {
        let capacity = self.inner.capacity;
        let mut channels = self.lock();
        let Live { tx, slot } = channels.get_mut(&workload)?;
        let tx = tx.get_or_insert_with(|| {
            let (tx, _) = broadcast::channel(capacity);
            let _ = slot.set(tx.downgrade());
            tx
        });
        Some(LogSubscription { rx: tx.subscribe() })
    }

    /// Ends every subscriber's stream for this workload.
    pub fn close(&self, workload: WorkloadId) {
        self.lock().remove(&workload);
        self.touch(workload);
    }

    /// Wakes whoever watches `workload` (see [`LogBroker::watch`]): its
    /// channel opened or closed, or it ended without one (never started).
    pub fn touch(&self, workload: WorkloadId) {
        // SeqCst pairs with `watch`: a watch counted after this load enables
        // its wait only after, and then subscribes, so it sees this change.
        if self.inner.watches.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(watch) = self.watched().get(&workload) {
            watch.notify_waiters();
        }
    }

    /// Watches for `workload`'s channel to open or close.
    pub fn watch(&self, workload: WorkloadId) -> ChannelWatch {
        (self.inner.watches).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let notify = Arc::clone(self.watched().entry(workload).or_default());
        ChannelWatch {
            workload,
            notify,
            broker: self.clone(),
        }
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<WorkloadId, Arc<Notify>>> {
        // Single inserts and removes: poison leaves nothing half-done.
        (self.inner.watched.lock()).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Workloads with an open channel (`/metrics`, and leak checks).
    pub fn open_channels(&self) -> usize {
        self.lock().len()
    }

    /// Live subscribers of one workload.
    #[cfg(test)]
    pub fn subscriber_count(&self, workload: WorkloadId) -> usize {
        self.lock()
            .get(&workload)
            .and_then(|live| live.tx.as_ref())
            .map_or(0, |tx| tx.receiver_count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkloadId, Live>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert/remove/get), so poison is ignored.
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The sending side of one workload's channel; closes it when dropped.
pub struct LogPublisher {
    workload: WorkloadId,
    tx: ChannelSlot,
    broker: LogBroker,
}

impl super::LivePublisher for LogPublisher {
    /// Sends a record to current subscribers; cheap when there are none.
    fn publish(&self, record: &Arc<LogRecord>) {
        if let Some(tx) = self.tx.get().and_then(|weak| weak.upgrade())
            && tx.receiver_count() > 0
        {
            // An error only means every subscriber left in the meantime.
            let _ = tx.send(Arc::clone(record));
        }
    }
}

impl Drop for LogPublisher {
    fn drop(&mut self) {
        self.broker.close(self.workload);
    }
}

/// A follower's watch on one workload's channel (see [`LogBroker::watch`]).
pub struct ChannelWatch {
    workload: WorkloadId,
    notify: Arc<Notify>,
    broker: LogBroker,
}

impl ChannelWatch {
    /// Resolves at the next open, close or [`LogBroker::touch`] after it
    /// was enabled (or first polled).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for ChannelWatch {
    fn drop(&mut self) {
        (self.broker.inner.watches).fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let mut watched = self.broker.watched();
        // The map's and this one's: nobody else watches it.
        if Arc::strong_count(&self.notify) <= 2 {
            watched.remove(&self.workload);
        }
    }
}

/// What a subscriber receives next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// The next live record.
    Line(Arc<LogRecord>),
    /// This many records were dropped because the subscriber was too slow; read
    /// them from the store, then carry on.
    Lagged(u64),
}

/// One client's view of a workload's live records.
pub struct LogSubscription {
    rx: broadcast::Receiver<Arc<LogRecord>>,
}

/// What [`LogSubscription::try_recv`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryNext {
    /// An event was ready.
    Event(BrokerEvent),
    /// Nothing is ready yet.
    Empty,
    /// The workload's channel is closed.
    Closed,
}

impl LogSubscription {
    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> TryNext {
        use broadcast::error::TryRecvError;
        match self.rx.try_recv() {
            Ok(record) => TryNext::Event(BrokerEvent::Line(record)),
            Err(TryRecvError::Lagged(n)) => TryNext::Event(BrokerEvent::Lagged(n)),
            Err(TryRecvError::Empty) => TryNext::Empty,
            Err(TryRecvError::Closed) => TryNext::Closed,
        }
    }

    /// The next event, or `None` once the workload's channel is closed.
    pub async fn recv(&mut self) -> Option<BrokerEvent> {
        match self.rx.recv().await {
            Ok(record) => Some(BrokerEvent::Line(record)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(BrokerEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::{LivePublisher, LogStream};

    fn record(workload: WorkloadId, seq: u64) -> Arc<LogRecord> {
        Arc::new(LogRecord {
            workload_id: workload,
            seq,
            stream: LogStream::Stdout,
            level: None,
            line: format!("line {seq}"),
            continued: false,
            ts_ms: 0,
            fields: Default::default(),
        })
    }

    async fn seqs(sub: &mut LogSubscription) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(event) = sub.recv().await {
            match event {
                BrokerEvent::Line(r) => out.push(r.seq),
                BrokerEvent::Lagged(n) => panic!("unexpected lag of {n}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn one_subscriber_gets_every_record_in_order_then_the_end() {
        let broker = LogBroker::default();
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        let mut sub = broker.subscribe(id).expect("live");
        for seq in 0..10 {
            publisher.publish(&record(id, seq));
        }
        drop(publisher);
        assert_eq!(seqs(&mut sub).await, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn many_subscribers_each_get_everything() {
        let broker = LogBroker::default();
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        let mut subs: Vec<_> = (0..5).map(|_| broker.subscribe(id).unwrap()).collect();
        assert_eq!(broker.subscriber_count(id), 5);
        for seq in 0..100 {
            publisher.publish(&record(id, seq));
        }
        drop(publisher);
        for sub in &mut subs {
            assert_eq!(seqs(sub).await, (0..100).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn late_subscriber_sees_only_later_records() {
        let broker = LogBroker::default();
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        publisher.publish(&record(id, 0));
        publisher.publish(&record(id, 1));
        let mut late = broker.subscribe(id).unwrap();
        publisher.publish(&record(id, 2));
        drop(publisher);
        assert_eq!(seqs(&mut late).await, vec![2]);
    }

    #[tokio::test]
    async fn slow_subscriber_is_told_it_lagged_and_does_not_block_others() {
        let broker = LogBroker::new(4);
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        let mut slow = broker.subscribe(id).unwrap();
        let mut fast = broker.subscribe(id).unwrap();
        let mut fast_seen = Vec::new();
        for seq in 0..10 {
            // Publishing never waits for the slow subscriber.
            publisher.publish(&record(id, seq));
            if let Some(BrokerEvent::Line(r)) = fast.recv().await {
                fast_seen.push(r.seq);
            }
        }
        drop(publisher);
        assert_eq!(fast_seen, (0..10).collect::<Vec<_>>());
        assert_eq!(slow.recv().await, Some(BrokerEvent::Lagged(6)));
        let rest: Vec<u64> = {
            let mut v = Vec::new();
            while let Some(BrokerEvent::Line(r)) = slow.recv().await {
                v.push(r.seq);
            }
            v
        };
        assert_eq!(rest, vec![6, 7, 8, 9], "after the lag, the newest records");
    }

    #[tokio::test]
    async fn close_ends_every_stream_even_while_the_publisher_lives() {
        let broker = LogBroker::default();
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        let mut a = broker.subscribe(id).unwrap();
        let mut b = broker.subscribe(id).unwrap();
        publisher.publish(&record(id, 0));
        broker.close(id);
        assert!(matches!(a.recv().await, Some(BrokerEvent::Line(_))));
        assert_eq!(a.recv().await, None);
        assert!(matches!(b.recv().await, Some(BrokerEvent::Line(_))));
        assert_eq!(b.recv().await, None);
        // Publishing after close is a no-op, not a panic.
        publisher.publish(&record(id, 1));
        assert!(broker.subscribe(id).is_none());
    }

    #[tokio::test]
    async fn nothing_leaks_after_close_or_unsubscribe() {
        let broker = LogBroker::default();
        let ids: Vec<_> = (0..50).map(|_| WorkloadId::new()).collect();
        let publishers: Vec<_> = ids.iter().map(|&id| broker.open(id)).collect();
        assert_eq!(broker.open_channels(), 50);
        let sub = broker.subscribe(ids[0]).unwrap();
        assert_eq!(broker.subscriber_count(ids[0]), 1);
        drop(sub);
        assert_eq!(broker.subscriber_count(ids[0]), 0);
        drop(publishers);
        assert_eq!(broker.open_channels(), 0);
    }

    #[tokio::test]
    async fn publishing_without_subscribers_is_fine() {
        let broker = LogBroker::default();
        let id = WorkloadId::new();
        let publisher = broker.open(id);
        for seq in 0..10_000 {
            publisher.publish(&record(id, seq));
        }
        drop(publisher);
        assert!(broker.subscribe(id).is_none());
    }
}
