//! Content-addressed modules and the compile cache.
//!
//! Compile once, instantiate many: a module is validated and compiled the first
//! time its sha256 is seen, kept in memory as a linked [`CompiledModule`], and
//! its compiled artifact is written to `<data-dir>/artifacts/`, so neither a
//! second run nor a restart recompiles. The bytes themselves are stored once in
//! the database. The compiled copies are bounded ([`cache`]). This module
//! decides when to compile; it does not run anything.

mod cache;

use cache::CompiledCache;
pub use cache::DEFAULT_MAX_CACHE_BYTES;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::engine::{CompiledModule, InvalidModule, Runtime};
use crate::metrics::Metrics;
use crate::store::{Db, ModuleInfo, StoreError};
use crate::workload::now_ms;

/// Why a module could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The bytes are not a runnable module.
    #[error(transparent)]
    Invalid(#[from] InvalidModule),
    /// No module has this hash.
    #[error("module {0} not found")]
    NotFound(String),
    /// The module is valid but too expensive to compile here.
    #[error("{0}")]
    TooExpensive(String),
    /// A pending or running workload uses the module.
    #[error("module {0} is used by a pending or running workload; delete it once they end")]
    InUse(String),
    /// The store is full; the module was not stored.
    #[error("{0}")]
    StorageFull(String),
    /// The store cannot write any more (its writer stopped).
    #[error("{0}")]
    StoreUnavailable(String),
    /// Anything else.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// `sha256:<hex>` of some bytes.
pub fn module_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Largest function body a module may have unless the operator says otherwise:
/// Cranelift's time and memory grow faster than linearly with a function's
/// size (four 6 MB functions took 13 s and 2 GB), and compilers do not emit
/// functions near this size for real programs.
pub const DEFAULT_MAX_FUNCTION_SIZE: u64 = 1 << 20;

/// One compile at a time, handed to waiting tenants in rotation: a tenant
/// waits for at most the compile in progress plus one compile of each other
/// tenant that is waiting, however many compiles those tenants queued; a
/// tenant that comes while another one's compile runs goes before that
/// tenant's next.
#[derive(Default)]
struct CompileTurns {
    state: Arc<Mutex<TurnState>>,
}

#[derive(Default)]
struct TurnState {
    /// A compile holds the turn.
    busy: bool,
    /// Whose compile holds it: if it has more waiting, it goes behind every
    /// tenant that came meanwhile when it hands the turn on.
    holder: Option<String>,
    /// Tenants with waiters, in the order they get the turn.
    rotation: std::collections::VecDeque<String>,
    /// Each such tenant's waiters, first come first served.
    waiting: HashMap<String, std::collections::VecDeque<tokio::sync::oneshot::Sender<CompileTurn>>>,
}

/// The turn to compile; dropping it hands it to the next tenant in rotation.
struct CompileTurn {
    state: Arc<Mutex<TurnState>>,
}

impl CompileTurns {
    /// Waits for `tenant`'s turn (`""`: no tenant); `None` if the turns were
    /// dropped meanwhile (they are not while anyone waits: a waiter exists
    /// only while a turn is held, and a held turn always hands itself on).
    async fn wait(&self, tenant: &str) -> Option<CompileTurn> {
        let waiting = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !state.busy {
                state.busy = true;
                state.holder = Some(tenant.to_owned());
                return Some(CompileTurn {
                    state: Arc::clone(&self.state),
                });
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let holds = state.holder.as_deref() == Some(tenant);
            let queue = state.waiting.entry(tenant.to_owned()).or_default();
            if queue.is_empty() && !holds {
                state.rotation.push_back(tenant.to_owned());
            }
            state
                .waiting
                .get_mut(tenant)
                .expect("just made")
                .push_back(tx);
            rx
        };
        waiting.await.ok()
    }
}

impl Drop for CompileTurn {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The tenant that just compiled waits for every other waiting
        // tenant's compile before its next one.
        if let Some(holder) = state.holder.take()
            && state.waiting.contains_key(&holder)
        {
            state.rotation.push_back(holder);
        }
        while let Some(tenant) = state.rotation.pop_front() {
            let Some(queue) = state.waiting.get_mut(&tenant) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                state.waiting.remove(&tenant);
            }
            let Some(next) = next else { continue };
            state.holder = Some(tenant);
            let turn = CompileTurn {
                state: Arc::clone(&self.state),
            };
            // A waiter that went away gives the turn back: sending fails and
            // returns it, or it is dropped with the channel; either drop
            // passes it on (after this lock is released).
            drop(state);
            if let Err(unsent) = next.send(turn) {
                drop(unsent);
            }
            return;
        }
        state.busy = false;
    }
}

