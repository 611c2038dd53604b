//! Cluster mode: many `vulcan serve` nodes over one NATS JetStream.
//!
//! Owns everything NATS (only this module imports async-nats): the shared
//! workload records, dispatch of queued work to nodes with a free slot, the
//! cluster's durable copy of every log line, kills across nodes, heartbeats
//! and the failing of a lost node's workloads. Each node still runs its
//! workloads through its own [`Node`] (engine, LogWriter, SQLite) exactly as
//! single-node does; this module must not touch those parts' insides.
//!
//! What it creates at start when missing (names are fixed; `--cluster-replicas`
//! sets every one's replica count):
//!
//! | name | kind | holds |
//! |---|---|---|
//! | `vulcan_workloads` | KV bucket, history 1 | key = workload id, value = the record as the API shows it (with `node`, `attempt`; a record written once, final, may also hold its lines under `log`); every change is a compare-and-swap on its revision |
//! | `vulcan_nodes` | KV bucket, history 1 | key = node id, value = its heartbeat: the workloads it has claimed, every second |
//! | `vulcan_modules` | object store | module bytes by hex sha256, checked on arrival |
//! | `vulcan_module_owners` | KV bucket | key = `<hex sha256>.<tenant>`, value = when that tenant first uploaded it (ms) |
//! | `vulcan_tenant_slots` | KV bucket | key = tenant, value = the workloads holding its `max_concurrent` places |
//! | `vulcan_retention` | KV bucket | key `pruner`: which node prunes now, until when (a lease) |
//! | `vulcan_idempotency` | KV bucket | key = SHA-256 of tenant and key: the first submission (24 h) |
//! | `vulcan_schedules` | KV bucket | key = SHA-256 of tenant and name: the schedule |
//! | `VULCAN_QUEUE` | stream, work-queue retention, subject `vulcan.queue` | submitted work (header `Vulcan-Revision`: its pending record's revision); durable pull consumer `vulcan_dispatch`, explicit ack, ack wait 10 s |
//! | `VULCAN_LOGS` | stream, subjects `vulcan.logs.<id>`, 2 min duplicate window | log lines (but those a record holds) in batches (headers `Nats-Msg-Id: <id>:<first seq>`, `Vulcan-Last: <last seq>`); the last message also carries `Vulcan-End: <line count>` |
//!
//! Kills travel as core NATS requests on `vulcan.kill.<node id>`; a final
//! record written by compare-and-swap is also announced (not stored) on
//! `vulcan.ended.<id>`, for whoever waits for that workload's end.

mod auth;
mod dispatch;
mod execute;
mod index;
mod keys;
mod kill;
mod liveness;
mod logs;
mod modules;
mod quota;
mod records;
mod retention;
mod schedules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, object_store, stream};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{ClusterAuth, Secret};
pub use keys::KEYS_BUCKET;
pub use logs::{LogChunk, LogCursor};
pub use quota::SLOTS_BUCKET;
pub use schedules::SCHEDULES_BUCKET;

use crate::node::Node;
use crate::workload::WorkloadId;

/// KV bucket of workload records.
pub const WORKLOADS_BUCKET: &str = "vulcan_workloads";
/// KV bucket of node heartbeats.
pub const NODES_BUCKET: &str = "vulcan_nodes";
/// Object store of module bytes.
pub const MODULES_BUCKET: &str = "vulcan_modules";
/// KV bucket of which tenant uploaded which module.
pub const OWNERS_BUCKET: &str = "vulcan_module_owners";
/// Stream of submitted work.
pub const QUEUE_STREAM: &str = "VULCAN_QUEUE";
/// Subject submitted work is published on.
pub const QUEUE_SUBJECT: &str = "vulcan.queue";
/// The durable consumer every node pulls work from.
pub const DISPATCH_CONSUMER: &str = "vulcan_dispatch";
/// Stream of log line batches.
pub const LOGS_STREAM: &str = "VULCAN_LOGS";

/// A node that has not renewed its heartbeat for this long is lost.
pub const NODE_LOSS_AFTER: Duration = Duration::from_secs(5);

/// How often a node renews its heartbeat and looks for lost nodes.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How long one NATS request may take before the cluster counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The subject a workload's log batches go to.
fn log_subject(id: WorkloadId) -> String {
    format!("vulcan.logs.{id}")
}

/// The subject a workload's end is announced on, with its final record.
fn ended_subject(id: WorkloadId) -> String {
    format!("vulcan.ended.{id}")
}

/// Where a node that deleted a module tells the others to drop their copies.
const MODULE_DELETED_SUBJECT: &str = "vulcan.modules.deleted";

