//! Durable state in SQLite: modules, workloads and their log lines.
//!
//! The main file (`vulcan.db`) holds modules and the workloads without a
//! tenant; each tenant's workloads and lines are in a file of its own
//! (`tenants/<name>.db`, see [`shard`]), so that one tenant's flood never
//! holds another's commits. [`Db`] routes each call to the file that holds
//! the workload ([`routing`]), and merges lists across files.
//!
//! In each file, one writer thread owns the only write connection ([`writer`]); log lines
//! wait for it in a bounded queue with one lane per workload ([`queue`]), and a
//! guest whose lane is full waits for room, so memory stays bounded however
//! fast guests write. A workload's terminal status is committed after every one
//! of its lines, and lines reach live followers only once committed: whoever
//! has seen a line or a final status finds it in the store. Reads use a small
//! pool of read-only connections (WAL lets them run beside the writer).
//!
//! A data directory has one owner: [`Db::open`] takes an exclusive lock on it
//! ([`lock`]);
//! [`Db::open_read_only`] does not, so `ls`, `status` and `logs` work beside a
//! running server.
//!
//! Only this module imports rusqlite, besides the cluster's index of its
//! records (`cluster::index`, a node's copy of what NATS holds).

mod checkpoint;
mod health;
mod lock;
mod ownership;
mod queue;
mod reads;
mod routing;

pub use reads::PAGE_BYTES;
mod jobs;
mod reserve;
mod schema;
mod shard;
mod usage;
mod write_op;
mod write_sql;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use anyhow::Context as _;
use rusqlite::Connection;
use tokio::sync::oneshot;

pub use jobs::{IDEMPOTENCY_WINDOW_MS, KeyedWorkload, RetryLater};
pub use lock::LOCK_FILE;
pub use queue::{LINE_OVERHEAD, LineLane};
pub use reserve::{DEFAULT_RESERVE_BYTES, RESERVE_FILE};
pub use schema::SCHEMA_VERSION;
pub use write_op::{Haste, PruneScope};
pub use writer::WriterConfig;

use crate::logs::{LivePublisher, LogRecord};
use crate::outbound::OutboundRule;
use crate::workload::{
    Completion, IdempotencyKey, Limits, ListRequest, LogLevel, QueuedInput, Status, WorkloadId,
    WorkloadRecord,
};
use lock::DataDirLock;
use ownership::OwnershipCache;
use queue::LineQueue;
use routing::Routing;
use shard::{Shard, SharedByWriters};
use usage::LogUsage;
use write_op::WriteOp;
#[cfg(test)]
use writer::LINES_PER_CHUNK;
use writer::WriterStats;

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "vulcan.db";

/// Errors a caller may branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No workload has this id.
    #[error("workload {0} not found")]
    NotFound(WorkloadId),
    /// No module has this hash.
    #[error("module {0} not found")]
    ModuleNotFound(String),
    /// The lifecycle does not allow this change (e.g. a terminal status changing).
    #[error("workload {id} is {from}; it cannot become {to}")]
    IllegalTransition {
        /// The workload.
        id: WorkloadId,
        /// Its current status.
        from: Status,
        /// The refused status.
        to: Status,
    },
    /// The database or its disk is full; writes fail until space is freed.
    #[error("{0}")]
    StorageFull(String),
    /// A module is used by a pending or running workload.
    #[error("module {0} is used by a pending or running workload; delete it once they end")]
    ModuleInUse(String),
    /// A writer thread has stopped: nothing can be written until a restart.
    #[error("the store cannot write: {0}")]
    Unavailable(String),
    /// Anything else: I/O, SQLite, a closed store.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            StoreError::StorageFull("the database or disk is full".into())
        } else {
            StoreError::Internal(e.into())
        }
    }
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A workload about to be created.
#[derive(Debug, Clone)]
pub struct NewWorkload {
    /// Its id.
    pub id: WorkloadId,
    /// `sha256:<hex>` of its module, which must already be stored.
    pub module_hash: String,
    /// Its argv.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its limits.
    pub limits: Limits,
    /// Hosts it may send HTTP requests to.
    pub allowed_hosts: Vec<OutboundRule>,
    /// Its minimum SDK log level.
    pub log_level: Option<LogLevel>,
    /// Created already `running` (its runner holds a slot and starts it at
    /// once): one commit instead of two. Otherwise `pending`.
    pub running: bool,
    /// The tenant it runs for; `None` on a server without tenants.
    pub tenant: Option<String>,
    /// Queued: created `pending` with what it needs to start later, which
    /// a restart finds (see [`Db::queued_workloads`]).
    pub queued: Option<QueuedInput>,
    /// The key it was submitted with, if any.
    pub idempotency: Option<IdempotencyKey>,
    /// The schedule whose firing created it, if one did.
    pub schedule: Option<String>,
    /// When its failed attempts run again.
    pub retry: Option<crate::workload::RetryPolicy>,
}

