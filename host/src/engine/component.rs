//! Components: WASI preview2 commands (`wasi:cli/run`) and workloads of the
//! Vulcan world (`wit/workload.wit`: `run(input) -> result<output, error>`).
//!
//! Owns the component store state, the bindings of Vulcan's own host
//! interface (`log`, `log-fields`, `metadata`) and the check at compile time
//! that a component is one of the two kinds with every import satisfied.
//! Guest output still leaves only through the [`LogWriter`], and HTTP
//! requests only through [`OutboundHooks`].

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::InvalidModule;
use super::http::OutboundHooks;
use super::limits::GuestLimiter;
use crate::logs::{Fields, LinesNotStored, LogLevel, LogWriter};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "workload",
        // `log` is async so that it waits for room in the store like any
        // other output, and trappable so that a store failure stops the guest.
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub use bindings::WorkloadPre;
pub use bindings::vulcan::workload::host::WorkloadMetadata as Metadata;
use bindings::vulcan::workload::host::{self, Level};

/// Store state of one component run.
pub struct ComponentHost {
    pub(super) ctx: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: GuestLimiter,
    pub(super) log: LogWriter,
    pub(super) meta: Metadata,
    pub(super) http: WasiHttpCtx,
    pub(super) outbound: OutboundHooks,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ComponentHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl host::Host for ComponentHost {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.log_fields(level, message, Vec::new()).await
    }

    async fn log_fields(
        &mut self,
        level: Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        self.log.room().await;
        if let Some(why) = self.log.store_failure() {
            return Err(wasmtime::Error::new(LinesNotStored(why)));
        }
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        // Past the output limit the guest stops here, as a write would stop it.
        self.log
            .log(level, &message, Fields(fields))
            .map_err(wasmtime::Error::new)
    }

    async fn metadata(&mut self) -> wasmtime::Result<Metadata> {
        Ok(self.meta.clone())
    }
}

/// A component linked and checked, ready to instantiate.
pub enum ComponentPre {
    /// A WASI preview2 command.
    Command(CommandPre<ComponentHost>),
    /// A workload of the Vulcan world.
    Workload(WorkloadPre<ComponentHost>),
}

/// Everything a component may import: WASI preview2, outbound `wasi:http`
/// (each request checked by [`OutboundHooks`]) and Vulcan's host interface.
pub fn linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<ComponentHost>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    host::add_to_linker::<_, wasmtime::component::HasSelf<ComponentHost>>(&mut linker, |h| h)?;
    Ok(linker)
}

/// Tells which kind `component` is and links it, refusing anything that
/// imports what the host does not provide or exports neither entry point.
pub fn link(
    linker: &Linker<ComponentHost>,
    component: &Component,
) -> Result<ComponentPre, InvalidModule> {
    let engine = linker.engine();
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    let is_workload = exports.iter().any(|n| n == "run");
    let is_command = exports.iter().any(|n| n.starts_with("wasi:cli/run@0.2"));
    if !is_workload && !is_command {
        return Err(InvalidModule(format!(
            "this component targets another world: it exports neither `run` (the \
             vulcan:workload world) nor `wasi:cli/run` (a WASI command); its exports: [{}]",
            exports.join(", ")
        )));
    }
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| InvalidModule(format!("the host cannot satisfy its imports: {e:#}")))?;
    if is_workload {
        WorkloadPre::new(pre)
            .map(ComponentPre::Workload)
            .map_err(|e| {
                InvalidModule(format!(
                    "its `run` export does not match the vulcan:workload world: {e:#}"
                ))
            })
    } else {
        CommandPre::new(pre)
            .map(ComponentPre::Command)
            .map_err(|e| InvalidModule(format!("not a WASI command: {e:#}")))
    }
}
