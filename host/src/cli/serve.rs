//! `vulcan serve`: the HTTP API over the same engine, pipeline and database.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::parse;
use crate::api::{AppState, serve};
use crate::engine::Runtime;
use crate::logs::LogBroker;
use crate::metrics::Metrics;
use crate::registry::ModuleRegistry;
use crate::runner::Runner;
use crate::store::Db;

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
    /// Most workloads running at once; further submissions get 503 with Retry-After
    #[arg(
        long,
        env = "VULCAN_MAX_CONCURRENT",
        default_value_t = 64,
        value_name = "N"
    )]
    max_concurrent: usize,
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
}

/// Runs the server until SIGINT or SIGTERM, then shuts down cleanly.
pub fn execute(args: ServeArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        let runtime = Runtime::new()?;
        let db = Db::open(data_dir)?;
        let orphaned = db
            .fail_unfinished(
                "failed: the server stopped while this workload was pending or running",
            )
            .await?;
        if orphaned > 0 {
            tracing::warn!(
                count = orphaned,
                "marked workloads left unfinished by a previous server as failed"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(ModuleRegistry::new(
            Arc::clone(&runtime),
            db.clone(),
            data_dir.join("artifacts"),
            Arc::clone(&metrics),
        ));
        let runner = Runner::with_options(
            runtime,
            db.clone(),
            LogBroker::default(),
            Some(args.max_concurrent.max(1)),
            Arc::clone(&metrics),
        );
        let max_upload = usize::try_from(args.max_upload).unwrap_or(usize::MAX);
        let state = AppState::new(
            Arc::clone(&runner),
            registry,
            metrics,
            args.token,
            max_upload,
        );
        let shutdown = ShutdownSignal::install()?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Printed (not only logged) so scripts and tests can find an ephemeral port.
        eprintln!(
            "vulcan: listening on http://{addr} (data in {})",
            data_dir.display()
        );
        serve(listener, state, shutdown.received()).await?;

        // Killed workloads finish within a tick; a wedged one must not keep
        // the process from exiting.
        if tokio::time::timeout(Duration::from_secs(10), runner.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                running = runner.running_count(),
                "workloads still running 10 s after shutdown; exiting anyway"
            );
        }
        db.flush().await;
        eprintln!("vulcan: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGINT and SIGTERM, registered when created: a signal that arrives after
/// the server said it is listening is always a clean shutdown, never the
/// default (fatal) action.
struct ShutdownSignal {
    #[cfg(unix)]
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
            let terminate = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
            Ok(Self {
                signals: (interrupt, terminate),
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn received(self) {
        #[cfg(unix)]
        {
            let (mut interrupt, mut terminate) = self.signals;
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
