//! The wasmtime backend: compiles modules and runs workloads in sandboxed stores.
//!
//! Three kinds of workload, told apart from the bytes at compile time: WASI
//! preview1 core modules, WASI preview2 command components, and components of
//! the Vulcan world (see [`component`]). All share the limits, the kill switch
//! and the output path.
//!
//! Owns the one process-wide wasmtime engine, its single epoch ticker thread,
//! WASI wiring (outbound `wasi:http` for components, see [`http`]) and the
//! classification of how a guest ended. It must not touch
//! the store or the broker: guest output leaves through the [`LogWriter`] it is
//! handed. Only this module imports wasmtime.
//!
//! Interruption: every store yields to the async executor at each epoch tick
//! (`TICK`), so a guest in a tight loop is still a well-behaved tokio task;
//! a kill or timeout simply drops the running future at its next yield (or at
//! once if it is blocked in a host call).

mod component;
mod http;
mod limits;
mod output;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wasmtime::{
    Config, Engine, InstancePre, Linker, Module, Store, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use component::{ComponentHost, ComponentPre};
pub use limits::MemoryLimitExceeded;
pub use output::GuestOutput;

use crate::logs::{LinesNotStored, LogStream, LogWriter, OutputLimitExceeded};
use crate::outbound::OutboundPolicy;
use crate::workload::{Stdin, WorkloadSpec};

/// Epoch tick: the longest a running guest goes without yielding, and so the
/// latency of kill and timeout for a guest that is computing.
pub const TICK: Duration = Duration::from_millis(5);

/// The state of one store: the guest's WASI context and its limits.
pub struct Host {
    wasi: WasiP1Ctx,
    limiter: limits::GuestLimiter,
}

/// The two wasm binary formats, told apart by the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryFormat {
    /// A core module.
    Module,
    /// A component.
    Component,
}

/// What kind of workload a compiled binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// A core module, WASI preview1 command (`_start`).
    Core,
    /// A WASI preview2 command component (`wasi:cli/run`).
    Command,
    /// A component of the Vulcan world (`run(input) -> result<output, error>`).
    Workload,
}

impl ModuleKind {
    /// Stable name for storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Core => "module",
            ModuleKind::Command => "wasi-command",
            ModuleKind::Workload => "vulcan-workload",
        }
    }
}

/// Who a run is for, as the Vulcan world's `metadata()` reports it.
#[derive(Debug, Clone, Default)]
pub struct GuestIdentity {
    /// The workload's id.
    pub workload_id: String,
    /// `sha256:<hex>` of its module.
    pub module_hash: String,
}

/// Bytes that cannot be run: the message says why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct InvalidModule(pub String);

/// A module compiled and linked, ready to instantiate many times.
pub struct CompiledModule {
    prepared: Prepared,
    /// How long its latest run took, in µs (0 before the first).
    last_run_us: std::sync::atomic::AtomicU64,
}

enum Prepared {
    Core(InstancePre<Host>),
    Component(ComponentPre),
}

impl CompiledModule {
    fn new(prepared: Prepared) -> Self {
        Self {
            prepared,
            last_run_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How long its latest run took (zero before the first): what the runner
    /// expects of the next one.
    pub fn last_run(&self) -> Duration {
        Duration::from_micros(self.last_run_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Notes how long a run took.
    pub fn record_run(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        (self.last_run_us).store(us, std::sync::atomic::Ordering::Relaxed);
    }

    /// Which kind of workload it is.
    pub fn kind(&self) -> ModuleKind {
        match &self.prepared {
            Prepared::Core(_) => ModuleKind::Core,
            Prepared::Component(ComponentPre::Command(_)) => ModuleKind::Command,
            Prepared::Component(ComponentPre::Workload(_)) => ModuleKind::Workload,
        }
    }
}

/// Which limit stopped a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    /// Linear memory would have grown past this many bytes.
    Memory(u64),
    /// This much fuel was used up.
    Fuel(u64),
    /// This many bytes of output were exceeded.
    Output(u64),
}

/// How a workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest exited (`proc_exit(n)`, or `_start` returned: 0).
    Exited(i32),
    /// A Vulcan-world workload returned its output.
    Returned(Vec<u8>),
    /// A Vulcan-world workload returned an error.
    ReturnedError(String),
    /// The guest trapped.
    Trapped {
        /// What went wrong.
        message: String,
        /// The wasm stack at the trap, when known.
        backtrace: Option<String>,
    },
    /// The wall-clock limit passed.
    TimedOut(Duration),
    /// Stopped on request.
    Killed,
    /// A resource limit was hit.
    LimitExceeded(LimitHit),
    /// Its log lines could not be stored, so it was stopped.
    LinesNotStored(String),
    /// The host failed around the guest (e.g. a directory it could not open).
    HostFailure(String),
}

/// The outcome of one run and how long it took.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall-clock time from instantiation to the end.
    pub duration: Duration,
}

/// Instance slots the engine keeps ready for a server: one workload's worth
/// per `--max-concurrent`, each memory able to grow to `--max-memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstancePool {
    /// Workloads that may run at once.
    pub workloads: u32,
    /// Largest linear memory a workload may have, in bytes.
    pub max_memory_bytes: u64,
}