/// Modules by hash, compiled at most once per process and once per data directory.
pub struct ModuleRegistry {
    runtime: Arc<Runtime>,
    db: Db,
    artifact_dir: PathBuf,
    cache: Mutex<CompiledCache>,
    metrics: Arc<Metrics>,
    /// One compile at a time: compiling uses every core, and a queue of
    /// compiles must not starve running workloads and requests. Turns go
    /// to tenants in rotation, so one tenant's flood of uploads delays
    /// another's by at most one compile.
    compiling: CompileTurns,
    max_function_size: u64,
}

/// What a registry is built from.
pub struct RegistryParts {
    /// Compiles and loads modules.
    pub runtime: Arc<Runtime>,
    /// Where module bytes and metadata are stored.
    pub db: Db,
    /// Where compiled artifacts are cached.
    pub artifact_dir: PathBuf,
    /// Counts compiles and cache hits.
    pub metrics: Arc<Metrics>,
    /// Largest function body a module may have.
    pub max_function_size: u64,
    /// Most bytes of compiled modules kept (see [`cache`]).
    pub max_cache_bytes: u64,
}

impl ModuleRegistry {
    /// A registry over these parts.
    pub fn new(parts: RegistryParts) -> Self {
        let RegistryParts {
            runtime,
            db,
            artifact_dir,
            metrics,
            max_function_size,
            max_cache_bytes,
        } = parts;
        Self {
            runtime,
            db,
            cache: Mutex::new(CompiledCache::new(&artifact_dir, max_cache_bytes)),
            artifact_dir,
            metrics,
            compiling: CompileTurns::default(),
            max_function_size,
        }
    }

    /// Validates, stores and compiles `bytes`; returns its metadata, the compiled
    /// module, and whether the bytes were new to the store.
    pub async fn register(
        &self,
        bytes: Bytes,
    ) -> Result<(ModuleInfo, Arc<CompiledModule>, bool), RegistryError> {
        self.register_for(None, bytes).await
    }

    /// [`Self::register`] for `tenant`, whose compile waits its tenant's turn.
    pub async fn register_for(
        &self,
        tenant: Option<&str>,
        bytes: Bytes,
    ) -> Result<(ModuleInfo, Arc<CompiledModule>, bool), RegistryError> {
        let hash = module_hash(&bytes);
        let compiled = match self.cached(&hash) {
            Some(c) => c,
            None => {
                let bytes = bytes.clone();
                self.compile_or_load(tenant, &hash, async move { Ok(bytes) })
                    .await?
            }
        };
        let info = ModuleInfo {
            hash: hash.clone(),
            kind: compiled.kind().as_str().to_owned(),
            size: bytes.len() as u64,
            created_at: now_ms(),
        };
        let new = self.db.put_module(info, bytes).await.map_err(|e| match e {
            StoreError::StorageFull(why) => RegistryError::StorageFull(why),
            e @ StoreError::Unavailable(_) => RegistryError::StoreUnavailable(e.to_string()),
            e => anyhow::Error::from(e)
                .context("failed to store the module")
                .into(),
        })?;
        let info = self
            .db
            .module_info(&hash)
            .await
            .map_err(anyhow::Error::from)?;
        Ok((info, compiled, new))
    }

