//! Durable state in one SQLite file: modules, workloads and their log lines.
//!
//! One writer thread owns the only write connection. Log lines wait in a shared
//! line queue; every other change (a new workload, a status transition) is an op
//! on the writer's channel, and committing an op takes every line queued before
//! it, so a workload's lines are always committed before the terminal status
//! that follows them. Lines are committed in group transactions (a full batch of
//! `max_batch` lines, or whatever arrived within `linger` of the first); an op
//! commits at once. Reads use a small pool of read-only connections (WAL lets
//! them run beside the writer).
//!
//! Only this module imports rusqlite.

mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

pub use schema::SCHEMA_VERSION;

use crate::logs::{LogRecord, LogStream};
use crate::workload::{Completion, Limits, Status, WorkloadId, WorkloadRecord, now_ms};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "vulcan.db";

/// Errors a caller may branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No workload has this id.
    #[error("workload {0} not found")]
    NotFound(WorkloadId),
    /// No module has this hash.
    #[error("module {0} not found")]
    ModuleNotFound(String),
    /// The lifecycle does not allow this change (e.g. a terminal status changing).
    #[error("workload {id} is {from}; it cannot become {to}")]
    IllegalTransition {
        /// The workload.
        id: WorkloadId,
        /// Its current status.
        from: Status,
        /// The refused status.
        to: Status,
    },
    /// Anything else: I/O, SQLite, a closed store.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Internal(e.into())
    }
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// How the line writer groups lines into transactions.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most lines in one transaction.
    pub max_batch: usize,
    /// Longest a line waits for companions before it is committed.
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            linger: Duration::from_millis(5),
        }
    }
}

/// A workload about to be created.
#[derive(Debug, Clone)]
pub struct NewWorkload {
    /// Its id.
    pub id: WorkloadId,
    /// `sha256:<hex>` of its module, which must already be stored.
    pub module_hash: String,
    /// Its argv.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its limits.
    pub limits: Limits,
}

/// A stored module's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// `sha256:<hex>`.
    pub hash: String,
    /// Core module or component.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was first stored, ms since the Unix epoch.
    pub created_at: i64,
}

/// One page of the workload list.
#[derive(Debug, Clone)]
pub struct WorkloadPage {
    /// The workloads, newest first.
    pub items: Vec<WorkloadRecord>,
    /// How many match in all.
    pub total: u64,
}

