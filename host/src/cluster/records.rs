//! The cluster's workload records: one KV entry per workload, holding the
//! record as the API shows it, changed only by compare-and-swap on its
//! revision (so a node that lost its claim can never overwrite a newer
//! state); each node's index of them for lists, brought up to date from the
//! records' stream when asked; and waiting for a workload's end.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::index::{Change, SummaryIndex};
use super::{Cluster, ClusterError, REQUEST_TIMEOUT, ended_subject};
use crate::view::TenantQueue;
use crate::view::{WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{ListRequest, WorkloadId};

/// A record and the revision it was read at.
pub struct Versioned {
    /// The record.
    pub view: WorkloadView,
    /// Its KV revision: the one a compare-and-swap must name.
    pub revision: u64,
}

/// What a node knows of every record (see [`SummaryIndex`]), and the
/// consumer that brings it up to date. It is brought up to date from the
/// records' stream when a list asks, or the liveness check (once after
/// start, and when a node is lost; see [`Cluster::catch_up`]), in batches,
/// rather than told of each change as it happens: that would deliver every
/// change of every run to every node.
pub struct Index {
    pub(super) summaries: SummaryIndex,
    /// The consumer that reads the records' stream from where the index
    /// stands, and when it was last used; held while catching up, so callers
    /// at the same time share one.
    reader: tokio::sync::Mutex<Option<(PullConsumer, Instant)>>,
}

/// Record changes read per request while catching up.
const CATCH_UP_BATCH: usize = 1024;

/// How long the records' reader may go unused before NATS removes it; one
/// unused for half of that is made afresh before it is used again.
const READER_IDLE: Duration = Duration::from_secs(60);

impl Index {
    /// The index kept in `data_dir`.
    pub fn open(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self {
            summaries: SummaryIndex::open(data_dir)?,
            reader: tokio::sync::Mutex::new(None),
        })
    }
}

/// One change read from the records' stream, as the index takes it.
fn change_of(key: &str, change: &async_nats::Message) -> Option<Change> {
    let Ok(id) = key.parse::<WorkloadId>() else {
        tracing::warn!(key, "ignoring a workload record with a malformed key");
        return None;
    };
    if !is_put(change) {
        return Some(Change::Delete(id));
    }
    // The summary alone (what a list shows) is all the index keeps.
    match serde_json::from_slice::<WorkloadSummary>(&change.payload) {
        Ok(summary) => Some(Change::Put(Box::new(summary))),
        Err(e) => {
            tracing::warn!(workload = %id, error = %e, "ignoring a workload record that does not parse");
            None
        }
    }
}

/// Whether a change read from a KV stream puts a value (rather than deleting
/// or purging its key, or marking it removed by the stream's limits).
fn is_put(change: &async_nats::Message) -> bool {
    let Some(headers) = change.headers.as_ref() else {
        return true;
    };
    headers
        .get("KV-Operation")
        .is_none_or(|op| op.as_str() == "PUT")
        && headers
            .get(async_nats::header::NATS_MARKER_REASON)
            .is_none()
}

/// A record's value as the cluster stores it: the record as the API shows it,
/// and under `log` the lines it carries, if any (a reader of the record alone
/// skips them).
pub(super) fn record_value(
    view: &WorkloadView,
    lines: Option<&[u8]>,
) -> Result<Bytes, ClusterError> {
    let mut value = serde_json::to_vec(view).map_err(anyhow::Error::from)?;
    if let Some(lines) = lines {
        // The record is a JSON object: one more key goes before its brace.
        value.pop();
        value.extend_from_slice(b",\"log\":");
        value.extend_from_slice(lines);
        value.push(b'}');
    }
    Ok(Bytes::from(value))
}

