//! Heartbeats, and what happens to a node that stops sending them.
//!
//! Every node writes its heartbeat (the workloads it has claimed) each second
//! and reads everyone else's. A node whose heartbeat
//! has not changed for [`NODE_LOSS_AFTER`] while this node could read NATS is
//! lost: each workload its heartbeat or the records say runs there is
//! failed — its log is ended after its last stored batch first, so the lost
//! node (if it was only paused) can append nothing more, and then its record
//! is swapped to `failed`, so it cannot overwrite that either. It is failed
//! rather than run again: a workload may have had effects (outbound
//! requests, its output so far) that a second run would repeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::dispatch::ended;
use super::{Cluster, ClusterError, HEARTBEAT_EVERY, NODE_LOSS_AFTER};
use crate::workload::{FailureKind, Status, WorkloadId};

/// What a node says of itself each second (the key is its id, and a new
/// revision is the beat itself).
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    /// Workloads it has claimed and not finished.
    claimed: Vec<WorkloadId>,
    /// Which process beats: made at start, so that a second live process
    /// with the same node id is told apart from this one's previous run.
    #[serde(default)]
    instance: String,
    /// Where that process runs, to name it when its id is refused.
    #[serde(default)]
    host: String,
    #[serde(default)]
    pid: u32,
}

/// How long a node that finds a heartbeat under its id watches it before
/// it takes the id: a live process beats at least once in that time.
const ID_IN_USE_WATCH: Duration = Duration::from_millis(2_500);

/// Every how many beats a node looks for quota places left held.
const SLOT_REPAIR_EVERY: u64 = 5;

/// The last heartbeat revision seen of a node, and since when.
struct Seen {
    revision: u64,
    since: Instant,
}

impl Cluster {
    /// Writes this node's heartbeat now: over its own last beat (compare
    /// and swap), so that another process beating under the same id is
    /// noticed and named.
    pub(super) async fn beat_now(&self) -> Result<(), ClusterError> {
        let mut last = self.beat.lock().await;
        let beat = Heartbeat {
            claimed: self.claimed_ids(),
            instance: self.instance.clone(),
            host: host_name(),
            pid: std::process::id(),
        };
        let value = Bytes::from(serde_json::to_vec(&beat).map_err(anyhow::Error::from)?);
        if let Some(revision) = *last {
            match self
                .nodes
                .update(&self.node_id, value.clone(), revision)
                .await
            {
                Ok(revision) => {
                    *last = Some(revision);
                    self.answered();
                    return Ok(());
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Someone else wrote it: a peer that presumed this node
                    // lost (and deleted it), or another process with this id.
                    if let Some(other) = self.beat_of_other_instance().await? {
                        tracing::error!(
                            node = self.node_id,
                            other,
                            "another live process beats under this node's id: both are \
                             taken for one node; stop one of them and give it another --node-id"
                        );
                    }
                }
                Err(e) => return Err(ClusterError::unavailable(e)),
            }
        }
        let revision =
            (self.nodes.put(&self.node_id, value).await).map_err(ClusterError::unavailable)?;
        *last = Some(revision);
        self.answered();
        Ok(())
    }

