//! Stored log bytes per tenant: what byte quotas and byte retention read.
//!
//! Kept in memory beside the writer and changed only after the writer's
//! transaction commits, so it always says what the file holds (up to the
//! workloads retention is part way through, which count until they are done).
//! Started from `workloads.log_bytes` when the store opens. Owns no SQL of
//! its own beyond that first sum.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::Connection;

/// The key of workloads without a tenant (tenant names are never empty).
const NO_TENANT: &str = "";

/// Bytes of stored lines of unpruned workloads, by tenant.
#[derive(Default)]
pub(super) struct LogUsage(Mutex<HashMap<String, u64>>);

/// Changes one transaction makes, applied once it commits.
#[derive(Default)]
pub(super) struct UsageDelta(HashMap<String, i64>);

impl UsageDelta {
    /// Counts `bytes` (negative: freed) against `tenant`.
    pub(super) fn add(&mut self, tenant: Option<&str>, bytes: i64) {
        let tenant = tenant.unwrap_or(NO_TENANT);
        // Called per lane per chunk of lines: no allocation once it is known.
        match self.0.get_mut(tenant) {
            Some(sum) => *sum += bytes,
            None => drop(self.0.insert(tenant.to_owned(), bytes)),
        }
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

impl LogUsage {
    /// Sums what `conn` holds.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut stmt = conn.prepare(
            "SELECT COALESCE(tenant, ''), SUM(log_bytes) FROM workloads \
             WHERE pruned_at IS NULL GROUP BY 1",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(Self(Mutex::new(rows.collect::<Result<_, _>>()?)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // Each update is one arithmetic step: a panic cannot leave it torn.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a committed transaction's changes.
    pub(super) fn apply(&self, delta: &UsageDelta) {
        let mut map = self.lock();
        for (tenant, bytes) in &delta.0 {
            let entry = map.entry(tenant.clone()).or_default();
            *entry = entry.saturating_add_signed(*bytes);
        }
    }

    /// One tenant's bytes (`None`: workloads without a tenant).
    pub(super) fn of(&self, tenant: Option<&str>) -> u64 {
        self.lock()
            .get(tenant.unwrap_or(NO_TENANT))
            .copied()
            .unwrap_or(0)
    }

    /// Everyone's bytes.
    pub(super) fn total(&self) -> u64 {
        self.lock().values().sum()
    }
}