enum WriteOp {
    /// The line queue needs the writer: its first line (which starts the linger
    /// clock) or a full batch.
    LinesQueued,
    PutModule {
        info: ModuleInfo,
        bytes: Arc<[u8]>,
        reply: oneshot::Sender<StoreResult<bool>>,
    },
    Create {
        new: NewWorkload,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    Transition {
        id: WorkloadId,
        to: Status,
        completion: Option<Completion>,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    FailUnfinished {
        reason: String,
        reply: oneshot::Sender<StoreResult<u64>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: mpsc::Sender<WriteOp>,
    queue: Arc<LineQueue>,
    readers: Mutex<Vec<Connection>>,
    lost_lines: Arc<AtomicU64>,
}

/// Lines waiting for the writer's next commit.
///
/// Kept apart from the op channel so that a line costs a push under a lock,
/// not a wake-up of the writer thread: the writer is woken once per batch.
/// Ordering still holds because a control op is sent after the lines before it
/// were pushed, and the writer takes the whole queue when it commits that op.
struct LineQueue {
    lines: Mutex<Vec<Arc<LogRecord>>>,
    /// Lines that make a full batch.
    full: usize,
}

impl LineQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LogRecord>>> {
        // A push or a swap cannot leave the vector half-changed.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends lines to the store without waiting; held by each `LogWriter`.
#[derive(Clone)]
pub struct LineSink {
    tx: mpsc::Sender<WriteOp>,
    queue: Arc<LineQueue>,
}

impl LineSink {
    /// Queues one line for the next batch. Never blocks on the database.
    pub fn send(&self, record: Arc<LogRecord>) {
        let queued = {
            let mut lines = self.queue.lock();
            lines.push(record);
            lines.len()
        };
        if queued == 1 || queued == self.queue.full {
            // Fails only after the writer thread is gone, which the writer logs itself.
            let _ = self.tx.send(WriteOp::LinesQueued);
        }
    }
}

impl Db {
    /// Opens (creating if needed) `vulcan.db` in `data_dir`, migrating it.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(data_dir, BatchConfig::default())
    }

    /// Like [`Db::open`] with explicit batching.
    pub fn open_with(data_dir: &Path, batch: BatchConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("failed to create data directory {}", data_dir.display()))?;
        let path = data_dir.join(DB_FILE);
        let mut conn = Connection::open(&path)
            .with_context(|| format!("failed to open database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("failed to switch the database to WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        schema::migrate(&mut conn)
            .with_context(|| format!("failed to migrate database {}", path.display()))?;

        let (tx, rx) = mpsc::channel();
        let lost_lines = Arc::new(AtomicU64::new(0));
        let lost = Arc::clone(&lost_lines);
        let queue = Arc::new(LineQueue {
            lines: Mutex::new(Vec::new()),
            full: batch.max_batch.max(1),
        });
        let queued = Arc::clone(&queue);
        thread::Builder::new()
            .name("vulcan-db-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    batch,
                    queue: queued,
                    lost,
                    keys: WorkloadKeys::default(),
                }
                .run(rx)
            })
            .context("failed to start the database writer")?;
        Ok(Self {
            inner: Arc::new(Inner {
                // One reader ready, so the first request after a start does
                // not pay for opening it.
                readers: Mutex::new(vec![open_reader(&path)?]),
                path,
                tx,
                queue,
                lost_lines,
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A handle for streaming lines into the store.
    pub fn line_sink(&self) -> LineSink {
        LineSink {
            tx: self.inner.tx.clone(),
            queue: Arc::clone(&self.inner.queue),
        }
    }

    /// Lines that could not be committed since start (each failure is also logged).
    pub fn lost_lines(&self) -> u64 {
        self.inner.lost_lines.load(Ordering::Relaxed)
    }

    async fn request<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> WriteOp,
    ) -> StoreResult<T> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(op(reply))
            .map_err(|_| anyhow::anyhow!("the database writer has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the database writer stopped before answering"))?
    }

    /// Stores a module once; returns true if it was new.
    pub async fn put_module(&self, info: ModuleInfo, bytes: Arc<[u8]>) -> StoreResult<bool> {
        self.request(|reply| WriteOp::PutModule { info, bytes, reply })
            .await
    }

    /// Creates a workload in status `pending`.
    pub async fn create_workload(&self, new: NewWorkload) -> StoreResult<()> {
        self.request(|reply| WriteOp::Create { new, reply }).await
    }

    /// Marks a pending workload running and sets `started_at`.
    pub async fn mark_running(&self, id: WorkloadId) -> StoreResult<()> {
        self.request(|reply| WriteOp::Transition {
            id,
            to: Status::Running,
            completion: None,
            reply,
        })
        .await
    }

    /// Writes a terminal status, after every line queued before it.
    pub async fn finish(&self, id: WorkloadId, completion: Completion) -> StoreResult<()> {
        self.request(|reply| WriteOp::Transition {
            id,
            to: completion.status,
            completion: Some(completion),
            reply,
        })
        .await
    }

    /// Marks every pending or running workload failed with `reason`; returns how many.
    pub async fn fail_unfinished(&self, reason: &str) -> StoreResult<u64> {
        let reason = reason.to_owned();
        self.request(|reply| WriteOp::FailUnfinished { reason, reply })
            .await
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(WriteOp::Flush { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let pooled = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.inner.path)?,
        };
        let result = f(&conn);
        let mut pool = self.inner.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    /// True when the database answers a trivial query.
    pub fn ping(&self) -> StoreResult<()> {
        self.with_reader(|c| Ok(c.prepare_cached("SELECT 1")?.query_row([], |_| Ok(()))?))
    }

    /// A module's metadata.
    pub fn module_info(&self, hash: &str) -> StoreResult<ModuleInfo> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT hash, kind, size, created_at FROM modules WHERE hash = ?1")?
                .query_row([hash], |r| {
                    Ok(ModuleInfo {
                        hash: r.get(0)?,
                        kind: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                        created_at: r.get(3)?,
                    })
                })
                .optional()?
                .ok_or_else(|| StoreError::ModuleNotFound(hash.to_owned()))
        })
    }

    /// A module's bytes.
    pub fn module_bytes(&self, hash: &str) -> StoreResult<Vec<u8>> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT bytes FROM modules WHERE hash = ?1")?
                .query_row([hash], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::ModuleNotFound(hash.to_owned()))
        })
    }