impl InstancePool {
    /// Core instances, memories and tables a component may hold: a Rust
    /// `wasm32-wasip2` component has a handful of each (its module, the WASI
    /// adapter and their shims); these leave room for larger ones.
    const CORE_INSTANCES_PER_WORKLOAD: u32 = 32;
    const MEMORIES_PER_WORKLOAD: u32 = 4;
    const TABLES_PER_WORKLOAD: u32 = 8;
    /// Elements a pooled table may hold (more than any toolchain emits for
    /// function pointers; a bigger table fails to instantiate, clearly).
    const TABLE_ELEMENTS: usize = 1 << 16;

    fn config(self) -> wasmtime::PoolingAllocationConfig {
        let n = self.workloads.max(1);
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(Self::CORE_INSTANCES_PER_WORKLOAD))
            .total_memories(n.saturating_mul(Self::MEMORIES_PER_WORKLOAD))
            .total_tables(n.saturating_mul(Self::TABLES_PER_WORKLOAD))
            .total_stacks(n)
            .max_memories_per_module(Self::MEMORIES_PER_WORKLOAD)
            .max_tables_per_module(Self::TABLES_PER_WORKLOAD)
            .table_elements(Self::TABLE_ELEMENTS)
            // wasm32 memories cannot be larger than 4 GiB anyway.
            .max_memory_size(self.max_memory_bytes.min(4 << 30) as usize);
        pool
    }
}

/// The shared wasmtime engine, with WASI linked in.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    component_linker: wasmtime::component::Linker<ComponentHost>,
    compat_key: String,
    outbound: Arc<http::OutboundGate>,
}

