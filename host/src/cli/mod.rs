//! The `vulcan` command line.
//!
//! Parses arguments (clap), runs one command, and maps the result onto an exit
//! code: a guest's own exit code passes through; host errors print their whole
//! context chain on one line and exit 2. This module owns process-level
//! concerns (tracing, the data directory, exit codes) and no workload logic.

mod local;
mod parse;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit codes of `vulcan run` for outcomes that are not a guest exit code.
pub mod exit {
    /// Bad input or a host error: unreadable or invalid module, bad flag, I/O failure.
    pub const HOST_ERROR: u8 = 2;
    /// The guest ran past `--timeout`.
    pub const TIMEOUT: u8 = 124;
    /// The guest wrote more than `--max-output`.
    pub const OUTPUT_LIMIT: u8 = 125;
    /// The guest trapped (e.g. `unreachable`, out-of-bounds access, stack overflow).
    pub const TRAP: u8 = 134;
    /// The guest tried to grow memory past `--max-memory`.
    pub const MEMORY_LIMIT: u8 = 135;
    /// The guest used up its `--fuel`.
    pub const FUEL_EXHAUSTED: u8 = 136;
    /// The workload was killed (e.g. Ctrl-C).
    pub const KILLED: u8 = 137;
}

const EXIT_CODES_HELP: &str = "\
Exit status:
  0-125  the guest's own exit code (proc_exit, or 0 when _start returns)
  2      bad input or host error (unreadable/invalid module, bad flag value)
  124    timed out (--timeout)
  125    output limit exceeded (--max-output)
  134    the guest trapped (message and wasm backtrace on stderr)
  135    memory limit exceeded (--max-memory)
  136    fuel exhausted (--fuel)
  137    killed (Ctrl-C)";

/// Vulcan: run WebAssembly workloads in a sandbox and keep every line they print.
#[derive(Debug, Parser)]
#[command(name = "vulcan", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory for the database and compiled-module cache
    /// [default: $XDG_DATA_HOME/vulcan, or ~/.local/share/vulcan]
    #[arg(long, env = "VULCAN_DATA_DIR", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a WASI module locally, exactly as the server would, and record it.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(run::RunArgs),
    /// List recorded workloads, newest first.
    Ls(local::LsArgs),
    /// Print a recorded workload's log lines.
    Logs(local::LogsArgs),
}

/// Limits shared by every command that starts a workload.
#[derive(Debug, Args, Clone, Default)]
pub struct LimitsArgs {
    /// Stop the guest after this much wall-clock time (e.g. 500ms, 5s, 2m)
    #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
    timeout: Option<std::time::Duration>,
    /// Largest linear memory the guest may have (e.g. 64MiB, 1GiB)
    #[arg(long, value_name = "SIZE", value_parser = parse::size)]
    max_memory: Option<u64>,
    /// Units of fuel (roughly, wasm instructions) the guest may use
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Most bytes the guest may write to stdout and stderr together (e.g. 10MiB)
    #[arg(long, value_name = "SIZE", value_parser = parse::size)]
    max_output: Option<u64>,
}

impl LimitsArgs {
    /// The limits as stored with the workload.
    pub fn to_limits(&self) -> crate::workload::Limits {
        crate::workload::Limits {
            timeout_ms: self.timeout.map(|d| d.as_millis() as u64),
            max_memory_bytes: self.max_memory,
            fuel: self.fuel,
            max_output_bytes: self.max_output,
        }
    }
}

/// Parses the process arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match execute(cli) {
        Ok(code) => code,
        // `vulcan ls | head`: the reader left; that is not an error worth a message.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vulcan: error: {e:#}");
            ExitCode::from(exit::HOST_ERROR)
        }
    }
}

/// Runs one parsed command.
pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.global.data_dir.clone().unwrap_or_else(default_data_dir);
    match cli.command {
        Command::Run(args) => run::execute(args, &data_dir),
        Command::Ls(args) => local::ls(args, &data_dir),
        Command::Logs(args) => local::logs(args, &data_dir),
    }
}

/// `$XDG_DATA_HOME/vulcan`, else `~/.local/share/vulcan`, else `./.vulcan`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("vulcan");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/vulcan"),
        None => PathBuf::from(".vulcan"),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VULCAN_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