/// The subject a node takes kill requests on.
fn kill_subject(node: &str) -> String {
    format!("vulcan.kill.{node}")
}

/// Errors a caller may branch on.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// NATS cannot be reached now; nothing was changed.
    #[error("the cluster is unavailable ({0}); retry when NATS is back")]
    Unavailable(String),
    /// No workload has this id.
    #[error("workload {0} not found")]
    NotFound(WorkloadId),
    /// No node and not the cluster has this module.
    #[error("module {0} not found")]
    ModuleNotFound(String),
    /// A sync run ended on this node, but NATS did not take its record in
    /// time: this node's view of its end (its record and lines reach the
    /// cluster once NATS answers).
    #[error(
        "the cluster is unavailable: workload {} ran on this node and ended {}, but NATS did \
         not take its record in time; its record and lines are kept on this node and reach \
         the cluster when NATS answers again",
        .0.summary.id, .0.summary.status
    )]
    Unrecorded(Box<crate::view::WorkloadView>),
    /// The submission is larger than one NATS message may be.
    #[error("{0}")]
    TooLarge(String),
    /// The module was refused or could not be stored.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Anything else.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ClusterError {
    fn unavailable(e: impl std::fmt::Display) -> Self {
        ClusterError::Unavailable(e.to_string())
    }
}

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// NATS server URL(s), comma-separated; credentials in them are taken out.
    pub url: String,
    /// How to authenticate to NATS and sign control messages.
    pub auth: ClusterAuth,
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// Replicas of every stream and bucket (1, or 3 on a 3-server NATS cluster).
    pub replicas: usize,
    /// Where this node keeps its index of the cluster's records.
    pub data_dir: std::path::PathBuf,
    /// Tenants whose `max_concurrent` the cluster counts.
    pub quota_tenants: Vec<String>,
}

/// Figures `/metrics` shows of the cluster.
pub struct ClusterMetrics {
    /// 1 while connected to NATS.
    pub connected: Gauge,
    /// Work queued and not yet claimed by any node.
    pub queue_depth: Gauge,
    /// Workloads this node has claimed and not yet finished.
    pub claimed: Gauge,
    /// Seconds from submission to a node claiming the work.
    pub dispatch_latency: Histogram,
    /// Passes this node made over a lost node's running workloads.
    pub lost_nodes_swept: prometheus_client::metrics::counter::Counter,
}

impl ClusterMetrics {
    fn new() -> Self {
        Self {
            connected: Gauge::default(),
            queue_depth: Gauge::default(),
            claimed: Gauge::default(),
            dispatch_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 4.0, 10),
            ),
            lost_nodes_swept: Default::default(),
        }
    }

    /// Registers the figures under `vulcan_cluster_*`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let sub = registry.sub_registry_with_prefix("cluster");
        sub.register(
            "connected",
            "1 while this node is connected to NATS",
            self.connected.clone(),
        );
        sub.register(
            "queue_depth",
            "Submitted workloads not yet claimed by any node",
            self.queue_depth.clone(),
        );
        sub.register(
            "claimed",
            "Workloads this node has claimed and not yet finished",
            self.claimed.clone(),
        );
        sub.register(
            "dispatch_latency_seconds",
            "From submission to a node claiming the workload",
            self.dispatch_latency.clone(),
        );
        sub.register(
            "lost_nodes_swept",
            "Passes this node made over a lost node's running workloads, failing those still running",
            self.lost_nodes_swept.clone(),
        );
    }
}

/// One node's membership of the cluster.
pub struct Cluster {
    node: Arc<Node>,
    node_id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    workloads: kv::Store,
    nodes: kv::Store,
    modules: object_store::ObjectStore,
    logs: stream::Stream,
    /// Who uploaded which module (key `<hex hash>.<tenant>`).
    owners: kv::Store,
    /// Tenants' held quota places (see `quota.rs`).
    slots: kv::Store,
    /// Who prunes (see `retention.rs`).
    lease: kv::Store,
    /// Idempotency keys (see `keys.rs`).
    keys: kv::Store,
    /// Schedules (see `schedules.rs`).
    schedules: kv::Store,
    /// Tenants whose places are counted.
    quota_tenants: std::collections::HashSet<String>,
    index: records::Index,
    /// Workloads claimed here, with a kill that arrived before they started.
    claimed: Mutex<HashMap<WorkloadId, Option<String>>>,
    /// Workloads whose record may say they run here though this node does
    /// not run them: NATS may have carried out a creation or claim that
    /// answered with an error (see the liveness sweep).
    doubtful: Mutex<Vec<WorkloadId>>,
    /// Serializes heartbeats, so a newer claim list never lands before an
    /// older one; holds the revision of this process's last beat.
    beat: tokio::sync::Mutex<Option<u64>>,
    /// This process, as its heartbeats name it (see `check_id_unused`).
    instance: String,
    /// Held while a module is fetched from the cluster.
    fetching: tokio::sync::Mutex<()>,
    metrics: Arc<ClusterMetrics>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Signs the control messages this node sends and checks those it acts
    /// on; `None`: the cluster has no secret (NATS permissions alone guard them).
    signer: Option<auth::Signer>,
    /// When this node's reads of the heartbeats began succeeding (None: failing).
    reachable_since: Mutex<Option<Instant>>,
    /// When NATS last took this node's heartbeat: a connection that stalls
    /// (no RST) still looks connected to the client for a minute.
    answered_at: Mutex<Instant>,
}

