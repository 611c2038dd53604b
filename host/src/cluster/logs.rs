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
//! A workload that ends before anyone else can know of it (a short sync run,
//! whose record is written once, final) keeps its few lines in that record
//! instead ([`INLINE_BYTES`] at most): one stored message for the whole run,
//! and the record and its lines become durable together.
//!
//! Readers (SSE and history, on any node) read the subject from its start
//! with an ordered consumer and skip what they have: a line's seq is its
//! identity, so none is shown twice. A log with no message on its subject is
//! looked for in the record.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::Notify;

use super::{Backoff, Cluster, ClusterError, log_subject};
use serde::{Deserialize, Serialize};

use crate::logs::{Fields, LineSink, LogLevel, LogRecord, LogStream};
use crate::workload::WorkloadId;

/// Most bytes of one workload's lines waiting for the cluster (as a store
/// lane holds about 1 MiB): bounded per workload, and so in all by the slots.
pub const BUFFER_BYTES: usize = 2 << 20;

/// Most bytes of lines in one published batch (below NATS's 1 MiB default
/// message size).
const BATCH_BYTES: usize = 256 << 10;

/// How long the first lines of a workload wait for more, or for its end,
/// before they are published.
const FIRST_BATCH_LINGER: Duration = Duration::from_millis(5);

/// Most bytes of lines a record written once, final, carries inside it
/// rather than on the log's subject: every node's index reads every record,
/// so only a short log travels this way.
pub const INLINE_BYTES: usize = 4 << 10;

/// Messages a reader asks for at a time.
const READ_AHEAD: usize = 8;

/// The header that marks the end of a workload's log (its value: the line count).
const END_HEADER: &str = "Vulcan-End";

/// The header of a batch that names its last line's seq, so a reader can
/// find where to resume from headers alone.
const LAST_HEADER: &str = "Vulcan-Last";

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
    // Sized for what it will most likely hold: a short log's few lines do
    // not take (and fault in) a flood's buffer.
    let likely: usize = batch.iter().map(|r| cost(r)).sum();
    let mut out = Vec::with_capacity(likely.min(limit));
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
    /// Told once, when the lines outgrow [`INLINE_BYTES`] (not on every line).
    beyond_inline: Notify,
}

#[derive(Default)]
struct Lines {
    waiting: VecDeque<Arc<LogRecord>>,
    bytes: usize,
    closed: bool,
    /// Closed by [`ClusterLines::close_unlisted`].
    unlisted: bool,
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
            beyond_inline: Notify::new(),
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
    fn may_inline(&self) -> bool {
        let state = self.lock();
        state.unlisted && state.failure.is_none()
    }

    /// Resolves once more lines have come than a record carries inside it
    /// (see [`INLINE_BYTES`]), or the lines failed.
    pub(super) async fn until_beyond_inline(&self) {
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
    async fn until_closed(&self) {
        loop {
            let more = self.more.notified();
            if self.lock().closed {
                return;
            }
            more.await;
        }
    }

    fn fail(&self, why: String) {
        let wakers = {
            let mut state = self.lock();
            state.failure.get_or_insert(why);
            std::mem::take(&mut state.room)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Marks the lines as no longer kept: the workload was taken over.
    fn fenced(&self) -> Fenced {
        self.fail(format!(
            "workload {} was taken over by the cluster (its node was presumed lost); its \
             further lines are not kept",
            self.id
        ));
        Fenced
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
    messages: Source,
    /// Messages not yet delivered when the last one was read.
    pending: u64,
    /// The stream sequence of the log's last message when the cursor was
    /// opened: a reader has caught up only once it has read that far, even
    /// if the consumer's pending count says so sooner (it can undercount
    /// after the server recovered from a crash).
    stored_until: u64,
    /// The stream sequence of the last message read (or before the first).
    read: u64,
    /// The last message read was the end (its lines were handed out).
    ended: bool,
}

/// Where a cursor's lines come from.
enum Source {
    /// The log's subject, through a consumer (a follower: waits for more).
    Subject(Box<LogPull>),
    /// The log's subject, one direct get a message, up to what was stored
    /// when the cursor was opened (a history page).
    Direct(Box<async_nats::jetstream::stream::Stream>),
    /// The final record (taken when read).
    Record(Option<Vec<LogRecord>>),
}

/// Reads a log's consumer one pull request at a time, each for at most
/// [`READ_AHEAD`] messages (each at most a batch): a reader holds a bounded
/// amount, and ten followers on one connection stay below NATS's
/// slow-consumer limit.
///
/// Not async-nats's continuous `stream()`: it counts the messages it is owed
/// only once its task reports the pull sent, so a reader that lags (a busy
/// node) can take a pull's messages before that, count them against nothing,
/// and then wait for messages the server no longer owes until the pull
/// expires. A follower stalled for 30 s, a few times in ten 1M-line follows.
/// A pull of its own counts only its own messages.
struct LogPull {
    consumer: PullConsumer,
    state: PullState,
    /// Where the consumer lives: it is deleted there when the reader goes.
    stream: async_nats::jetstream::stream::Stream,
}

impl Drop for LogPull {
    fn drop(&mut self) {
        // At once, not after the consumer's inactivity threshold: a
        // thousand short reads must not hold a thousand consumers.
        let name = self.consumer.cached_info().name.clone();
        let stream = self.stream.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(consumer = name, error = %e, "a log reader's consumer was not deleted; it expires");
                }
            });
        }
    }
}

