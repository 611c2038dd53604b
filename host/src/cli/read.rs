//! `vulcan status`, `ls` and `logs`: the same commands over either backend
//! (the local database, or a server with `--server`), printed by one printer.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;

use super::backend::{Backend, LIST_PAGE, ListQuery};
use super::print::{self, LinePrinter};
use crate::workload::{Status, WorkloadId};

/// Arguments of `vulcan ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Most workloads to show
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
    /// Skip this many of the newest
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Only workloads older than this one (the last id of the previous
    /// page): pages by key, at the same cost however deep
    #[arg(long, value_name = "ID")]
    pub before: Option<WorkloadId>,
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
    /// Only this attempt's lines (a workload with a retry policy)
    #[arg(long, value_name = "N", conflicts_with = "follow")]
    pub attempt: Option<u32>,
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

/// `vulcan status ID`.
pub async fn status(backend: &impl Backend, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let w = backend.workload(args.id).await?;
    let mut out = std::io::stdout().lock();
    print::workload(&mut out, &w, args.json)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `vulcan ls`: pages through the backend until `--limit` workloads are shown.
pub async fn ls(backend: &impl Backend, args: LsArgs) -> anyhow::Result<ExitCode> {
    let page = |shown: u64| ListQuery {
        limit: (args.limit - shown).min(LIST_PAGE),
        offset: args.offset + shown,
        before: args.before,
        status: args.status,
    };
    let mut list = backend.list(page(0)).await?;
    while (list.items.len() as u64) < args.limit.min(list.total.saturating_sub(args.offset)) {
        let more = backend.list(page(list.items.len() as u64)).await?;
        if more.items.is_empty() {
            break;
        }
        list.total = more.total;
        list.items.extend(more.items);
    }
    list.limit = args.limit;
    let mut out = std::io::stdout().lock();
    print::list(&mut out, &list, args.json)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `vulcan logs ID`: every stored line, page by page.
pub async fn logs(backend: &impl Backend, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut printer = LinePrinter::terminal(args.json);
    // An attempt's lines are a range of seqs, which its record names.
    let (mut after, end) = match args.attempt {
        None => (None, None),
        Some(n) => {
            let w = backend.workload(args.id).await?;
            w.attempt_lines(n).map_err(anyhow::Error::msg)?
        }
    };
    'pages: loop {
        let page = backend.lines(args.id, after).await?;
        if page.lines.is_empty() {
            break;
        }
        for line in &page.lines {
            if end.is_some_and(|end| line.seq >= end) {
                break 'pages;
            }
            printer.line(line)?;
        }
        after = page.next_after;
    }
    printer.flush()?;
    Ok(ExitCode::SUCCESS)
}
