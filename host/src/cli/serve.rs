//! `vulcan serve`: the HTTP API over the same engine, pipeline and database.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::parse;
use super::signals::ShutdownSignal;
use crate::api::{ApiConfig, AppState, serve};
use crate::cluster::{Cluster, ClusterOptions, check_node_id, stable_node_id};
use crate::diagnostics::say;
use crate::node::{Node, NodeOptions};
use crate::outbound::{OutboundPolicy, parse_rules};
use crate::service::{LimitPolicy, Service, ServiceConfig};
use crate::workload::Limits;

/// Arguments of `vulcan serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(
        long,
        env = "VULCAN_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: String,
    /// Host names the server answers for, besides IP addresses and
    /// `localhost` (repeatable or comma-separated): a request with another
    /// `Host` is refused (421), so a page cannot rebind its own name to this
    /// server. Add the names clients and browsers reach this server by
    #[arg(
        long,
        env = "VULCAN_ALLOWED_HOST",
        value_name = "NAME",
        value_delimiter = ','
    )]
    allowed_host: Vec<String>,
    /// The URL browsers reach this server by, when that is not its listen
    /// address (e.g. https://vulcan.example.com behind a proxy): its host is
    /// answered for, and pages of its origin may change state
    #[arg(long, env = "VULCAN_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// Most workloads running at once; further submissions wait in the queue
    #[arg(
        long,
        env = "VULCAN_MAX_CONCURRENT",
        default_value_t = 64,
        value_name = "N"
    )]
    max_concurrent: usize,
    /// Most workloads waiting in the queue; beyond, 503 `queue_full` with Retry-After
    #[arg(
        long,
        env = "VULCAN_MAX_QUEUED",
        default_value_t = crate::service::DEFAULT_MAX_QUEUED as u64,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_queued: u64,
    /// Most log followers (SSE streams) open at once; beyond, 503 with Retry-After
    #[arg(
        long,
        env = "VULCAN_MAX_FOLLOWERS",
        default_value_t = 4096,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_followers: u32,
    /// Largest accepted request body (e.g. 64MiB)
    #[arg(long, env = "VULCAN_MAX_UPLOAD", default_value = "64MiB", value_name = "SIZE", value_parser = parse::size)]
    max_upload: u64,
    /// Require `Authorization: Bearer TOKEN` on every endpoint but /healthz
    #[arg(
        long,
        env = "VULCAN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Tenants and their hashed tokens and quotas (TOML, or JSON when the
    /// name ends in .json); each tenant sees only its own workloads and
    /// modules. `--token` adds an admin tenant. See `vulcan tenant add`
    #[arg(long, env = "VULCAN_TENANTS", value_name = "FILE")]
    tenants: Option<std::path::PathBuf>,
    /// Delete finished workloads' lines this long after they end (e.g. 7d,
    /// 12h); their records stay, and their logs answer 410 Gone. A tenant's
    /// `retain_for_ms` overrides it for that tenant. Default: keep forever
    #[arg(long, env = "VULCAN_RETAIN_FOR", value_name = "DURATION", value_parser = parse::duration)]
    retain_for: Option<Duration>,
    /// Keep at most this many bytes of log lines in the store (e.g. 20GiB):
    /// above it, the lines of the oldest finished workloads (any tenant's)
    /// are deleted first, as `--retain-for` deletes them. Default: no cap
    #[arg(long, env = "VULCAN_RETAIN_BYTES", value_name = "SIZE", value_parser = parse::size)]
    retain_bytes: Option<u64>,
    /// Most bytes of args, env, stdin and input one workload may be given (413 beyond)
    #[arg(long, env = "VULCAN_MAX_SPEC_SIZE", default_value = "1MiB", value_name = "SIZE", value_parser = parse::size)]
    max_spec_size: u64,
    /// How long a client may stall (send no request, pause its body, or stop
    /// reading a response) before its connection is closed
    #[arg(long, env = "VULCAN_CLIENT_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = parse::duration)]
    client_timeout: Duration,
    /// Most bytes of compiled modules kept in memory and in
    /// `<data-dir>/artifacts` (least recently used dropped beyond; compiled
    /// again when needed)
    #[arg(long, env = "VULCAN_MAX_CACHE_BYTES", default_value = "2GiB", value_name = "SIZE", value_parser = parse::size)]
    max_cache_bytes: u64,
    /// Longest a SIGTERM or SIGINT takes to end the process, whether NATS
    /// answers or not: running workloads are killed, their ends recorded
    /// where they can be in that time, then the process exits (with an
    /// error if the time ran out)
    #[arg(long, env = "VULCAN_SHUTDOWN_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse::duration)]
    shutdown_timeout: Duration,
    /// Largest function body a module may have; bigger ones are refused at
    /// upload (413) because compiling them takes seconds and gigabytes
    #[arg(long, env = "VULCAN_MAX_FUNCTION_SIZE", default_value = "1MiB", value_name = "SIZE", value_parser = parse::size)]
    max_function_size: u64,
    /// Hosts workloads may list in `allowed_hosts` and send HTTP requests to,
    /// as scheme://host[:port] patterns (`*.domain`, `*` and port `*` allowed;
    /// repeatable or comma-separated; `none` refuses every outbound request).
    /// Unset: any host a workload's spec lists
    #[arg(
        long,
        env = "VULCAN_ALLOW_OUTBOUND",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    allow_outbound: Vec<String>,
    /// Let workloads reach loopback, private, link-local and other non-public
    /// addresses (refused by default, whatever the spec lists)
    #[arg(long, env = "VULCAN_ALLOW_PRIVATE_OUTBOUND")]
    allow_private_outbound: bool,
    /// Outbound HTTP requests one workload may have in flight (each holds a
    /// socket until its connection ends); more wait for a place
    #[arg(
        long,
        env = "VULCAN_MAX_OUTBOUND_INFLIGHT",
        default_value_t = 32,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_outbound_inflight: u32,
    /// Outbound HTTP requests all workloads on this node may have in flight
    /// together; more wait for a place
    #[arg(
        long,
        env = "VULCAN_MAX_OUTBOUND_INFLIGHT_NODE",
        default_value_t = 1024,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_outbound_inflight_node: u32,
    /// Join a cluster: the NATS server(s) with JetStream that the nodes share
    /// (e.g. nats://127.0.0.1:4222; comma-separated for several). Unset: a
    /// single node on its own SQLite
    #[arg(long, env = "VULCAN_CLUSTER", value_name = "URL")]
    cluster: Option<String>,
    /// This node's id in the cluster (letters, digits, `-`, `_`); default: one
    /// made once and kept in the data directory
    #[arg(long, env = "VULCAN_NODE_ID", value_name = "ID", requires = "cluster")]
    node_id: Option<String>,
    /// Replicas of the cluster's streams and buckets when they are created
    /// (3 on a 3-server NATS cluster for high availability)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_REPLICAS",
        default_value_t = 1,
        value_name = "N",
        requires = "cluster"
    )]
    cluster_replicas: usize,
    #[command(flatten)]
    cluster_auth: ClusterAuthArgs,
    #[command(flatten)]
    limits: ServerLimits,
}