enum PullState {
    /// A pull being asked for. Kept here, so a caller that stops waiting
    /// (a keep-alive's timeout) loses none of the messages it brings.
    Asking(futures_util::future::BoxFuture<'static, Result<pull::Batch, pull::BatchError>>),
    /// The messages of a pull as they come.
    Reading(Box<pull::Batch>),
}

/// How long one pull waits for messages on a quiet log before the next.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

impl LogPull {
    fn new(consumer: PullConsumer, stream: async_nats::jetstream::stream::Stream) -> Self {
        let state = Self::ask(&consumer);
        Self {
            consumer,
            state,
            stream,
        }
    }

    fn ask(consumer: &PullConsumer) -> PullState {
        let consumer = consumer.clone();
        PullState::Asking(Box::pin(async move {
            consumer
                .batch()
                .max_messages(READ_AHEAD)
                .expires(PULL_EXPIRES)
                .messages()
                .await
        }))
    }

    /// The next message of the log; waits for one. Cancel-safe.
    async fn next(&mut self) -> Result<async_nats::jetstream::Message, ClusterError> {
        loop {
            let batch = match &mut self.state {
                PullState::Reading(batch) => batch,
                PullState::Asking(asked) => {
                    let asked = asked.as_mut().await;
                    match asked {
                        Ok(batch) => self.state = PullState::Reading(Box::new(batch)),
                        Err(e) => {
                            self.state = Self::ask(&self.consumer);
                            return Err(ClusterError::unavailable(e));
                        }
                    }
                    continue;
                }
            };
            match batch.next().await {
                Some(Ok(message)) => return Ok(message),
                Some(Err(e)) => {
                    self.state = Self::ask(&self.consumer);
                    return Err(ClusterError::unavailable(e));
                }
                // This pull has all it asked for, or expired: the next one.
                None => self.state = Self::ask(&self.consumer),
            }
        }
    }
}

impl LogCursor {
    /// A cursor over lines that travelled inside the final record.
    fn of_record(id: WorkloadId, lines: Vec<LogRecord>) -> Self {
        Self {
            id,
            messages: Source::Record(Some(lines)),
            pending: 0,
            stored_until: 0,
            read: 0,
            ended: false,
        }
    }

    /// True when everything stored so far has been read.
    pub fn caught_up(&self) -> bool {
        let unread = matches!(self.messages, Source::Record(Some(_)));
        !unread && self.pending == 0 && self.read >= self.stored_until
    }