/// How long NATS may leave this node's heartbeats unanswered before the
/// node refuses what needs NATS (503 `cluster_unavailable`) rather than
/// start work it may not be able to record.
const NATS_SILENT_AFTER: Duration = Duration::from_secs(4);

impl Cluster {
    /// Connects to NATS, creates what is missing, and starts taking work.
    pub async fn join(node: Arc<Node>, options: ClusterOptions) -> anyhow::Result<Arc<Self>> {
        let urls = auth::ServerUrls::parse(&options.url)?;
        let shown = urls.shown();
        let client = options
            .auth
            .connect_options(&urls)
            .await?
            .name(format!("vulcan {}", options.node_id))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(REQUEST_TIMEOUT))
            // Reconnect quickly and forever: a node never needs a restart
            // because NATS went away for a while.
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis(100 * (attempt as u64).min(10))
            })
            .connect(urls.addrs())
            .await
            .with_context(|| format!("failed to connect to the cluster at {shown}"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        let replicas = options.replicas.max(1);
        let bucket = |name: &str, what: &str| kv::Config {
            bucket: name.to_owned(),
            description: what.to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let workloads = create_kv(
            &js,
            bucket(WORKLOADS_BUCKET, "Vulcan workload records by id"),
        )
        .await?;
        let nodes = create_kv(&js, bucket(NODES_BUCKET, "Vulcan node heartbeats")).await?;
        let owners = create_kv(
            &js,
            bucket(OWNERS_BUCKET, "Vulcan module owners: <hash>.<tenant>"),
        )
        .await?;
        let slots = create_kv(
            &js,
            bucket(SLOTS_BUCKET, "Vulcan tenants' held quota places"),
        )
        .await?;
        let lease = create_kv(
            &js,
            bucket(retention::RETENTION_BUCKET, "Vulcan's retention lease"),
        )
        .await?;
        let keys = create_kv(
            &js,
            kv::Config {
                max_age: Duration::from_secs(24 * 60 * 60),
                ..bucket(KEYS_BUCKET, "Vulcan idempotency keys (24 h)")
            },
        )
        .await?;
        let schedules = create_kv(
            &js,
            bucket(SCHEDULES_BUCKET, "Vulcan schedules by tenant and name"),
        )
        .await?;
        let modules = match js.get_object_store(MODULES_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: MODULES_BUCKET.to_owned(),
                    description: Some("Vulcan module bytes by sha256".to_owned()),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .context("failed to create the modules object store")?,
        };
        let queue = js
            .get_or_create_stream(stream::Config {
                name: QUEUE_STREAM.to_owned(),
                subjects: vec![QUEUE_SUBJECT.to_owned()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_messages: 1_000_000,
                discard: stream::DiscardPolicy::New,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .context("failed to create the work queue stream")?;
        let consumer = queue
            .get_or_create_consumer(
                DISPATCH_CONSUMER,
                jetstream::consumer::pull::Config {
                    durable_name: Some(DISPATCH_CONSUMER.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(10),
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .context("failed to create the dispatch consumer")?;
        let logs = js
            .get_or_create_stream(stream::Config {
                name: LOGS_STREAM.to_owned(),
                subjects: vec!["vulcan.logs.*".to_owned()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                duplicate_window: Duration::from_secs(120),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .context("failed to create the log stream")?;
        let metrics = Arc::new(ClusterMetrics::new());
        node.metrics().register_more(|r| metrics.register(r));
        let cluster = Arc::new(Self {
            node,
            node_id: options.node_id,
            client,
            js,
            workloads,
            nodes,
            modules,
            logs,
            owners,
            slots,
            lease,
            keys,
            schedules,
            quota_tenants: options.quota_tenants.into_iter().collect(),
            index: records::Index::open(&options.data_dir)?,
            claimed: Mutex::new(HashMap::new()),
            doubtful: Mutex::new(Vec::new()),
            beat: tokio::sync::Mutex::new(None),
            instance: ulid::Ulid::new().to_string(),
            fetching: tokio::sync::Mutex::new(()),
            metrics,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            signer: options.auth.signer(),
            reachable_since: Mutex::new(None),
            answered_at: Mutex::new(Instant::now()),
        });
        cluster.check_id_unused().await?;
        // What a previous run of this node claimed cannot be running now.
        cluster
            .fail_own_previous()
            .await
            .context("failed to settle this node's previous workloads")?;
        cluster.beat_now().await.map_err(anyhow::Error::from)?;
        cluster.spawn_background(consumer).await?;
        Ok(cluster)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Work queued and not yet claimed, as this node last read it from
    /// NATS (every second).
    pub fn queued_as_last_seen(&self) -> u64 {
        u64::try_from(self.metrics.queue_depth.get()).unwrap_or(0)
    }

    /// The node this membership runs workloads on.
    pub fn node_arc(&self) -> &Arc<Node> {
        &self.node
    }

    /// Refuses at once when NATS is not connected, instead of waiting for a
    /// request to time out.
    fn connected(&self) -> Result<(), ClusterError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => {}
            state => {
                return Err(ClusterError::Unavailable(format!(
                    "not connected to NATS: {state}"
                )));
            }
        }
        let silent = self.lock_answered().elapsed();
        if silent > NATS_SILENT_AFTER {
            return Err(ClusterError::Unavailable(format!(
                "NATS has not answered this node for {} s",
                silent.as_secs()
            )));
        }
        Ok(())
    }

    /// NATS took a request of this node's now.
    fn answered(&self) {
        *self.lock_answered() = Instant::now();
    }

    fn lock_answered(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.answered_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn_background(
        self: &Arc<Self>,
        consumer: jetstream::consumer::PullConsumer,
    ) -> anyhow::Result<()> {
        let kills = self
            .client
            .subscribe(kill_subject(&self.node_id))
            .await
            .context("failed to subscribe to kill requests")?;
        let this = Arc::clone(self);
        tokio::spawn(async move { this.take_kills(kills).await });
        let deletions = self
            .client
            .subscribe(MODULE_DELETED_SUBJECT)
            .await
            .context("failed to subscribe to module deletions")?;
        let this = Arc::clone(self);
        tokio::spawn(async move { this.take_module_deletions(deletions).await });
        let this = Arc::clone(self);
        tokio::spawn(async move { this.dispatch(consumer).await });
        // Beats on a task of their own: a long sweep of a lost node's
        // workloads never makes this node miss its own.
        let this = Arc::clone(self);
        tokio::spawn(async move { this.beat_forever().await });
        let this = Arc::clone(self);
        tokio::spawn(async move { this.keep_alive().await });
        Ok(())
    }

    /// Stops taking work, ends what runs here with `reason`, records those
    /// ends in the cluster, and leaves (its heartbeat is removed).
    pub async fn leave(&self, reason: &str, grace: Duration) {
        self.stop.cancel();
        self.node.shutdown(reason, grace).await;
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some workload ends were not recorded in the cluster before stopping");
        }
        // Each bounded: NATS may not answer at all.
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.nodes.delete(&self.node_id)).await;
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.client.flush()).await;
    }
}

async fn create_kv(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(config)
            .await
            .with_context(|| format!("failed to create the KV bucket {name}")),
    }
}

/// Pauses between retries of a NATS operation: 50 ms, doubling to 1 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(50))
    }
}

impl Backoff {
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
}

/// Runs `op` until it succeeds: for what must reach the cluster eventually
/// (a final record, an end marker), however long NATS is away.
async fn until_done<T, F: Future<Output = Result<T, ClusterError>>>(
    what: &str,
    id: WorkloadId,
    mut op: impl FnMut() -> F,
) -> T {
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(done) => return done,
            Err(e) => {
                tracing::debug!(workload = %id, error = %e, "{what} not stored yet; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// This data directory's node id: made once, kept in `node-id`.
pub fn stable_node_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    let id = format!(
        "node-{}",
        &ulid::Ulid::new().to_string().to_lowercase()[16..]
    );
    std::fs::write(&path, &id).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(id)
}

/// Checks a node id: it is part of NATS subjects and KV keys.
pub fn check_node_id(id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--node-id `{id}`: use 1 to 64 letters, digits, `-` or `_`"
    );
    Ok(())
}
