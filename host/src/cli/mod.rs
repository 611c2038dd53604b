//! The `vulcan` command line.
//!
//! Parses arguments (clap), runs one command, and maps the result onto an exit
//! code: a guest's own exit code passes through; host errors print their whole
//! context chain on one line and exit 2. This module owns process-level
//! concerns (tracing, the data directory, exit codes) and no workload logic.

mod backend;
mod client;
mod parse;
mod print;
mod read;
mod run;
mod schedule;
mod serve;
mod signals;
pub mod sse;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
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

    /// The exit code of a workload that ended as `w` says: its own exit code
    /// if it has one, else one for how it ended. `vulcan run`, `submit`,
    /// `submit -f` and `logs -f` all exit with this.
    pub fn for_view(w: &crate::view::WorkloadSummary) -> u8 {
        use crate::workload::Status;
        match (w.exit_code, w.status, w.failure) {
            (Some(code), _, _) => code.clamp(0, 255) as u8,
            (None, Status::Completed, _) => 0,
            (None, _, Some(kind)) => for_failure(kind),
            (None, Status::Killed, None) => KILLED,
            // Failed without a recorded kind (a record from before kinds existed).
            (None, _, None) => HOST_ERROR,
        }
    }

    /// The exit code of a workload that ended with this kind of failure and no
    /// exit code of its own.
    pub fn for_failure(kind: crate::workload::FailureKind) -> u8 {
        use crate::workload::FailureKind as F;
        match kind {
            F::Timeout | F::QueueTimeout => TIMEOUT,
            F::Output => OUTPUT_LIMIT,
            F::Memory => MEMORY_LIMIT,
            F::Fuel => FUEL_EXHAUSTED,
            F::Killed => KILLED,
            F::Store | F::Host | F::NodeLost => HOST_ERROR,
            F::Trap | F::Exit | F::ReturnedError => TRAP,
        }
    }
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
    /// Talk to this server (e.g. http://127.0.0.1:8080) instead of the local
    /// database; the token comes from VULCAN_TOKEN
    #[arg(long, env = "VULCAN_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a WASI module locally, exactly as the server would, and record it.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(run::RunArgs),
    /// Serve the HTTP API: upload, run, list, kill and follow workloads.
    Serve(Box<serve::ServeArgs>),
    /// Upload a module to the server and run it (needs --server).
    #[command(after_help = EXIT_CODES_HELP)]
    Submit(client::SubmitArgs),
    /// Show one workload.
    Status(read::StatusArgs),
    /// List workloads, newest first.
    Ls(read::LsArgs),
    /// Print a workload's log lines (stdout lines to stdout, the rest to
    /// stderr); with -f, follow them live (needs --server).
    Logs(read::LogsArgs),
    /// Kill a running workload (needs --server).
    Kill(read::KillArgs),
    /// Show the tenant the token (VULCAN_TOKEN) names, and its quota use
    /// (needs --server).
    Whoami,
    /// Show the queue: workloads waiting for a slot, per tenant, and the
    /// oldest wait (needs --server).
    Queue {
        /// Print the server's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// Manage a server's schedules: workloads fired on a cron expression
    /// (needs --server).
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Manage the tenants file of `vulcan serve --tenants`.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Compact the data directory's files while no server runs: gives the
    /// space of pruned lines back, and turns on the incremental vacuum that
    /// retention uses (databases made before it was on need this once).
    Vacuum,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Add a tenant: prints its new token once, and writes only the token's
    /// SHA-256 to the file (created if missing).
    Add(TenantAddArgs),
}

#[derive(Debug, Args)]
struct TenantAddArgs {
    /// The tenant's name (letters, digits, `-`, `_`, `.`)
    name: String,
    /// The tenants file
    #[arg(long, env = "VULCAN_TENANTS", value_name = "FILE")]
    tenants: PathBuf,
    /// It sees and acts on every tenant's work and reads /metrics
    #[arg(long)]
    admin: bool,
    /// Most of its workloads running at once (more wait in the queue; on a
    /// cluster, 429 quota_exceeded)
    #[arg(long, value_name = "N")]
    max_concurrent: Option<usize>,
    /// Its share of the slots against other tenants with queued work
    /// (default 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    weight: Option<u32>,
    /// Most of its log followers (SSE streams) open at once on a node
    /// (beyond: 429 quota_exceeded)
    #[arg(long, value_name = "N")]
    max_followers: Option<usize>,
    /// Most bytes of log lines its workloads keep stored (e.g. 1GiB)
    #[arg(long, value_name = "SIZE", value_parser = parse::size)]
    max_log_bytes: Option<u64>,
    /// At --max-log-bytes: delete its oldest finished workloads' lines
    /// (prune-oldest, the default) or refuse its new runs with 429 (refuse)
    #[arg(long, value_name = "ACTION", requires = "max_log_bytes")]
    on_log_quota: Option<LogQuotaArg>,
}

/// `--on-log-quota` as typed.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogQuotaArg {
    PruneOldest,
    Refuse,
}

