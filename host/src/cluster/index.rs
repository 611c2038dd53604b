//! A node's index of the cluster's workload records, for lists and for
//! finding what runs where, in a SQLite file of the node's own
//! (`cluster-index.sqlite` in its data directory) rather than in memory: a
//! node's resident memory does not grow with the number of workloads the
//! cluster has ever run.
//!
//! Holds each record's summary (what a list shows) and the stream sequence
//! of the last change applied; it is brought up to date from the records'
//! stream in batches (see `records.rs`). Rebuilt from the stream when it is
//! missing, does not open, or is ahead of the stream (made anew).

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension as _, params, params_from_iter};

use crate::view::{WorkloadList, WorkloadSummary};
use crate::workload::{ListRequest, WorkloadId};

/// The index file in a data directory.
const FILE: &str = "cluster-index.sqlite";

/// One change read from the records' stream.
pub(super) enum Change {
    /// The record's summary now.
    Put(Box<WorkloadSummary>),
    /// The record was deleted.
    Delete(WorkloadId),
}

/// The summaries of every record, newest first by id.
#[derive(Clone)]
pub struct SummaryIndex {
    conn: Arc<Mutex<Connection>>,
}

impl SummaryIndex {
    /// Opens (or makes) the index in `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(FILE);
        let conn = match open(&path) {
            Ok(conn) => conn,
            Err(e) => {
                // Only a copy of the stream: made afresh.
                tracing::warn!(error = format!("{e:#}"), "rebuilding the cluster index");
                let _ = std::fs::remove_file(&path);
                open(&path)?
            }
        };
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the index's connection on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .context("the cluster index's thread failed")?
        .context("the cluster index failed")
    }

    /// The stream sequence of the last change applied (0: none).
    pub(super) async fn applied(&self) -> anyhow::Result<u64> {
        self.with(|c| {
            c.query_row("SELECT applied FROM progress", [], |r| r.get::<_, i64>(0))
                .map(|a| a as u64)
        })
        .await
    }

    /// Empties the index (its stream was made anew).
    pub(super) async fn reset(&self) -> anyhow::Result<()> {
        self.with(|c| c.execute_batch("DELETE FROM summaries; UPDATE progress SET applied = 0;"))
            .await
    }

    /// Applies `changes`, the last of which was stored at stream sequence
    /// `applied`, in one transaction.
    pub(super) async fn apply(&self, changes: Vec<Change>, applied: u64) -> anyhow::Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO summaries \
                     (id, status, tenant, node, module, finished_at, pruned_at, summary) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                let mut delete = tx.prepare_cached("DELETE FROM summaries WHERE id = ?1")?;
                for change in changes {
                    match change {
                        Change::Put(s) => {
                            let json = serde_json::to_string(&s).unwrap_or_default();
                            put.execute(params![
                                s.id.to_string(),
                                s.status.as_str(),
                                s.tenant,
                                s.node,
                                s.module,
                                s.finished_at
                                    .as_deref()
                                    .and_then(crate::view::parse_rfc3339),
                                s.pruned_at.is_some(),
                                json
                            ])?;
                        }
                        Change::Delete(id) => {
                            delete.execute(params![id.to_string()])?;
                        }
                    }
                }
                tx.execute(
                    "UPDATE progress SET applied = max(applied, ?1)",
                    params![applied as i64],
                )?;
            }
            tx.commit()
        })
        .await
    }

    /// A page as `request` asks, newest first, with the exact total (`before` aside).
    pub(super) async fn list(&self, request: ListRequest) -> anyhow::Result<WorkloadList> {
        self.with(move |c| {
            // Only the conditions asked for, so SQLite seeks the index that
            // serves them rather than testing every row.
            let mut conditions = Vec::new();
            let mut values: Vec<Value> = Vec::new();
            if let Some(status) = request.status {
                conditions.push("status = ?");
                values.push(Value::Text(status.as_str().to_owned()));
            }
            if let Some(tenant) = &request.tenant {
                conditions.push("tenant = ?");
                values.push(Value::Text(tenant.clone()));
            }
            let filter = |conditions: &[&str]| match conditions.is_empty() {
                true => String::new(),
                false => format!("WHERE {}", conditions.join(" AND ")),
            };
            let total: i64 = c
                .prepare_cached(&format!(
                    "SELECT COUNT(*) FROM summaries {}",
                    filter(&conditions)
                ))?
                .query_row(params_from_iter(&values), |r| r.get(0))?;
            if let Some(before) = request.before {
                conditions.push("id < ?");
                values.push(Value::Text(before.to_string()));
            }
            values.push(Value::Integer(request.limit.min(i64::MAX as u64) as i64));
            values.push(Value::Integer(request.offset.min(i64::MAX as u64) as i64));
            let mut stmt = c.prepare_cached(&format!(
                "SELECT summary FROM summaries {} ORDER BY id DESC LIMIT ? OFFSET ?",
                filter(&conditions)
            ))?;
            let items = stmt
                .query_map(params_from_iter(&values), |r| r.get::<_, String>(0))?
                .filter_map(|json| serde_json::from_str(&json.ok()?).ok())
                .collect();
            Ok(WorkloadList {
                items,
                total: total as u64,
                limit: request.limit,
                offset: request.offset,
            })
        })
        .await
    }

    /// Per tenant: pending and running workloads and when the oldest
    /// pending one was created (RFC 3339), in tenant order.
    pub(super) async fn queue_depth(
        &self,
    ) -> anyhow::Result<Vec<(Option<String>, u64, u64, Option<String>)>> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT tenant, SUM(status = 'pending'), SUM(status = 'running'), \
                 MIN(CASE WHEN status = 'pending' THEN json_extract(summary, '$.created_at') END) \
                 FROM summaries WHERE status IN ('pending', 'running') \
                 GROUP BY tenant ORDER BY tenant",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, Option<String>>(3)?,
                ))
            })?;
            rows.collect()
        })
        .await
    }

    /// True when a pending or running workload uses module `hash`.
    pub(super) async fn uses_module(&self, hash: &str) -> anyhow::Result<bool> {
        let hash = hash.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT 1 FROM summaries WHERE module = ?1 AND status IN ('pending', 'running') \
                 LIMIT 1",
                params![hash],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
        })
        .await
    }

    /// Workloads the index last saw running on `node`.
    pub(super) async fn running_on(&self, node: &str) -> anyhow::Result<Vec<WorkloadId>> {
        let node = node.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM summaries WHERE status = 'running' AND node = ?1",
            )?;
            let ids = stmt
                .query_map(params![node], |r| r.get::<_, String>(0))?
                .filter_map(|id| id.ok()?.parse().ok())
                .collect();
            Ok(ids)
        })
        .await
    }

    /// Up to `limit` finished workloads whose lines are still kept, oldest
    /// end first: of `tenant` (or of everyone but `except`), ended before
    /// `cutoff` (ms since the epoch).
    pub(super) async fn prunable(
        &self,
        tenant: Option<String>,
        except: Vec<String>,
        cutoff: i64,
        limit: u64,
    ) -> anyhow::Result<Vec<WorkloadId>> {
        self.with(move |c| {
            let except = serde_json::to_string(&except).unwrap_or_else(|_| "[]".into());
            let mut stmt = c.prepare_cached(
                "SELECT id FROM summaries WHERE pruned_at = 0 AND finished_at < ?1 \
                 AND status NOT IN ('pending', 'running') \
                 AND ((?2 IS NOT NULL AND tenant = ?2) OR (?2 IS NULL AND \
                      (tenant IS NULL OR tenant NOT IN (SELECT value FROM json_each(?3))))) \
                 ORDER BY finished_at LIMIT ?4",
            )?;
            let ids = stmt
                .query_map(params![cutoff, tenant, except, limit as i64], |r| {
                    r.get::<_, String>(0)
                })?
                .filter_map(|id| id.ok()?.parse().ok())
                .collect();
            Ok(ids)
        })
        .await
    }
}

fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("failed to open the cluster index {}", path.display()))?;
    // A copy of the stream: a crash may lose the last changes (they are
    // read again), never corrupt it.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = OFF;
         PRAGMA cache_size = -8192;
         CREATE TABLE IF NOT EXISTS summaries (
             id          TEXT PRIMARY KEY,
             status      TEXT NOT NULL,
             tenant      TEXT,
             node        TEXT,
             module      TEXT NOT NULL,
             finished_at INTEGER,
             pruned_at   INTEGER NOT NULL DEFAULT 0,
             summary     TEXT NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS summaries_by_status ON summaries (status, id);
         CREATE INDEX IF NOT EXISTS summaries_by_tenant ON summaries (tenant, id);
         CREATE INDEX IF NOT EXISTS summaries_by_tenant_status ON summaries (tenant, status, id);
         CREATE INDEX IF NOT EXISTS summaries_by_end ON summaries (finished_at)
             WHERE status NOT IN ('pending', 'running');
         CREATE INDEX IF NOT EXISTS summaries_by_module ON summaries (module)
             WHERE status IN ('pending', 'running');
         CREATE TABLE IF NOT EXISTS progress (applied INTEGER NOT NULL);
         INSERT INTO progress (applied) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM progress);",
    )
    .context("failed to set up the cluster index")?;
    Ok(conn)
}