/// A stored module's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// `sha256:<hex>`.
    pub hash: String,
    /// Core module or component.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was first stored, ms since the Unix epoch.
    pub created_at: i64,
}

/// One page of the workload list.
#[derive(Debug, Clone)]
pub struct WorkloadPage {
    /// The workloads, newest first.
    pub items: Vec<WorkloadRecord>,
    /// How many match in all.
    pub total: u64,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    /// The files, and which holds which workload.
    routing: Routing,
    /// Modules known to be owned, by tenant.
    owned: OwnershipCache,
    /// What the writers share (the disk's reserve, their health).
    shared: SharedByWriters,
    /// Held for as long as the handle lives; released by the OS if we die.
    _owner: Option<DataDirLock>,
}

/// A writer thread's inbox and what it shares with the handles.
struct WriterHandle {
    tx: mpsc::Sender<WriteOp>,
    /// Where its thread says that it stopped.
    health: Arc<health::StoreHealth>,
    queue: Arc<LineQueue>,
    stats: Arc<WriterStats>,
    usage: Arc<LogUsage>,
}

impl WriterHandle {
    /// Sends an op (never lines: those are queued) to the writer, which
    /// then stops growing a transaction of lines for it; false if the writer
    /// has stopped.
    fn send(&self, op: WriteOp) -> bool {
        self.stats.ops_waiting.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.send(op).is_ok();
        if !sent {
            self.stats.ops_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }
}

impl Db {
    /// Opens (creating if needed) `vulcan.db` and the tenants' files in
    /// `data_dir` as their only owner, migrating them.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(data_dir, WriterConfig::default())
    }