/// How a node authenticates to NATS and to the other nodes. Secrets are
/// best given in the environment (a command line is visible in `ps`); none
/// is ever printed.
#[derive(Debug, Args)]
struct ClusterAuthArgs {
    /// NATS user (also accepted in the URL, nats://user:pass@host)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_USER",
        value_name = "USER",
        requires = "cluster"
    )]
    cluster_user: Option<String>,
    /// NATS password
    #[arg(
        long,
        env = "VULCAN_CLUSTER_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        requires = "cluster"
    )]
    cluster_password: Option<String>,
    /// NATS token (also accepted in the URL, nats://token@host)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        requires = "cluster"
    )]
    cluster_token: Option<String>,
    /// NATS creds file (a user JWT and nkey seed, as `nsc` writes them)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_CREDS",
        value_name = "FILE",
        requires = "cluster"
    )]
    cluster_creds: Option<std::path::PathBuf>,
    /// File holding a NATS user nkey seed (SU…)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_NKEY",
        value_name = "FILE",
        requires = "cluster"
    )]
    cluster_nkey: Option<std::path::PathBuf>,
    /// CA certificate (PEM) that signed the NATS server's certificate; requires TLS
    #[arg(
        long,
        env = "VULCAN_CLUSTER_CA",
        value_name = "FILE",
        requires = "cluster"
    )]
    cluster_ca: Option<std::path::PathBuf>,
    /// This node's client certificate (PEM) for NATS servers that verify clients
    #[arg(long, env = "VULCAN_CLUSTER_CERT", value_name = "FILE", requires_all = ["cluster", "cluster_key"])]
    cluster_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(
        long,
        env = "VULCAN_CLUSTER_KEY",
        value_name = "FILE",
        requires = "cluster_cert"
    )]
    cluster_key: Option<std::path::PathBuf>,
    /// Shared secret every node of the cluster is given: kills and end
    /// announcements are signed with it, and unsigned or forged ones are
    /// ignored. Without it, anyone who may publish on `vulcan.>` can kill
    #[arg(
        long,
        env = "VULCAN_CLUSTER_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        requires = "cluster"
    )]
    cluster_secret: Option<String>,
}