impl Runtime {
    /// Builds the engine and starts its epoch ticker; components' outbound
    /// HTTP requests are held to `outbound` as well as to their spec. With a
    /// `pool`, instances come from preallocated slots (no mapping per run,
    /// warm slots reused); without one (`vulcan run`), on demand.
    pub fn new(outbound: OutboundPolicy, pool: Option<InstancePool>) -> anyhow::Result<Arc<Self>> {
        let mut config = Config::new();
        config.epoch_interruption(true).consume_fuel(true);
        // Memories start from a copy-on-write image of their data segments.
        config.memory_init_cow(true);
        if let Some(pool) = pool {
            config
                .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool.config()));
        }
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .with_context(|| match pool {
                // Each memory slot reserves 4 GiB of address space plus
                // guards (so wasm32 code runs without bounds checks), whatever
                // --max-memory says; only the slot count can shrink the pool.
                Some(pool) => format!(
                    "failed to reserve the instance pool for {} workloads (4 memory slots \
                     each, every slot 4 GiB of address space and its guards); lower \
                     --max-concurrent",
                    pool.workloads
                ),
                None => "failed to create the wasmtime engine".to_owned(),
            })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |h: &mut Host| &mut h.wasi)
            .map_err(anyhow::Error::from)
            .context("failed to link WASI preview1")?;
        let component_linker = component::linker(&engine)
            .context("failed to link WASI preview2 and the Vulcan host")?;
        start_ticker(&engine)?;
        let compat_key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            env!("CARGO_PKG_VERSION").hash(&mut h);
            format!("{:016x}", h.finish())
        };
        Ok(Arc::new(Self {
            engine,
            linker,
            component_linker,
            compat_key,
            outbound: Arc::new(http::OutboundGate::new(outbound)),
        }))
    }

    /// What the operator allows components' outbound HTTP requests.
    pub fn outbound_policy(&self) -> &OutboundPolicy {
        self.outbound.policy()
    }

    /// A key that changes whenever compiled artifacts stop being loadable.
    pub fn artifact_key(&self) -> &str {
        &self.compat_key
    }

    /// Tells a core module from a component by its header.
    pub fn classify(bytes: &[u8]) -> Result<BinaryFormat, InvalidModule> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            let native = [
                &b"\x7fELF"[..],
                b"MZ",
                b"\xcf\xfa\xed\xfe",
                b"\xca\xfe\xba\xbe",
            ]
            .iter()
            .any(|magic| bytes.starts_with(magic));
            let hint = match native {
                true => {
                    "; it is a native executable or library: build for WebAssembly with \
                     `cargo build --release --target wasm32-wasip2` (an SDK workload, with \
                     `crate-type = [\"cdylib\"]`) or `--target wasm32-wasip1` (a plain program)"
                }
                false => "",
            };
            return Err(InvalidModule(format!(
                "not a WebAssembly binary (it does not start with the \\0asm magic bytes){hint}"
            )));
        }
        if wasmparser_is_component(bytes) {
            Ok(BinaryFormat::Component)
        } else {
            Ok(BinaryFormat::Module)
        }
    }

    /// Validates, compiles and links `bytes`.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledModule, InvalidModule> {
        match Self::classify(bytes)? {
            BinaryFormat::Module => {
                let module = Module::from_binary(&self.engine, bytes)
                    .map_err(|e| InvalidModule(format!("invalid module: {e:#}")))?;
                self.link(module)
            }
            BinaryFormat::Component => {
                let component = wasmtime::component::Component::from_binary(&self.engine, bytes)
                    .map_err(|e| InvalidModule(format!("invalid component: {e:#}")))?;
                self.link_component(component)
            }
        }
    }

    /// The compiled form of `module`, for the artifact cache.
    pub fn serialize(&self, module: &CompiledModule) -> anyhow::Result<Vec<u8>> {
        match &module.prepared {
            Prepared::Core(pre) => pre.module().serialize(),
            Prepared::Component(ComponentPre::Command(pre)) => {
                pre.instance_pre().component().serialize()
            }
            Prepared::Component(ComponentPre::Workload(pre)) => {
                pre.instance_pre().component().serialize()
            }
        }
        .map_err(anyhow::Error::from)
        .context("failed to serialize a compiled module")
    }

    /// Loads an artifact written by [`Runtime::serialize`] of this same build.
    pub fn load_artifact(&self, path: &std::path::Path) -> anyhow::Result<CompiledModule> {
        // SAFETY: `deserialize_file` trusts the file to be a wasmtime artifact. These
        // files are written only by `serialize` above into the data directory, under
        // a name carrying `artifact_key` (wasmtime's own compatibility hash plus our
        // version), and wasmtime still checks its header and engine settings.
        #[expect(unsafe_code, reason = "loading our own cached compilation artifacts")]
        let module = unsafe { Module::deserialize_file(&self.engine, path) };
        let loaded = match module {
            Ok(module) => self.link(module),
            // Not a core module's artifact: a component's (wasmtime checks which).
            Err(module_error) => {
                // SAFETY: as above.
                #[expect(unsafe_code, reason = "loading our own cached compilation artifacts")]
                let component =
                    unsafe { wasmtime::component::Component::deserialize_file(&self.engine, path) }
                        .map_err(|e| anyhow::anyhow!("{module_error:#}; as a component: {e:#}"))
                        .with_context(|| {
                            format!("failed to load compiled artifact {}", path.display())
                        })?;
                self.link_component(component)
            }
        };
        loaded.map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn link_component(
        &self,
        component: wasmtime::component::Component,
    ) -> Result<CompiledModule, InvalidModule> {
        Ok(CompiledModule::new(Prepared::Component(component::link(
            &self.component_linker,
            &component,
        )?)))
    }

    fn link(&self, module: Module) -> Result<CompiledModule, InvalidModule> {
        match module.get_export("_start") {
            Some(wasmtime::ExternType::Func(f))
                if f.params().len() == 0 && f.results().len() == 0 => {}
            _ if module
                .imports()
                .any(|i| i.module().starts_with("vulcan:workload/")) =>
            {
                return Err(InvalidModule(
                    "this is an SDK workload built as a core module (wasm32-wasip1); build it \
                     with `cargo build --release --target wasm32-wasip2` to get a component"
                        .into(),
                ));
            }
            _ => {
                return Err(InvalidModule(
                    "not a WASI command: it has no `_start` function export".into(),
                ));
            }
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| InvalidModule(format!("{e:#}")))?;
        Ok(CompiledModule::new(Prepared::Core(pre)))
    }

    /// Runs `module` as described by `spec`, its output going to `log`, until it
    /// ends, times out, hits a limit or `cancel` fires.
    ///
    /// An `Err` is a host-side setup failure (e.g. a preopened directory that
    /// cannot be opened); everything the guest does is an [`Outcome`].
    pub async fn run(
        &self,
        module: &CompiledModule,
        spec: &WorkloadSpec,
        identity: &GuestIdentity,
        log: &LogWriter,
        cancel: &CancellationToken,
    ) -> anyhow::Result<RunReport> {
        let mut wasi = wasi_context(spec, log)?;
        let limiter = limits::GuestLimiter::new(spec.limits.max_memory_bytes);
        let started = Instant::now();
        let outcome = match &module.prepared {
            Prepared::Core(pre) => {
                let host = Host {
                    wasi: wasi.build_p1(),
                    limiter,
                };
                let mut store = self.store(host, spec, log)?;
                let pre = pre.clone();
                supervise(spec, cancel, async move {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await?;
                    Ok(Outcome::Exited(0))
                })
                .await
            }
            Prepared::Component(pre) => {
                let host = ComponentHost {
                    ctx: wasi.build(),
                    table: wasmtime::component::ResourceTable::new(),
                    limiter,
                    log: log.clone(),
                    meta: component::Metadata {
                        id: identity.workload_id.clone(),
                        module_hash: identity.module_hash.clone(),
                    },
                    http: wasmtime_wasi_http::WasiHttpCtx::new(),
                    outbound: http::OutboundHooks::new(
                        &spec.allowed_hosts,
                        Arc::clone(&self.outbound),
                        log.clone(),
                    ),
                };
                let mut store = self.store(host, spec, log)?;
                match pre {
                    ComponentPre::Command(pre) => {
                        let pre: CommandPre<ComponentHost> = pre.clone();
                        supervise(spec, cancel, async move {
                            let command = pre.instantiate_async(&mut store).await?;
                            let result = command.wasi_cli_run().call_run(&mut store).await?;
                            // `run` returning an error is the command's exit status 1.
                            Ok(Outcome::Exited(if result.is_ok() { 0 } else { 1 }))
                        })
                        .await
                    }
                    ComponentPre::Workload(pre) => {
                        let pre = pre.clone();
                        let input = spec.input.clone().unwrap_or_default();
                        supervise(spec, cancel, async move {
                            let workload = pre.instantiate_async(&mut store).await?;
                            Ok(match workload.call_run(&mut store, &input).await? {
                                Ok(output) => Outcome::Returned(output),
                                Err(message) => Outcome::ReturnedError(message),
                            })
                        })
                        .await
                    }
                }
            }
        };
        let outcome = match (log.output_limit_hit(), outcome) {
            (
                Some(limit),
                Outcome::Exited(_)
                | Outcome::Trapped { .. }
                | Outcome::Returned(_)
                | Outcome::ReturnedError(_),
            ) => Outcome::LimitExceeded(LimitHit::Output(limit)),
            (_, outcome) => outcome,
        };
        // Whatever the guest did, a run whose lines are not all stored failed.
        let outcome = match log.store_failure() {
            Some(why) => Outcome::LinesNotStored(why),
            None => outcome,
        };
        Ok(RunReport {
            outcome,
            duration: started.elapsed(),
        })
    }

    /// A store with the spec's limits: memory, fuel, and an epoch deadline that
    /// yields at every tick (or stops a guest that went on after its output
    /// limit: WASI turns the write error into an errno it may ignore).
    fn store<T: GuestState>(
        &self,
        host: T,
        spec: &WorkloadSpec,
        log: &LogWriter,
    ) -> anyhow::Result<Store<T>> {
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| h.limiter());
        store
            .set_fuel(spec.limits.fuel.unwrap_or(u64::MAX))
            .map_err(anyhow::Error::from)?;
        store.set_epoch_deadline(1);
        let output = log.clone();
        store.epoch_deadline_callback(move |_| {
            if let Some(limit) = output.output_limit_hit() {
                return Err(wasmtime::Error::new(OutputLimitExceeded { limit }));
            }
            if let Some(why) = output.store_failure() {
                return Err(wasmtime::Error::new(LinesNotStored(why)));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }
}

/// Store state of either kind, as far as limits are concerned.
trait GuestState: Send + 'static {
    fn limiter(&mut self) -> &mut limits::GuestLimiter;
}

impl GuestState for Host {
    fn limiter(&mut self) -> &mut limits::GuestLimiter {
        &mut self.limiter
    }
}

impl GuestState for ComponentHost {
    fn limiter(&mut self) -> &mut limits::GuestLimiter {
        &mut self.limiter
    }
}

/// Runs `execution` until it ends, the timeout passes or `cancel` fires.
async fn supervise(
    spec: &WorkloadSpec,
    cancel: &CancellationToken,
    execution: impl Future<Output = wasmtime::Result<Outcome>>,
) -> Outcome {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Outcome::Killed,
        result = with_timeout(spec.limits.timeout(), execution) => match result {
            None => Outcome::TimedOut(spec.limits.timeout().unwrap_or_default()),
            Some(result) => classify(result, spec),
        },
    }
}