    /// Like [`Db::open`] with explicit batching and bounds.
    pub fn open_with(data_dir: &Path, config: WriterConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("failed to create data directory {}", data_dir.display()))?;
        let owner = DataDirLock::acquire(data_dir)?;
        let shared = SharedByWriters {
            reserve: Arc::new(reserve::StorageReserve::open(
                data_dir,
                config.reserve_bytes,
            )),
            health: Arc::default(),
        };
        let main = Shard::open(data_dir.join(DB_FILE), None, config, &shared)?;
        let mut tenants = BTreeMap::new();
        for (name, path) in shard::existing_tenants(data_dir)? {
            let opened = Shard::open(path, Some(name.clone()), tenant_config(config), &shared)?;
            tenants.insert(name, opened);
        }
        Ok(Self::with_shards(
            data_dir,
            config,
            main,
            tenants,
            Some((owner, shared)),
        ))
    }

    /// Opens an existing database for reading only, beside whoever owns it.
    pub fn open_read_only(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(DB_FILE);
        anyhow::ensure!(
            path.exists(),
            "no database in {} (nothing has run there yet)",
            data_dir.display()
        );
        let main = Shard::open_read_only(path, None)?;
        let mut tenants = BTreeMap::new();
        for (name, path) in shard::existing_tenants(data_dir)? {
            let opened = Shard::open_read_only(path, Some(name.clone()))?;
            tenants.insert(name, opened);
        }
        let config = WriterConfig::default();
        Ok(Self::with_shards(data_dir, config, main, tenants, None))
    }

    fn with_shards(
        data_dir: &Path,
        config: WriterConfig,
        main: Arc<Shard>,
        tenants: BTreeMap<String, Arc<Shard>>,
        owner: Option<(DataDirLock, SharedByWriters)>,
    ) -> Self {
        let (owner, shared) = match owner {
            Some((lock, shared)) => (Some(lock), shared),
            // A read-only handle has no writers: nothing is shared.
            None => (
                None,
                SharedByWriters {
                    reserve: Arc::new(reserve::StorageReserve::open(data_dir, 0)),
                    health: Arc::default(),
                },
            ),
        };
        Self {
            inner: Arc::new(Inner {
                routing: Routing::new(data_dir.to_owned(), config, main, tenants),
                owned: OwnershipCache::default(),
                shared,
                _owner: owner,
            }),
        }
    }

    /// Opens a workload's line lane: lines sent to it are committed in batches
    /// and, once committed, published to `live`.
    pub fn line_sink(
        &self,
        workload: WorkloadId,
        live: Option<Box<dyn LivePublisher>>,
    ) -> StoreResult<LineLane> {
        let shard = self.inner.routing.home(workload);
        let w = writer_of(&shard)?;
        Ok(LineLane::new(
            workload,
            live,
            Arc::clone(&w.queue),
            w.tx.clone(),
            false,
        ))
    }

    /// Sends a workload's creation without waiting for its commit, with its
    /// line lane: lines sent to the lane meanwhile wait for the creation and
    /// are committed with it or after it. The future answers the creation;
    /// if it fails, [`Db::drop_lines`] discards the lane.
    pub fn create_workload_with_lane(
        &self,
        new: NewWorkload,
        live: Option<Box<dyn LivePublisher>>,
        haste: Haste,
    ) -> StoreResult<(
        LineLane,
        impl Future<Output = StoreResult<()>> + Send + 'static,
    )> {
        let shard = self
            .inner
            .routing
            .shard_for_new(new.tenant.as_deref(), &self.inner.shared)?;
        let w = writer_of(&shard)?;
        let id = new.id;
        // Open before the creation is sent: the commit that takes the
        // creation releases the lane, so the lane must exist by then.
        let lane = LineLane::new(id, live, Arc::clone(&w.queue), w.tx.clone(), true);
        let (reply, rx) = oneshot::channel();
        if !w.send(WriteOp::Create { new, reply, haste }) {
            w.queue.close(id);
            return Err(anyhow::anyhow!("the database writer has stopped").into());
        }
        self.inner.routing.remember_home(id, &shard, true);
        Ok((lane, async move {
            rx.await
                .map_err(|_| anyhow::anyhow!("the database writer stopped before answering"))?
        }))
    }

    /// Discards a workload's line lane and whatever waits in it (its
    /// creation failed).
    pub fn drop_lines(&self, workload: WorkloadId) {
        if let Ok(w) = writer_of(&self.inner.routing.home(workload)) {
            w.queue.close(workload);
        }
        self.inner.routing.forget_live(workload);
    }

    /// Sums a writer's figure over every file.
    fn sum(&self, figure: impl Fn(&WriterHandle) -> u64) -> u64 {
        (self.inner.routing.shards().iter())
            .filter_map(|s| s.writer.as_ref().map(&figure))
            .sum()
    }

    /// Lines that could not be committed since start (each failure is also logged).
    pub fn lost_lines(&self) -> u64 {
        self.sum(|w| w.queue.lost.load(Ordering::Relaxed))
    }

    /// Bytes of stored log lines of `tenant`'s workloads (`None`: those
    /// without a tenant) that retention has not deleted.
    pub fn log_bytes(&self, tenant: Option<&str>) -> u64 {
        let of = |s: &Shard| s.writer.as_ref().map_or(0, |w| w.usage.of(tenant));
        match tenant {
            // Asked before each of a tenant's runs: no list of files.
            Some(t) => {
                of(&self.inner.routing.main)
                    + self.inner.routing.tenant_shard(t).map_or(0, |s| of(&s))
            }
            // Only the main file holds workloads without a tenant.
            None => of(&self.inner.routing.main),
        }
    }

    /// Bytes of all stored log lines that retention has not deleted.
    pub fn log_bytes_total(&self) -> u64 {
        self.sum(|w| w.usage.total())
    }

    /// Log lines committed since start.
    pub fn committed_lines(&self) -> u64 {
        self.sum(|w| w.stats.lines.load(Ordering::Relaxed))
    }

    /// Transactions committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.sum(|w| w.stats.commits.load(Ordering::Relaxed))
    }

    /// Transactions retried because another connection held the database.
    pub fn busy_retries(&self) -> u64 {
        self.sum(|w| w.stats.busy_retries.load(Ordering::Relaxed))
    }

    async fn request<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> WriteOp,
    ) -> StoreResult<T> {
        request(&self.inner.routing.main, op).await
    }

    /// Stores a module once; returns true if it was new.
    pub async fn put_module(&self, info: ModuleInfo, bytes: bytes::Bytes) -> StoreResult<bool> {
        self.request(|reply| WriteOp::PutModule { info, bytes, reply })
            .await
    }

    /// Records that `tenant` uploaded the stored module `hash`; true when it
    /// had not before.
    pub async fn own_module(&self, tenant: &str, hash: &str) -> StoreResult<bool> {
        let (t, h) = (tenant.to_owned(), hash.to_owned());
        let new = self
            .request(|reply| WriteOp::OwnModule {
                tenant: t,
                hash: h,
                reply,
            })
            .await?;
        self.inner.owned.remember(tenant, hash);
        Ok(new)
    }

    /// Deletes module `hash` for `tenant` (its ownership; the bytes go once
    /// no tenant owns it), or with `None` for everyone; refused while a
    /// pending or running workload (of `tenant`, or of anyone) uses it.
    /// True if the bytes went.
    pub async fn delete_module(&self, hash: &str, tenant: Option<&str>) -> StoreResult<bool> {
        let (shards, used) = (self.inner.routing.shards_of(tenant), hash.to_owned());
        let scope = tenant.map(str::to_owned);
        let in_use = read_blocking(move || {
            for shard in shards {
                if shard.with_reader(|c| reads::module_in_use(c, &used, scope.as_deref()))? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await?;
        if in_use {
            return Err(StoreError::ModuleInUse(hash.to_owned()));
        }
        let (h, t) = (hash.to_owned(), tenant.map(str::to_owned));
        let gone = self
            .request(|reply| WriteOp::DeleteModule {
                hash: h,
                tenant: t,
                reply,
            })
            .await?;
        self.inner.owned.forget(hash, tenant);
        Ok(gone)
    }

    /// Ok if `tenant` owns the stored module `hash`, else module not found
    /// (another tenant's module is no module at all); read once per pair.
    pub async fn check_owned(&self, tenant: &str, hash: &str) -> StoreResult<()> {
        if !self.inner.owned.knows(tenant, hash) {
            self.tenant_module_info(tenant, hash).await?;
            self.inner.owned.remember(tenant, hash);
        }
        Ok(())
    }

    /// One small step of retention (see [`PruneScope`]): how much it did,
    /// 0 when nothing of `scope` ended before `cutoff` is left to prune.
    /// Across files, the workload that ended first goes first.
    pub async fn prune_step(
        &self,
        scope: PruneScope,
        cutoff: i64,
        max_lines: u64,
    ) -> StoreResult<u64> {
        let candidates: Vec<_> = match &scope {
            PruneScope::Tenant(t) => self.inner.routing.shards_of(Some(t)),
            PruneScope::AllBut(others) => (self.inner.routing.shards().into_iter())
                .filter(|s| s.tenant.as_ref().is_none_or(|t| !others.contains(t)))
                .collect(),
        };
        let mut ordered = Vec::with_capacity(candidates.len());
        if candidates.len() == 1 {
            ordered = candidates;
        } else {
            let (found_scope, shards) = (scope.clone(), candidates);
            let mut oldest = read_blocking(move || {
                let mut oldest = Vec::new();
                for shard in shards {
                    let first =
                        shard.with_reader(|c| reads::first_to_prune(c, &found_scope, cutoff))?;
                    if let Some(ended) = first {
                        oldest.push((ended, shard));
                    } else if shard.with_reader(reads::has_free_pages)? {
                        // Its pruning is done; its free pages go back last.
                        oldest.push((i64::MAX, shard));
                    }
                }
                Ok(oldest)
            })
            .await?;
            oldest.sort_by_key(|(ended, _)| *ended);
            ordered.extend(oldest.into_iter().map(|(_, shard)| shard));
        }
        for shard in ordered {
            let (scope, shard) = (scope.clone(), &shard);
            let done = request(shard, |reply| WriteOp::Prune {
                scope,
                cutoff,
                max_lines,
                reply,
            })
            .await?;
            if done > 0 {
                return Ok(done);
            }
        }
        Ok(0)
    }

    /// After pruning: asks each file's checkpointer to give the WAL's space
    /// back (the pruning steps already gave the database's free pages back).
    pub fn shrink_logs(&self) {
        for shard in self.inner.routing.shards() {
            if let Some(checkpointer) = &shard.checkpointer {
                checkpointer.truncate();
            }
        }
    }

    /// Creates a workload in status `pending`.
    pub async fn create_workload(&self, new: NewWorkload) -> StoreResult<()> {
        let (id, shard) = (
            new.id,
            self.inner
                .routing
                .shard_for_new(new.tenant.as_deref(), &self.inner.shared)?,
        );
        self.inner.routing.remember_home(id, &shard, true);
        let created = request(&shard, |reply| WriteOp::Create {
            new,
            reply,
            haste: Haste::Now,
        })
        .await;
        if created.is_err() {
            // Nothing will end it: no end needs to find it.
            self.inner.routing.forget_live(id);
        }
        created
    }

    /// Writes a terminal status, after every line of the workload, and returns
    /// the final record as committed. If the store cannot take it now, the
    /// error is returned and the writer keeps retrying.
    pub async fn finish(
        &self,
        id: WorkloadId,
        completion: Completion,
    ) -> StoreResult<WorkloadRecord> {
        self.finish_with(id, completion, Haste::Now).await
    }

    /// [`Db::finish`], committed as soon as `haste` asks.
    pub async fn finish_with(
        &self,
        id: WorkloadId,
        completion: Completion,
        haste: Haste,
    ) -> StoreResult<WorkloadRecord> {
        let ended = request(&self.inner.routing.home(id), |reply| WriteOp::Transition {
            id,
            to: completion.status,
            completion: Some(completion),
            reply: Some(reply),
            haste,
            retry: None,
        })
        .await;
        // An end that could not be written yet is retried by the writer,
        // which knows its file.
        self.inner.routing.forget_live(id);
        ended?.ok_or_else(|| anyhow::anyhow!("workload {id} ended without its record").into())
    }

    /// Marks every pending or running workload failed with `reason`, its line
    /// count and end time taken from its stored lines; returns how many.
    pub async fn fail_unfinished(&self, reason: &str) -> StoreResult<u64> {
        let mut failed = 0;
        for shard in self.inner.routing.shards() {
            let reason = reason.to_owned();
            failed += request(&shard, |reply| WriteOp::FailUnfinished { reason, reply }).await?;
        }
        Ok(failed)
    }

    /// Waits until everything queued so far is committed (or has failed).
    pub async fn flush(&self) {
        for shard in self.inner.routing.shards() {
            let (reply, rx) = oneshot::channel();
            if let Ok(w) = writer_of(&shard)
                && w.send(WriteOp::Flush { reply })
            {
                let _ = rx.await;
            }
        }
    }

    /// Caps the main file at `pages` pages (`None` lifts the cap): a full
    /// disk on demand, for tests.
    #[cfg(test)]
    pub async fn set_page_limit(&self, pages: Option<u64>) {
        let (reply, rx) = oneshot::channel();
        if let Ok(w) = writer_of(&self.inner.routing.main)
            && w.send(WriteOp::PageLimit { pages, reply })
        {
            let _ = rx.await;
        }
    }

    /// Runs `f` on a read-only connection to the main file, here (tests).
    #[cfg(test)]
    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        self.inner.routing.main.with_reader(f)
    }

    /// Runs a read on a pooled read-only connection to the main file, off
    /// the async workers.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let main = Arc::clone(&self.inner.routing.main);
        read_blocking(move || main.with_reader(f)).await
    }

    /// Runs a read of workload `id` in the file that holds it (found by
    /// looking in each, main first, when not remembered; the main file's
    /// answer when none has it).
    async fn read_workload<T: Send + 'static>(
        &self,
        id: WorkloadId,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let shards = match self.inner.routing.known_home(id) {
            Some(shard) => vec![shard],
            None => self.inner.routing.shards(),
        };
        let db = self.clone();
        read_blocking(move || {
            let mut home = &shards[0];
            if shards.len() > 1 {
                for shard in &shards {
                    if shard.with_reader(|c| reads::has_workload(c, id))? {
                        home = shard;
                        db.inner.routing.remember_home(id, shard, false);
                        break;
                    }
                }
            }
            home.with_reader(f)
        })
        .await
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> StoreResult<()> {
        if let Some(why) = self.writer_failure() {
            return Err(StoreError::Unavailable(why));
        }
        self.read(reads::ping).await
    }

    /// True while the disk is full and log lines are refused.
    pub fn storage_full(&self) -> bool {
        self.inner.shared.reserve.is_full()
    }

    /// Why the store can no longer write (a writer thread stopped), if so.
    pub fn writer_failure(&self) -> Option<String> {
        self.inner.shared.health.failure()
    }

    /// Resolves once a writer thread has stopped, with the reason.
    pub async fn writer_stopped(&self) -> String {
        self.inner.shared.health.wait().await
    }

    /// A module's metadata.
    pub async fn module_info(&self, hash: &str) -> StoreResult<ModuleInfo> {
        let hash = hash.to_owned();
        self.read(move |c| reads::module_info(c, &hash)).await
    }

    /// Up to `limit` stored modules' metadata, newest first: all, or those
    /// `tenant` uploaded.
    pub async fn list_modules(
        &self,
        limit: u64,
        offset: u64,
        tenant: Option<&str>,
    ) -> StoreResult<(Vec<ModuleInfo>, u64)> {
        let tenant = tenant.map(str::to_owned);
        self.read(move |c| reads::list_modules(c, limit, offset, tenant.as_deref()))
            .await
    }

    /// A module as `tenant` sees it (its own first-seen time); not found
    /// unless that tenant uploaded it.
    pub async fn tenant_module_info(&self, tenant: &str, hash: &str) -> StoreResult<ModuleInfo> {
        let (tenant, hash) = (tenant.to_owned(), hash.to_owned());
        self.read(move |c| reads::tenant_module_info(c, &tenant, &hash))
            .await
    }

    /// A module's bytes.
    pub async fn module_bytes(&self, hash: &str) -> StoreResult<Vec<u8>> {
        let hash = hash.to_owned();
        self.read(move |c| reads::module_bytes(c, &hash)).await
    }

    /// One workload.
    pub async fn workload(&self, id: WorkloadId) -> StoreResult<WorkloadRecord> {
        self.read_workload(id, move |c| reads::workload(c, id))
            .await
    }

    /// A page of the workloads `request` asks for, newest first, with how
    /// many match in all (`before` aside). Only summary columns are read,
    /// and across several files the offset is walked by keyset in steps, so
    /// a request holds memory for a step and its page whatever the offset.
    pub async fn list_workloads(&self, request: &ListRequest) -> StoreResult<WorkloadPage> {
        let shards = self.inner.routing.shards_of(request.tenant.as_deref());
        let request = request.clone();
        read_blocking(move || {
            let (status, tenant) = (request.status, request.tenant.as_deref());
            let mut total = 0;
            for shard in &shards {
                total += shard.with_reader(|c| reads::count_workloads(c, status, tenant))?;
            }
            let before = request.before.map(|id| id.to_string());
            if let [only] = &shards[..] {
                let items = only.with_reader(|c| {
                    let (limit, offset, before) =
                        (request.limit, request.offset, before.as_deref());
                    reads::list_workloads(c, limit, offset, before, status, tenant)
                })?;
                return Ok(WorkloadPage { items, total });
            }
            // Skip `offset` ids a step at a time: each file's next STEP ids
            // below the cursor, merged; the first STEP of them are the
            // cluster-wide next ones.
            const STEP: u64 = 1024;
            let (mut cursor, mut skip) = (before, request.offset);
            while skip > 0 {
                let mut ids = Vec::new();
                for shard in &shards {
                    let below = cursor.as_deref();
                    ids.extend(
                        shard.with_reader(|c| reads::list_ids(c, STEP, below, status, tenant))?,
                    );
                }
                ids.sort_unstable_by(|a, b| b.cmp(a));
                ids.truncate(STEP.min(skip) as usize);
                let Some(last) = ids.pop() else { break };
                skip -= ids.len() as u64 + 1;
                cursor = Some(last);
            }
            let mut items = Vec::new();
            for shard in &shards {
                let below = cursor.as_deref();
                items.extend(shard.with_reader(|c| {
                    reads::list_workloads(c, request.limit, 0, below, status, tenant)
                })?);
            }
            // Ids are ULIDs: newest first is greatest first.
            items.sort_unstable_by_key(|w| std::cmp::Reverse(w.id));
            items.truncate(usize::try_from(request.limit).unwrap_or(usize::MAX));
            Ok(WorkloadPage { items, total })
        })
        .await
    }

    /// Up to `limit` stored lines of a workload with seq greater than `after`
    /// (all from the start when `after` is `None`), in seq order; fewer when
    /// they pass [`PAGE_BYTES`] of text, so page until a page is empty.
    pub async fn read_lines(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
    ) -> StoreResult<Vec<LogRecord>> {
        self.read_workload(id, move |c| reads::read_lines(c, id, after, limit))
            .await
    }

    /// The lines [`Db::read_lines`] would return, handed to `visit` on the
    /// reading thread as they are read (until it returns false), with
    /// `state` given back afterwards: a caller can turn a page into what it
    /// sends without a record crossing threads.
    pub async fn scan_lines<S: Send + 'static>(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
        mut state: S,
        mut visit: impl FnMut(&mut S, LogRecord) -> bool + Send + 'static,
    ) -> StoreResult<S> {
        self.read_workload(id, move |c| {
            reads::scan_lines(c, id, after, limit, |r| visit(&mut state, r))?;
            Ok(state)
        })
        .await
    }
}

