//! The cluster's schedules: one KV entry per (tenant, name) in bucket
//! [`SCHEDULES_BUCKET`], key = hex SHA-256 of both, value = the schedule's
//! JSON. Every node reads them and fires their ticks; a tick's workload is
//! made once by its idempotency key (see the service's `schedules`).

use async_nats::jetstream::kv;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::{Cluster, ClusterError};
use crate::schedule::Schedule;

/// KV bucket of schedules.
pub const SCHEDULES_BUCKET: &str = "vulcan_schedules";

fn kv_key(tenant: Option<&str>, name: &str) -> String {
    let mut h = Sha256::new();
    h.update(tenant.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    hex::encode(h.finalize())
}

fn parse(bytes: &[u8]) -> Result<Schedule, ClusterError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClusterError::Internal(anyhow::anyhow!("corrupt schedule: {e}")))
}

impl Cluster {
    /// Adds `schedule`; `false` if its tenant has one of that name.
    pub async fn create_schedule(&self, schedule: &Schedule) -> Result<bool, ClusterError> {
        self.connected()?;
        let body = serde_json::to_vec(schedule).map_err(anyhow::Error::from)?;
        let at = kv_key(schedule.tenant.as_deref(), &schedule.name);
        match self.schedules.create(at, body.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// Writes `schedule` over the one of its tenant and name.
    pub async fn put_schedule(&self, schedule: &Schedule) -> Result<(), ClusterError> {
        self.connected()?;
        let body = serde_json::to_vec(schedule).map_err(anyhow::Error::from)?;
        let at = kv_key(schedule.tenant.as_deref(), &schedule.name);
        (self.schedules.put(at, body.into()).await).map_err(ClusterError::unavailable)?;
        Ok(())
    }

    /// `tenant`'s schedule `name`.
    pub async fn schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Schedule>, ClusterError> {
        self.connected()?;
        let found = self.schedules.get(kv_key(tenant, name)).await;
        match found.map_err(ClusterError::unavailable)? {
            Some(bytes) => Ok(Some(parse(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Every schedule.
    pub async fn schedules(&self) -> Result<Vec<Schedule>, ClusterError> {
        self.connected()?;
        let mut keys = self
            .schedules
            .keys()
            .await
            .map_err(ClusterError::unavailable)?;
        let mut all = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(ClusterError::unavailable)?;
            if let Some(bytes) = self
                .schedules
                .get(&key)
                .await
                .map_err(ClusterError::unavailable)?
            {
                all.push(parse(&bytes)?);
            }
        }
        Ok(all)
    }

    /// Deletes `tenant`'s schedule `name`.
    pub async fn delete_schedule(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<(), ClusterError> {
        self.connected()?;
        (self.schedules.purge(kv_key(tenant, name)).await).map_err(ClusterError::unavailable)?;
        Ok(())
    }
}
