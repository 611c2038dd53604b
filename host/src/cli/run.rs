//! `vulcan run`: one workload on the local engine, pipeline and database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::{LimitsArgs, exit, parse};
use crate::engine::{LimitHit, Outcome, Runtime};
use crate::logs::LogBroker;
use crate::registry::{ModuleRegistry, RegistryError};
use crate::runner::{Runner, Tee};
use crate::store::Db;
use crate::workload::{Preopen, Stdin, WorkloadSpec};

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
    /// The WASI module (.wasm) to run
    module: PathBuf,
    /// Arguments passed to the guest (after `--`)
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the module and returns the guest's exit code (or one of [`exit`]'s).
pub fn execute(args: RunArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module {}", args.module.display()))?;
    let argv0 = args.argv0.clone().unwrap_or_else(|| {
        args.module.file_name().map_or_else(
            || "module.wasm".into(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let mut argv = vec![argv0];
    argv.extend(args.args.iter().cloned());
    let spec = WorkloadSpec {
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
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        // Validate before touching the database, so bad input writes nothing.
        let runtime = Runtime::new()?;
        Runtime::classify(&bytes)?;
        let db = Db::open(data_dir)?;
        let registry = ModuleRegistry::new(
            Arc::clone(&runtime),
            db.clone(),
            data_dir.join("artifacts"),
            Arc::default(),
        );
        let (info, compiled, _) = registry.register(bytes.into()).await.map_err(|e| match e {
            RegistryError::Invalid(e) => {
                anyhow::anyhow!("{}: {e}", args.module.display())
            }
            other => anyhow::Error::from(other),
        })?;
        let runner = Runner::new(runtime, db.clone(), LogBroker::default());
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
        let started = runner.start(compiled, info.hash, spec, Some(tee)).await?;
        let id = started.id;
        let killer = {
            let runner = Arc::clone(&runner);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    runner.kill(id, "killed by Ctrl-C");
                }
            })
        };
        let (record, outcome) = started.done.await.context("workload task failed")??;
        killer.abort();
        db.flush().await;
        tracing::info!(workload = %record.id, status = %record.status, "recorded");
        if let Outcome::Returned(output) = &outcome {
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
        Ok(exit_code(&outcome, record.error.as_deref()))
    })
}

fn exit_code(outcome: &Outcome, error: Option<&str>) -> ExitCode {
    let report = |what: &str| {
        eprintln!("vulcan: {what}");
    };
    match outcome {
        Outcome::Exited(code) => ExitCode::from((*code).clamp(0, 255) as u8),
        Outcome::Returned(_) => ExitCode::SUCCESS,
        Outcome::ReturnedError(message) => {
            report(&format!("the workload returned an error: {message}"));
            ExitCode::FAILURE
        }
        Outcome::Trapped { .. } => {
            report(error.unwrap_or("the guest trapped"));
            ExitCode::from(exit::TRAP)
        }
        Outcome::TimedOut(_) => {
            report(error.unwrap_or("timed out"));
            ExitCode::from(exit::TIMEOUT)
        }
        Outcome::Killed => {
            report("killed");
            ExitCode::from(exit::KILLED)
        }
        Outcome::LinesNotStored(_) | Outcome::HostFailure(_) => {
            report(error.unwrap_or("the host failed"));
            ExitCode::from(exit::HOST_ERROR)
        }
        Outcome::LimitExceeded(hit) => {
            report(error.unwrap_or("limit exceeded"));
            ExitCode::from(match hit {
                LimitHit::Memory(_) => exit::MEMORY_LIMIT,
                LimitHit::Fuel(_) => exit::FUEL_EXHAUSTED,
                LimitHit::Output(_) => exit::OUTPUT_LIMIT,
            })
        }
    }
}