/// `vulcan tenant add`: the token goes to stdout, alone, for scripts.
fn tenant_add(args: TenantAddArgs) -> anyhow::Result<ExitCode> {
    let token = crate::tenants::new_token()?;
    let entry = crate::tenants::TenantEntry {
        admin: args.admin,
        max_concurrent: args.max_concurrent,
        weight: args.weight,
        max_followers: args.max_followers,
        max_log_bytes: args.max_log_bytes,
        on_log_quota: args.on_log_quota.map(|a| match a {
            LogQuotaArg::PruneOldest => crate::tenants::LogQuotaAction::PruneOldest,
            LogQuotaArg::Refuse => crate::tenants::LogQuotaAction::Refuse,
        }),
        ..crate::tenants::TenantEntry::new(args.name, crate::tenants::token_hash(&token))
    };
    let name = entry.name.clone();
    crate::tenants::add_to_file(&args.tenants, entry)?;
    println!("{token}");
    eprintln!(
        "vulcan: tenant `{name}` added to {}; the token above is not stored anywhere: keep it",
        args.tenants.display()
    );
    Ok(ExitCode::SUCCESS)
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
    /// Most bytes the guest may write to stdout and stderr together, SDK log
    /// records included (e.g. 10MiB)
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
    let server = cli.global.server.clone().filter(|s| !s.is_empty());
    let command = match cli.command {
        Command::Run(args) => return run::execute(args, &data_dir),
        Command::Serve(args) => return serve::execute(*args, &data_dir),
        Command::Tenant(TenantCommand::Add(args)) => return tenant_add(args),
        Command::Vacuum => return vacuum(&data_dir),
        command => command,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        let Some(server) = server else {
            const NEEDS_SERVER: &str =
                "this command talks to a server: pass --server URL or set VULCAN_SERVER";
            // Refused before the database is opened: its state is no reason.
            let reads_locally = match &command {
                Command::Logs(args) => !args.follow,
                command => matches!(command, Command::Status(_) | Command::Ls(_)),
            };
            anyhow::ensure!(reads_locally, NEEDS_SERVER);
            let local = backend::Local::open(&data_dir)?;
            return match command {
                Command::Status(args) => read::status(&local, args).await,
                Command::Ls(args) => read::ls(&local, args).await,
                Command::Logs(args) => read::logs(&local, args).await,
                _ => anyhow::bail!(NEEDS_SERVER),
            };
        };
        let c = client::Client::new(&server)?;
        match command {
            Command::Submit(args) => client::submit(&c, args).await,
            Command::Status(args) => read::status(&c, args).await,
            Command::Ls(args) => read::ls(&c, args).await,
            Command::Logs(args) if args.follow => client::follow(&c, args.id, args.json).await,
            Command::Logs(args) => read::logs(&c, args).await,
            Command::Kill(args) => client::kill(&c, args.id).await,
            Command::Whoami => client::whoami(&c).await,
            Command::Queue { json } => client::queue(&c, json).await,
            Command::Schedule(command) => schedule::run(&c, command).await,
            Command::Run(_) | Command::Serve(_) | Command::Tenant(_) | Command::Vacuum => {
                unreachable!("handled above")
            }
        }
    })
}

/// `vulcan vacuum`: compacts every file of the data directory.
fn vacuum(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for file in crate::store::vacuum(data_dir)? {
        println!(
            "{}: {:.1} MiB -> {:.1} MiB",
            file.path.display(),
            mib(file.before),
            mib(file.after)
        );
    }
    Ok(ExitCode::SUCCESS)
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
        .with_writer(crate::diagnostics::LossyStderr)
        // Its own report of a failed write goes through `eprintln!`, which
        // panics when stderr fails: the writer above counts those instead.
        .log_internal_errors(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::exit;
    use crate::view::WorkloadView;
    use crate::workload::{FailureKind, Limits, Status, WorkloadId, WorkloadRecord};

    fn ended(status: Status, exit_code: Option<i32>, failure: Option<FailureKind>) -> u8 {
        let record = WorkloadRecord {
            id: WorkloadId::new(),
            status,
            module_hash: String::new(),
            args: vec![],
            env: vec![],
            limits: Limits::default(),
            allowed_hosts: vec![],
            log_level: None,
            exit_code,
            error: None,
            failure,
            output: None,
            duration_ms: None,
            line_count: 0,
            created_at: 0,
            started_at: None,
            finished_at: None,
            tenant: None,
            pruned_at: None,
            queued_at: None,
            schedule: None,
            retry: None,
            attempt: 1,
            attempts: Vec::new(),
        };
        exit::for_view(&WorkloadView::from(record).summary)
    }

    #[test]
    fn every_failure_kind_has_its_exit_code() {
        for kind in FailureKind::ALL {
            let want = match kind {
                FailureKind::Timeout | FailureKind::QueueTimeout => 124,
                FailureKind::Output => 125,
                FailureKind::Memory => 135,
                FailureKind::Fuel => 136,
                FailureKind::Killed => 137,
                FailureKind::Trap | FailureKind::Exit | FailureKind::ReturnedError => 134,
                FailureKind::Store | FailureKind::Host | FailureKind::NodeLost => 2,
            };
            let status = match kind {
                FailureKind::Killed => Status::Killed,
                _ => Status::Failed,
            };
            assert_eq!(ended(status, None, Some(kind)), want, "{kind:?}");
        }
    }

    #[test]
    fn a_guest_exit_code_wins_and_success_is_zero() {
        assert_eq!(ended(Status::Failed, Some(7), Some(FailureKind::Exit)), 7);
        assert_eq!(
            ended(Status::Failed, Some(1), Some(FailureKind::ReturnedError)),
            1
        );
        assert_eq!(
            ended(Status::Failed, Some(300), Some(FailureKind::Exit)),
            255
        );
        assert_eq!(ended(Status::Completed, Some(0), None), 0);
        assert_eq!(ended(Status::Completed, None, None), 0);
        assert_eq!(ended(Status::Killed, None, None), 137);
    }
}
