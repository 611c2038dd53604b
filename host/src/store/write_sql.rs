//! The SQL of each write: inserting a batch of lines and applying one control
//! op inside the writer's transaction. Knows tables and columns; knows nothing
//! of batching, retries or threads (that is [`super::writer`]).

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use super::queue::{LineQueue, Taken};
use super::reads::stream_code;
use super::usage::UsageDelta;
use super::write_op::{Applied, PRUNABLE, PruneScope, WriteOp};
use super::{NewWorkload, StoreError, StoreResult};
use crate::workload::{Completion, LogLevel, Status, WorkloadId, now_ms};

/// Rows per multi-row INSERT: one statement execution per this many lines
/// (SQLite's per-statement cost dominates small rows); [`COLUMNS`] parameters
/// each stays well under SQLite's parameter limit.
const ROWS_PER_INSERT: usize = 256;

/// Parameters of one line's row. Lines with key/value fields (rare) go
/// through a one-row statement of their own, so the common row keeps this
/// shape and its cost.
const COLUMNS: usize = 7;

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO log_records (workload, seq, stream, level, line, continued, created_at) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?)");
    }
    sql
}

/// Inserts the taken lines and counts their bytes on their workloads (and
/// in `usage`); returns how many were skipped because their workload is not
/// in the table.
pub(super) fn insert_lines(
    tx: &Connection,
    taken: &Taken,
    keys: &mut WorkloadKeys,
    usage: &mut UsageDelta,
) -> rusqlite::Result<u64> {
    let mut keyed = Vec::with_capacity(taken.len());
    let mut with_fields = Vec::new();
    let mut unknown = 0;
    let mut add_bytes =
        tx.prepare_cached("UPDATE workloads SET log_bytes = log_bytes + ?2 WHERE key = ?1")?;
    for lane in &taken.lanes {
        match keys.get(tx, lane.workload)? {
            Some((key, tenant)) => {
                let mut bytes = 0;
                for r in &lane.lines {
                    bytes += r.line.len();
                    match r.fields.is_empty() {
                        true => keyed.push((key, &**r)),
                        false => {
                            let fields = fields_json(r);
                            bytes += fields.as_ref().map_or(0, String::len);
                            with_fields.push((key, &**r, fields))
                        }
                    }
                }
                if bytes > 0 {
                    add_bytes.execute(params![key, bytes as i64])?;
                    usage.add(tenant.as_deref(), bytes as i64);
                }
            }
            None => unknown += lane.lines.len() as u64,
        }
    }
    let mut chunks = keyed.chunks_exact(ROWS_PER_INSERT);
    let mut many = None;
    for chunk in &mut chunks {
        let stmt = match &mut many {
            Some(stmt) => stmt,
            None => many.insert(tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?),
        };
        for (row, (key, r)) in chunk.iter().enumerate() {
            bind_line(stmt, row * COLUMNS, *key, r)?;
        }
        stmt.raw_execute()?;
    }
    // The rest in halving statements (128, 64, …, 1 rows): at most eight
    // executions, each of a statement cached like the full one.
    let mut rest = chunks.remainder();
    for rows in (0..ROWS_PER_INSERT.ilog2()).rev().map(|bit| 1 << bit) {
        if rest.len() >= rows {
            let mut stmt = tx.prepare_cached(&insert_sql(rows))?;
            for (row, (key, r)) in rest[..rows].iter().enumerate() {
                bind_line(&mut stmt, row * COLUMNS, *key, r)?;
            }
            stmt.raw_execute()?;
            rest = &rest[rows..];
        }
    }
    if !with_fields.is_empty() {
        let mut one = tx.prepare_cached(
            "INSERT INTO log_records \
             (workload, seq, stream, level, line, continued, created_at, fields) \
             VALUES (?,?,?,?,?,?,?,?)",
        )?;
        for (key, r, fields) in with_fields {
            bind_line(&mut one, 0, key, r)?;
            one.raw_bind_parameter(COLUMNS + 1, fields)?;
            one.raw_execute()?;
        }
    }
    Ok(unknown)
}

/// A line's key/value fields as stored.
fn fields_json(r: &crate::logs::LogRecord) -> Option<String> {
    // Strings only: serializing them cannot fail.
    serde_json::to_string(&r.fields).ok()
}

/// Binds one line's seven values at parameters `first + 1 ..= first + 7`.
fn bind_line(
    stmt: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    key: i64,
    r: &crate::logs::LogRecord,
) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(first + 1, key)?;
    stmt.raw_bind_parameter(first + 2, r.seq as i64)?;
    stmt.raw_bind_parameter(first + 3, stream_code(r.stream))?;
    stmt.raw_bind_parameter(first + 4, r.level.map(|l| l.as_str()))?;
    stmt.raw_bind_parameter(first + 5, r.line.as_str())?;
    stmt.raw_bind_parameter(first + 6, r.continued)?;
    stmt.raw_bind_parameter(first + 7, r.ts_ms)?;
    Ok(())
}