impl ClusterAuthArgs {
    fn auth(&self) -> anyhow::Result<crate::cluster::ClusterAuth> {
        use crate::cluster::Secret;
        if self.cluster_secret.as_deref().is_some_and(|s| s.len() < 16) {
            anyhow::bail!("--cluster-secret must be at least 16 characters");
        }
        Ok(crate::cluster::ClusterAuth {
            user: self.cluster_user.clone(),
            password: self.cluster_password.clone().map(Secret::new),
            token: self.cluster_token.clone().map(Secret::new),
            creds_file: self.cluster_creds.clone(),
            nkey_file: self.cluster_nkey.clone(),
            ca_file: self.cluster_ca.clone(),
            client_cert: self.cluster_cert.clone().zip(self.cluster_key.clone()),
            secret: self.cluster_secret.clone().map(Secret::new),
        })
    }
}

impl ServeArgs {
    /// The operator's outbound policy from `--allow-outbound` and
    /// `--allow-private-outbound`.
    fn outbound(&self) -> anyhow::Result<OutboundPolicy> {
        let patterns: Vec<&str> = self
            .allow_outbound
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        let caps = match patterns.as_slice() {
            [] => None,
            ["none"] => Some(Vec::new()),
            many if many.contains(&"none") => {
                anyhow::bail!("--allow-outbound `none` cannot be combined with other patterns")
            }
            many => Some(parse_rules(many).map_err(|e| anyhow::anyhow!("--allow-outbound: {e}"))?),
        };
        Ok(OutboundPolicy {
            caps,
            allow_private: self.allow_private_outbound,
            max_inflight_per_workload: self.max_outbound_inflight as usize,
            max_inflight_per_node: self.max_outbound_inflight_node as usize,
        })
    }
}

