//! Retention on a cluster: the lines of workloads that ended long enough ago
//! (`--retain-for`, a tenant's `retain_for_ms`), and of the oldest finished
//! workloads while `VULCAN_LOGS` holds more than `--retain-bytes`, are
//! purged from the stream; the record stays, with `pruned_at`, so its SSE and
//! history answer 410 on every node.
//!
//! One node prunes at a time: it holds the lease (key `pruner` in the
//! `vulcan_retention` bucket, renewed by compare-and-swap each pass). A
//! workload is pruned log first, record second; a node that dies between
//! the two leaves a record whose lines are gone but which is not yet marked,
//! and the next holder purges (nothing more) and marks it. Only finished
//! workloads past their time are ever candidates, so nothing that should
//! stay is touched.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, log_subject, now_ms};
use crate::retention::RetentionPolicy;
use crate::store::PruneScope;
use crate::workload::WorkloadId;

/// KV bucket of the pruning lease.
pub const RETENTION_BUCKET: &str = "vulcan_retention";

/// The lease's key.
const LEASE_KEY: &str = "pruner";

/// How long a lease lasts unless renewed: a holder that died is replaced
/// after this.
const LEASE_FOR: Duration = Duration::from_secs(15);

/// Workloads read from the index per step.
const STEP: u64 = 256;

/// Who prunes, until when.
#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    node: String,
    until_ms: i64,
}

impl Cluster {
    /// Every `every`, prunes what `policy` says is old, while this node
    /// holds the lease; runs until dropped.
    pub async fn prune_forever(self: Arc<Self>, policy: RetentionPolicy, every: Duration) {
        if policy.keeps_everything() {
            return;
        }
        let lease = self.lease.clone();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.hold_lease(&lease).await {
                Ok(true) => {
                    if let Err(e) = self.prune_once(&policy, &lease).await {
                        tracing::debug!(error = %e, "cluster retention stopped for now");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the retention lease"),
            }
        }
    }

    /// Takes or renews the lease: true while this node holds it.
    async fn hold_lease(&self, bucket: &kv::Store) -> Result<bool, ClusterError> {
        self.connected()?;
        let now = now_ms();
        let mine = Lease {
            node: self.node_id.clone(),
            until_ms: now + LEASE_FOR.as_millis() as i64,
        };
        let value = Bytes::from(serde_json::to_vec(&mine).map_err(anyhow::Error::from)?);
        let entry = bucket
            .entry(LEASE_KEY)
            .await
            .map_err(ClusterError::unavailable)?;
        let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
            None => bucket.create(LEASE_KEY, value).await.is_ok(),
            Some(e) => {
                let held: Option<Lease> = serde_json::from_slice(&e.value).ok();
                let free = held.is_none_or(|l| l.node == self.node_id || l.until_ms < now);
                free && bucket.update(LEASE_KEY, value, e.revision).await.is_ok()
            }
        };
        Ok(written)
    }

    /// One pass: each scope's old workloads, then the oldest while the
    /// stream is over its size. Stops early when the lease is lost.
    async fn prune_once(
        &self,
        policy: &RetentionPolicy,
        lease: &kv::Store,
    ) -> Result<(), ClusterError> {
        self.catch_up().await?;
        for (scope, cutoff) in policy.cutoffs(now_ms()) {
            let (tenant, except) = match scope {
                PruneScope::Tenant(t) => (Some(t), Vec::new()),
                PruneScope::AllBut(others) => (None, others),
            };
            loop {
                let ids = (self.index.summaries)
                    .prunable(tenant.clone(), except.clone(), cutoff, STEP)
                    .await?;
                if ids.is_empty() {
                    break;
                }
                self.prune_all(&ids).await?;
                self.catch_up().await?;
                if !self.hold_lease(lease).await? {
                    return Ok(());
                }
            }
        }
        if let Some(cap) = policy.max_bytes {
            while self.log_stream_bytes().await? > cap {
                let ids = (self.index.summaries)
                    .prunable(None, Vec::new(), i64::MAX, 16)
                    .await?;
                if ids.is_empty() {
                    break;
                }
                self.prune_all(&ids).await?;
                self.catch_up().await?;
                if !self.hold_lease(lease).await? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn prune_all(&self, ids: &[WorkloadId]) -> Result<(), ClusterError> {
        for id in ids {
            self.prune_workload(*id).await?;
        }
        Ok(())
    }

    /// Bytes `VULCAN_LOGS` holds now.
    async fn log_stream_bytes(&self) -> Result<u64, ClusterError> {
        let mut stream = self.logs.clone();
        let info = stream.info().await.map_err(ClusterError::unavailable)?;
        Ok(info.state.bytes)
    }

    /// Purges `id`'s lines from the stream, then marks its record pruned
    /// (which also drops lines the record carried inside).
    pub(super) async fn prune_workload(&self, id: WorkloadId) -> Result<(), ClusterError> {
        loop {
            let current = match self.record(id).await {
                Ok(found) => found,
                Err(ClusterError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut view = current.view;
            if !view.summary.status.is_terminal() || view.summary.pruned_at.is_some() {
                return Ok(());
            }
            self.logs
                .purge()
                .filter(log_subject(id))
                .await
                .map_err(ClusterError::unavailable)?;
            view.summary.pruned_at = Some(crate::view::rfc3339(now_ms()));
            let value = super::records::record_value(&view, None)?;
            match self
                .workloads
                .update(id.to_string(), value, current.revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(ClusterError::unavailable(e)),
            }
        }
    }
}
