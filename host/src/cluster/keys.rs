//! Idempotency keys across the cluster: one KV entry per (tenant, key)
//! (bucket [`KEYS_BUCKET`], key = hex SHA-256 of both, entries expire after
//! 24 hours), holding the first submission's workload id and fingerprint.
//! The KV's atomic create decides which of two nodes' concurrent
//! submissions is the first.

use async_nats::jetstream::kv;
use sha2::{Digest as _, Sha256};

use super::{Cluster, ClusterError};
use crate::store::KeyedWorkload;
use crate::workload::WorkloadId;

/// KV bucket of idempotency keys.
pub const KEYS_BUCKET: &str = "vulcan_idempotency";

/// What an entry holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    id: WorkloadId,
    fingerprint: String,
}

/// The KV key of `tenant`'s `key` (any bytes may be in a client's key).
fn kv_key(tenant: Option<&str>, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(tenant.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    hex::encode(h.finalize())
}

impl Cluster {
    /// Claims `key` for workload `id`: `None` if it is now ours, else the
    /// first submission's workload.
    pub async fn claim_key(
        &self,
        tenant: Option<&str>,
        key: &str,
        fingerprint: &str,
        id: WorkloadId,
    ) -> Result<Option<KeyedWorkload>, ClusterError> {
        self.connected()?;
        let at = kv_key(tenant, key);
        let entry = Entry {
            id,
            fingerprint: fingerprint.to_owned(),
        };
        let value = serde_json::to_vec(&entry).map_err(anyhow::Error::from)?;
        loop {
            match self.keys.create(&at, value.clone().into()).await {
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(ClusterError::unavailable(e)),
            }
            let found = self
                .keys
                .get(&at)
                .await
                .map_err(ClusterError::unavailable)?;
            // Gone in between (expired or given back): claimed afresh.
            let Some(found) = found else { continue };
            let first: Entry = serde_json::from_slice(&found)
                .map_err(|e| anyhow::anyhow!("corrupt idempotency entry: {e}"))?;
            return Ok(Some(KeyedWorkload {
                id: first.id,
                fingerprint: first.fingerprint,
            }));
        }
    }

    /// Gives a claimed key back (its submission was refused).
    pub async fn release_key(&self, tenant: Option<&str>, key: &str) {
        if let Err(e) = self.keys.purge(kv_key(tenant, key)).await {
            tracing::warn!(error = %e, "could not give an idempotency key back");
        }
    }
}