/// The limits a workload gets when its request names none, and the most a
/// request may ask for (400 beyond). `unlimited` lifts one.
#[derive(Debug, Args)]
struct ServerLimits {
    /// Wall-clock limit of a workload that names none
    #[arg(long, env = "VULCAN_DEFAULT_TIMEOUT", default_value = "5m", value_name = "DURATION|unlimited", value_parser = parse::cap_duration)]
    default_timeout: parse::Cap,
    /// Longest wall-clock limit a workload may ask for
    #[arg(long, env = "VULCAN_MAX_TIMEOUT", default_value = "1h", value_name = "DURATION|unlimited", value_parser = parse::cap_duration)]
    max_timeout: parse::Cap,
    /// Memory limit of a workload that names none
    #[arg(long, env = "VULCAN_DEFAULT_MEMORY", default_value = "256MiB", value_name = "SIZE|unlimited", value_parser = parse::cap_size)]
    default_memory: parse::Cap,
    /// Largest memory limit a workload may ask for
    #[arg(long, env = "VULCAN_MAX_MEMORY", default_value = "4GiB", value_name = "SIZE|unlimited", value_parser = parse::cap_size)]
    max_memory: parse::Cap,
    /// Output limit (stdout plus stderr) of a workload that names none
    #[arg(long, env = "VULCAN_DEFAULT_OUTPUT", default_value = "256MiB", value_name = "SIZE|unlimited", value_parser = parse::cap_size)]
    default_output: parse::Cap,
    /// Largest output limit a workload may ask for
    #[arg(long, env = "VULCAN_MAX_OUTPUT", default_value = "4GiB", value_name = "SIZE|unlimited", value_parser = parse::cap_size)]
    max_output: parse::Cap,
    /// Fuel of a workload that names none (its CPU is bounded by the timeout)
    #[arg(long, env = "VULCAN_DEFAULT_FUEL", default_value = "unlimited", value_name = "N|unlimited", value_parser = parse::cap_count)]
    default_fuel: parse::Cap,
    /// Most fuel a workload may ask for
    #[arg(long, env = "VULCAN_MAX_FUEL", default_value = "unlimited", value_name = "N|unlimited", value_parser = parse::cap_count)]
    max_fuel: parse::Cap,
}

impl ServerLimits {
    fn policy(&self) -> anyhow::Result<LimitPolicy> {
        let policy = LimitPolicy {
            default: Limits {
                timeout_ms: self.default_timeout.0,
                max_memory_bytes: self.default_memory.0,
                fuel: self.default_fuel.0,
                max_output_bytes: self.default_output.0,
            },
            max: Limits {
                timeout_ms: self.max_timeout.0,
                max_memory_bytes: self.max_memory.0,
                fuel: self.max_fuel.0,
                max_output_bytes: self.max_output.0,
            },
        };
        policy.validate().map_err(anyhow::Error::msg)?;
        Ok(policy)
    }
}

/// Ends the process if it is still shutting down a second after `limit`
/// (the in-process timeouts should have ended it by then; this is the bound
/// a supervisor can count on whatever hangs).
fn watchdog(limit: Duration) {
    let spawned = std::thread::Builder::new()
        .name("vulcan-shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit + Duration::from_secs(1));
            say(format_args!(
                "vulcan: shutdown took longer than --shutdown-timeout ({limit:?}); exiting"
            ));
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no shutdown watchdog");
    }
}

/// How long a server whose store cannot write keeps answering 503 before
/// it exits: long enough for a health check to see why.
const FATAL_GRACE: Duration = Duration::from_secs(2);