    /// The next chunk; waits for one while the workload runs.
    pub async fn next(&mut self) -> Result<LogChunk, ClusterError> {
        if self.ended {
            return Ok(LogChunk::End);
        }
        loop {
            let (ends, payload) = match &mut self.messages {
                Source::Record(lines) => {
                    self.ended = true;
                    return Ok(match lines.take() {
                        Some(lines) => LogChunk::Lines(lines),
                        None => LogChunk::End,
                    });
                }
                Source::Subject(messages) => {
                    let message = messages.next().await?;
                    if let Ok(info) = message.info() {
                        self.pending = info.pending;
                        self.read = self.read.max(info.stream_sequence);
                    }
                    let ends =
                        (message.headers.as_ref()).is_some_and(|h| h.get(END_HEADER).is_some());
                    (ends, message.message.payload)
                }
                Source::Direct(stream) => {
                    if self.read >= self.stored_until {
                        // What was stored when the page began is read.
                        return Ok(LogChunk::End);
                    }
                    let message = stream
                        .direct_get_next_for_subject(log_subject(self.id), Some(self.read + 1))
                        .await
                        .map_err(ClusterError::unavailable)?;
                    self.read = message.sequence;
                    (message.headers.get(END_HEADER).is_some(), message.payload)
                }
            };
            if ends && payload.is_empty() {
                return Ok(LogChunk::End);
            }
            match decode_batch(self.id, &payload) {
                Ok(lines) => {
                    self.ended = ends;
                    return Ok(LogChunk::Lines(lines));
                }
                // Logged and dropped: a foreign message must not end a read.
                Err(e) => {
                    tracing::warn!(workload = %self.id, error = %e, "dropping a log message that does not parse")
                }
            }
        }
    }
}

/// What became of one publish of a batch.
enum Attempt {
    /// Stored now, at this stream sequence.
    Stored(u64),
    /// A message with its id was stored before, at this sequence.
    Earlier(u64),
    /// Not known to be stored: try again.
    Retry,
}

/// A stored message of a workload's log, from its headers alone.
struct Stored {
    sequence: u64,
    end: bool,
    /// The seq after its last line; an end marker's line count.
    next_seq: Option<u64>,
    msg_id: Option<String>,
}

impl Stored {
    fn of(m: &async_nats::jetstream::message::StreamMessage) -> Self {
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        let end = header(END_HEADER);
        let next_seq = match &end {
            Some(count) => count.parse().ok(),
            None => header(LAST_HEADER)
                .and_then(|l| l.parse::<u64>().ok())
                .map(|l| l + 1),
        };
        Self {
            sequence: m.sequence,
            end: end.is_some(),
            next_seq,
            msg_id: header(async_nats::header::NATS_MESSAGE_ID.as_ref()),
        }
    }
}

impl Cluster {
    /// Follows `id`'s log from the first batch holding a line after `after`
    /// (from its start when `None`), waiting for more while it runs.
    pub async fn read_log(
        &self,
        id: WorkloadId,
        after: Option<u64>,
    ) -> Result<LogCursor, ClusterError> {
        self.open_log(id, after, true).await
    }

    /// Reads what `id`'s log holds now, from the first batch holding a line
    /// after `after`, with direct gets: a history page holds nothing on the
    /// server once it is read (a consumer would outlive it).
    pub async fn read_history(
        &self,
        id: WorkloadId,
        after: Option<u64>,
    ) -> Result<LogCursor, ClusterError> {
        self.open_log(id, after, false).await
    }

    /// A cursor over `id`'s log from the first batch holding a line after
    /// `after`: through a consumer that waits for more (`follow`), or by
    /// direct gets of what is stored now.
    async fn open_log(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        follow: bool,
    ) -> Result<LogCursor, ClusterError> {
        self.connected()?;
        let last = self.last_log_message(id).await?;
        if last.is_none()
            && let Some(lines) = self.lines_in_record(id).await?
        {
            return Ok(LogCursor::of_record(id, lines));
        }
        let start = match after {
            None => 1,
            Some(after) => self.first_batch_after(id, after, last.as_ref()).await?,
        };
        let (messages, pending) = match follow {
            true => {
                let consumer = self.log_consumer(id, start).await?;
                let pending = consumer.cached_info().num_pending;
                let pull = LogPull::new(consumer, self.logs.clone());
                (Source::Subject(Box::new(pull)), pending)
            }
            false => (Source::Direct(Box::new(self.logs.clone())), 0),
        };
        Ok(LogCursor {
            id,
            messages,
            pending,
            stored_until: last.map_or(0, |m| m.sequence),
            read: start - 1,
            ended: false,
        })
    }

