//! Retention: deletes the lines of workloads that ended long enough ago, and
//! of the oldest finished workloads while stored lines exceed a size.
//!
//! Owns the schedule and the policy (the server's `--retain-for` and
//! `--retain-bytes`, and each tenant's own); the store does the deleting, one
//! small transaction at a time, so writers are never held up for long.
//! Running workloads are never touched: only an end time can make a workload
//! old, and only finished workloads are pruned for size.

use std::time::Duration;

use crate::store::{Db, PruneScope};
use crate::workload::now_ms;

/// How long finished workloads' lines are kept.
#[derive(Debug, Clone, Default)]
pub struct RetentionPolicy {
    /// For every workload without a tenant rule; `None`: forever.
    pub default: Option<Duration>,
    /// Tenants with their own rule.
    pub tenants: Vec<(String, Duration)>,
    /// Most bytes of lines the whole store keeps; `None`: no cap.
    pub max_bytes: Option<u64>,
    /// Tenants whose own lines are capped: (name, bytes).
    pub tenant_bytes: Vec<(String, u64)>,
}

impl RetentionPolicy {
    /// True when nothing is ever deleted.
    pub fn keeps_everything(&self) -> bool {
        self.default.is_none()
            && self.tenants.is_empty()
            && self.max_bytes.is_none()
            && self.tenant_bytes.is_empty()
    }

    /// Each scope with the end time before which its workloads are pruned.
    pub fn cutoffs(&self, now: i64) -> Vec<(PruneScope, i64)> {
        let before =
            |d: &Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut out: Vec<_> = (self.tenants.iter())
            .map(|(name, d)| (PruneScope::Tenant(name.clone()), before(d)))
            .collect();
        if let Some(d) = &self.default {
            let others = self.tenants.iter().map(|(n, _)| n.clone()).collect();
            out.push((PruneScope::AllBut(others), before(d)));
        }
        out
    }
}

/// Lines deleted per transaction.
const STEP_LINES: u64 = 5_000;

/// Every `every`, prunes what `policy` says is old, step by step, until
/// nothing is left; runs until dropped.
pub async fn run(db: Db, policy: RetentionPolicy, every: Duration) {
    if policy.keeps_everything() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut pruned = false;
        for (scope, cutoff) in policy.cutoffs(now_ms()) {
            pruned |= prune_while(&db, scope, cutoff, || true).await;
        }
        // Any finished workload may go for size, oldest first.
        for (tenant, cap) in &policy.tenant_bytes {
            let scope = PruneScope::Tenant(tenant.clone());
            pruned |= prune_while(&db, scope, i64::MAX, || db.log_bytes(Some(tenant)) > *cap).await;
        }
        if let Some(cap) = policy.max_bytes {
            let everyone = PruneScope::AllBut(Vec::new());
            pruned |= prune_while(&db, everyone, i64::MAX, || db.log_bytes_total() > cap).await;
        }
        if pruned {
            // The files gave their free pages back step by step; the WAL
            // that carried the deletes goes now.
            db.shrink_logs();
        }
    }
}

/// Prunes workloads of `scope` that ended before `cutoff`, step by step,
/// while `needed` holds and there is something left; true if it pruned.
async fn prune_while(db: &Db, scope: PruneScope, cutoff: i64, needed: impl Fn() -> bool) -> bool {
    let mut pruned = false;
    while needed() {
        match db.prune_step(scope.clone(), cutoff, STEP_LINES).await {
            Ok(0) => break,
            Ok(_) => {
                pruned = true;
                tokio::task::yield_now().await
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention could not prune; will try again");
                break;
            }
        }
    }
    pruned
}