/// A workload's integer key and its tenant.
type Keyed = (i64, Option<Arc<str>>);

/// The integer key (and tenant) of each workload the writer created and has
/// not finished.
#[derive(Default)]
pub(super) struct WorkloadKeys(HashMap<WorkloadId, Keyed>);

impl WorkloadKeys {
    /// The workload's key, from memory or else the table; `None` if it does not exist.
    fn get(&mut self, tx: &Connection, id: WorkloadId) -> rusqlite::Result<Option<Keyed>> {
        if let Some(keyed) = self.0.get(&id) {
            return Ok(Some(keyed.clone()));
        }
        let keyed = tx
            .prepare_cached("SELECT key, tenant FROM workloads WHERE id = ?1")?
            .query_row([id.to_string()], |r| {
                Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.map(Arc::from)))
            })
            .optional()?;
        if let Some(keyed) = &keyed {
            self.0.insert(id, keyed.clone());
        }
        Ok(keyed)
    }

    pub(super) fn remove(&mut self, id: WorkloadId) {
        self.0.remove(&id);
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// Applies one control op inside the transaction.
pub(super) fn apply(
    tx: &Connection,
    op: &WriteOp,
    keys: &mut WorkloadKeys,
    queue: &LineQueue,
    usage: &mut UsageDelta,
    checks_modules: bool,
) -> StoreResult<Applied> {
    match op {
        WriteOp::PutModule { info, bytes, .. } => Ok(Applied::Bool(
            tx.prepare_cached(
                "INSERT OR IGNORE INTO modules (hash, kind, size, bytes, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                info.hash,
                info.kind,
                info.size as i64,
                &bytes[..],
                info.created_at
            ])? == 1,
        )),
        WriteOp::OwnModule { tenant, hash, .. } => Ok(Applied::Bool(
            tx.prepare_cached(
                "INSERT OR IGNORE INTO module_owners (tenant, hash, created_at) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![tenant, hash, now_ms()])?
                == 1,
        )),
        WriteOp::DeleteModule { hash, tenant, .. } => {
            delete_module(tx, hash, tenant.as_deref()).map(Applied::Bool)
        }
        WriteOp::Create { new, .. } => {
            create(tx, new, checks_modules)?;
            let tenant = new.tenant.as_deref().map(Arc::from);
            keys.0.insert(new.id, (tx.last_insert_rowid(), tenant));
            Ok(Applied::Unit)
        }
        WriteOp::Transition {
            id,
            to,
            completion,
            retry,
            ..
        } => {
            // Some of its lines are not stored: it cannot have completed.
            let failed = match (completion, queue.failure(*id)) {
                (Some(c), Some((why, stored))) => {
                    let mut c = c.clone();
                    c.store_failure(&why);
                    // What is stored: the prefix before the first lost line.
                    c.line_count = c.line_count.min(stored);
                    Some(c)
                }
                _ => None,
            };
            let completion = failed.as_ref().or(completion.as_ref());
            if let (Some(later), None) = (retry, &failed) {
                retry_later(tx, *id, later)?;
                return Ok(Applied::Record(Box::new(super::reads::workload(tx, *id)?)));
            }
            let to = completion.map_or(*to, |c| c.status);
            transition(tx, *id, to, completion)?;
            // A queued start answers its record too: its attempt and the
            // seq its lines go on from.
            match to.is_terminal() || to == Status::Running {
                true => Ok(Applied::Record(Box::new(super::reads::workload(tx, *id)?))),
                false => Ok(Applied::Unit),
            }
        }
        WriteOp::FailUnfinished { reason, .. } => Ok(Applied::Count(fail_unfinished(tx, reason)?)),
        WriteOp::Prune {
            scope,
            cutoff,
            max_lines,
            ..
        } => Ok(Applied::Count(prune(
            tx, scope, *cutoff, *max_lines, usage,
        )?)),
        WriteOp::LinesQueued | WriteOp::Flush { .. } => Ok(Applied::Unit),
        #[cfg(test)]
        WriteOp::PageLimit { .. } => Ok(Applied::Unit),
    }
}

/// Ends every running workload (and every pending one that is not queued)
/// as failed, as a restart finds them: their line count and end time come
/// from the lines that were stored. Queued ones stay: they are the queue.
fn fail_unfinished(tx: &Connection, reason: &str) -> StoreResult<u64> {
    // The time of its last stored line, else when it started or was created.
    const END: &str = "COALESCE((SELECT created_at FROM log_records \
         WHERE workload = workloads.key ORDER BY seq DESC LIMIT 1), started_at, created_at)";
    let n = tx
        .prepare_cached(&format!(
            "UPDATE workloads SET status = 'failed', error = ?1, failure = 'host', \
             line_count = (SELECT COUNT(*) FROM log_records WHERE workload = workloads.key), \
             finished_at = {END}, \
             duration_ms = CASE WHEN started_at IS NULL THEN NULL \
                                ELSE MAX({END} - started_at, 0) END \
             WHERE status = 'running' OR (status = 'pending' AND queued IS NULL)"
        ))?
        .execute([reason])?;
    Ok(n as u64)
}

/// Deletes up to `max_lines` of the oldest lines of the finished workload of
/// `scope` that ended first before `cutoff`, and marks it pruned once none
/// are left (its bytes then leave `usage`). Small steps, so the writer's
/// other work interleaves.
fn prune(
    tx: &Connection,
    scope: &PruneScope,
    cutoff: i64,
    max_lines: u64,
    usage: &mut UsageDelta,
) -> StoreResult<u64> {
    let (tenant, others) = scope.params()?;
    let found: Option<(i64, Option<String>, i64)> = tx
        .prepare_cached(&format!(
            "SELECT key, tenant, log_bytes FROM workloads WHERE {PRUNABLE} \
             ORDER BY finished_at, key LIMIT 1"
        ))?
        .query_row(params![cutoff, tenant, others], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((key, owner, bytes)) = found else {
        // Nothing left to delete: a step of giving free pages back, until
        // none are left (a database without incremental vacuum has none to
        // give, and keeps them for reuse).
        let free: i64 = tx.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let incremental: i64 = tx.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if free == 0 || incremental != 2 {
            return Ok(0);
        }
        vacuum(tx, VACUUM_PAGES_PER_STEP)?;
        return Ok(1);
    };
    let deleted = tx
        .prepare_cached(
            "DELETE FROM log_records WHERE workload = ?1 AND seq < \
             (SELECT MIN(seq) FROM log_records WHERE workload = ?1) + ?2",
        )?
        .execute(params![key, max_lines as i64])? as u64;
    if deleted < max_lines {
        tx.prepare_cached("UPDATE workloads SET pruned_at = ?2 WHERE key = ?1")?
            .execute(params![key, now_ms()])?;
        usage.add(owner.as_deref(), -bytes);
    }
    // Gives freed pages back to the file system (a no-op on a database made
    // before incremental vacuum was switched on; `vulcan vacuum` turns it on).
    vacuum(tx, VACUUM_PAGES_PER_STEP)?;
    Ok(deleted + 1)
}

/// Deletes `tenant`'s ownership of module `hash` (every ownership with
/// `None`), and its bytes once no tenant owns it; true if the bytes went.
fn delete_module(tx: &Connection, hash: &str, tenant: Option<&str>) -> StoreResult<bool> {
    let not_found = || StoreError::ModuleNotFound(hash.to_owned());
    if let Some(tenant) = tenant {
        let taken = tx
            .prepare_cached("DELETE FROM module_owners WHERE tenant = ?1 AND hash = ?2")?
            .execute(params![tenant, hash])?;
        if taken == 0 {
            return Err(not_found());
        }
        let left: i64 = tx
            .prepare_cached("SELECT COUNT(*) FROM module_owners WHERE hash = ?1")?
            .query_row([hash], |r| r.get(0))?;
        if left > 0 {
            return Ok(false);
        }
    } else {
        tx.prepare_cached("DELETE FROM module_owners WHERE hash = ?1")?
            .execute([hash])?;
    }
    let gone = tx
        .prepare_cached("DELETE FROM modules WHERE hash = ?1")?
        .execute([hash])?;
    match (gone, tenant) {
        (0, None) => Err(not_found()),
        (n, _) => Ok(n > 0),
    }
}

/// Most free pages one retention step gives back: more than a step of
/// [`super::write_op`]'s lines frees, so the file shrinks as fast as it is
/// pruned, and the transaction stays short.
const VACUUM_PAGES_PER_STEP: u32 = 4096;

/// Moves up to `pages` free pages to the end of the file and truncates it.
/// The pragma frees one page per step of its statement, so it is stepped
/// to its end (one `execute` would free a single page).
fn vacuum(tx: &Connection, pages: u32) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Inserts a new workload's record; `checks_modules`: its module must be
/// stored in this file (a tenant's file holds none; its caller checked).
fn create(tx: &Connection, new: &NewWorkload, checks_modules: bool) -> StoreResult<()> {
    let known: bool = !checks_modules
        || tx
            .prepare_cached("SELECT 1 FROM modules WHERE hash = ?1")?
            .query_row([&new.module_hash], |_| Ok(()))
            .optional()?
            .is_some();
    if !known {
        return Err(StoreError::ModuleNotFound(new.module_hash.clone()));
    }
    let now = now_ms();
    let queued = new
        .queued
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(anyhow::Error::from)?;
    let retry = new
        .retry
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(anyhow::Error::from)?;
    let (key, fingerprint) = match &new.idempotency {
        Some(k) => (Some(k.key.as_str()), Some(k.fingerprint.as_str())),
        None => (None, None),
    };
    tx.prepare_cached(
        "INSERT INTO workloads (id, status, module_hash, args, env, limits, created_at, \
         allowed_hosts, log_level, started_at, tenant, queued_at, queued, idempotency_key, \
         fingerprint, schedule, retry) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        new.id.to_string(),
        match new.running {
            true => Status::Running.as_str(),
            false => Status::Pending.as_str(),
        },
        new.module_hash,
        serde_json::to_string(&new.args).map_err(anyhow::Error::from)?,
        serde_json::to_string(&new.env).map_err(anyhow::Error::from)?,
        serde_json::to_string(&new.limits).map_err(anyhow::Error::from)?,
        now,
        match new.allowed_hosts.is_empty() {
            true => None,
            false => Some(serde_json::to_string(&new.allowed_hosts).map_err(anyhow::Error::from)?),
        },
        new.log_level.map(LogLevel::as_str),
        new.running.then_some(now),
        new.tenant,
        queued.is_some().then_some(now),
        queued,
        key,
        fingerprint,
        new.schedule,
        retry,
    ])?;
    Ok(())
}

/// Workload `id`'s status as this transaction sees it.
fn status_of(tx: &Connection, id: WorkloadId) -> StoreResult<Status> {
    Ok(tx
        .prepare_cached("SELECT status FROM workloads WHERE id = ?1")?
        .query_row([id.to_string()], |r| r.get::<_, String>(0))
        .optional()?
        .ok_or(StoreError::NotFound(id))?
        .parse()?)
}

/// Puts a running workload whose attempt failed back to `pending`, its
/// attempt kept in its history, to start again once its backoff is over.
fn retry_later(tx: &Connection, id: WorkloadId, later: &super::RetryLater) -> StoreResult<()> {
    let key = id.to_string();
    let from = status_of(tx, id)?;
    if from != Status::Running {
        return Err(StoreError::IllegalTransition {
            id,
            from,
            to: Status::Pending,
        });
    }
    let attempt = serde_json::to_string(&later.attempt).map_err(anyhow::Error::from)?;
    let queued = serde_json::to_string(&later.queued).map_err(anyhow::Error::from)?;
    tx.prepare_cached(
        "UPDATE workloads SET status = 'pending', attempt = attempt + 1, \
         attempts = json_insert(COALESCE(attempts, '[]'), '$[#]', json(?1)), \
         queued = ?2, queued_at = ?3, line_count = ?4, started_at = NULL WHERE id = ?5",
    )?
    .execute(params![
        attempt,
        queued,
        now_ms(),
        (later.attempt.first_seq + later.attempt.lines) as i64,
        key
    ])?;
    Ok(())
}

fn transition(
    tx: &Connection,
    id: WorkloadId,
    to: Status,
    completion: Option<&Completion>,
) -> StoreResult<()> {
    let key = id.to_string();
    let from = status_of(tx, id)?;
    if !from.can_become(to) {
        return Err(StoreError::IllegalTransition { id, from, to });
    }
    let now = now_ms();
    match completion {
        None => {
            // A queued run's input is needed no more once it starts.
            tx.prepare_cached(
                "UPDATE workloads SET status = ?1, started_at = ?2, queued = NULL WHERE id = ?3",
            )?
            .execute(params![to.as_str(), now, key])?;
        }
        Some(c) => {
            // Only a queued one (ending unstarted) has input to drop: the
            // common end does not touch the queue's index.
            let sql = match from {
                Status::Pending => {
                    "UPDATE workloads SET status = ?1, exit_code = ?2, error = ?3, output = ?4, \
                     duration_ms = ?5, line_count = ?6, finished_at = ?7, failure = ?8, \
                     queued = NULL WHERE id = ?9"
                }
                _ => {
                    "UPDATE workloads SET status = ?1, exit_code = ?2, error = ?3, output = ?4, \
                     duration_ms = ?5, line_count = ?6, finished_at = ?7, failure = ?8 \
                     WHERE id = ?9"
                }
            };
            tx.prepare_cached(sql)?.execute(params![
                to.as_str(),
                c.exit_code,
                &c.error,
                &c.output,
                c.duration_ms as i64,
                c.line_count as i64,
                now,
                c.failure.map(|f| f.as_str()),
                key
            ])?;
        }
    }
    Ok(())
}
