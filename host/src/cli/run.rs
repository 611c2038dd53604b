//! `vulcan run`: one workload on the local engine, pipeline and database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::print::end_message;
use super::signals::ShutdownSignal;
use super::{LimitsArgs, exit, parse};
use crate::engine::{ModuleKind, Runtime};
use crate::node::{Node, NodeOptions};
use crate::outbound::{OutboundPolicy, OutboundRule};
use crate::registry::RegistryError;
use crate::runner::{Creation, Tee};
use crate::view::WorkloadView;
use crate::workload::{LogLevel, Preopen, Stdin, WorkloadSpec};

/// Arguments of `vulcan run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Set an environment variable for the guest (repeatable). The guest sees only these.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse::env_pair)]
    env: Vec<(String, String)>,
    /// Give the guest a host directory, read-write, at GUEST (default: the same path)
    #[arg(long = "dir", value_name = "HOST[::GUEST]", value_parser = |s: &str| parse::preopen(s, true))]
    dirs: Vec<Preopen>,
    /// Give the guest a host directory, read-only, at GUEST (default: the same path)
    #[arg(long = "dir-ro", value_name = "HOST[::GUEST]", value_parser = |s: &str| parse::preopen(s, false))]
    dirs_ro: Vec<Preopen>,
    #[command(flatten)]
    limits: LimitsArgs,
    /// Override argv[0] (default: the module's file name)
    #[arg(long, value_name = "NAME")]
    argv0: Option<String>,
    /// Input: a JSON value, or @FILE for a file's bytes. An SDK workload gets it
    /// as `run`'s argument (its output is printed after the logs); a plain WASI
    /// program reads it on stdin.
    #[arg(long, value_name = "JSON|@FILE", value_parser = parse::input)]
    input: Option<parse::InputBytes>,
    /// Drop SDK `log` records below this level (trace, debug, info, warn, error)
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Let the workload send HTTP requests to this host, as scheme://host[:port]
    /// (e.g. https://api.example.com; repeatable; a component only)
    #[arg(long = "allow-host", value_name = "URL", value_parser = parse::outbound_rule)]
    allowed_hosts: Vec<OutboundRule>,
    /// Let those requests reach loopback, private and other non-public addresses
    #[arg(long)]
    allow_private_outbound: bool,
    /// The WASI module (.wasm) to run
    module: PathBuf,
    /// Arguments passed to the guest (after `--`)
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the module and returns the guest's exit code (or one of [`exit`]'s).
pub fn execute(args: RunArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let bytes = parse::read_module(&args.module)?;
    let argv0 = args.argv0.clone().unwrap_or_else(|| {
        args.module.file_name().map_or_else(
            || "module.wasm".into(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let mut argv = vec![argv0];
    argv.extend(args.args.iter().cloned());
    let spec = WorkloadSpec {
        retry: None,
        args: argv,
        env: args.env.clone(),
        stdin: if args.input.is_some() {
            Stdin::Empty
        } else {
            Stdin::Inherit
        },
        preopens: args.dirs.iter().chain(&args.dirs_ro).cloned().collect(),
        limits: args.limits.to_limits(),
        input: args.input.clone().map(|i| i.0),
        log_level: args.log_level,
        allowed_hosts: args.allowed_hosts.clone(),
        tenant: None,
        schedule: None,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        // Validate before touching the database, so bad input writes nothing.
        Runtime::classify(&bytes)?;
        let options = NodeOptions {
            outbound: OutboundPolicy {
                caps: None,
                allow_private: args.allow_private_outbound,
                ..OutboundPolicy::default()
            },
            ..NodeOptions::default()
        };
        let node = Node::open(data_dir, options).await?;
        let (info, compiled, _) = node
            .registry()
            .register(bytes::Bytes::from(bytes))
            .await
            .map_err(|e| match e {
                RegistryError::Invalid(e) => {
                    anyhow::anyhow!("{}: {e}", args.module.display())
                }
                other => anyhow::Error::from(other),
            })?;
        if args.input.is_some() && compiled.kind() != ModuleKind::Workload {
            eprintln!(
                "vulcan: note: --input goes to the stdin of {}, a plain WASI program, which \
                 returns no output (an SDK workload built for wasm32-wasip2 takes --input as \
                 its argument)",
                args.module.display()
            );
        }
        let tee = Tee {
            // Buffered: the LogWriter flushes every tick and at the end.
            stdout: Box::new(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stdout(),
            )),
            stderr: Box::new(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            )),
        };
        let runner = node.runner();
        // Handled from before the guest starts: a Ctrl-C that comes as soon
        // as it prints must kill and record it, not end vulcan unrecorded.
        let interrupt = ShutdownSignal::install()?;
        let started = runner
            .start(compiled, info.hash, spec, Some(tee), Creation::Overlapped)
            .await?;
        let id = started.id;
        let killer = {
            let runner = Arc::clone(runner);
            tokio::spawn(async move {
                interrupt.received().await;
                runner.kill(id, "killed by Ctrl-C (SIGINT) or SIGTERM");
            })
        };
        let record = started.done.await.context("workload task failed")??;
        killer.abort();
        node.db().flush().await;
        tracing::info!(workload = %record.id, status = %record.status, "recorded");
        if let Some(output) = &record.output {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(output)
                .context("failed to print the output")?;
            if !output.ends_with(b"\n") {
                stdout
                    .write_all(b"\n")
                    .context("failed to print the output")?;
            }
        }
        let view = WorkloadView::from(record);
        if let Some(why) = end_message(&view.summary) {
            eprintln!("vulcan: {why}");
        }
        Ok(ExitCode::from(exit::for_view(&view.summary)))
    })
}