async fn with_timeout<F: Future>(limit: Option<Duration>, f: F) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, f).await.ok(),
        None => Some(f.await),
    }
}

fn classify(result: wasmtime::Result<Outcome>, spec: &WorkloadSpec) -> Outcome {
    let error = match result {
        Ok(outcome) => return outcome,
        Err(e) => e,
    };
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return Outcome::Exited(exit.0);
    }
    if let Some(m) = error.downcast_ref::<MemoryLimitExceeded>() {
        return Outcome::LimitExceeded(LimitHit::Memory(m.limit));
    }
    if let Some(o) = error.downcast_ref::<OutputLimitExceeded>() {
        return Outcome::LimitExceeded(LimitHit::Output(o.limit));
    }
    if let Some(Trap::OutOfFuel) = error.downcast_ref::<Trap>() {
        return Outcome::LimitExceeded(LimitHit::Fuel(spec.limits.fuel.unwrap_or(u64::MAX)));
    }
    let message = match error.downcast_ref::<Trap>() {
        // A trap's own text already starts with "wasm trap: ".
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    };
    Outcome::Trapped {
        message,
        backtrace: error
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| bt.to_string())
            .filter(|bt| !bt.trim().is_empty()),
    }
}

/// Builds exactly the WASI view the spec allows: nothing of the host's
/// environment, filesystem or network leaks in.
fn wasi_context(spec: &WorkloadSpec, log: &LogWriter) -> anyhow::Result<WasiCtxBuilder> {
    let mut b = WasiCtxBuilder::new();
    b.args(&spec.args);
    for (k, v) in &spec.env {
        b.env(k, v);
    }
    match &spec.stdin {
        // A plain WASI workload reads its input on stdin when no stdin is given.
        Stdin::Empty => {
            if let Some(input) = &spec.input {
                b.stdin(MemoryInputPipe::new(input.clone()));
            }
        }
        Stdin::Bytes(bytes) => {
            b.stdin(MemoryInputPipe::new(bytes.clone()));
        }
        Stdin::Inherit => {
            b.inherit_stdin();
        }
    }
    b.stdout(GuestOutput::new(log.clone(), LogStream::Stdout));
    b.stderr(GuestOutput::new(log.clone(), LogStream::Stderr));
    for p in &spec.preopens {
        let perms = if p.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(&p.host, &p.guest, perms)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("failed to open directory {}", p.host.display()))?;
    }
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    Ok(b)
}

/// True when the binary header says component (layer 1) rather than core module.
fn wasmparser_is_component(bytes: &[u8]) -> bool {
    // Header: magic, then a u16 version and a u16 layer; layer 1 is a component.
    bytes.len() >= 8 && bytes[6..8] == [1, 0]
}

/// One thread per process advances the epoch; it holds only a weak handle, so it
/// stops when the engine is dropped.
fn start_ticker(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("vulcan-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })
        .context("failed to start the epoch ticker")?;
    Ok(())
}

#[cfg(test)]
mod tests;
