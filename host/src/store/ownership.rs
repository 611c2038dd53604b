//! Which tenant owns which module, as far as this handle has seen: a run of
//! a tenant's module checks ownership without a read once it is known.
//! Bounded; forgets what a deletion takes back.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Most ownership pairs kept in memory; beyond it the set starts afresh
/// (a miss costs one read).
const OWNED_CACHED: usize = 65_536;

/// Module hashes known to be owned, by tenant.
#[derive(Default)]
pub(super) struct OwnershipCache(Mutex<HashMap<String, HashSet<String>>>);

impl OwnershipCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `tenant` is known to own `hash`.
    pub(super) fn knows(&self, tenant: &str, hash: &str) -> bool {
        self.lock()
            .get(tenant)
            .is_some_and(|hashes| hashes.contains(hash))
    }

    /// Notes that `tenant` owns `hash`.
    pub(super) fn remember(&self, tenant: &str, hash: &str) {
        let mut owned = self.lock();
        // Counted only here, on a first sight, never on a run.
        if owned.values().map(HashSet::len).sum::<usize>() >= OWNED_CACHED {
            owned.clear();
        }
        (owned.entry(tenant.to_owned()).or_default()).insert(hash.to_owned());
    }

    /// Forgets `tenant`'s ownership of `hash` (everyone's for `None`): it
    /// was taken back.
    pub(super) fn forget(&self, hash: &str, tenant: Option<&str>) {
        for (owner, hashes) in self.lock().iter_mut() {
            if tenant.is_none_or(|t| t == owner) {
                hashes.remove(hash);
            }
        }
    }
}
