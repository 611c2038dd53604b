//! Following a workload's log: every stored line after the follower's
//! position, then each line as it is committed, then the end with the final
//! record — on one node from its store and broker, on a cluster from the
//! cluster's copy of the log — encoded by the edge's [`LineEncoding`].
//!
//! Lines are published live only after they are committed, in seq order, so
//! every line a follower sees is durable, and the hand-over from stored to live
//! lines never loses or repeats one:
//! 1. subscribe to the broker first, so nothing published from now on is missed;
//! 2. replay every stored line after the client's position (everything
//!    published before we subscribed is stored);
//! 3. forward live records, skipping seqs already sent; when a live record is
//!    ahead of the next expected seq (published before we subscribed, or after
//!    a lag), the lines in between are already stored: fill the gap from there;
//! 4. when the channel closes, the terminal status is committed: send what is
//!    left in the store, then `end` with the final record.
//!
//! Events are encoded into a buffer that goes out as one chunk when it is
//! full or when no further record is ready, so a flood costs one write per
//! batch rather than per line, and a quiet workload's line still goes out at
//! once. A follower's memory is bounded in bytes: a replayed page stops at
//! [`CHUNK`] bytes of encoded events, at most [`QUEUED_CHUNKS`] chunks wait
//! for the client, and at most [`CONCURRENT_REPLAYS`] pages are read from the
//! store at once on the node. Followers themselves are capped per node
//! (`--max-followers`, 503 `busy` beyond) and per tenant (`max_followers`,
//! 429 `quota_exceeded` beyond).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Backend, Caller, Service, ServiceError as ApiError};
use crate::cluster::{Cluster, LogChunk};
use crate::logs::{BrokerEvent, LogRecord, TryNext};
use crate::node::Node;
use crate::view::WorkloadView;
use crate::workload::WorkloadId;

/// How a follower's events are written (the edge's wire format).
pub trait LineEncoding: Copy + Send + Sync + 'static {
    /// Appends one line as an event.
    fn line(self, buf: &mut BytesMut, r: &LogRecord);
    /// Appends the end event, with the final record as JSON.
    fn end(self, buf: &mut BytesMut, record: &str);
    /// Appends an error event (the stream is cut), with the error as JSON.
    fn error(self, buf: &mut BytesMut, error: &str);
    /// Appends a keep-alive.
    fn keep_alive(self, buf: &mut BytesMut);
}

/// Lines read from the store per query while replaying (a page also stops
/// once it holds [`CHUNK`] bytes of events).
const REPLAY_PAGE: u64 = 10_000;

/// A batch goes out once it holds this many bytes; a replayed page stops
/// once it holds this many.
const CHUNK: usize = 32 * 1024;

/// Batches queued for one client before the follower waits for it.
const QUEUED_CHUNKS: usize = 2;

/// Pages of stored lines read for followers at once on a node: each holds a
/// reader connection (and its page cache) and a blocking thread.
const CONCURRENT_REPLAYS: usize = 8;

/// Who may follow: the node's and each tenant's caps on open followers, and
/// the turns at the store that replays take.
pub struct FollowerGate {
    open: Arc<Semaphore>,
    max: usize,
    replays: Semaphore,
}

impl FollowerGate {
    /// A gate for at most `max` followers open at once.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(Semaphore::new(max)),
            max,
            replays: Semaphore::new(CONCURRENT_REPLAYS),
        }
    }

    /// The places a new follower of `caller` holds while it streams: 429 when
    /// its tenant has all it may, 503 when the node has.
    pub(super) fn admit(&self, caller: &Caller) -> Result<FollowerPlaces, ApiError> {
        let tenant = match caller.tenant().and_then(|t| t.followers.as_ref()) {
            None => None,
            Some(places) => Some(Arc::clone(places).try_acquire_owned().map_err(|_| {
                ApiError::QuotaExceeded(format!(
                    "tenant `{}` has as many log followers open as its max_followers allows; \
                     close one or retry later",
                    caller.tenant().map_or("", |t| t.name())
                ))
            })?),
        };
        let node = Arc::clone(&self.open).try_acquire_owned().map_err(|_| {
            ApiError::Busy(format!(
                "this server has {} log followers open (--max-followers); retry later",
                self.max
            ))
        })?;
        Ok(FollowerPlaces {
            _node: node,
            _tenant: tenant,
        })
    }
}

/// What a follower holds while it streams; dropped when it ends.
pub(super) struct FollowerPlaces {
    _node: OwnedSemaphorePermit,
    _tenant: Option<OwnedSemaphorePermit>,
}

/// How long a follower stays silent before it sends a keep-alive comment.
const KEEP_ALIVE_AFTER: Duration = Duration::from_secs(15);

/// How often a cluster follower's cursor is reopened after a read error
/// before its client is told to reconnect.
const CURSOR_REOPENS: u32 = 3;

