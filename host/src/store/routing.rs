//! Which file holds what: the main file and each tenant's own (opened, or
//! made, on a tenant's first workload), and the cache of which file holds a
//! workload, so a call about a workload goes to its file without a lookup in
//! each. Owns no SQL; [`super::Db`] asks it where to go.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context as _;

use super::shard::{self, Shard, SharedByWriters};
use super::{StoreError, StoreResult, WriterConfig, tenant_config, writer_of};
use crate::workload::WorkloadId;

/// The files of one data directory, and where each workload lives.
pub(super) struct Routing {
    /// The data directory.
    pub(super) data_dir: PathBuf,
    /// How tenants' files opened later batch and bound their lines.
    pub(super) config: WriterConfig,
    /// The main file: modules, their owners, workloads without a tenant (and
    /// tenants' workloads stored before tenants had files of their own).
    pub(super) main: Arc<Shard>,
    /// Tenants' files, by name; a tenant's is opened (made) when it first
    /// creates a workload. Read-only handles see those that existed.
    tenants: RwLock<BTreeMap<String, Arc<Shard>>>,
    /// Which tenant's file holds a workload: those created through this
    /// handle until they end (never forgotten: their end must find them),
    /// and, in `found`, those found by a read.
    homes: Mutex<Homes>,
}

/// Most workloads whose file is remembered; beyond it the map starts afresh
/// (a miss costs one lookup in each file).
const HOMES_CACHED: usize = 65_536;

/// Where workloads outside the main file live.
#[derive(Default)]
struct Homes {
    live: HashMap<WorkloadId, Arc<Shard>>,
    found: HashMap<WorkloadId, Arc<Shard>>,
}

impl Routing {
    pub(super) fn new(
        data_dir: PathBuf,
        config: WriterConfig,
        main: Arc<Shard>,
        tenants: BTreeMap<String, Arc<Shard>>,
    ) -> Self {
        Self {
            data_dir,
            config,
            main,
            tenants: RwLock::new(tenants),
            homes: Mutex::default(),
        }
    }

    /// Every file: the main one first.
    pub(super) fn shards(&self) -> Vec<Arc<Shard>> {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        std::iter::once(Arc::clone(&self.main))
            .chain(tenants.values().cloned())
            .collect()
    }

    /// `tenant`'s own file, if it has one yet.
    pub(super) fn tenant_shard(&self, tenant: &str) -> Option<Arc<Shard>> {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        tenants.get(tenant).cloned()
    }

    /// The files that may hold `tenant`'s workloads (every file for `None`,
    /// everyone's): the main file, which holds those stored before tenants
    /// had files, and its own.
    pub(super) fn shards_of(&self, tenant: Option<&str>) -> Vec<Arc<Shard>> {
        match tenant {
            None => self.shards(),
            Some(t) => std::iter::once(Arc::clone(&self.main))
                .chain(self.tenant_shard(t))
                .collect(),
        }
    }

    /// The file a new workload of `tenant` goes to, opened (made) on first use.
    pub(super) fn shard_for_new(
        &self,
        tenant: Option<&str>,
        shared: &SharedByWriters,
    ) -> StoreResult<Arc<Shard>> {
        let Some(name) = tenant else {
            return Ok(Arc::clone(&self.main));
        };
        if let Some(found) = self.tenant_shard(name) {
            return Ok(found);
        }
        let Some(path) = shard::tenant_path(&self.data_dir, name) else {
            return Ok(Arc::clone(&self.main));
        };
        writer_of(&self.main)?;
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = tenants.get(name) {
            return Ok(Arc::clone(found));
        }
        let dir = self.data_dir.join(shard::TENANTS_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let opened = Shard::open(
            path,
            Some(name.to_owned()),
            tenant_config(self.config),
            shared,
        )
        .map_err(|e| {
            // A full disk is what it is for the caller (507), as on any write.
            let full = e.chain().any(|cause| {
                cause
                    .downcast_ref::<rusqlite::Error>()
                    .and_then(|e| e.sqlite_error_code())
                    == Some(rusqlite::ErrorCode::DiskFull)
            });
            let e = e.context(format!("failed to open the store of tenant `{name}`"));
            match full {
                true => StoreError::StorageFull(format!("{e:#}")),
                false => StoreError::Internal(e),
            }
        })?;
        tenants.insert(name.to_owned(), Arc::clone(&opened));
        Ok(opened)
    }

    fn homes(&self) -> std::sync::MutexGuard<'_, Homes> {
        self.homes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the file of a workload being created (`live`) or found by a read.
    pub(super) fn remember_home(&self, id: WorkloadId, shard: &Arc<Shard>, live: bool) {
        // The main file is the one used for a workload not remembered.
        if Arc::ptr_eq(shard, &self.main) {
            return;
        }
        let mut homes = self.homes();
        if live {
            homes.live.insert(id, Arc::clone(shard));
        } else {
            if homes.found.len() >= HOMES_CACHED {
                homes.found.clear();
            }
            homes.found.insert(id, Arc::clone(shard));
        }
    }

    /// A workload created through this handle has ended (or failed to be
    /// created): it is only remembered as found.
    pub(super) fn forget_live(&self, id: WorkloadId) {
        let mut homes = self.homes();
        if let Some(shard) = homes.live.remove(&id) {
            if homes.found.len() >= HOMES_CACHED {
                homes.found.clear();
            }
            homes.found.insert(id, shard);
        }
    }

    /// The file that holds a workload, if remembered.
    pub(super) fn known_home(&self, id: WorkloadId) -> Option<Arc<Shard>> {
        let homes = self.homes();
        (homes.live.get(&id).or_else(|| homes.found.get(&id))).cloned()
    }

    /// The file a workload created through this handle lives in (the main
    /// one when it is not remembered).
    pub(super) fn home(&self, id: WorkloadId) -> Arc<Shard> {
        self.known_home(id)
            .unwrap_or_else(|| Arc::clone(&self.main))
    }
}