    /// One workload.
    pub fn workload(&self, id: WorkloadId) -> StoreResult<WorkloadRecord> {
        self.with_reader(|c| {
            c.prepare_cached(&format!(
                "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = ?1"
            ))?
            .query_row([id.to_string()], row_to_workload)
            .optional()?
            .ok_or(StoreError::NotFound(id))?
        })
    }

    /// A page of workloads, newest first, optionally of one status.
    pub fn list_workloads(
        &self,
        limit: u64,
        offset: u64,
        status: Option<Status>,
    ) -> StoreResult<WorkloadPage> {
        self.with_reader(|c| {
            let filter = status.map(|s| s.as_str());
            let total: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM workloads WHERE ?1 IS NULL OR status = ?1")?
                .query_row([filter], |r| r.get(0))?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE ?1 IS NULL OR status = ?1 \
                 ORDER BY id DESC LIMIT ?2 OFFSET ?3"
            ))?;
            let items = stmt
                .query_map(
                    params![filter, limit as i64, offset as i64],
                    row_to_workload,
                )?
                .map(|r| r?)
                .collect::<StoreResult<Vec<_>>>()?;
            Ok(WorkloadPage {
                items,
                total: total as u64,
            })
        })
    }

    /// Up to `limit` stored lines of a workload with seq greater than `after`
    /// (all from the start when `after` is `None`), in seq order.
    pub fn read_lines(
        &self,
        id: WorkloadId,
        after: Option<u64>,
        limit: u64,
    ) -> StoreResult<Vec<LogRecord>> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, stream, level, line, continued, created_at FROM log_records \
                 WHERE workload = (SELECT key FROM workloads WHERE id = ?1) AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?;
            let after = after.map_or(-1, |a| a as i64);
            let rows = stmt.query_map(params![id.to_string(), after, limit as i64], |r| {
                let stream: i64 = r.get(1)?;
                let level: Option<String> = r.get(2)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    stream,
                    level,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, stream, level, line, continued, ts_ms) = row?;
                out.push(LogRecord {
                    workload_id: id,
                    seq: seq as u64,
                    stream: stream_from_code(stream)?,
                    level: level.map(|l| l.parse()).transpose()?,
                    line,
                    continued,
                    ts_ms,
                });
            }
            Ok(out)
        })
    }
}

fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("failed to open {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

const WORKLOAD_COLUMNS: &str = "id, status, module_hash, args, env, limits, exit_code, error, \
     output, duration_ms, line_count, created_at, started_at, finished_at";

fn row_to_workload(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoreResult<WorkloadRecord>> {
    let id: String = r.get(0)?;
    let status: String = r.get(1)?;
    let args: String = r.get(3)?;
    let env: String = r.get(4)?;
    let limits: String = r.get(5)?;
    let parse = || -> anyhow::Result<_> {
        Ok((
            id.parse::<WorkloadId>()?,
            status.parse::<Status>()?,
            serde_json::from_str(&args)?,
            serde_json::from_str(&env)?,
            serde_json::from_str(&limits)?,
        ))
    };
    let (id, status, args, env, limits) = match parse() {
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
        exit_code: r.get(6)?,
        error: r.get(7)?,
        output: r.get(8)?,
        duration_ms: r.get::<_, Option<i64>>(9)?.map(|d| d as u64),
        line_count: r.get::<_, i64>(10)? as u64,
        created_at: r.get(11)?,
        started_at: r.get(12)?,
        finished_at: r.get(13)?,
    }))
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    batch: BatchConfig,
    queue: Arc<LineQueue>,
    lost: Arc<AtomicU64>,
    /// Integer keys of workloads that may still write lines, so a line never
    /// needs a lookup; a miss falls back to the table.
    keys: WorkloadKeys,
}

