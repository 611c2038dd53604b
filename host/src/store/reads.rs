//! The SQL of every read, on a read-only connection the caller provides.
//! [`super::Db`] runs these on pooled connections off the async workers.

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};

use super::write_op::{PRUNABLE, PruneScope};
use super::{ModuleInfo, StoreError, StoreResult};
use crate::logs::{Fields, LogRecord, LogStream};
use crate::workload::{Status, WorkloadId, WorkloadRecord};

/// True when the database answers a trivial query.
pub(super) fn ping(c: &Connection) -> StoreResult<()> {
    Ok(c.prepare_cached("SELECT 1")?.query_row([], |_| Ok(()))?)
}

/// A module's metadata.
pub(super) fn module_info(c: &Connection, hash: &str) -> StoreResult<ModuleInfo> {
    c.prepare_cached("SELECT hash, kind, size, created_at FROM modules WHERE hash = ?1")?
        .query_row([hash], row_to_module)
        .optional()?
        .ok_or_else(|| StoreError::ModuleNotFound(hash.to_owned()))
}

/// A tenant's view of a module: its metadata with the time that tenant
/// first uploaded it; not found when it never did.
pub(super) fn tenant_module_info(
    c: &Connection,
    tenant: &str,
    hash: &str,
) -> StoreResult<ModuleInfo> {
    c.prepare_cached(
        "SELECT m.hash, m.kind, m.size, o.created_at FROM module_owners o \
         JOIN modules m ON m.hash = o.hash WHERE o.tenant = ?1 AND o.hash = ?2",
    )?
    .query_row([tenant, hash], row_to_module)
    .optional()?
    .ok_or_else(|| StoreError::ModuleNotFound(hash.to_owned()))
}

/// Stored modules' metadata, newest first: all of them, or one tenant's
/// (with its own first-seen times).
pub(super) fn list_modules(
    c: &Connection,
    limit: u64,
    offset: u64,
    tenant: Option<&str>,
) -> StoreResult<(Vec<ModuleInfo>, u64)> {
    let items = c
        .prepare_cached(
            "SELECT m.hash, m.kind, m.size, COALESCE(o.created_at, m.created_at) AS seen \
             FROM modules m LEFT JOIN module_owners o ON o.hash = m.hash AND o.tenant = ?2 \
             WHERE ?2 IS NULL OR o.tenant IS NOT NULL \
             ORDER BY seen DESC, m.hash LIMIT ?1 OFFSET ?3",
        )?
        .query_map(params![limit as i64, tenant, offset as i64], row_to_module)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let total: i64 = match tenant {
        None => c.query_row("SELECT COUNT(*) FROM modules", [], |r| r.get(0))?,
        Some(t) => c
            .prepare_cached("SELECT COUNT(*) FROM module_owners WHERE tenant = ?1")?
            .query_row([t], |r| r.get(0))?,
    };
    Ok((items, total as u64))
}

/// True when a pending or running workload (of `tenant`, if given) runs
/// module `hash`.
pub(super) fn module_in_use(c: &Connection, hash: &str, tenant: Option<&str>) -> StoreResult<bool> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM workloads WHERE status IN ('pending', 'running') \
             AND module_hash = ?1 AND (?2 IS NULL OR tenant = ?2) LIMIT 1",
    )?
    .query_row(params![hash, tenant], |_| Ok(()))
    .optional()?
    .is_some())
}