    /// Drops a deleted module's compiled copy (in memory and on disk);
    /// true if there was one.
    pub fn forget(&self, hash: &str) -> bool {
        let cached = self.lock_cache().remove(hash);
        let on_disk = std::fs::remove_file(self.artifact_path(hash)).is_ok();
        cached || on_disk
    }

    /// Whether `hash` is stored here (in memory or in the store), without
    /// loading or compiling it.
    pub async fn has(&self, hash: &str) -> bool {
        let in_memory = self.lock_cache().contains(hash);
        in_memory || self.db.module_info(hash).await.is_ok()
    }

    /// The compiled module for a stored hash.
    pub async fn get(&self, hash: &str) -> Result<Arc<CompiledModule>, RegistryError> {
        self.get_for(None, hash).await
    }

    /// [`Self::get`] for `tenant`, whose compile (if one is needed) waits its
    /// tenant's turn.
    pub async fn get_for(
        &self,
        tenant: Option<&str>,
        hash: &str,
    ) -> Result<Arc<CompiledModule>, RegistryError> {
        if let Some(c) = self.cached(hash) {
            return Ok(c);
        }
        // Known, but its bytes are read only if there is no artifact to load.
        match self.db.module_info(hash).await {
            Ok(_) => {}
            Err(StoreError::ModuleNotFound(h)) => return Err(RegistryError::NotFound(h)),
            Err(e) => return Err(anyhow::Error::from(e).into()),
        }
        let (db, stored) = (self.db.clone(), hash.to_owned());
        self.compile_or_load(tenant, hash, async move {
            let bytes = db.module_bytes(&stored).await?;
            Ok(Bytes::from(bytes))
        })
        .await
    }

    fn cached(&self, hash: &str) -> Option<Arc<CompiledModule>> {
        let hit = self.lock_cache().get(hash);
        if hit.is_some() {
            self.metrics.cache_hits.inc();
        }
        hit
    }

    /// Loads the artifact of `hash`, or compiles what `bytes` resolves to
    /// (awaited only when there is no artifact).
    async fn compile_or_load(
        &self,
        tenant: Option<&str>,
        hash: &str,
        bytes: impl Future<Output = anyhow::Result<Bytes>>,
    ) -> Result<Arc<CompiledModule>, RegistryError> {
        let path = self.artifact_path(hash);
        // Loading and compiling are CPU-bound: keep them off the async workers.
        let loaded = {
            let (runtime, path) = (Arc::clone(&self.runtime), path.clone());
            tokio::task::spawn_blocking(move || {
                if !path.exists() {
                    return None;
                }
                runtime
                    .load_artifact(&path)
                    .inspect_err(|e| {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "ignoring an unusable compiled artifact; recompiling"
                        )
                    })
                    .ok()
            })
            .await
            .context("artifact loading task failed")?
        };
        let compiled = match loaded {
            Some(compiled) => compiled,
            None => {
                let _turn = self
                    .compiling
                    .wait(tenant.unwrap_or(""))
                    .await
                    .context("the compiler is shut down")?;
                // Another request for the same module may have compiled it
                // while this one waited for its turn.
                if let Some(compiled) = self.cached(hash) {
                    return Ok(compiled);
                }
                let bytes = bytes.await?;
                let runtime = Arc::clone(&self.runtime);
                let max_function_size = self.max_function_size;
                let path = path.clone();
                let compiled = tokio::task::spawn_blocking(move || {
                    check_function_sizes(&bytes, max_function_size)?;
                    let compiled = runtime.compile(&bytes)?;
                    if let Err(e) = write_artifact(&runtime, &compiled, &path) {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "failed to cache a compiled module"
                        );
                    }
                    Ok::<_, RegistryError>(compiled)
                })
                .await
                .context("compilation task failed")??;
                self.metrics.compiles.inc();
                compiled
            }
        };
        self.metrics.cache_misses.inc();
        let compiled = Arc::new(compiled);
        self.lock_cache().insert(hash, Arc::clone(&compiled), path);
        Ok(compiled)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, CompiledCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn artifact_path(&self, hash: &str) -> PathBuf {
        let hex = hash.trim_start_matches("sha256:");
        self.artifact_dir
            .join(format!("{hex}-{}.cwasm", self.runtime.artifact_key()))
    }
}