/// The client left; stop streaming.
struct Gone;

/// A page of stored lines, encoded where it was read.
struct Replayed {
    events: BytesMut,
    /// The seq of the last line encoded; `None` when the page was empty.
    last: Option<u64>,
}

/// One follower's stream and position.
struct Follower<E> {
    service: Service,
    id: WorkloadId,
    encoding: E,
    /// The last seq encoded, if any.
    sent: Option<u64>,
    /// Events encoded but not yet handed to the connection.
    buf: BytesMut,
    tx: mpsc::Sender<Bytes>,
}

impl<E: LineEncoding> Follower<E> {
    fn next(&self) -> u64 {
        self.sent.map_or(0, |s| s + 1)
    }

    /// Encodes one record into the batch, sending the batch once it is full.
    async fn send(&mut self, r: &LogRecord) -> Result<(), Gone> {
        self.encoding.line(&mut self.buf, r);
        self.sent = Some(r.seq);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands the encoded batch to the connection, waiting while the client
    /// is behind (a client that stops reading is disconnected by the server).
    async fn flush(&mut self) -> Result<(), Gone> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The next buffer is sized like this batch: a flood's batches are
        // encoded without regrowing, and a quiet follower holds little.
        let room = self.buf.len().min(CHUNK) + 1024;
        let chunk = std::mem::replace(&mut self.buf, BytesMut::with_capacity(room));
        self.tx.send(chunk.freeze()).await.map_err(|_| Gone)
    }

    /// Sends every stored line after the last one sent, up to (not including) `until`.
    ///
    /// A page is encoded on the thread that reads it, so a lagging follower
    /// moves one buffer of events across threads rather than every record.
    async fn replay(&mut self, node: &Node, until: Option<u64>) -> Result<(), Gone> {
        loop {
            if until.is_some_and(|u| self.next() >= u) {
                return Ok(());
            }
            let page = Replayed {
                // Room for a page and its last event, so it never regrows.
                events: BytesMut::with_capacity(CHUNK + 4096),
                last: None,
            };
            let encoding = self.encoding;
            let turn = self.service.inner.followers.replays.acquire().await;
            let read = node
                .db()
                .scan_lines(self.id, self.sent, REPLAY_PAGE, page, move |page, r| {
                    if until.is_some_and(|u| r.seq >= u) {
                        return false;
                    }
                    encoding.line(&mut page.events, &r);
                    page.last = Some(r.seq);
                    // A page is one chunk: a lagging follower holds no more.
                    page.events.len() < CHUNK
                })
                .await;
            drop(turn);
            let page = match read {
                Ok(page) => page,
                Err(error) => {
                    // Not "no more lines": the follower must know its stream is cut.
                    tracing::error!(workload = %self.id, error = format!("{error:#}"), "failed to read stored lines for a follower");
                    return Err(self
                        .cut("failed to read the stored lines; reconnect with Last-Event-ID")
                        .await);
                }
            };
            let Some(last) = page.last else {
                return Ok(());
            };
            self.sent = Some(last);
            // What was encoded before goes first; then the page in chunks of
            // about CHUNK bytes (an event may straddle two, as SSE allows).
            self.flush().await?;
            let mut events = page.events;
            while !events.is_empty() {
                let chunk = events.split_to(events.len().min(CHUNK)).freeze();
                self.tx.send(chunk).await.map_err(|_| Gone)?;
            }
        }
    }

    /// Tells the client its stream is cut, and why.
    async fn cut(&mut self, message: &str) -> Gone {
        let error = serde_json::json!({"error": {"code": "internal", "message": message}});
        self.encoding.error(&mut self.buf, &error.to_string());
        let _ = self.flush().await;
        Gone
    }

    /// A cluster member's follower: the cluster's copy of the log, wherever
    /// the workload runs, then `end` with the cluster's final record.
    async fn stream_cluster(&mut self, cluster: &Cluster) -> Result<(), Gone> {
        let mut cursor = match cluster.read_log(self.id, self.sent).await {
            Ok(cursor) => cursor,
            Err(e) => {
                return Err(self
                    .cut(&format!("{e}; reconnect with Last-Event-ID"))
                    .await);
            }
        };
        // Cursors reopened in a row without a line between them.
        let mut reopened = 0;
        loop {
            let chunk = if cursor.caught_up() {
                // Nothing more is stored yet: what is encoded goes out now.
                self.flush().await?;
                match tokio::time::timeout(KEEP_ALIVE_AFTER, cursor.next()).await {
                    Ok(chunk) => chunk,
                    Err(_) => {
                        self.encoding.keep_alive(&mut self.buf);
                        continue;
                    }
                }
            } else {
                cursor.next().await
            };
            match chunk {
                Ok(LogChunk::Lines(lines)) => {
                    reopened = 0;
                    for r in &lines {
                        // A line's seq is its identity: resumed or repeated, once.
                        if r.seq >= self.next() {
                            self.send(r).await?;
                        }
                    }
                }
                Ok(LogChunk::End) => break,
                Err(e) => {
                    // A pull JetStream refused once (e.g. `no responders` while
                    // it is swamped) costs a new cursor, not the client's stream.
                    if reopened < CURSOR_REOPENS {
                        reopened += 1;
                        tracing::debug!(workload = %self.id, error = %e, "reopening a follower's cursor");
                        tokio::time::sleep(Duration::from_millis(50) * reopened).await;
                        if let Ok(fresh) = cluster.read_log(self.id, self.sent).await {
                            cursor = fresh;
                        }
                        continue;
                    }
                    return Err(self
                        .cut(&format!("{e}; reconnect with Last-Event-ID"))
                        .await);
                }
            }
        }
        let record = match cluster.wait_end(self.id).await {
            Ok(view) => serde_json::to_string(&view).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": e.to_string()}).to_string(),
        };
        self.encoding.end(&mut self.buf, &record);
        self.flush().await
    }

