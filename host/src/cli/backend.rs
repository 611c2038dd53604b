//! Where the read commands (`status`, `ls`, `logs`) get their views: the local
//! database or a server. Both answer in the same [`crate::view`] types, so
//! the printing after this point is one code path whichever answered.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::client::Client;
use crate::store::Db;
use crate::view::{LogLine, LogPage, WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::{Status, WorkloadId};

/// Most workloads one list request asks for (the API's page limit).
pub const LIST_PAGE: u64 = 500;

/// Most lines one history request asks for (the API's page limit).
pub const HISTORY_PAGE: u64 = 10_000;

/// Which page of the workload list to read.
#[derive(Debug, Clone, Copy)]
pub struct ListQuery {
    /// Most workloads to return (at most [`LIST_PAGE`] are).
    pub limit: u64,
    /// How many of the newest to skip (after `before`, when given).
    pub offset: u64,
    /// Only workloads older than this one.
    pub before: Option<WorkloadId>,
    /// Only workloads with this status.
    pub status: Option<Status>,
}

/// A source of workload views.
pub(crate) trait Backend {
    /// One workload.
    async fn workload(&self, id: WorkloadId) -> anyhow::Result<WorkloadView>;
    /// A page of at most [`LIST_PAGE`] workloads, newest first.
    async fn list(&self, q: ListQuery) -> anyhow::Result<WorkloadList>;
    /// Up to [`HISTORY_PAGE`] stored lines after `after`, in seq order.
    async fn lines(&self, id: WorkloadId, after: Option<u64>) -> anyhow::Result<LogPage>;
}

/// The local database, read-only and without the owner's lock, so that it
/// works beside a running server.
pub struct Local {
    data_dir: PathBuf,
    /// `None` when nothing has run in the data directory yet.
    db: Option<Db>,
}

impl Local {
    /// Opens the database in `data_dir`, if there is one.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let db = match data_dir.join(crate::store::DB_FILE).exists() {
            false => None,
            true => Some(
                Db::open_read_only(data_dir)
                    .with_context(|| format!("no usable database in {}", data_dir.display()))?,
            ),
        };
        Ok(Self {
            data_dir: data_dir.to_owned(),
            db,
        })
    }

    fn db_for(&self, id: WorkloadId) -> anyhow::Result<&Db> {
        self.db.as_ref().with_context(|| {
            format!(
                "workload {id} not found (nothing has run with data directory {} yet)",
                self.data_dir.display()
            )
        })
    }
}

impl Backend for Local {
    async fn workload(&self, id: WorkloadId) -> anyhow::Result<WorkloadView> {
        Ok(self.db_for(id)?.workload(id).await?.into())
    }

    async fn list(&self, q: ListQuery) -> anyhow::Result<WorkloadList> {
        let (limit, offset) = (q.limit.min(LIST_PAGE), q.offset);
        let (items, total) = match &self.db {
            None => (Vec::new(), 0),
            Some(db) => {
                let page = db
                    .list_workloads(&crate::workload::ListRequest {
                        limit,
                        offset,
                        status: q.status,
                        tenant: None,
                        before: q.before,
                    })
                    .await?;
                let items = page.items.into_iter().map(WorkloadSummary::from);
                (items.collect(), page.total)
            }
        };
        Ok(WorkloadList {
            items,
            total,
            limit,
            offset,
        })
    }

    async fn lines(&self, id: WorkloadId, after: Option<u64>) -> anyhow::Result<LogPage> {
        let db = self.db_for(id)?;
        if after.is_none() {
            // An unknown workload is an error, not an empty log.
            db.workload(id).await?;
        }
        let lines = db.read_lines(id, after, HISTORY_PAGE).await?;
        Ok(LogPage {
            next_after: lines.last().map(|r| r.seq).or(after),
            lines: lines.iter().map(LogLine::from).collect(),
        })
    }
}

impl Backend for Client {
    async fn workload(&self, id: WorkloadId) -> anyhow::Result<WorkloadView> {
        self.get(&format!("/v1/workloads/{id}")).await
    }

    async fn list(&self, q: ListQuery) -> anyhow::Result<WorkloadList> {
        let mut path = format!(
            "/v1/workloads?limit={}&offset={}",
            q.limit.min(LIST_PAGE),
            q.offset
        );
        if let Some(s) = q.status {
            path.push_str(&format!("&status={s}"));
        }
        if let Some(id) = q.before {
            path.push_str(&format!("&before={id}"));
        }
        self.get(&path).await
    }

    async fn lines(&self, id: WorkloadId, after: Option<u64>) -> anyhow::Result<LogPage> {
        let mut path = format!("/v1/workloads/{id}/logs/history?limit={HISTORY_PAGE}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        self.get(&path).await
    }
}