fn write_artifact(
    runtime: &Runtime,
    compiled: &CompiledModule,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let dir = path.parent().context("artifact path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let bytes = runtime.serialize(compiled)?;
    // Write then rename, so a crash never leaves a torn artifact under the real
    // name; a failed write or rename (e.g. a full disk) leaves nothing behind.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("failed to write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("failed to rename to {}", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Refuses a module (or any core module inside a component) with a function
/// body larger than `max` bytes, before the compiler spends seconds on it.
fn check_function_sizes(bytes: &[u8], max: u64) -> Result<(), RegistryError> {
    // Malformed bytes are left to the compiler, whose messages are better.
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { return Ok(()) };
        if let wasmparser::Payload::CodeSectionEntry(body) = payload {
            let size = body.range().len() as u64;
            if size > max {
                return Err(RegistryError::TooExpensive(format!(
                    "the module has a function of {size} bytes; this server compiles functions of \
                     at most {max} bytes (--max-function-size), as larger ones take seconds and \
                     gigabytes to compile"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn compile_turns_go_to_tenants_in_rotation() {
        use futures_util::poll;
        let turns = CompileTurns::default();
        let held = turns.wait("a").await.unwrap();
        // a compiles, floods three more, then b asks for one, then c.
        let mut a = [
            Box::pin(turns.wait("a")),
            Box::pin(turns.wait("a")),
            Box::pin(turns.wait("a")),
        ];
        for w in &mut a {
            assert!(poll!(w.as_mut()).is_pending());
        }
        let mut b = Box::pin(turns.wait("b"));
        let mut c = Box::pin(turns.wait("c"));
        assert!(poll!(b.as_mut()).is_pending());
        assert!(poll!(c.as_mut()).is_pending());
        // b and c wait for the compile in progress only, not for a's queue.
        drop(held);
        let [mut a1, a2, a3] = a;
        let t = b.await.unwrap();
        assert!(poll!(a1.as_mut()).is_pending());
        assert!(poll!(c.as_mut()).is_pending());
        drop(t);
        let t = c.await.unwrap();
        assert!(poll!(a1.as_mut()).is_pending());
        drop(t);
        drop(a1.await.unwrap());
        drop(a2.await.unwrap());
        // A waiter that went away hands its turn on.
        let mut late = Box::pin(turns.wait("d"));
        let t = a3.await.unwrap();
        assert!(poll!(late.as_mut()).is_pending());
        let mut gone = Box::pin(turns.wait("e"));
        assert!(poll!(gone.as_mut()).is_pending());
        drop(t);
        drop(late.await.unwrap());
        drop(gone);
        // Nobody waits: the next one gets the turn at once.
        assert!(poll!(Box::pin(turns.wait("f"))).is_ready());
    }

    #[test]
    fn a_function_over_the_size_limit_is_refused_before_compiling() {
        let body = "(i32.const 1) (drop) ".repeat(2_000);
        let wasm = wat::parse_str(format!("(module (func {body}))")).unwrap();
        assert!(check_function_sizes(&wasm, 1 << 20).is_ok());
        let err = check_function_sizes(&wasm, 1_000).unwrap_err();
        assert!(matches!(err, RegistryError::TooExpensive(_)), "{err}");
        assert!(err.to_string().contains("--max-function-size"), "{err}");
    }

    #[tokio::test]
    async fn a_module_is_compiled_once_per_data_directory() {
        use crate::node::{Node, NodeOptions};
        let dir = tempfile::tempdir().unwrap();
        let bytes = Bytes::from(wat::parse_str(wat_fixture!("print-hello")).unwrap());
        let node = Node::open(dir.path(), NodeOptions::default())
            .await
            .unwrap();
        let (info, _, new) = node.registry().register(bytes.clone()).await.unwrap();
        assert!(new);
        let (again, _, new) = node.registry().register(bytes.clone()).await.unwrap();
        assert!(!new, "the same bytes are stored once");
        assert_eq!(again, info);
        assert_eq!(node.metrics().compiles.get(), 1);
        assert_eq!(node.metrics().cache_hits.get(), 1);
        drop(node);

        // After a restart the artifact is loaded, not compiled.
        let node = Node::open(dir.path(), NodeOptions::default())
            .await
            .unwrap();
        node.registry().get(&info.hash).await.unwrap();
        assert_eq!(node.metrics().compiles.get(), 0);
        let unknown = format!("sha256:{}", "0".repeat(64));
        let err = node.registry().get(&unknown).await.err().unwrap();
        assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
    }

    #[test]
    fn a_failed_artifact_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(Default::default(), None).unwrap();
        let compiled = runtime
            .compile(&wat::parse_str("(module (func (export \"_start\")))").unwrap())
            .unwrap();
        // The final name is taken by a directory: the rename fails.
        let path = dir.path().join("a.cwasm");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), b"x").unwrap();
        assert!(write_artifact(&runtime, &compiled, &path).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["a.cwasm"], "no temporary file is left");
    }

    #[tokio::test]
    async fn the_compiled_cache_keeps_its_bound_and_drops_the_least_recently_used() {
        use crate::node::{Node, NodeOptions};
        let dir = tempfile::tempdir().unwrap();
        let module = |n: u32| {
            let wat =
                format!("(module (func (export \"_start\")) (func (result i32) i32.const {n}))");
            Bytes::from(wat::parse_str(wat).unwrap())
        };
        // Measure one artifact, then allow two and a half.
        let probe = Node::open(dir.path(), NodeOptions::default())
            .await
            .unwrap();
        let (info, _, _) = probe.registry().register(module(0)).await.unwrap();
        let one = std::fs::metadata(probe.registry().artifact_path(&info.hash))
            .unwrap()
            .len();
        drop(probe);
        let options = NodeOptions {
            max_cache_bytes: one * 5 / 2,
            ..NodeOptions::default()
        };
        let node = Node::open(dir.path(), options).await.unwrap();
        let registry = node.registry();
        let mut hashes = Vec::new();
        for n in 1..=3 {
            hashes.push(registry.register(module(n)).await.unwrap().0.hash);
            // The first is used again between the others: the second is
            // the least recently used when the third comes.
            if n == 2 {
                registry.get(&hashes[0]).await.unwrap();
            }
        }
        let on_disk = |h: &str| registry.artifact_path(h).exists();
        assert!(registry.lock_cache().bytes() <= one * 5 / 2);
        assert!(on_disk(&hashes[0]) && on_disk(&hashes[2]));
        assert!(
            !on_disk(&hashes[1]),
            "the least recently used artifact went"
        );
        // It is compiled again when needed.
        let compiles = node.metrics().compiles.get();
        registry.get(&hashes[1]).await.unwrap();
        assert_eq!(node.metrics().compiles.get(), compiles + 1);
        // Beyond the bound at start (a smaller bound now), the oldest go.
        drop(node);
        let options = NodeOptions {
            max_cache_bytes: one,
            ..NodeOptions::default()
        };
        let node = Node::open(dir.path(), options).await.unwrap();
        let left = std::fs::read_dir(dir.path().join("artifacts"))
            .unwrap()
            .count();
        assert_eq!(left, 1, "one artifact fits");
        drop(node);
    }
}