    /// A consumer of `id`'s log from stream sequence `start`.
    async fn log_consumer(&self, id: WorkloadId, start: u64) -> Result<PullConsumer, ClusterError> {
        // A plain ephemeral consumer, in memory, without acks: each reader
        // asks for a few batches at a time (ten followers on one connection
        // stay below NATS's slow-consumer limit), and it goes away with its
        // reader.
        self.logs
            .create_consumer(pull::Config {
                filter_subject: log_subject(id),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ack_policy: AckPolicy::None,
                // Deleted when its reader goes (see `LogPull`'s drop);
                // this is for a node that died with readers open.
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::unavailable)
    }

    /// Where a reader that has every line up to `after` starts: the stream
    /// sequence of the first message of `id`'s log holding a later line (or
    /// its end), found by bisecting the stream with direct gets that read
    /// headers, so a resumed reader skips what it has however long the log;
    /// past the log's last message when nothing later is stored yet.
    async fn first_batch_after(
        &self,
        id: WorkloadId,
        after: u64,
        last: Option<&Stored>,
    ) -> Result<u64, ClusterError> {
        let Some(last) = last else {
            return Ok(1);
        };
        let holds_later = |m: &Stored| m.end || m.next_seq.is_some_and(|n| n > after + 1);
        if !holds_later(last) {
            return Ok(last.sequence + 1);
        }
        // `answer` holds a later line; no earlier one is outside [lo, hi).
        let (mut answer, mut lo, mut hi) = (last.sequence, 1, last.sequence);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let next = self
                .logs
                .direct_get_next_for_subject(log_subject(id), Some(mid))
                .await
                .map_err(ClusterError::unavailable)?;
            let stored = Stored::of(&next);
            if stored.sequence >= hi {
                // None of the log's messages lie in [mid, hi).
                hi = mid;
            } else if holds_later(&stored) {
                (answer, hi) = (stored.sequence, mid);
            } else {
                lo = stored.sequence + 1;
            }
        }
        Ok(answer)
    }