/// Runs the server until SIGINT or SIGTERM, then shuts down cleanly; or,
/// when its store can no longer write, exits with an error.
pub fn execute(args: ServeArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    if args.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        anyhow::bail!(
            "--token (or VULCAN_TOKEN) is empty: that would leave the API open; give a real \
             token, or unset it to run without one"
        );
    }
    let tenants = Arc::new(crate::tenants::Tenants::load(
        args.tenants.as_deref(),
        args.token.as_deref(),
    )?);
    let limits = args.limits.policy()?;
    let outbound = args.outbound()?;
    let allowed_hosts =
        crate::api::AllowedHosts::new(&args.allowed_host, args.public_url.as_slice(), &args.listen)
            .map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        let options = NodeOptions {
            max_concurrent: Some(args.max_concurrent),
            max_memory: limits.max.max_memory_bytes,
            max_function_size: args.max_function_size,
            outbound,
            max_cache_bytes: args.max_cache_bytes,
            writer: crate::store::WriterConfig {
                // The fault switch of the tests of a dying store writer.
                dies_at_commit: std::env::var("VULCAN_TEST_FAULT_WRITER_DIES_AT_COMMIT")
                    .ok()
                    .and_then(|v| v.parse().ok()),
                ..Default::default()
            },
        };
        let node = Node::open(data_dir, options).await?;
        let cluster = match &args.cluster {
            Some(url) => {
                let node_id = match args.node_id {
                    Some(id) => id,
                    None => stable_node_id(data_dir)?,
                };
                check_node_id(&node_id)?;
                let auth = args.cluster_auth.auth()?;
                if auth.secret.is_none() {
                    tracing::warn!(
                        "no --cluster-secret: kills and end announcements are accepted from \
                         anyone who may publish on vulcan.> (see the README's security section)"
                    );
                }
                let options = ClusterOptions {
                    url: url.clone(),
                    auth,
                    node_id,
                    replicas: args.cluster_replicas,
                    data_dir: data_dir.to_owned(),
                    quota_tenants: tenants.with_quota(),
                };
                Some(Cluster::join(Arc::clone(&node), options).await?)
            }
            None => None,
        };
        let config = ServiceConfig {
            retention: crate::retention::RetentionPolicy {
                default: args.retain_for,
                tenants: tenants.retentions(),
                max_bytes: args.retain_bytes,
                tenant_bytes: tenants.log_caps(),
            },
            tenants,
            limits,
            max_followers: args.max_followers as usize,
            max_queued: usize::try_from(args.max_queued).unwrap_or(usize::MAX),
            // The fault switch of the tests of a dying vital task.
            dispatcher_dies_at: std::env::var("VULCAN_TEST_FAULT_DISPATCHER_DIES_AT")
                .ok()
                .and_then(|v| v.parse().ok()),
        };
        let service = match &cluster {
            Some(cluster) => Service::clustered(Arc::clone(cluster), config),
            None => Service::local(Arc::clone(&node), config),
        };
        let api = ApiConfig {
            max_upload: usize::try_from(args.max_upload).unwrap_or(usize::MAX),
            max_spec: usize::try_from(args.max_spec_size).unwrap_or(usize::MAX),
            client_timeout: args.client_timeout,
            allowed_hosts: Arc::new(allowed_hosts),
        };
        let state = AppState::new(service.clone(), api);
        let shutdown = ShutdownSignal::install()?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Printed (not only logged) so scripts and tests can find an ephemeral port.
        match &cluster {
            Some(cluster) => say(format_args!(
                "vulcan: listening on http://{addr} (data in {}; cluster node {})",
                data_dir.display(),
                cluster.node_id()
            )),
            None => say(format_args!(
                "vulcan: listening on http://{addr} (data in {})",
                data_dir.display()
            )),
        }
        say(format_args!("vulcan: web console at http://{addr}/"));
        // A store that cannot write any more takes the server down, after
        // a moment in which `/healthz` and new runs answer 503 with the
        // reason, so that its supervisor restarts it.
        let db = node.db().clone();
        let vital = node.vital().clone();
        let limit = args.shutdown_timeout;
        let stop = async move {
            tokio::select! {
                () = shutdown.received() => {}
                why = db.writer_stopped() => {
                    say(format_args!("vulcan: fatal: {why}; shutting down"));
                    tokio::time::sleep(FATAL_GRACE).await;
                }
                why = vital.failed() => {
                    say(format_args!("vulcan: fatal: {why}; shutting down"));
                    tokio::time::sleep(FATAL_GRACE).await;
                }
            }
            watchdog(limit);
        };
        // Retention and the stats sampler run while the server does.
        let housekeeping = service.start_housekeeping();
        serve(listener, state, stop).await?;
        drop(housekeeping);
        // Killed workloads finish within a tick; a wedged one, or a NATS
        // that does not answer, must not keep the process from exiting.
        let reason = "killed: the server shut down";
        let grace = limit / 2;
        let left = service.stop(reason, grace);
        if tokio::time::timeout(limit, left).await.is_err() {
            anyhow::bail!(
                "shutdown took longer than --shutdown-timeout ({limit:?}); what was not \
                 recorded in the cluster is failed as `node restarted` when this node starts again"
            );
        }
        if let Some(why) = node.db().writer_failure() {
            anyhow::bail!("stopped because the store cannot write: {why}");
        }
        if let Some(why) = node.vital().failure() {
            anyhow::bail!("stopped because {why}");
        }
        say(format_args!("vulcan: stopped"));
        Ok(ExitCode::SUCCESS)
    })
}