/// A `hash, kind, size, created_at` row.
fn row_to_module(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModuleInfo> {
    Ok(ModuleInfo {
        hash: r.get(0)?,
        kind: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        created_at: r.get(3)?,
    })
}

/// A module's bytes.
pub(super) fn module_bytes(c: &Connection, hash: &str) -> StoreResult<Vec<u8>> {
    c.prepare_cached("SELECT bytes FROM modules WHERE hash = ?1")?
        .query_row([hash], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::ModuleNotFound(hash.to_owned()))
}

/// One workload.
pub(super) fn workload(c: &Connection, id: WorkloadId) -> StoreResult<WorkloadRecord> {
    c.prepare_cached(&format!(
        "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = ?1"
    ))?
    .query_row([id.to_string()], row_to_workload)
    .optional()?
    .ok_or(StoreError::NotFound(id))?
}

/// True when this file holds workload `id`.
pub(super) fn has_workload(c: &Connection, id: WorkloadId) -> StoreResult<bool> {
    Ok(c.prepare_cached("SELECT 1 FROM workloads WHERE id = ?1")?
        .query_row([id.to_string()], |_| Ok(()))
        .optional()?
        .is_some())
}

/// When the workload a prune of `scope` would take first here ended.
pub(super) fn first_to_prune(
    c: &Connection,
    scope: &PruneScope,
    cutoff: i64,
) -> StoreResult<Option<i64>> {
    let (tenant, others) = scope.params()?;
    Ok(c.prepare_cached(&format!(
        "SELECT MIN(finished_at) FROM workloads WHERE {PRUNABLE}"
    ))?
    .query_row(params![cutoff, tenant, others], |r| r.get(0))?)
}

/// The `WHERE` of a list and its values: only the conditions asked for, so
/// that SQLite seeks the index that serves them (`id < ?` from the id index,
/// a status or a tenant from theirs) instead of testing every row.
fn list_filter(
    status: Option<Status>,
    tenant: Option<&str>,
    before: Option<&str>,
) -> (String, Vec<Value>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    if let Some(status) = status {
        conditions.push("status = ?");
        values.push(Value::Text(status.as_str().to_owned()));
    }
    if let Some(tenant) = tenant {
        conditions.push("tenant = ?");
        values.push(Value::Text(tenant.to_owned()));
    }
    if let Some(before) = before {
        conditions.push("id < ?");
        values.push(Value::Text(before.to_owned()));
    }
    match conditions.is_empty() {
        true => (String::new(), values),
        false => (format!("WHERE {}", conditions.join(" AND ")), values),
    }
}

/// What a list item needs, in [`WORKLOAD_COLUMNS`]' places: a spec's args,
/// env and output (which may be large) are left out, and an error is cut,
/// so a page's memory is bounded by its length whatever the workloads held.
const SUMMARY_COLUMNS: &str = "id, status, module_hash, '[]', '[]', '{}', exit_code, \
     substr(error, 1, 1024), NULL, duration_ms, line_count, created_at, started_at, \
     finished_at, failure, NULL, NULL, tenant, pruned_at, queued_at, schedule, NULL, attempt, NULL";

/// How many workloads match `status` and `tenant` in all.
pub(super) fn count_workloads(
    c: &Connection,
    status: Option<Status>,
    tenant: Option<&str>,
) -> StoreResult<u64> {
    let (filter, values) = list_filter(status, tenant, None);
    let total: i64 = c
        .prepare_cached(&format!("SELECT COUNT(*) FROM workloads {filter}"))?
        .query_row(rusqlite::params_from_iter(&values), |r| r.get(0))?;
    Ok(total as u64)
}

/// A page of workloads (summary columns only), newest first, below
/// `before` when given.
pub(super) fn list_workloads(
    c: &Connection,
    limit: u64,
    offset: u64,
    before: Option<&str>,
    status: Option<Status>,
    tenant: Option<&str>,
) -> StoreResult<Vec<WorkloadRecord>> {
    let (filter, mut values) = list_filter(status, tenant, before);
    values.push(Value::Integer(limit.min(i64::MAX as u64) as i64));
    values.push(Value::Integer(offset.min(i64::MAX as u64) as i64));
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM workloads {filter} ORDER BY id DESC LIMIT ? OFFSET ?"
    ))?;
    stmt.query_map(rusqlite::params_from_iter(&values), row_to_workload)?
        .map(|r| r?)
        .collect::<StoreResult<Vec<_>>>()
}

/// Up to `limit` ids of matching workloads below `before`, newest first.
pub(super) fn list_ids(
    c: &Connection,
    limit: u64,
    before: Option<&str>,
    status: Option<Status>,
    tenant: Option<&str>,
) -> StoreResult<Vec<String>> {
    let (filter, mut values) = list_filter(status, tenant, before);
    values.push(Value::Integer(limit.min(i64::MAX as u64) as i64));
    let mut stmt = c.prepare_cached(&format!(
        "SELECT id FROM workloads {filter} ORDER BY id DESC LIMIT ?"
    ))?;
    stmt.query_map(rusqlite::params_from_iter(&values), |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()
        .map_err(Into::into)
}

/// Up to `limit` stored lines of a workload with seq greater than `after`, in seq order.
/// Most bytes of text one page of lines holds (at least one line is always
/// returned), so a reader holds a bounded amount whatever the lines' length.
pub const PAGE_BYTES: usize = 4 << 20;

/// Up to `limit` lines after `after`, in seq order, stopping early once the
/// page holds [`PAGE_BYTES`] of text.
pub(super) fn read_lines(
    c: &Connection,
    id: WorkloadId,
    after: Option<u64>,
    limit: u64,
) -> StoreResult<Vec<LogRecord>> {
    let mut out = Vec::new();
    scan_lines(c, id, after, limit, |r| {
        out.push(r);
        true
    })?;
    Ok(out)
}

/// Hands the lines [`read_lines`] would return to `visit` one by one, as
/// they are read, until it returns false.
pub(super) fn scan_lines(
    c: &Connection,
    id: WorkloadId,
    after: Option<u64>,
    limit: u64,
    mut visit: impl FnMut(LogRecord) -> bool,
) -> StoreResult<()> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, stream, level, line, continued, created_at, fields FROM log_records \
         WHERE workload = (SELECT key FROM workloads WHERE id = ?1) AND seq > ?2 \
         ORDER BY seq LIMIT ?3",
    )?;
    let after = after.map_or(-1, |a| a as i64);
    let rows = stmt.query_map(params![id.to_string(), after, limit as i64], |r| {
        let stream: i64 = r.get(1)?;
        let level: Option<String> = r.get(2)?;
        let fields: Option<String> = r.get(6)?;
        Ok((
            (r.get::<_, i64>(0)?, stream, level),
            (r.get::<_, String>(3)?, r.get(4)?, r.get(5)?, fields),
        ))
    })?;
    let mut bytes = 0;
    for row in rows {
        if bytes >= PAGE_BYTES {
            break;
        }
        let ((seq, stream, level), (line, continued, ts_ms, fields)) = row?;
        bytes += line.len() + fields.as_ref().map_or(0, String::len);
        let fields = match fields {
            None => Fields::default(),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| anyhow::anyhow!("corrupt log fields: {e}"))?,
        };
        let record = LogRecord {
            workload_id: id,
            seq: seq as u64,
            stream: stream_from_code(stream)?,
            level: level.map(|l| l.parse()).transpose()?,
            line,
            continued,
            ts_ms,
            fields,
        };
        if !visit(record) {
            break;
        }
    }
    Ok(())
}

