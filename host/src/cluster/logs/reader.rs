//! Reading a workload's log back on any node: an ordered pull of its
//! subject (or its record's inline lines), for followers and history pages.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use futures_util::StreamExt as _;

use super::super::{Cluster, ClusterError, log_subject};
use serde::Deserialize;

use crate::logs::LogRecord;
use crate::workload::WorkloadId;

use super::*;

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
pub(in crate::cluster) enum Source {
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
pub(in crate::cluster) struct LogPull {
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

pub(in crate::cluster) enum PullState {
    /// A pull being asked for. Kept here, so a caller that stops waiting
    /// (a keep-alive's timeout) loses none of the messages it brings.
    Asking(futures_util::future::BoxFuture<'static, Result<pull::Batch, pull::BatchError>>),
    /// The messages of a pull as they come.
    Reading(Box<pull::Batch>),
}

/// How long one pull waits for messages on a quiet log before the next.
pub(in crate::cluster) const PULL_EXPIRES: Duration = Duration::from_secs(10);

impl LogPull {
    pub(in crate::cluster) fn new(
        consumer: PullConsumer,
        stream: async_nats::jetstream::stream::Stream,
    ) -> Self {
        let state = Self::ask(&consumer);
        Self {
            consumer,
            state,
            stream,
        }
    }

    pub(in crate::cluster) fn ask(consumer: &PullConsumer) -> PullState {
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
    pub(in crate::cluster) async fn next(
        &mut self,
    ) -> Result<async_nats::jetstream::Message, ClusterError> {
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
    pub(in crate::cluster) fn of_record(id: WorkloadId, lines: Vec<LogRecord>) -> Self {
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
    pub(in crate::cluster) async fn open_log(
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
    pub(in crate::cluster) async fn log_consumer(
        &self,
        id: WorkloadId,
        start: u64,
    ) -> Result<PullConsumer, ClusterError> {
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
    pub(in crate::cluster) async fn first_batch_after(
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

    /// The lines `id`'s record carries, if it does (see [`INLINE_BYTES`]).
    pub(in crate::cluster) async fn lines_in_record(
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
}
