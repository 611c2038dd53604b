//! One Vulcan node: the composition root.
//!
//! Opens a data directory and wires its parts once — store, module registry,
//! engine runtime, log broker, runner and metrics — for `vulcan serve`,
//! `vulcan run` and the benchmarks alike, so they cannot drift apart. Owns the
//! wiring, start-up recovery and the shutdown order; holds no workload logic
//! and nothing HTTP (the API holds a node plus its own configuration).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{InstancePool, Runtime};
use crate::logs::LogBroker;
use crate::metrics::Metrics;
use crate::outbound::OutboundPolicy;
use crate::registry::{DEFAULT_MAX_FUNCTION_SIZE, ModuleRegistry, RegistryParts};
use crate::runner::{GuestThreads, Runner, RunnerParts};
use crate::store::{Db, WriterConfig};

/// What an operator decides about a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Most workloads running at once; `None`: no limit (`vulcan run`). A
    /// limit also sizes the engine's instance pool, with `max_memory`.
    pub max_concurrent: Option<usize>,
    /// Largest linear memory any workload may ask for (`--max-memory`);
    /// `None`: no cap below wasm32's 4 GiB.
    pub max_memory: Option<u64>,
    /// Largest function body a module may have (larger ones are refused
    /// before compiling).
    pub max_function_size: u64,
    /// How the store batches and bounds log lines.
    pub writer: WriterConfig,
    /// Most bytes of compiled modules kept, in memory and on disk.
    pub max_cache_bytes: u64,
    /// Where components may send HTTP requests, beyond what each spec lists.
    pub outbound: OutboundPolicy,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            max_concurrent: None,
            max_memory: None,
            max_function_size: DEFAULT_MAX_FUNCTION_SIZE,
            writer: WriterConfig::default(),
            max_cache_bytes: crate::registry::DEFAULT_MAX_CACHE_BYTES,
            outbound: OutboundPolicy::default(),
        }
    }
}

/// The wired parts of one node over one data directory.
pub struct Node {
    data_dir: std::path::PathBuf,
    runtime: Arc<Runtime>,
    db: Db,
    broker: LogBroker,
    registry: ModuleRegistry,
    runner: Arc<Runner>,
    metrics: Arc<Metrics>,
    vital: crate::vital::VitalTasks,
    /// Declared last: dropped after the runner that spawns onto it.
    _guests: Option<GuestThreads>,
}

impl Node {
    /// Opens `data_dir` as its only owner and wires the parts. Workloads a
    /// previous process left pending or running are marked failed: with the
    /// directory's lock held, nothing else can be running them.
    pub async fn open(data_dir: &Path, options: NodeOptions) -> anyhow::Result<Arc<Self>> {
        let pool = options.max_concurrent.map(|n| InstancePool {
            workloads: u32::try_from(n).unwrap_or(u32::MAX),
            max_memory_bytes: options.max_memory.unwrap_or(4 << 30),
        });
        let runtime = Runtime::new(options.outbound, pool)?;
        let db = Db::open_with(data_dir, options.writer)?;
        let orphaned = db
            .fail_unfinished("failed: vulcan stopped while this workload was pending or running")
            .await?;
        if orphaned > 0 {
            tracing::warn!(
                count = orphaned,
                "marked workloads left unfinished by a previous process as failed"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let broker = LogBroker::default();
        let registry = ModuleRegistry::new(RegistryParts {
            runtime: Arc::clone(&runtime),
            db: db.clone(),
            artifact_dir: data_dir.join("artifacts"),
            metrics: Arc::clone(&metrics),
            max_function_size: options.max_function_size,
            max_cache_bytes: options.max_cache_bytes,
        });
        // A server's guests get threads of their own; `vulcan run` runs one.
        let guests = options
            .max_concurrent
            .map(GuestThreads::start)
            .transpose()?;
        let runner = Runner::new(RunnerParts {
            runtime: Arc::clone(&runtime),
            db: db.clone(),
            broker: broker.clone(),
            metrics: Arc::clone(&metrics),
            max_concurrent: options.max_concurrent.map(|n| n.max(1)),
            guests: guests.as_ref().map(GuestThreads::handle),
        });
        Ok(Arc::new(Self {
            data_dir: data_dir.to_owned(),
            runtime,
            db,
            broker,
            registry,
            runner,
            metrics,
            vital: crate::vital::VitalTasks::default(),
            _guests: guests,
        }))
    }

    /// The data directory the node owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The store: records, modules and lines.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Live delivery of committed lines.
    pub fn broker(&self) -> &LogBroker {
        &self.broker
    }

    /// Modules and their compiled forms.
    pub fn registry(&self) -> &ModuleRegistry {
        &self.registry
    }

    /// Starts, tracks and kills workloads.
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// What the operator allows components' outbound HTTP requests.
    pub fn outbound_policy(&self) -> &OutboundPolicy {
        self.runtime.outbound_policy()
    }

    /// The counters every part reports into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The tasks this node cannot live without.
    pub fn vital(&self) -> &crate::vital::VitalTasks {
        &self.vital
    }

    /// Stops the node's work: kills what runs with `reason`, waits up to
    /// `grace` for it to end (a wedged guest must not keep the process alive),
    /// then waits until everything queued is committed.
    pub async fn shutdown(&self, reason: &str, grace: Duration) {
        self.runner.kill_all(reason);
        if tokio::time::timeout(grace, self.runner.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.runner.running_count(),
                "workloads still running {grace:?} after shutdown; stopping anyway"
            );
        }
        self.db.flush().await;
    }
}
