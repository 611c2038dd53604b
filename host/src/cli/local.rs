//! `vulcan ls` and `vulcan logs` against the local database.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::store::Db;
use crate::workload::{Status, WorkloadId, WorkloadRecord};

/// Arguments of `vulcan ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Most workloads to show
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
    /// Skip this many of the newest
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Only workloads with this status (pending, running, completed, failed, killed)
    #[arg(long)]
    pub status: Option<Status>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vulcan logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The workload's id
    pub id: WorkloadId,
    /// Follow live until the workload ends, then exit with its exit code (needs --server)
    #[arg(long, short)]
    pub follow: bool,
    /// Print one JSON record per line instead of the bare lines
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vulcan status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The workload's id
    pub id: WorkloadId,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vulcan kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// The workload's id
    pub id: WorkloadId,
}

/// Prints one workload from the local database.
pub fn status(args: StatusArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let w = open_for(data_dir, args.id)?.workload(args.id)?;
    if args.json {
        println!("{}", serde_json::to_string(&w)?);
    } else {
        print_table(&mut std::io::stdout().lock(), std::slice::from_ref(&w))?;
        if let Some(error) = &w.error {
            println!("error: {error}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The local database, read-only and without the owner's lock, so that it
/// works beside a running server; `None` when nothing has run there yet.
fn open(data_dir: &Path) -> anyhow::Result<Option<Db>> {
    if !data_dir.join(crate::store::DB_FILE).exists() {
        return Ok(None);
    }
    Db::open_read_only(data_dir)
        .map(Some)
        .with_context(|| format!("no usable database in {}", data_dir.display()))
}

/// The local database, for a command about workload `id`.
fn open_for(data_dir: &Path, id: WorkloadId) -> anyhow::Result<Db> {
    open(data_dir)?.with_context(|| {
        format!(
            "workload {id} not found (nothing has run with data directory {} yet)",
            data_dir.display()
        )
    })
}

/// Prints a page of workloads.
pub fn ls(args: LsArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let page = match open(data_dir)? {
        Some(db) => db.list_workloads(args.limit.min(10_000), args.offset, args.status)?,
        None => crate::store::WorkloadPage {
            items: Vec::new(),
            total: 0,
        },
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({"items": page.items, "total": page.total}),
        )?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &page.items)?;
        writeln!(out, "({} of {} workloads)", page.items.len(), page.total)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints workloads as an aligned table.
pub fn print_table(out: &mut impl std::io::Write, items: &[WorkloadRecord]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  MODULE",
        "ID", "STATUS", "EXIT", "DURATION", "LINES"
    )?;
    for w in items {
        writeln!(
            out,
            "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  {}",
            w.id,
            w.status.as_str(),
            w.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            w.duration_ms
                .map_or_else(|| "-".into(), |d| format!("{d}ms")),
            w.line_count,
            w.module_hash.get(..19).unwrap_or(&w.module_hash),
        )?;
    }
    Ok(())
}

/// Prints every stored line of a workload.
pub fn logs(args: LogsArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.follow,
        "following live needs a server: pass --server URL or set VULCAN_SERVER"
    );
    let db = open_for(data_dir, args.id)?;
    db.workload(args.id)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut after = None;
    loop {
        let lines = db.read_lines(args.id, after, 10_000)?;
        let Some(last) = lines.last() else { break };
        after = Some(last.seq);
        for r in &lines {
            if args.json {
                serde_json::to_writer(&mut out, r)?;
                writeln!(out)?;
            } else if r.continued {
                write!(out, "{}", r.line)?;
            } else {
                writeln!(out, "{}", r.line)?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