    /// Publishes `lines` as they arrive until they are closed and all stored,
    /// then ends the log (the last batch carries the end marker when it can,
    /// so a short workload costs one message). The record is final only
    /// after this: every line is stored before it says so.
    pub(super) async fn publish_lines(
        &self,
        lines: Arc<ClusterLines>,
    ) -> Result<Published, Fenced> {
        let (id, subject) = (lines.id, log_subject(lines.id));
        // Room for the headers within NATS's largest message.
        let limit = BATCH_BYTES.min(self.client.server_info().max_payload.saturating_sub(4096));
        let mut published = Published {
            sequence: 0,
            lines: 0,
            inline: None,
        };
        let mut backoff = Backoff::default();
        let mut lingered = false;
        loop {
            let more = lines.more.notified();
            let batch = lines.front();
            let (closed, waiting) = {
                let state = lines.lock();
                (state.closed, state.waiting.len())
            };
            let Some(batch) = batch else {
                if closed {
                    break;
                }
                more.await;
                continue;
            };
            if !closed && !lingered {
                // Most workloads end within moments of their first line: then
                // their lines and end go in one message, not two.
                lingered = true;
                let _ = tokio::time::timeout(FIRST_BATCH_LINGER, lines.until_closed()).await;
                continue;
            }
            let (payload, n) = encode_batch(&batch, limit);
            let (first, last) = (batch[0].seq, batch[n - 1].seq);
            let ends = closed && n == waiting;
            // Stream sequences start at 1: none of its lines is published.
            if ends
                && published.sequence == 0
                && payload.len() <= INLINE_BYTES
                && lines.may_inline()
            {
                lines.stored(n);
                return Ok(Published {
                    sequence: 0,
                    lines: last + 1,
                    inline: Some(payload),
                });
            }
            let msg_id = format!("{id}:{first}");
            let mut publish = Publish::build()
                .payload(payload)
                .message_id(&msg_id)
                .header(LAST_HEADER, last.to_string().as_str())
                .expected_last_subject_sequence(published.sequence);
            if ends {
                publish = publish.header(END_HEADER, (last + 1).to_string().as_str());
            }
            let stored = match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await.map(|ack| (ack.sequence, ack.duplicate)),
                Err(e) => Err(e),
            };
            // A message with this id may have been stored by an earlier
            // attempt whose answer was lost (a stalled NATS), holding fewer
            // lines than this one (more came since): only what it holds
            // counts as stored.
            let earlier = match stored {
                Ok((sequence, false)) => Attempt::Stored(sequence),
                Ok((sequence, true)) => Attempt::Earlier(sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Stored by such an attempt, or fenced.
                    match self.last_log_message(id).await {
                        Ok(Some(m)) if m.msg_id.as_deref() == Some(&msg_id) => {
                            Attempt::Earlier(m.sequence)
                        }
                        Ok(_) => return Err(lines.fenced()),
                        Err(_) => Attempt::Retry,
                    }
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    // Never going to fit: the workload stops, failed for its
                    // lines, and its log ends with what the cluster holds.
                    lines.fail(format!(
                        "a log record of workload {id} is larger than the cluster's largest \
                         message ({limit} bytes)"
                    ));
                    break;
                }
                Err(e) => {
                    tracing::debug!(workload = %id, error = %e, "log batch not stored yet; retrying");
                    Attempt::Retry
                }
            };
            let (sequence, held) = match earlier {
                Attempt::Stored(sequence) => (sequence, n),
                Attempt::Earlier(sequence) => match self.lines_up_to(id, sequence).await {
                    Ok(Some((next_seq, end))) => {
                        let held = usize::try_from(next_seq.saturating_sub(first)).unwrap_or(n);
                        match end {
                            // This attempt's own end, stored before.
                            true if ends && held == n => (sequence, n),
                            // Someone else's end: the workload was taken over.
                            true => return Err(lines.fenced()),
                            false => (sequence, held.min(n)),
                        }
                    }
                    Ok(None) | Err(_) => (0, 0),
                },
                Attempt::Retry => (0, 0),
            };
            if held == 0 {
                backoff.wait().await;
                continue;
            }
            published = Published {
                sequence,
                lines: first + held as u64,
                inline: None,
            };
            lines.stored(held);
            backoff = Backoff::default();
            if ends && held == n {
                return Ok(published);
            }
        }
        if published.sequence == 0 && lines.may_inline() {
            // No line at all: the record says so by itself.
            published.inline = Some(Bytes::from_static(b"[]"));
            return Ok(published);
        }
        // Nothing left to carry it: the end marker alone.
        loop {
            match self
                .publish_end(id, Some(published.sequence), published.lines)
                .await
            {
                Ok(true) => return Ok(published),
                Ok(false) => return Err(lines.fenced()),
                Err(e) => {
                    tracing::debug!(workload = %id, error = %e, "log end not stored yet; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// The lines `id`'s record carries, if it does (see [`INLINE_BYTES`]).
    async fn lines_in_record(
        &self,
        id: WorkloadId,
    ) -> Result<Option<Vec<LogRecord>>, ClusterError> {
        #[derive(Deserialize)]
        struct WithLines<'a> {
            #[serde(borrow)]
            log: Option<&'a serde_json::value::RawValue>,
        }
        let Some(value) = self
            .workloads
            .get(id.to_string())
            .await
            .map_err(ClusterError::unavailable)?
        else {
            return Ok(None);
        };
        let Ok(WithLines { log: Some(lines) }) = serde_json::from_slice(&value) else {
            return Ok(None);
        };
        decode_batch(id, lines.get().as_bytes())
            .map(Some)
            .map_err(|e| {
                anyhow::anyhow!("the lines in workload {id}'s record do not parse: {e}").into()
            })
    }

    /// What the message at `sequence` of `id`'s log holds: the seq after
    /// its last line, and whether it ends the log.
    async fn lines_up_to(
        &self,
        id: WorkloadId,
        sequence: u64,
    ) -> Result<Option<(u64, bool)>, ClusterError> {
        let m = self
            .logs
            .direct_get(sequence)
            .await
            .map_err(ClusterError::unavailable)?;
        if m.subject.as_str() != log_subject(id) {
            return Ok(None);
        }
        let stored = Stored::of(&m);
        Ok(stored.next_seq.map(|next| (next, stored.end)))
    }

    async fn last_log_message(&self, id: WorkloadId) -> Result<Option<Stored>, ClusterError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .logs
            .get_last_raw_message_by_subject(&log_subject(id))
            .await
        {
            Ok(m) => Ok(Some(Stored::of(&m))),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// Ends `id`'s log after its last stored message (unless it has ended),
    /// so that nothing can be appended after it; the number of lines it holds.
    /// (An end already there was written by its node before its final record,
    /// or by another node that failed it over.)
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