/// One file compacted by [`vacuum`], with its size (and its WAL's) before and after.
#[derive(Debug)]
pub struct Vacuumed {
    /// The database file.
    pub path: PathBuf,
    /// Bytes before, WAL included.
    pub before: u64,
    /// Bytes after, WAL included.
    pub after: u64,
}

/// Compacts every file of `data_dir` as its only owner (no server may run
/// on it): a full `VACUUM` with incremental vacuum turned on, then the WAL
/// truncated.
pub fn vacuum(data_dir: &Path) -> anyhow::Result<Vec<Vacuumed>> {
    let main = data_dir.join(DB_FILE);
    anyhow::ensure!(
        main.exists(),
        "no database in {} (nothing has run there yet)",
        data_dir.display()
    );
    let _owner = DataDirLock::acquire(data_dir)?;
    let size = |path: &Path| {
        let wal = path.with_extension("db-wal");
        [path, wal.as_path()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum::<u64>()
    };
    let mut done = Vec::new();
    let files = std::iter::once(main).chain(
        shard::existing_tenants(data_dir)?
            .into_iter()
            .map(|(_, p)| p),
    );
    for path in files {
        let before = size(&path);
        let conn = Connection::open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        // Only a full VACUUM changes the mode of a file that has tables.
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .with_context(|| format!("failed to vacuum {}", path.display()))?;
        drop(conn);
        done.push(Vacuumed {
            after: size(&path),
            path,
            before,
        });
    }
    Ok(done)
}

/// The writer of `shard`, unless it was opened read-only.
fn writer_of(shard: &Shard) -> StoreResult<&WriterHandle> {
    (shard.writer.as_ref())
        .ok_or_else(|| anyhow::anyhow!("the database was opened read-only").into())
}

/// Sends an op to `shard`'s writer and waits for its answer.
async fn request<T>(
    shard: &Shard,
    op: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> WriteOp,
) -> StoreResult<T> {
    let (reply, rx) = oneshot::channel();
    let writer = writer_of(shard)?;
    if writer.send(op(reply))
        && let Ok(answer) = rx.await
    {
        return answer;
    }
    // The thread is gone, or unwinding: its reason comes at once.
    let why = tokio::time::timeout(std::time::Duration::from_secs(1), writer.health.wait())
        .await
        .unwrap_or_else(|_| "the database writer has stopped".into());
    Err(StoreError::Unavailable(why))
}

/// Runs blocking reads off the async workers.
async fn read_blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("a database read failed: {e}"))?
}

