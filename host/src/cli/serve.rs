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
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Printed (not only logged) so scripts and tests can find an ephemeral port.
        eprintln!(
            "vulcan: listening on http://{addr} (data in {})",
            data_dir.display()
        );
        serve(listener, state, shutdown_signal()).await?;

        // Killed workloads finish within a tick; give stragglers a bounded wait.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runner.running_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        db.flush().await;
        eprintln!("vulcan: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