    async fn stream(&mut self) -> Result<(), Gone> {
        let service = self.service.clone();
        match &service.inner.backend {
            Backend::Local(_) => self.stream_local(service.node()).await,
            Backend::Cluster(b) => self.stream_cluster(b.cluster()).await,
        }
    }

    /// One node's follower: its store, then its broker; again for each
    /// attempt, waiting while it is queued or between attempts, until it
    /// has ended.
    async fn stream_local(&mut self, node: &Node) -> Result<(), Gone> {
        let watch = node.broker().watch(self.id);
        loop {
            // Listening before the subscription, so a channel that opens
            // after it is not missed.
            let notified = watch.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let subscription = node.broker().subscribe(self.id);
            self.forward(node, subscription).await?;
            let record = node.db().workload(self.id).await;
            if let Ok(w) = &record
                && !w.status.is_terminal()
            {
                // Queued, waiting out a retry's backoff, or about to go
                // live: until a channel opens or closes. Checked again
                // now and then, for an end that no channel saw.
                self.flush().await?;
                let mut idle = Duration::ZERO;
                while idle < KEEP_ALIVE_AFTER {
                    let step = Duration::from_secs(1);
                    if tokio::time::timeout(step, notified.as_mut()).await.is_ok() {
                        break;
                    }
                    idle += step;
                }
                if idle >= KEEP_ALIVE_AFTER {
                    self.encoding.keep_alive(&mut self.buf);
                }
                continue;
            }
            let record = match record {
                Ok(w) => serde_json::to_string(&WorkloadView::from(w)).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e.to_string()}).to_string(),
            };
            self.encoding.end(&mut self.buf, &record);
            return self.flush().await;
        }
    }

    /// Sends what is stored, then what `subscription` delivers live until
    /// its channel closes, then what was committed before it closed.
    async fn forward(
        &mut self,
        node: &Node,
        subscription: Option<crate::logs::LogSubscription>,
    ) -> Result<(), Gone> {
        self.replay(node, None).await?;
        if let Some(mut sub) = subscription {
            loop {
                // Take what is ready without waiting; only when nothing is
                // does the batch go out, so a flood is sent in large chunks
                // and a single line at once.
                let event = match sub.try_recv() {
                    TryNext::Event(event) => event,
                    TryNext::Closed => break,
                    TryNext::Empty => {
                        self.flush().await?;
                        match tokio::time::timeout(KEEP_ALIVE_AFTER, sub.recv()).await {
                            Ok(Some(event)) => event,
                            Ok(None) => break,
                            Err(_) => {
                                self.encoding.keep_alive(&mut self.buf);
                                continue;
                            }
                        }
                    }
                };
                match event {
                    BrokerEvent::Line(r) => {
                        if r.seq < self.next() {
                            continue;
                        }
                        if r.seq > self.next() {
                            self.replay(node, Some(r.seq)).await?;
                        }
                        self.send(&r).await?;
                    }
                    BrokerEvent::Lagged(_) => self.replay(node, None).await?,
                }
            }
        }
        // Closed: the attempt's end and every line before it are committed.
        self.replay(node, None).await
    }
}

/// Starts following `id` after `after` in a task of its own: the chunks
/// to send, until the end or until the receiver is dropped.
pub(super) fn start<E: LineEncoding>(
    service: Service,
    id: WorkloadId,
    after: Option<u64>,
    encoding: E,
    places: FollowerPlaces,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
    tokio::spawn(async move {
        let _places = places;
        let followers = service.node().metrics().followers.clone();
        followers.inc();
        // Ends quietly when the client goes away (the send fails), including a
        // client that stopped reading and was disconnected for it.
        let mut follower = Follower {
            service,
            id,
            encoding,
            sent: after,
            buf: BytesMut::new(),
            tx,
        };
        let _ = follower.stream().await;
        followers.dec();
    });
    rx
}
