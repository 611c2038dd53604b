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

mod buffer;
mod reader;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;

use super::{Backoff, Cluster, ClusterError, log_subject};

use crate::workload::WorkloadId;

pub use buffer::{ClusterLines, Fenced, Published};
pub use reader::{LogChunk, LogCursor};
use wire::*;

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
pub(in crate::cluster) struct Stored {
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
