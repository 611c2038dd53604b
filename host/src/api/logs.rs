//! Log lines over Server-Sent Events (live, resumable) and as JSON history.
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
//! An event's `data` is the line's text (a `log` record's is
//! `{"level","message"}`); with `?format=json` it is the whole [`LogLine`]
//! (seq, stream, level, line, continued, ts), as history pages carry it.
//!
//! Events are encoded into a buffer that goes out as one body chunk when it
//! is full or when no further record is ready, so a flood costs one write per
//! batch rather than per line, and a quiet workload's line still goes out at
//! once.
//!
//! A follower's memory is bounded in bytes: a replayed page stops at
//! [`CHUNK`] bytes of encoded events, at most [`QUEUED_CHUNKS`] chunks wait
//! for the client, and at most [`CONCURRENT_REPLAYS`] pages are read from the
//! store at once on the node. Followers themselves are capped per node
//! (`--max-followers`, 503 `busy` beyond) and per tenant (`max_followers`,
//! 429 `quota_exceeded` beyond).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::caller::Caller;
use super::sse::{KEEP_ALIVE, put_event};
use super::workloads::{in_range, parse_id, record_with_lines};
use super::{ApiError, AppState};
use crate::cluster::{Cluster, LogChunk};
use crate::logs::{BrokerEvent, LogRecord, TryNext};
use crate::view::{LogLine, LogPage, WorkloadView};
use crate::workload::WorkloadId;

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
    fn admit(&self, caller: &Caller) -> Result<FollowerPlaces, ApiError> {
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
struct FollowerPlaces {
    _node: OwnedSemaphorePermit,
    _tenant: Option<OwnedSemaphorePermit>,
}

/// How long a follower stays silent before it sends a keep-alive comment.
const KEEP_ALIVE_AFTER: Duration = Duration::from_secs(15);

/// How often a cluster follower's cursor is reopened after a read error
/// before its client is told to reconnect.
const CURSOR_REOPENS: u32 = 3;

/// Where to resume.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    after: Option<u64>,
    format: Option<EventFormat>,
}

/// What an SSE event's `data` holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    /// The line's text.
    #[default]
    Text,
    /// The whole [`LogLine`] as JSON.
    Json,
}

/// `GET /v1/workloads/{id}/logs`: SSE, one event per line, then `end`.
pub async fn follow(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a seq number".into()))?,
        ),
        None => None,
    };
    // The header wins: it is what a reconnecting EventSource sends.
    let after = in_range("Last-Event-ID", last_event_id)?.or(in_range("after", query.after)?);
    match state.cluster() {
        Some(cluster) => drop(cluster.record(id).await?),
        None => drop(record_with_lines(&state, &caller, id).await?),
    }
    let format = query.format.unwrap_or_default();
    let places = state.followers().admit(&caller)?;

    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
    tokio::spawn(async move {
        let _places = places;
        let followers = state.node().metrics().followers.clone();
        followers.inc();
        // Ends quietly when the client goes away (the send fails), including a
        // client that stopped reading and was disconnected for it.
        let mut follower = Follower {
            state,
            id,
            format,
            sent: after,
            buf: BytesMut::new(),
            tx,
        };
        let _ = follower.stream().await;
        followers.dec();
    });
    let chunks = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok::<Bytes, Infallible>);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    ))
}

/// The client left; stop streaming.
struct Gone;

/// A page of stored lines, encoded where it was read.
struct Replayed {
    events: BytesMut,
    /// The seq of the last line encoded; `None` when the page was empty.
    last: Option<u64>,
}

/// Appends `r` as one event in `format`.
fn encode(buf: &mut BytesMut, format: EventFormat, r: &LogRecord) {
    let (id, stream) = (Some(r.seq), r.stream.as_str());
    match (format, r.level) {
        (EventFormat::Json, _) => {
            let data = serde_json::to_vec(&LogLine::from(r)).unwrap_or_default();
            put_event(buf, id, stream, &data);
        }
        // Structured log lines carry their level (and fields) with the message.
        (EventFormat::Text, Some(level)) => {
            let mut data = json!({"level": level, "message": r.line});
            if !r.fields.is_empty() {
                data["fields"] = json!(r.fields);
            }
            put_event(buf, id, stream, data.to_string().as_bytes());
        }
        (EventFormat::Text, None) => put_event(buf, id, stream, r.line.as_bytes()),
    }
}

