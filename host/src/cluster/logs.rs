//! The cluster's durable copy of every log line, and reading it back.
//!
//! The node running a workload hands each record to [`ClusterLines`] beside
//! its own store; a task publishes them to `vulcan.logs.<id>` in batches, one
//! at a time, each naming the subject's last sequence it expects
//! (`Nats-Expected-Last-Subject-Sequence`) and carrying a `Nats-Msg-Id`, so a
//! retried batch is stored once and a node whose workload was failed over
//! (an end marker was written after its last batch) can never append to it.
//! While NATS is away the batches wait, bounded: once [`BUFFER_BYTES`] are
//! waiting the guest's output waits too.
//!
//! Readers (SSE and history, on any node) read the subject from its start
//! with an ordered consumer and skip what they have: a line's seq is its
//! identity, so none is shown twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::Notify;

use super::{Cluster, ClusterError, log_subject};
use serde::{Deserialize, Serialize};

use crate::logs::{Fields, LineSink, LogLevel, LogRecord, LogStream};
use crate::workload::WorkloadId;

/// Most bytes of one workload's lines waiting for the cluster.
pub const BUFFER_BYTES: usize = 8 << 20;

/// Most bytes of lines in one published batch (below NATS's 1 MiB default
/// message size).
const BATCH_BYTES: usize = 256 << 10;

/// Messages a reader asks for at a time.
const READ_AHEAD: i64 = 8;

/// The header that marks the end of a workload's log.
const END_HEADER: &str = "Vulcan-End";

/// A line as the cluster carries it: short keys, defaults left out (a
/// flood's batches are mostly this framing).
#[derive(Serialize)]
struct WireLine<'a> {
    s: u64,
    t: LogStream,
    #[serde(skip_serializing_if = "Option::is_none")]
    l: Option<LogLevel>,
    m: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    c: bool,
    ts: i64,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    f: &'a Fields,
}

#[derive(Deserialize)]
struct WireLineOwned {
    s: u64,
    t: LogStream,
    #[serde(default)]
    l: Option<LogLevel>,
    m: String,
    #[serde(default)]
    c: bool,
    ts: i64,
    #[serde(default)]
    f: Fields,
}

/// Encodes records from the front of `batch` into one message of at most
/// `limit` bytes (at least one record); the payload and how many it holds.
fn encode_batch(batch: &[Arc<LogRecord>], limit: usize) -> (Bytes, usize) {
    let mut out = Vec::with_capacity(limit.min(64 << 10));
    out.push(b'[');
    let mut n = 0;
    for r in batch {
        let before = out.len();
        if n > 0 {
            out.push(b',');
        }
        let wire = WireLine {
            s: r.seq,
            t: r.stream,
            l: r.level,
            m: &r.line,
            c: r.continued,
            ts: r.ts_ms,
            f: &r.fields,
        };
        // Serializing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &wire);
        if n > 0 && out.len() + 1 > limit {
            out.truncate(before);
            break;
        }
        n += 1;
    }
    out.push(b']');
    (Bytes::from(out), n)
}

/// The records of one message of `id`'s log.
fn decode_batch(id: WorkloadId, payload: &[u8]) -> serde_json::Result<Vec<LogRecord>> {
    let lines: Vec<WireLineOwned> = serde_json::from_slice(payload)?;
    Ok(lines
        .into_iter()
        .map(|w| LogRecord {
            workload_id: id,
            seq: w.s,
            stream: w.t,
            level: w.l,
            line: w.m,
            continued: w.c,
            ts_ms: w.ts,
            fields: w.f,
        })
        .collect())
}

/// One workload's lines on their way to the cluster.
pub struct ClusterLines {
    id: WorkloadId,
    state: Mutex<Lines>,
    more: Notify,
}

#[derive(Default)]
struct Lines {
    waiting: VecDeque<Arc<LogRecord>>,
    bytes: usize,
    closed: bool,
    failure: Option<String>,
    room: Vec<Waker>,
}

fn cost(r: &LogRecord) -> usize {
    r.line.len() + 64
}

