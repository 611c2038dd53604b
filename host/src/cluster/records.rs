//! The cluster's workload records: one KV entry per workload, holding the
//! record as the API shows it, changed only by compare-and-swap on its
//! revision (so a node that lost its claim can never overwrite a newer
//! state), and each node's index of them for lists and for waiting on an end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::oneshot;

use super::{Cluster, ClusterError};
use crate::view::{WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{Status, WorkloadId};

/// A record and the revision it was read at.
pub struct Versioned {
    /// The record.
    pub view: WorkloadView,
    /// Its KV revision: the one a compare-and-swap must name.
    pub revision: u64,
}

/// What a node knows of every record, kept current by a KV watch: enough for
/// lists, and who is waiting for which workload to end.
#[derive(Default)]
pub struct Index {
    inner: Mutex<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    /// Newest last: ids are ULIDs, ordered by creation time.
    items: BTreeMap<WorkloadId, WorkloadSummary>,
    waiters: HashMap<WorkloadId, Vec<oneshot::Sender<WorkloadView>>>,
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, IndexInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, entry: kv::Entry) {
        let Ok(id) = entry.key.parse::<WorkloadId>() else {
            tracing::warn!(
                key = entry.key,
                "ignoring a workload record with a malformed key"
            );
            return;
        };
        let mut inner = self.lock();
        if entry.operation != kv::Operation::Put {
            inner.items.remove(&id);
            return;
        }
        // The summary alone (what a list shows) is all most records need
        // here: every node reads every record.
        let summary: WorkloadSummary = match serde_json::from_slice(&entry.value) {
            Ok(summary) => summary,
            Err(e) => {
                tracing::warn!(workload = %id, error = %e, "ignoring a workload record that does not parse");
                return;
            }
        };
        if summary.status.is_terminal()
            && let Some(waiters) = inner.waiters.remove(&id)
        {
            match serde_json::from_slice::<WorkloadView>(&entry.value) {
                Ok(view) => {
                    for waiter in waiters {
                        let _ = waiter.send(view.clone());
                    }
                }
                // Dropped: each waiter reads the record itself (see `await_end`).
                Err(e) => {
                    tracing::warn!(workload = %id, error = %e, "a final workload record does not parse")
                }
            }
        }
        inner.items.insert(id, summary);
    }

    /// The status the index last saw of `id`.
    fn status(&self, id: WorkloadId) -> Option<Status> {
        self.lock().items.get(&id).map(|s| s.status)
    }

    /// Drops whoever waits for `id` (its submission failed).
    pub(super) fn forget(&self, id: WorkloadId) {
        self.lock().waiters.remove(&id);
    }

    /// Workloads the index last saw running on `node`.
    pub(super) fn running_on(&self, node: &str) -> Vec<WorkloadId> {
        self.lock()
            .items
            .values()
            .filter(|s| s.status == Status::Running && s.node.as_deref() == Some(node))
            .map(|s| s.id)
            .collect()
    }

    pub(super) fn wait(&self, id: WorkloadId) -> oneshot::Receiver<WorkloadView> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        let waiters = inner.waiters.entry(id).or_default();
        waiters.retain(|w| !w.is_closed());
        waiters.push(tx);
        rx
    }

    fn list(&self, limit: u64, offset: u64, status: Option<Status>) -> WorkloadList {
        let inner = self.lock();
        let matching = || {
            inner
                .items
                .values()
                .rev()
                .filter(|s| status.is_none_or(|st| s.status == st))
        };
        WorkloadList {
            items: matching()
                .skip(offset as usize)
                .take(limit as usize)
                .cloned()
                .collect(),
            total: matching().count() as u64,
            limit,
            offset,
        }
    }
}

/// A record's value as the cluster stores it: the record as the API shows it,
/// and under `log` the lines it carries, if any (a reader of the record alone
/// skips them).
fn record_value(view: &WorkloadView, lines: Option<&[u8]>) -> Result<Bytes, ClusterError> {
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
            Ok(revision) => Ok(revision),
            Err(e) => match self.record(view.summary.id).await {
                Ok(found) if found.view.summary.status == view.summary.status => Ok(found.revision),
                _ => Err(e),
            },
        }
    }

    /// Replaces a record read at `revision`: the new revision, or `None` when
    /// someone changed it since.
    pub(super) async fn swap(
        &self,
        view: &WorkloadView,
        revision: u64,
    ) -> Result<Option<u64>, ClusterError> {
        let value = record_value(view, None)?;
        match self
            .workloads
            .update(view.summary.id.to_string(), value, revision)
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// A page of every workload of the cluster, newest first (from this
    /// node's index, which follows the records within milliseconds).
    pub fn list(&self, limit: u64, offset: u64, status: Option<Status>) -> WorkloadList {
        self.index.list(limit, offset, status)
    }

    /// The final record of `id` once it has ended.
    pub async fn wait_end(&self, id: WorkloadId) -> Result<WorkloadView, ClusterError> {
        let ended = self.index.wait(id);
        // Registered before looking, so an end in between is not missed.
        let look = self.index.status(id).is_none_or(|s| s.is_terminal());
        self.await_end(id, ended, look).await
    }

    /// Waits on `ended` (registered before the record could end), looking at
    /// the record itself first if `look`, and every second: the index's watch
    /// can miss an update across a reconnect.
    pub(super) async fn await_end(
        &self,
        id: WorkloadId,
        mut ended: oneshot::Receiver<WorkloadView>,
        mut look: bool,
    ) -> Result<WorkloadView, ClusterError> {
        loop {
            if look {
                let record = self.record(id).await?;
                if record.view.summary.status.is_terminal() {
                    return Ok(record.view);
                }
            }
            tokio::select! {
                view = &mut ended => match view {
                    Ok(view) => return Ok(view),
                    // Dropped (its entry pruned): wait anew.
                    Err(_) => ended = self.index.wait(id),
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            look = true;
        }
    }

    /// Follows every record into the index; starts over after a failure.
    pub(super) async fn watch_records(self: Arc<Self>) {
        loop {
            match self.workloads.watch_with_history(">").await {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(entry) => self.index.apply(entry),
                            Err(e) => {
                                tracing::warn!(error = %e, "the watch of workload records failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch workload records yet"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}