/// One follower's stream and position.
struct Follower {
    state: AppState,
    id: WorkloadId,
    format: EventFormat,
    /// The last seq encoded, if any.
    sent: Option<u64>,
    /// Events encoded but not yet handed to the connection.
    buf: BytesMut,
    tx: mpsc::Sender<Bytes>,
}

impl Follower {
    fn next(&self) -> u64 {
        self.sent.map_or(0, |s| s + 1)
    }

    /// Encodes one record into the batch, sending the batch once it is full.
    async fn send(&mut self, r: &LogRecord) -> Result<(), Gone> {
        encode(&mut self.buf, self.format, r);
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
    async fn replay(&mut self, until: Option<u64>) -> Result<(), Gone> {
        loop {
            if until.is_some_and(|u| self.next() >= u) {
                return Ok(());
            }
            let page = Replayed {
                // Room for a page and its last event, so it never regrows.
                events: BytesMut::with_capacity(CHUNK + 4096),
                last: None,
            };
            let format = self.format;
            let turn = self.state.followers().replays.acquire().await;
            let read = self
                .state
                .node()
                .db()
                .scan_lines(self.id, self.sent, REPLAY_PAGE, page, move |page, r| {
                    if until.is_some_and(|u| r.seq >= u) {
                        return false;
                    }
                    encode(&mut page.events, format, &r);
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
                    let error = json!({"error": {"code": "internal", "message": "failed to read the stored lines; reconnect with Last-Event-ID"}});
                    put_event(&mut self.buf, None, "error", error.to_string().as_bytes());
                    let _ = self.flush().await;
                    return Err(Gone);
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
        let error = json!({"error": {"code": "internal", "message": message}});
        put_event(&mut self.buf, None, "error", error.to_string().as_bytes());
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
                        self.buf.extend_from_slice(KEEP_ALIVE);
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
            Err(e) => json!({"error": e.to_string()}).to_string(),
        };
        put_event(&mut self.buf, None, "end", record.as_bytes());
        self.flush().await
    }

    async fn stream(&mut self) -> Result<(), Gone> {
        if let Some(cluster) = self.state.cluster().cloned() {
            return self.stream_cluster(&cluster).await;
        }
        let subscription = self.state.node().broker().subscribe(self.id);
        self.replay(None).await?;
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
                                self.buf.extend_from_slice(KEEP_ALIVE);
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
                            self.replay(Some(r.seq)).await?;
                        }
                        self.send(&r).await?;
                    }
                    BrokerEvent::Lagged(_) => self.replay(None).await?,
                }
            }
        }
        // Closed: the terminal status and every line before it are committed.
        self.replay(None).await?;
        let record = match self.state.node().db().workload(self.id).await {
            Ok(w) => serde_json::to_string(&WorkloadView::from(w)).unwrap_or_default(),
            Err(e) => json!({"error": e.to_string()}).to_string(),
        };
        put_event(&mut self.buf, None, "end", record.as_bytes());
        self.flush().await
    }
}

/// Query of the history endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    after: Option<u64>,
    limit: Option<u64>,
}

/// Most lines one history page returns.
const MAX_HISTORY_PAGE: u64 = 10_000;

/// `GET /v1/workloads/{id}/logs/history?after=&limit=`.
pub async fn history(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(1_000);
    let after = in_range("after", q.after)?;
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY_PAGE}"
        )));
    }
    if let Some(cluster) = state.cluster() {
        cluster.record(id).await?;
        let mut cursor = cluster.read_history(id, after).await?;
        let mut lines = Vec::new();
        while !cursor.caught_up() && (lines.len() as u64) < limit {
            match cursor.next().await? {
                LogChunk::Lines(batch) => lines.extend(
                    batch
                        .into_iter()
                        .filter(|r| after.is_none_or(|a| r.seq > a))
                        .take((limit as usize).saturating_sub(lines.len())),
                ),
                LogChunk::End => break,
            }
        }
        return Ok(Json(LogPage {
            next_after: lines.last().map(|r| r.seq).or(after),
            lines: lines.iter().map(LogLine::from).collect(),
        }));
    }
    record_with_lines(&state, &caller, id).await?;
    let lines = state.node().db().read_lines(id, after, limit).await?;
    Ok(Json(LogPage {
        next_after: lines.last().map(|r| r.seq).or(after),
        lines: lines.iter().map(LogLine::from).collect(),
    }))
}