impl Cluster {
    /// A workload's record as the cluster holds it now.
    pub async fn record(&self, id: WorkloadId) -> Result<Versioned, ClusterError> {
        self.connected()?;
        let entry = self
            .workloads
            .entry(id.to_string())
            .await
            .map_err(ClusterError::unavailable)?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Versioned {
                view: serde_json::from_slice(&e.value).map_err(|e| {
                    anyhow::anyhow!("the cluster's record of workload {id} does not parse: {e}")
                })?,
                revision: e.revision,
            }),
            _ => Err(ClusterError::NotFound(id)),
        }
    }

    /// Creates a record; fails if the id exists.
    pub(super) async fn create_record(&self, view: &WorkloadView) -> Result<u64, ClusterError> {
        self.create_with_lines(view, None).await
    }

    /// Creates a record that carries its log's `lines` (encoded) when given.
    async fn create_with_lines(
        &self,
        view: &WorkloadView,
        lines: Option<&[u8]>,
    ) -> Result<u64, ClusterError> {
        let value = record_value(view, lines)?;
        self.workloads
            .create(view.summary.id.to_string(), value)
            .await
            .map_err(ClusterError::unavailable)
    }

    /// Creates a record only this node can know of (a sync run's, see
    /// `UNLISTED_FOR`), with its log's `lines` inside when given: its
    /// revision, also when an earlier attempt whose answer was lost created it.
    pub(super) async fn create_own(
        &self,
        view: &WorkloadView,
        lines: Option<&[u8]>,
    ) -> Result<u64, ClusterError> {
        match self.create_with_lines(view, lines).await {
            Ok(revision) => {
                self.ended_with_slot(view);
                Ok(revision)
            }
            Err(e) => match self.record(view.summary.id).await {
                Ok(found) if found.view.summary.status == view.summary.status => Ok(found.revision),
                _ => Err(e),
            },
        }
    }

    /// Replaces a record read at `revision`: the new revision, or `None` when
    /// someone changed it since. A final record is also announced to whoever
    /// waits for it (see [`Cluster::wait_end`]).
    pub(super) async fn swap(
        &self,
        view: &WorkloadView,
        revision: u64,
    ) -> Result<Option<u64>, ClusterError> {
        let value = record_value(view, None)?;
        match self
            .workloads
            .update(view.summary.id.to_string(), value.clone(), revision)
            .await
        {
            Ok(revision) => {
                if view.summary.status.is_terminal() {
                    self.ended_with_slot(view);
                    // Not stored: a waiter that misses it reads the record.
                    let subject = ended_subject(view.summary.id);
                    let published = match &self.signer {
                        Some(signer) => {
                            let headers = signer.sign(&subject, &value);
                            self.client
                                .publish_with_headers(subject, headers, value)
                                .await
                        }
                        None => self.client.publish(subject, value).await,
                    };
                    if let Err(e) = published {
                        tracing::debug!(workload = %view.summary.id, error = %e, "could not announce an end");
                    }
                }
                Ok(Some(revision))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// A page of every workload of the cluster, newest first, from this
    /// node's index brought up to every change stored before the call (or,
    /// when NATS cannot be read, as the index last knew them).
    pub async fn list(&self, request: ListRequest) -> Result<WorkloadList, ClusterError> {
        if let Err(e) = self.catch_up().await {
            tracing::debug!(error = %e, "listing from the index as it stands");
        }
        Ok(self.index.summaries.list(request).await?)
    }

    /// Per tenant: queued (pending) and running workloads and the oldest
    /// wait, from this node's index brought up to date as for a list; and
    /// how many wait in all.
    pub async fn queue_depth(&self) -> Result<(Vec<TenantQueue>, u64), ClusterError> {
        if let Err(e) = self.catch_up().await {
            tracing::debug!(error = %e, "queue depth from the index as it stands");
        }
        let now = super::now_ms();
        let rows = self.index.summaries.queue_depth().await?;
        let total = rows.iter().map(|r| r.1).sum();
        let tenants = rows
            .into_iter()
            .map(|(tenant, queued, running, oldest)| {
                let oldest_ms = oldest.as_deref().and_then(crate::view::parse_rfc3339);
                TenantQueue {
                    tenant,
                    queued,
                    running,
                    oldest_queued_at: oldest,
                    oldest_wait_ms: oldest_ms.map(|at| (now - at).max(0) as u64),
                }
            })
            .collect();
        Ok((tenants, total))
    }

    /// The final record of `id` once it has ended: from the end announced on
    /// [`ended_subject`] by whoever ended it, or from the record itself,
    /// read first and every second (an announcement is not stored, so one
    /// made across a reconnect is missed).
    pub async fn wait_end(&self, id: WorkloadId) -> Result<WorkloadView, ClusterError> {
        self.connected()?;
        // Subscribed before the first look, so an end in between is not missed.
        let mut ends = Some(
            self.client
                .subscribe(ended_subject(id))
                .await
                .map_err(ClusterError::unavailable)?,
        );
        loop {
            let record = self.record(id).await?;
            if record.view.summary.status.is_terminal() {
                return Ok(record.view);
            }
            let announced = async {
                match ends.as_mut() {
                    Some(subscription) => subscription.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = announced => match end {
                    Some(end) => {
                        let forged = self.signer.as_ref().and_then(|s| {
                            s.refusal(end.subject.as_str(), end.headers.as_ref(), &end.payload)
                        });
                        match (forged, serde_json::from_slice::<WorkloadView>(&end.payload)) {
                            (Some(why), _) => tracing::warn!(workload = %id, "ignoring an announced end: {why}"),
                            (None, Ok(view)) if view.summary.status.is_terminal() => return Ok(view),
                            (None, Ok(_)) => {}
                            (None, Err(e)) => tracing::warn!(workload = %id, error = %e, "ignoring an announced end that does not parse"),
                        }
                    }
                    // The client closed the subscription: looking every second will do.
                    None => ends = None,
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Brings the index up to every record change stored before this call.
    pub(super) async fn catch_up(&self) -> Result<(), ClusterError> {
        self.connected()?;
        let mut reader = self.index.reader.lock().await;
        loop {
            // Each request is bounded, not the whole: a node just started
            // may have a long way to go.
            let read = tokio::time::timeout(REQUEST_TIMEOUT, self.read_batch(&mut reader)).await;
            let failure = match read {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => continue,
                Ok(Err(e)) => e,
                Err(_) => {
                    ClusterError::Unavailable("reading the workload records timed out".into())
                }
            };
            // Made afresh from where the index stands next time.
            *reader = None;
            return Err(failure);
        }
    }

    /// Reads one batch of changes into the index with `reader` (made first
    /// if missing): true when none is left.
    async fn read_batch(
        &self,
        reader: &mut Option<(PullConsumer, Instant)>,
    ) -> Result<bool, ClusterError> {
        // One unused for long may have been removed by NATS: made afresh.
        reader.take_if(|(_, used)| used.elapsed() >= READER_IDLE / 2);
        let consumer = match reader {
            Some((consumer, used)) => {
                *used = Instant::now();
                consumer
            }
            None => {
                &mut reader
                    .insert((self.records_reader().await?, Instant::now()))
                    .0
            }
        };
        let mut batch = consumer
            .fetch()
            .max_messages(CATCH_UP_BATCH)
            .messages()
            .await
            .map_err(ClusterError::unavailable)?;
        let (mut read, mut pending, mut last) = (0, 0, 0);
        let mut changes = Vec::new();
        while let Some(change) = batch.next().await {
            let change = change.map_err(ClusterError::unavailable)?;
            let (seq, left) = match change.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(e) => return Err(ClusterError::unavailable(e)),
            };
            let key = change
                .subject
                .strip_prefix(self.workloads.prefix.as_str())
                .unwrap_or_default();
            changes.extend(change_of(key, &change));
            (read, pending, last) = (read + 1, left, seq);
        }
        if read > 0 {
            self.index.summaries.apply(changes, last).await?;
        }
        Ok(read < CATCH_UP_BATCH || pending == 0)
    }

    /// A consumer of the records' stream from the change after the last the
    /// index applied; the latest of each record for an index that has none,
    /// or whose stream was made anew (its sequence went back).
    async fn records_reader(&self) -> Result<PullConsumer, ClusterError> {
        let mut stream = self.workloads.stream.clone();
        let last = stream
            .info()
            .await
            .map_err(ClusterError::unavailable)?
            .state
            .last_sequence;
        let mut applied = self.index.summaries.applied().await?;
        if applied > last {
            self.index.summaries.reset().await?;
            applied = 0;
        }
        let deliver_policy = match applied {
            0 => DeliverPolicy::LastPerSubject,
            applied => DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            },
        };
        stream
            .create_consumer(pull::Config {
                deliver_policy,
                ack_policy: AckPolicy::None,
                filter_subject: format!("{}>", self.workloads.prefix),
                inactive_threshold: READER_IDLE,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::unavailable)
    }
}