/// A control operation applied in a batch, with the answer it will send.
type Pending = Box<dyn FnOnce(Option<&anyhow::Error>) + Send>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriteOp>) {
        let mut lines: Vec<Arc<LogRecord>> = Vec::new();
        let mut ops: Vec<WriteOp> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let next = match deadline {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            let (mut due, mut disconnected) = (false, false);
            match next {
                Ok(op) => {
                    due = self.take(op, &mut ops);
                    // Ops that are already waiting join this commit.
                    loop {
                        match rx.try_recv() {
                            Ok(op) => due |= self.take(op, &mut ops),
                            Err(mpsc::TryRecvError::Empty) => break,
                            Err(mpsc::TryRecvError::Disconnected) => {
                                disconnected = true;
                                break;
                            }
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => due = true,
                Err(mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
            }
            if due || disconnected {
                // Every line queued before the ops in hand is in the queue now.
                std::mem::swap(&mut *self.queue.lock(), &mut lines);
                self.commit(&mut lines, &mut ops);
                deadline = None;
            } else {
                deadline.get_or_insert_with(|| Instant::now() + self.batch.linger);
            }
            if disconnected {
                return;
            }
        }
    }

    /// Keeps `op` for the next commit; true if that commit is due now: someone
    /// waits on the op, or the line queue holds a full batch.
    fn take(&self, op: WriteOp, ops: &mut Vec<WriteOp>) -> bool {
        match op {
            WriteOp::LinesQueued => self.queue.lock().len() >= self.queue.full,
            op => {
                ops.push(op);
                true
            }
        }
    }

    fn commit(&mut self, lines: &mut Vec<Arc<LogRecord>>, ops: &mut Vec<WriteOp>) {
        if lines.is_empty() && ops.is_empty() {
            // A wake-up whose lines went out with an earlier commit.
            return;
        }
        let mut answers: Vec<Pending> = Vec::with_capacity(ops.len());
        let Writer {
            conn, lost, keys, ..
        } = self;
        let mut lines_dropped = false;
        let result = (|| -> anyhow::Result<()> {
            let mut tx = conn.transaction()?;
            if !lines.is_empty() {
                // A bad line batch must not take the status changes beside it down too.
                let sp = tx.savepoint()?;
                match insert_lines(&sp, lines, keys) {
                    Ok(unknown) => {
                        sp.commit()?;
                        if unknown > 0 {
                            lost.fetch_add(unknown, Ordering::Relaxed);
                            tracing::error!(
                                lines = unknown,
                                "log lines of an unknown workload were not stored"
                            );
                        }
                    }
                    Err(e) => {
                        lines_dropped = true;
                        lost.fetch_add(lines.len() as u64, Ordering::Relaxed);
                        tracing::error!(
                            error = format!("{e:#}"),
                            lines = lines.len(),
                            "failed to store a batch of log lines; they are lost from history"
                        );
                    }
                }
            }
            for op in ops.drain(..) {
                answers.push(apply(&tx, op, keys));
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = &result {
            // Keys assigned in the rolled-back transaction may be reused.
            keys.clear();
            if !lines_dropped {
                lost.fetch_add(lines.len() as u64, Ordering::Relaxed);
            }
            tracing::error!(
                error = format!("{e:#}"),
                "failed to commit a database batch"
            );
        }
        lines.clear();
        // A failed commit turns every answer into that failure.
        for answer in answers {
            answer(result.as_ref().err());
        }
        for op in ops.drain(..) {
            // Only reached if the transaction could not even start.
            apply_failed(op, result.as_ref().err());
        }
    }
}

/// Rows per multi-row INSERT: one statement execution per this many lines
/// (SQLite's per-statement cost dominates small rows); 7 parameters each stays
/// well under SQLite's parameter limit.
const ROWS_PER_INSERT: usize = 256;

/// Inserts `lines`; returns how many were skipped because their workload is
/// not in the table.
fn insert_lines(
    tx: &Connection,
    lines: &[Arc<LogRecord>],
    keys: &mut WorkloadKeys,
) -> anyhow::Result<u64> {
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
    let mut keyed = Vec::with_capacity(lines.len());
    // Lines arrive in long runs of one workload: one key lookup per run.
    let mut last: Option<(WorkloadId, Option<i64>)> = None;
    for r in lines {
        let key = match last {
            Some((id, key)) if id == r.workload_id => key,
            _ => last.insert((r.workload_id, keys.get(tx, r.workload_id)?)).1,
        };
        if let Some(key) = key {
            keyed.push((key, &**r));
        }
    }
    let unknown = (lines.len() - keyed.len()) as u64;
    let mut chunks = keyed.chunks_exact(ROWS_PER_INSERT);
    let mut many = None;
    for chunk in &mut chunks {
        let stmt = match &mut many {
            Some(stmt) => stmt,
            None => many.insert(tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?),
        };
        for (row, (key, r)) in chunk.iter().enumerate() {
            bind_line(stmt, row * 7, *key, r)?;
        }
        stmt.raw_execute()?;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        for (key, r) in rest {
            bind_line(&mut one, 0, *key, r)?;
            one.raw_execute()?;
        }
    }
    Ok(unknown)
}

/// Binds one line's seven values at parameters `first + 1 ..= first + 7`.
fn bind_line(
    stmt: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    key: i64,
    r: &LogRecord,
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

/// The integer key of each workload the writer created and has not finished.
#[derive(Default)]
struct WorkloadKeys(std::collections::HashMap<WorkloadId, i64>);

impl WorkloadKeys {
    /// The workload's key, from memory or else the table; `None` if it does not exist.
    fn get(&mut self, tx: &Connection, id: WorkloadId) -> rusqlite::Result<Option<i64>> {
        if let Some(key) = self.0.get(&id) {
            return Ok(Some(*key));
        }
        let key = tx
            .prepare_cached("SELECT key FROM workloads WHERE id = ?1")?
            .query_row([id.to_string()], |r| r.get(0))
            .optional()?;
        if let Some(key) = key {
            self.0.insert(id, key);
        }
        Ok(key)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// How a stream is stored in `log_records.stream`.
fn stream_code(stream: LogStream) -> i64 {
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

/// Applies one control op inside the batch transaction; returns how to answer it.
fn apply(tx: &Connection, op: WriteOp, keys: &mut WorkloadKeys) -> Pending {
    fn answer<T: Send + 'static>(
        reply: oneshot::Sender<StoreResult<T>>,
        result: StoreResult<T>,
    ) -> Pending {
        Box::new(move |commit_error| {
            let result = match commit_error {
                Some(e) => Err(anyhow::anyhow!("commit failed: {e:#}").into()),
                None => result,
            };
            let _ = reply.send(result);
        })
    }
    match op {
        WriteOp::LinesQueued => unreachable!("a wake-up is not applied"),
        WriteOp::Flush { reply } => Box::new(move |_| {
            let _ = reply.send(());
        }),
        WriteOp::PutModule { info, bytes, reply } => {
            let result = tx
                .execute(
                    "INSERT OR IGNORE INTO modules (hash, kind, size, bytes, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        info.hash,
                        info.kind,
                        info.size as i64,
                        &bytes[..],
                        info.created_at
                    ],
                )
                .map(|n| n == 1)
                .map_err(StoreError::from);
            answer(reply, result)
        }
        WriteOp::Create { new, reply } => {
            let id = new.id;
            let result = create(tx, new);
            if result.is_ok() {
                keys.0.insert(id, tx.last_insert_rowid());
            }
            answer(reply, result)
        }
        WriteOp::Transition {
            id,
            to,
            completion,
            reply,
        } => {
            let result = transition(tx, id, to, completion);
            if to.is_terminal() {
                // Its last line came before this, through the same queue.
                keys.0.remove(&id);
            }
            answer(reply, result)
        }
        WriteOp::FailUnfinished { reason, reply } => {
            let result = tx
                .execute(
                    "UPDATE workloads SET status = 'failed', error = ?1, finished_at = ?2, \
                     duration_ms = CASE WHEN started_at IS NULL THEN NULL ELSE ?2 - started_at END \
                     WHERE status IN ('pending', 'running')",
                    params![reason, now_ms()],
                )
                .map(|n| n as u64)
                .map_err(StoreError::from);
            answer(reply, result)
        }
    }
}

fn apply_failed(op: WriteOp, e: Option<&anyhow::Error>) {
    let msg = e.map_or_else(|| "not applied".to_owned(), |e| format!("{e:#}"));
    let err = || StoreError::Internal(anyhow::anyhow!("database write failed: {msg}"));
    match op {
        WriteOp::LinesQueued => {}
        WriteOp::Flush { reply } => drop(reply.send(())),
        WriteOp::PutModule { reply, .. } => drop(reply.send(Err(err()))),
        WriteOp::Create { reply, .. } => drop(reply.send(Err(err()))),
        WriteOp::Transition { reply, .. } => drop(reply.send(Err(err()))),
        WriteOp::FailUnfinished { reply, .. } => drop(reply.send(Err(err()))),
    }
}

fn create(tx: &Connection, new: NewWorkload) -> StoreResult<()> {
    let known: bool = tx
        .prepare_cached("SELECT 1 FROM modules WHERE hash = ?1")?
        .query_row([&new.module_hash], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return Err(StoreError::ModuleNotFound(new.module_hash));
    }
    tx.prepare_cached(
        "INSERT INTO workloads (id, status, module_hash, args, env, limits, created_at) \
         VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        new.id.to_string(),
        new.module_hash,
        serde_json::to_string(&new.args).map_err(anyhow::Error::from)?,
        serde_json::to_string(&new.env).map_err(anyhow::Error::from)?,
        serde_json::to_string(&new.limits).map_err(anyhow::Error::from)?,
        now_ms()
    ])?;
    Ok(())
}

fn transition(
    tx: &Connection,
    id: WorkloadId,
    to: Status,
    completion: Option<Completion>,
) -> StoreResult<()> {
    let key = id.to_string();
    let from: Status = tx
        .prepare_cached("SELECT status FROM workloads WHERE id = ?1")?
        .query_row([&key], |r| r.get::<_, String>(0))
        .optional()?
        .ok_or(StoreError::NotFound(id))?
        .parse()?;
    if !from.can_become(to) {
        return Err(StoreError::IllegalTransition { id, from, to });
    }
    let now = now_ms();
    match completion {
        None => {
            tx.prepare_cached("UPDATE workloads SET status = ?1, started_at = ?2 WHERE id = ?3")?
                .execute(params![to.as_str(), now, key])?;
        }
        Some(c) => {
            tx.prepare_cached(
                "UPDATE workloads SET status = ?1, exit_code = ?2, error = ?3, output = ?4, \
                 duration_ms = ?5, line_count = ?6, finished_at = ?7 WHERE id = ?8",
            )?
            .execute(params![
                to.as_str(),
                c.exit_code,
                c.error,
                c.output,
                c.duration_ms as i64,
                c.line_count as i64,
                now,
                key
            ])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