/// A tenant's file holds a quarter of the lines the main one may hold
/// waiting for commits (at least one lane's worth): one tenant's backlog is
/// bounded on its own, and all of them together stay a few times the main
/// file's.
fn tenant_config(config: WriterConfig) -> WriterConfig {
    WriterConfig {
        total_bytes: (config.total_bytes / 4).max(config.lane_bytes),
        ..config
    }
}

#[cfg(test)]
mod tests;

/// Helpers for other modules' tests that need a real store with a workload in it.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::workload::Completion;

    /// Creates a running workload of a stored dummy module.
    pub async fn create_workload(db: &Db) -> WorkloadId {
        let info = ModuleInfo {
            hash: "sha256:abc".into(),
            kind: "module".into(),
            size: 3,
            created_at: 1,
        };
        db.put_module(info, bytes::Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let id = WorkloadId::new();
        db.create_workload(NewWorkload {
            id,
            module_hash: "sha256:abc".into(),
            args: vec![],
            env: vec![],
            limits: Limits::default(),
            allowed_hosts: vec![],
            log_level: None,
            running: false,
            tenant: None,
            queued: None,
            idempotency: None,
            schedule: None,
            retry: None,
        })
        .await
        .unwrap();
        db.mark_running(id).await.unwrap();
        id
    }

    /// Ends a running workload as completed with `lines` lines.
    pub async fn complete(db: &Db, id: WorkloadId, lines: u64) {
        let completion = Completion {
            status: Status::Completed,
            exit_code: Some(0),
            error: None,
            failure: None,
            output: None,
            duration_ms: 1,
            line_count: lines,
        };
        db.finish(id, completion).await.unwrap();
    }
}
