//! Tenants' `max_concurrent` across the whole cluster.
//!
//! One KV entry per tenant with a quota (bucket [`SLOTS_BUCKET`], key = the
//! tenant) lists the workloads holding its places, each with when it took
//! one. A place is taken by compare-and-swap before the workload's record is
//! created, so racing submissions on any nodes never hold more than the
//! quota; it is given back by whoever writes the workload's final record
//! (its node, a kill, or the sweep of a lost node). A place whose holder
//! ended without giving it back (its node died between the two writes) or
//! never got a record is given back by the repair every node runs.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, now_ms};
use crate::view::WorkloadView;
use crate::workload::WorkloadId;

/// KV bucket of the tenants' held places.
pub const SLOTS_BUCKET: &str = "vulcan_tenant_slots";

/// How long a place may be held by a workload that has no record before
/// the repair gives it back: far longer than a submission takes.
const UNRECORDED_GRACE_MS: i64 = 30_000;

/// Compare-and-swap attempts before a change counts as failed.
const ATTEMPTS: usize = 200;

/// The places one tenant holds: workload id → when it took it (ms).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Held {
    held: BTreeMap<WorkloadId, i64>,
}

/// The held places of `tenant` and the revision they were read at (0: none).
async fn read(slots: &kv::Store, tenant: &str) -> Result<(Held, u64), ClusterError> {
    let entry = slots
        .entry(tenant)
        .await
        .map_err(ClusterError::unavailable)?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let held = serde_json::from_slice(&e.value).unwrap_or_default();
            Ok((held, e.revision))
        }
        Some(e) => Ok((Held::default(), e.revision)),
        None => Ok((Held::default(), 0)),
    }
}

/// Writes `held` over the revision it was read at; false when it moved.
async fn write(
    slots: &kv::Store,
    tenant: &str,
    held: &Held,
    revision: u64,
) -> Result<bool, ClusterError> {
    let value = Bytes::from(serde_json::to_vec(held).map_err(anyhow::Error::from)?);
    let written = match revision {
        0 => slots.create(tenant, value).await.map(drop).map_err(|e| {
            match e.kind() == kv::CreateErrorKind::AlreadyExists {
                true => None,
                false => Some(ClusterError::unavailable(e)),
            }
        }),
        r => slots.update(tenant, value, r).await.map(drop).map_err(|e| {
            match e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                true => None,
                false => Some(ClusterError::unavailable(e)),
            }
        }),
    };
    match written {
        Ok(()) => Ok(true),
        Err(None) => Ok(false),
        Err(Some(e)) => Err(e),
    }
}

/// Applies `change` to `tenant`'s places until it lands (or it says there
/// is nothing to write): what `change` returned.
async fn change<T>(
    slots: &kv::Store,
    tenant: &str,
    mut change: impl FnMut(&mut Held) -> (bool, T),
) -> Result<T, ClusterError> {
    for _ in 0..ATTEMPTS {
        let (mut held, revision) = read(slots, tenant).await?;
        let (write_it, out) = change(&mut held);
        if !write_it || write(slots, tenant, &held, revision).await? {
            return Ok(out);
        }
    }
    Err(ClusterError::Unavailable(format!(
        "tenant `{tenant}`'s quota changed {ATTEMPTS} times in a row while being updated"
    )))
}

/// Gives back the place `id` holds of `tenant`'s quota, if it holds one.
pub(super) async fn give_back(
    slots: &kv::Store,
    tenant: &str,
    id: WorkloadId,
) -> Result<(), ClusterError> {
    change(slots, tenant, |held| (held.held.remove(&id).is_some(), ())).await
}

impl Cluster {
    /// Takes one of `tenant`'s `max` places for workload `id`: false when
    /// all are held, cluster-wide.
    pub async fn take_slot(
        &self,
        tenant: &str,
        max: usize,
        id: WorkloadId,
    ) -> Result<bool, ClusterError> {
        self.connected()?;
        change(&self.slots, tenant, |held| {
            if held.held.contains_key(&id) {
                return (false, true);
            }
            if held.held.len() >= max {
                return (false, false);
            }
            held.held.insert(id, now_ms());
            (true, true)
        })
        .await
    }

    /// Gives back `id`'s place of `tenant`'s quota unless its record shows
    /// it still pending or running (a submission that failed before, or as,
    /// its record was made).
    pub async fn give_back_unless_live(&self, tenant: &str, id: WorkloadId) {
        let live = match self.record(id).await {
            Ok(found) => !found.view.summary.status.is_terminal(),
            Err(ClusterError::NotFound(_)) => false,
            // Unknown: the repair looks again.
            Err(_) => return,
        };
        if !live && let Err(e) = give_back(&self.slots, tenant, id).await {
            tracing::debug!(workload = %id, error = %e, "a quota place stays until the repair");
        }
    }

    /// How many of `tenant`'s places are held, cluster-wide.
    pub async fn slots_held(&self, tenant: &str) -> Result<usize, ClusterError> {
        Ok(read(&self.slots, tenant).await?.0.held.len())
    }

    /// Gives back the place of a workload whose final record was just
    /// written, in a task of its own (the writer does not wait for it).
    pub(super) fn ended_with_slot(&self, view: &WorkloadView) {
        let Some(tenant) = view.summary.tenant.as_ref() else {
            return;
        };
        if !self.quota_tenants.contains(tenant) || !view.summary.status.is_terminal() {
            return;
        }
        let (slots, tenant, id) = (self.slots.clone(), tenant.clone(), view.summary.id);
        tokio::spawn(async move {
            if let Err(e) = give_back(&slots, &tenant, id).await {
                tracing::debug!(workload = %id, error = %e, "a quota place stays until the repair");
            }
        });
    }

    /// Gives back places held by workloads that have ended, or that never
    /// got a record (see [`UNRECORDED_GRACE_MS`]).
    pub(super) async fn repair_slots(&self) -> Result<(), ClusterError> {
        for tenant in &self.quota_tenants {
            let (held, _) = read(&self.slots, tenant).await?;
            for (id, since) in held.held {
                let stale = match self.record(id).await {
                    Ok(found) => found.view.summary.status.is_terminal(),
                    Err(ClusterError::NotFound(_)) => now_ms() - since > UNRECORDED_GRACE_MS,
                    Err(e) => return Err(e),
                };
                if stale {
                    tracing::info!(workload = %id, tenant, "giving back a quota place its workload left held");
                    give_back(&self.slots, tenant, id).await?;
                }
            }
        }
        Ok(())
    }
}