impl ClusterLines {
    /// An empty buffer for `id`.
    pub fn new(id: WorkloadId) -> Arc<Self> {
        Arc::new(Self {
            id,
            state: Mutex::new(Lines::default()),
            more: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more records will come: the publisher ends once it has sent them.
    pub fn close(&self) {
        self.lock().closed = true;
        self.more.notify_one();
    }

    fn fail(&self, why: String) {
        let wakers = {
            let mut state = self.lock();
            state.failure.get_or_insert(why);
            std::mem::take(&mut state.room)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The batch at the front (not removed until it is stored).
    fn front(&self) -> Option<Vec<Arc<LogRecord>>> {
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

    fn stored(&self, n: usize) {
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
            state.bytes += cost(&record);
            state.waiting.push_back(record);
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
/// must not be appended.
#[derive(Debug)]
pub struct Fenced;

/// What a reader gets from a workload's log.
pub enum LogChunk {
    /// Lines in seq order (possibly ones already seen: skip by seq).
    Lines(Vec<LogRecord>),
    /// The log is complete; the record is (or is about to be) final.
    End,
}

/// A position in a workload's log in the cluster.
pub struct LogCursor {
    id: WorkloadId,
    messages: Option<pull::Ordered>,
    /// Messages not yet delivered when the last one was read.
    pending: u64,
}

impl LogCursor {
    /// True when everything stored so far has been read.
    pub fn caught_up(&self) -> bool {
        self.pending == 0
    }

    /// The next chunk; waits for one while the workload runs.
    pub async fn next(&mut self) -> Result<LogChunk, ClusterError> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                return std::future::pending().await;
            };
            let message = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(ClusterError::unavailable(e)),
                None => return Err(ClusterError::Unavailable("the log read ended".into())),
            };
            if let Ok(info) = message.info() {
                self.pending = info.pending;
            }
            if is_end(message.headers.as_ref()) {
                return Ok(LogChunk::End);
            }
            match decode_batch(self.id, &message.payload) {
                Ok(lines) => return Ok(LogChunk::Lines(lines)),
                // Logged and dropped: a foreign message must not end a read.
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = %e, "dropping a log message that does not parse")
                }
            }
        }
    }
}

fn is_end(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(END_HEADER).is_some())
}

/// The last message of a workload's log subject.
struct LastMessage {
    sequence: u64,
    end: bool,
    /// The seq after its last line (a line count); an end marker's count.
    next_seq: Option<u64>,
    msg_id: Option<String>,
}

impl Cluster {
    /// Reads `id`'s log from its start.
    pub async fn read_log(&self, id: WorkloadId) -> Result<LogCursor, ClusterError> {
        self.connected()?;
        let consumer = self
            .logs
            .create_consumer(pull::OrderedConfig {
                filter_subject: log_subject(id),
                deliver_policy: DeliverPolicy::All,
                // A few batches in flight per reader: ten followers on one
                // connection must stay below NATS's slow-consumer limit.
                max_batch: READ_AHEAD,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::unavailable)?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(ClusterError::unavailable)?;
        Ok(LogCursor {
            id,
            messages: Some(messages),
            pending,
        })
    }

    /// Publishes `lines` as they arrive until they are closed and all stored;
    /// the subject's last sequence on success.
    pub(super) async fn publish_lines(
        &self,
        lines: Arc<ClusterLines>,
        mut last: u64,
    ) -> Result<u64, Fenced> {
        let subject = log_subject(lines.id);
        // Room for the headers within NATS's largest message.
        let limit = BATCH_BYTES.min(self.client.server_info().max_payload.saturating_sub(4096));
        let mut backoff = Duration::from_millis(50);
        loop {
            let more = lines.more.notified();
            let Some(batch) = lines.front() else {
                if lines.lock().closed {
                    return Ok(last);
                }
                more.await;
                continue;
            };
            let msg_id = format!("{}:{}", lines.id, batch[0].seq);
            let (payload, n) = encode_batch(&batch, limit);
            let publish = Publish::build()
                .payload(payload)
                .message_id(&msg_id)
                .expected_last_subject_sequence(last);
            let stored = match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(ack) => {
                    last = ack.sequence;
                    lines.stored(n);
                    backoff = Duration::from_millis(50);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Stored by an attempt whose answer was lost, or fenced.
                    match self.last_log_message(lines.id).await {
                        Ok(Some(m)) if m.msg_id.as_deref() == Some(&msg_id) => {
                            last = m.sequence;
                            lines.stored(n);
                        }
                        Ok(_) => {
                            lines.fail(format!(
                                "workload {} was taken over by the cluster (its node was \
                                 presumed lost); its further lines are not kept",
                                lines.id
                            ));
                            return Err(Fenced);
                        }
                        Err(_) => tokio::time::sleep(backoff).await,
                    }
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    // Never going to fit: the workload cannot keep its lines.
                    lines.fail(format!(
                        "a log record of workload {} is larger than the cluster's largest \
                         message ({limit} bytes)",
                        lines.id
                    ));
                    return Err(Fenced);
                }
                Err(e) => {
                    tracing::debug!(workload = %lines.id, error = %e, "log batch not stored yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn last_log_message(&self, id: WorkloadId) -> Result<Option<LastMessage>, ClusterError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .logs
            .get_last_raw_message_by_subject(&log_subject(id))
            .await
        {
            Ok(m) => {
                let end = m.headers.get(END_HEADER).is_some();
                let next_seq = match m.headers.get(END_HEADER) {
                    Some(count) => count.as_str().parse().ok(),
                    None => decode_batch(id, &m.payload)
                        .ok()
                        .and_then(|lines| lines.last().map(|r| r.seq + 1)),
                };
                Ok(Some(LastMessage {
                    sequence: m.sequence,
                    end,
                    next_seq,
                    msg_id: m
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .map(|v| v.as_str().to_owned()),
                }))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// Ends `id`'s log after its last stored message (unless it has ended),
    /// so that nothing can be appended after it; the number of lines it holds.
    pub(super) async fn end_log(&self, id: WorkloadId) -> Result<u64, ClusterError> {
        loop {
            let last = self.last_log_message(id).await?;
            if let Some(m) = last.as_ref().filter(|m| m.end) {
                return Ok(m.next_seq.unwrap_or(0));
            }
            let (expected, lines) = match &last {
                Some(m) => (m.sequence, m.next_seq.unwrap_or(0)),
                None => (0, 0),
            };
            if self.publish_end(id, Some(expected), lines).await? {
                return Ok(lines);
            }
            // A batch landed in between: look again.
        }
    }

    /// Publishes the end marker; false when `expected` was not the subject's
    /// last sequence.
    pub(super) async fn publish_end(
        &self,
        id: WorkloadId,
        expected: Option<u64>,
        lines: u64,
    ) -> Result<bool, ClusterError> {
        let mut publish = Publish::build()
            .header(END_HEADER, lines.to_string().as_str())
            .message_id(format!("{id}:end"));
        if let Some(expected) = expected {
            publish = publish.expected_last_subject_sequence(expected);
        }
        let stored = match self.js.send_publish(log_subject(id), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }
}