    /// Who beats under this node's id, if it is not this process.
    async fn beat_of_other_instance(&self) -> Result<Option<String>, ClusterError> {
        let entry = (self.nodes.entry(&self.node_id).await).map_err(ClusterError::unavailable)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice::<Heartbeat>(&e.value).ok())
            .filter(|b| b.instance != self.instance)
            .map(|b| describe(&b)))
    }

    /// Refuses this node's id if another live process beats under it (the
    /// same `--node-id` twice, or a copied data directory's `node-id`): a
    /// heartbeat found under it must stay still for [`ID_IN_USE_WATCH`],
    /// as that of this node's crashed previous run does.
    pub(super) async fn check_id_unused(&self) -> anyhow::Result<()> {
        let first = (self.nodes.entry(&self.node_id).await)
            .context("failed to read this node's heartbeat")?
            .filter(|e| e.operation == kv::Operation::Put);
        let Some(first) = first else { return Ok(()) };
        tokio::time::sleep(ID_IN_USE_WATCH).await;
        let again = (self.nodes.entry(&self.node_id).await)
            .context("failed to read this node's heartbeat")?
            .filter(|e| e.operation == kv::Operation::Put);
        if let Some(again) = again
            && again.revision != first.revision
        {
            let other = serde_json::from_slice::<Heartbeat>(&again.value)
                .map(|b| describe(&b))
                .unwrap_or_else(|_| "a process that beats under it".to_owned());
            anyhow::bail!(
                "node id `{}` is in use by a live node ({other}); give this node another \
                 --node-id (a copied data directory carries its id in its `node-id` file: \
                 delete that file to get a new one)",
                self.node_id
            );
        }
        Ok(())
    }

    /// Fails what this node's previous run had claimed (its heartbeat is
    /// still there after a crash): nothing runs those now.
    pub(super) async fn fail_own_previous(&self) -> Result<(), ClusterError> {
        let entry = self
            .nodes
            .entry(&self.node_id)
            .await
            .map_err(ClusterError::unavailable)?;
        if let Some(entry) = entry
            && let Ok(beat) = serde_json::from_slice::<Heartbeat>(&entry.value)
        {
            let why = restarted(&self.node_id);
            for id in beat.claimed {
                self.fail_lost(id, &self.node_id, &why).await?;
            }
        }
        Ok(())
    }

    /// This node's heartbeat and the connection figure, every second.
    pub(super) async fn beat_forever(self: Arc<Self>) {
        let mut beats = Beats::new();
        while beats.next(&self.stop).await {
            let connected = self.connected().is_ok();
            self.metrics.connected.set(i64::from(connected));
            if let Err(e) = self.beat_now().await {
                tracing::debug!(error = %e, "heartbeat not written");
                // Time without NATS does not count against anyone.
                *self.lock_reachable() = None;
            }
        }
    }

    /// Loss detection (and the queue figure), every second.
    pub(super) async fn keep_alive(self: Arc<Self>) {
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut swept_previous = false;
        let mut beats = Beats::new();
        let mut beat = 0u64;
        while beats.next(&self.stop).await {
            beat += 1;
            if beat.is_multiple_of(SLOT_REPAIR_EVERY)
                && let Err(e) = self.repair_slots().await
            {
                tracing::debug!(error = %e, "quota places not repaired this time");
            }
            if let Ok(info) = self.js_queue_depth().await {
                self.metrics.queue_depth.set(info);
            }
            let others = self.read_heartbeats().await;
            let Ok(others) = others else {
                // Time without NATS does not count against anyone.
                *self.lock_reachable() = None;
                continue;
            };
            if !swept_previous {
                swept_previous = self.sweep_previous_run().await;
            }
            self.sweep_doubtful().await;
            // A lost node's workloads are found in the index, brought up to
            // date once in this beat if a node is lost.
            let mut caught_up = None;
            let now = Instant::now();
            let reachable_since = *self.lock_reachable().get_or_insert(now);
            seen.retain(|node, _| others.iter().any(|(n, _, _)| n == node));
            for (node, revision, beat) in others {
                if node == self.node_id {
                    continue;
                }
                let s = seen.entry(node.clone()).or_insert(Seen {
                    revision,
                    since: now,
                });
                if s.revision != revision {
                    *s = Seen {
                        revision,
                        since: now,
                    };
                    continue;
                }
                let silent = now.duration_since(s.since.max(reachable_since));
                if silent < NODE_LOSS_AFTER {
                    continue;
                }
                tracing::warn!(
                    node,
                    silent_ms = silent.as_millis() as u64,
                    "node lost: failing its running workloads"
                );
                let why = format!(
                    "failed: node {node} was lost (no heartbeat for {} s) while this workload \
                     was running there; its lines up to the loss are kept",
                    silent.as_secs()
                );
                // An index behind the records may miss some: tried next beat.
                let mut settled = match caught_up {
                    Some(ok) => ok,
                    None => *caught_up.insert(self.catch_up().await.is_ok()),
                };
                // What it said it had claimed, and what the records say runs there.
                let mut ids = beat.map(|b| b.claimed).unwrap_or_default();
                match self.index.summaries.running_on(&node).await {
                    Ok(running) => ids.extend(running),
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot read the cluster index");
                        settled = false;
                    }
                }
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    if let Err(e) = self.fail_lost(id, &node, &why).await {
                        tracing::warn!(workload = %id, error = %e, "failed to fail a lost node's workload; retrying");
                        settled = false;
                    }
                }
                // A pass over them, whether or not each was settled.
                self.metrics.lost_nodes_swept.inc();
                if settled {
                    // Only if unchanged: a node that came back keeps its entry.
                    let _ = self
                        .nodes
                        .delete_expect_revision(&node, Some(revision))
                        .await;
                    seen.remove(&node);
                }
            }
        }
    }

    /// Fails records that say they run here but that this process has not
    /// claimed, left by a previous run of this node (one that crashed and
    /// came back sooner than its loss was noticed): all were stored before
    /// this run began, so one sweep of the whole index does. True once done.
    async fn sweep_previous_run(&self) -> bool {
        if let Err(e) = self.catch_up().await {
            tracing::debug!(error = %e, "cannot read the workload records yet");
            return false;
        }
        // In this order: a workload is claimed before its record says it
        // runs here, so one the index shows is in the set read after it.
        let Ok(running_here) = self.index.summaries.running_on(&self.node_id).await else {
            return false;
        };
        let claimed = self.claimed_ids();
        let why = restarted(&self.node_id);
        let mut done = true;
        for id in running_here {
            if !claimed.contains(&id)
                && let Err(e) = self.fail_lost(id, &self.node_id, &why).await
            {
                tracing::debug!(workload = %id, error = %e, "failed to fail an orphan; retrying");
                done = false;
            }
        }
        done
    }

    /// Settles the workloads this run doubts (see [`Cluster::doubt`]): one
    /// whose record says it runs here, but that this node has not claimed,
    /// is failed; the others are forgotten.
    async fn sweep_doubtful(&self) {
        let doubtful = self.lock_doubtful().clone();
        for id in doubtful {
            let settled = match self.record(id).await {
                Ok(found) => {
                    let s = &found.view.summary;
                    // Read after the record, as in the sweep above.
                    let orphan = s.status == Status::Running
                        && s.node.as_deref() == Some(self.node_id.as_str())
                        && !self.claimed_ids().contains(&id);
                    !orphan || {
                        let why = unconfirmed(&self.node_id);
                        self.fail_lost(id, &self.node_id, &why).await.is_ok()
                    }
                }
                Err(ClusterError::NotFound(_)) => true,
                Err(_) => false,
            };
            if settled {
                self.lock_doubtful().retain(|d| *d != id);
            }
        }
    }

    fn lock_reachable(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.reachable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Work queued and not yet handed to any node.
    async fn js_queue_depth(&self) -> Result<i64, ClusterError> {
        let consumer: async_nats::jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(super::DISPATCH_CONSUMER, super::QUEUE_STREAM)
            .await
            .map_err(ClusterError::unavailable)?;
        Ok(i64::try_from(consumer.cached_info().num_pending).unwrap_or(i64::MAX))
    }

    /// Every node's heartbeat: its id, revision and content (if it parses).
    async fn read_heartbeats(&self) -> Result<Vec<(String, u64, Option<Heartbeat>)>, ClusterError> {
        use futures_util::TryStreamExt as _;
        let keys: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(ClusterError::unavailable)?
            .try_collect()
            .await
            .map_err(ClusterError::unavailable)?;
        let mut beats = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(entry) = self
                .nodes
                .entry(&key)
                .await
                .map_err(ClusterError::unavailable)?
            {
                let beat = serde_json::from_slice(&entry.value)
                    .inspect_err(
                        |e| tracing::warn!(node = key, error = %e, "a heartbeat does not parse"),
                    )
                    .ok();
                beats.push((key, entry.revision, beat));
            }
        }
        Ok(beats)
    }

    /// Fails `id` if it is still running on `node`: ends its log after the
    /// last stored batch, then swaps its record to `failed` (node lost).
    pub(super) async fn fail_lost(
        &self,
        id: WorkloadId,
        node: &str,
        why: &str,
    ) -> Result<(), ClusterError> {
        loop {
            let current = match self.record(id).await {
                Ok(c) => c,
                Err(ClusterError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let summary = &current.view.summary;
            if summary.status != Status::Running || summary.node.as_deref() != Some(node) {
                return Ok(());
            }
            // Still running there: its log is ended now if it was not (an
            // end already there counts its lines just the same).
            let lines = self.end_log(id).await?;
            let revision = current.revision;
            let mut view = ended(
                current.view,
                Status::Failed,
                FailureKind::NodeLost,
                why.to_owned(),
            );
            view.summary.line_count = lines;
            if self.swap(&view, revision).await?.is_some() {
                return Ok(());
            }
        }
    }
}

/// A tick every [`HEARTBEAT_EVERY`] (a late one delays the next) until
/// the node stops.
struct Beats(tokio::time::Interval);

impl Beats {
    fn new() -> Self {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(tick)
    }

    /// Waits for the next tick; false once `stop` is cancelled.
    async fn next(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        tokio::select! {
            () = stop.cancelled() => false,
            _ = self.0.tick() => true,
        }
    }
}

/// Names the process behind a heartbeat.
fn describe(beat: &Heartbeat) -> String {
    format!(
        "instance {} on host `{}`, pid {}",
        beat.instance, beat.host, beat.pid
    )
}

/// This machine's name, as far as it can be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Why a workload this node never ran was failed.
fn unconfirmed(node: &str) -> String {
    format!(
        "failed: node {node} could not confirm that it started this workload (NATS did not \
         answer in time) and did not run it"
    )
}

fn restarted(node: &str) -> String {
    format!(
        "failed: node {node} restarted while this workload was running there; its lines up to \
         then are kept"
    )
}