pub(super) const WORKLOAD_COLUMNS: &str = "id, status, module_hash, args, env, limits, exit_code, error, \
     output, duration_ms, line_count, created_at, started_at, finished_at, failure, \
     allowed_hosts, log_level, tenant, pruned_at, queued_at, schedule, retry, attempt, attempts";

pub(super) fn row_to_workload(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<StoreResult<WorkloadRecord>> {
    let id: String = r.get(0)?;
    let status: String = r.get(1)?;
    let args: String = r.get(3)?;
    let env: String = r.get(4)?;
    let limits: String = r.get(5)?;
    let failure: Option<String> = r.get(14)?;
    let allowed_hosts: Option<String> = r.get(15)?;
    let log_level: Option<String> = r.get(16)?;
    let retry: Option<String> = r.get(21)?;
    let attempts: Option<String> = r.get(23)?;
    let parse = || -> anyhow::Result<_> {
        Ok((
            id.parse::<WorkloadId>()?,
            status.parse::<Status>()?,
            serde_json::from_str(&args)?,
            serde_json::from_str(&env)?,
            serde_json::from_str(&limits)?,
            failure.as_deref().map(str::parse).transpose()?,
            allowed_hosts
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?
                .unwrap_or_default(),
            log_level.as_deref().map(str::parse).transpose()?,
            retry.as_deref().map(serde_json::from_str).transpose()?,
            attempts
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?
                .unwrap_or_default(),
        ))
    };
    let (id, status, args, env, limits, failure, allowed_hosts, log_level, retry, attempts) =
        match parse() {
            Ok(v) => v,
            Err(e) => return Ok(Err(e.context("corrupt workload row").into())),
        };
    Ok(Ok(WorkloadRecord {
        id,
        status,
        module_hash: r.get(2)?,
        args,
        env,
        limits,
        allowed_hosts,
        log_level,
        exit_code: r.get(6)?,
        error: r.get(7)?,
        failure,
        output: r.get(8)?,
        duration_ms: r.get::<_, Option<i64>>(9)?.map(|d| d as u64),
        line_count: r.get::<_, i64>(10)? as u64,
        created_at: r.get(11)?,
        started_at: r.get(12)?,
        finished_at: r.get(13)?,
        tenant: r.get(17)?,
        pruned_at: r.get(18)?,
        queued_at: r.get(19)?,
        schedule: r.get(20)?,
        retry,
        attempt: r.get::<_, i64>(22)? as u32,
        attempts,
    }))
}

/// How a stream is stored in `log_records.stream`.
pub(crate) fn stream_code(stream: LogStream) -> i64 {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
        LogStream::Log => 2,
    }
}

fn stream_from_code(code: i64) -> anyhow::Result<LogStream> {
    Ok(match code {
        0 => LogStream::Stdout,
        1 => LogStream::Stderr,
        2 => LogStream::Log,
        other => anyhow::bail!("unknown stream code {other} in log_records"),
    })
}

/// True when the file has free pages that incremental vacuum can give back.
pub(super) fn has_free_pages(conn: &Connection) -> StoreResult<bool> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let incremental: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    Ok(free > 0 && incremental == 2)
}
