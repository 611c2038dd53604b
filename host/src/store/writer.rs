//! The writer thread: the only connection that writes, and the SQL of every write.
//!
//! Control ops (a new workload, a status change, …) arrive on a channel; lines
//! wait in the [`LineQueue`]. A commit takes the ops in hand, every line of each
//! workload an op ends (so a terminal status always follows its lines), and a
//! fair share of everyone else's lines, and writes them in one `BEGIN IMMEDIATE`
//! transaction. Only then are the lines published live and their room given back.
//!
//! Faults: `SQLITE_BUSY`/`LOCKED` are retried until they pass. Any other failure
//! is permanent for what was in the transaction: its lines are dropped and their
//! workloads fail (`failure: store`), the ops are tried once more without lines,
//! and a terminal status that still cannot be written is kept and retried until
//! the store accepts it, so no workload stays `running` because of a fault.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::queue::{LineQueue, Taken};
use super::{ModuleInfo, NewWorkload, StoreError, StoreResult, stream_code};
use crate::workload::{Completion, Status, WorkloadId, now_ms};

/// How often a terminal status that could not be written is tried again.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Longest pause between two attempts of a transaction that found the database busy.
const MAX_BUSY_BACKOFF: Duration = Duration::from_millis(200);

/// Work for the writer thread.
pub(super) enum WriteOp {
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
        /// `None` for a terminal status the writer retries on its own.
        reply: Option<oneshot::Sender<StoreResult<()>>>,
    },
    FailUnfinished {
        reason: String,
        reply: oneshot::Sender<StoreResult<u64>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Caps the database's size in pages, as a full disk would (tests only).
    #[cfg(test)]
    PageLimit {
        pages: Option<u64>,
        reply: oneshot::Sender<()>,
    },
}

impl WriteOp {
    /// The workload whose lines must be committed with (before) this op.
    fn ends(&self) -> Option<WorkloadId> {
        match self {
            WriteOp::Transition { id, to, .. } if to.is_terminal() => Some(*id),
            _ => None,
        }
    }
}

/// What an applied op answers.
enum Applied {
    Unit,
    Bool(bool),
    Count(u64),
}

/// Counters the writer keeps.
#[derive(Default)]
pub(super) struct WriterStats {
    /// Attempts that found the database busy and were retried.
    pub(super) busy_retries: AtomicU64,
}

/// How the writer groups and retries.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most lines in one transaction (besides those of a workload that ends in it).
    pub max_batch: usize,
    /// Longest a line waits for companions before it is committed.
    pub linger: Duration,
    /// How long one attempt waits for a lock held by another connection.
    pub busy_timeout: Duration,
    /// Most bytes of lines one workload may have waiting for the store.
    pub lane_bytes: usize,
    /// Most bytes of lines all workloads together may have waiting.
    pub total_bytes: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            linger: Duration::from_millis(5),
            busy_timeout: Duration::from_secs(5),
            lane_bytes: 1 << 20,
            total_bytes: 64 << 20,
        }
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) config: WriterConfig,
    pub(super) queue: Arc<LineQueue>,
    pub(super) stats: Arc<WriterStats>,
    /// Integer keys of workloads that may still write lines, so a line never
    /// needs a lookup; a miss falls back to the table.
    pub(super) keys: WorkloadKeys,
    /// Terminal statuses that could not be written yet.
    pub(super) retained: Vec<(WorkloadId, Completion)>,
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriteOp>) {
        let mut ops: Vec<WriteOp> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            // A backlog of full batches is committed back to back; ops that
            // arrive meanwhile join the next one.
            let backlog = self.queue.has_full_batch();
            let wake = match (deadline, self.retained.is_empty()) {
                (Some(d), true) => Some(d),
                (Some(d), false) => Some(d.min(Instant::now() + RETRY_INTERVAL)),
                (None, false) => Some(Instant::now() + RETRY_INTERVAL),
                (None, true) => None,
            };
            let next = if backlog {
                rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
                })
            } else {
                match wake {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                }
            };
            let (mut due, mut disconnected) = (backlog, false);
            match next {
                Ok(op) => {
                    due |= self.take(op, &mut ops);
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
                self.commit(&mut ops, disconnected);
                // Lines left behind by a fair batch wait at most one more linger.
                deadline = (self.queue.lines() > 0).then(|| Instant::now() + self.config.linger);
            } else {
                deadline.get_or_insert_with(|| Instant::now() + self.config.linger);
            }
            if disconnected {
                return;
            }
        }
    }

    /// Keeps `op` for the next commit; true if that commit is due now: someone
    /// waits on the op, or the line queue holds a full batch.
    fn take(&mut self, op: WriteOp, ops: &mut Vec<WriteOp>) -> bool {
        match op {
            WriteOp::LinesQueued => self.queue.has_full_batch(),
            #[cfg(test)]
            WriteOp::PageLimit { pages, reply } => {
                // SQLite's default maximum, to lift the cap.
                let pages = pages.unwrap_or(4_294_967_294);
                if let Err(e) = self
                    .conn
                    .pragma_update(None, "max_page_count", pages as i64)
                {
                    tracing::error!(error = %e, "failed to set max_page_count");
                }
                let _ = reply.send(());
                false
            }
            op => {
                ops.push(op);
                true
            }
        }
    }

    /// Commits the ops in hand with the lines they need and a fair batch of
    /// the rest; `everything` takes every queued line (the last commit).
    fn commit(&mut self, ops: &mut Vec<WriteOp>, everything: bool) {
        for (id, completion) in self.retained.drain(..) {
            ops.push(WriteOp::Transition {
                id,
                to: completion.status,
                completion: Some(completion),
                reply: None,
            });
        }
        let mut taken = Taken::default();
        if everything || ops.iter().any(|op| matches!(op, WriteOp::Flush { .. })) {
            self.queue.take_all(&mut taken);
        } else {
            for id in ops.iter().filter_map(WriteOp::ends) {
                self.queue.take_lane(id, &mut taken);
            }
            self.queue.take_fair(self.config.max_batch, &mut taken);
        }
        if taken.is_empty() && ops.is_empty() {
            // A wake-up whose lines went out with an earlier commit.
            return;
        }
        let error = match self.attempt_until_not_busy(Some(&taken), ops) {
            Ok(results) => {
                self.queue.committed(taken);
                self.answer(ops, results);
                return;
            }
            Err(e) => e,
        };
        let why = describe(&error);
        if !taken.is_empty() {
            tracing::error!(error = %why, lines = taken.len(), "failed to commit a batch of log lines");
            self.queue.failed(taken, &why);
        }
        if ops.is_empty() {
            return;
        }
        // Without the lines, the ops may still go through (and a terminal status
        // now records the store failure of its workload).
        match self.attempt_until_not_busy(None, ops) {
            Ok(results) => self.answer(ops, results),
            Err(e) => {
                let why = describe(&e);
                tracing::error!(error = %why, ops = ops.len(), "failed to commit database changes");
                let full = is_full(&e);
                for op in ops.drain(..) {
                    self.refuse(op, &why, full);
                }
            }
        }
    }

    /// Tries the transaction until it fails for another reason than a busy database.
    fn attempt_until_not_busy(
        &mut self,
        lines: Option<&Taken>,
        ops: &[WriteOp],
    ) -> Result<Vec<StoreResult<Applied>>, rusqlite::Error> {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.attempt(lines, ops) {
                Err(e) if is_busy(&e) => {
                    self.stats.busy_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "the database is busy; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BUSY_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// One transaction: the lines, then each op; an op's own refusal (e.g. an
    /// illegal transition) is its answer and does not fail the others.
    fn attempt(
        &mut self,
        lines: Option<&Taken>,
        ops: &[WriteOp],
    ) -> Result<Vec<StoreResult<Applied>>, rusqlite::Error> {
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(lines) = lines {
                let unknown = insert_lines(&tx, lines, &mut self.keys)?;
                if unknown > 0 {
                    self.queue.lost.fetch_add(unknown, Ordering::Relaxed);
                    tracing::error!(
                        lines = unknown,
                        "log lines of an unknown workload were not stored"
                    );
                }
            }
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                let result = apply(&tx, op, &mut self.keys, &self.queue);
                if let Err(StoreError::StorageFull(_)) = result {
                    // SQLite may have rolled the whole transaction back: it
                    // fails as a whole, and the caller decides what to retry.
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                        None,
                    ));
                }
                results.push(result);
            }
            tx.commit()?;
            Ok(results)
        })();
        if result.is_err() {
            // Keys assigned in the rolled-back transaction may be reused.
            self.keys.clear();
        }
        result
    }

    /// Sends each op its result after a successful commit.
    fn answer(&mut self, ops: &mut Vec<WriteOp>, results: Vec<StoreResult<Applied>>) {
        for (op, result) in ops.drain(..).zip(results) {
            match (op, result) {
                // The statement itself hit the fault (e.g. a full disk): keep it.
                (
                    op @ WriteOp::Transition { .. },
                    Err(e @ (StoreError::StorageFull(_) | StoreError::Internal(_))),
                ) if op.ends().is_some() => {
                    let full = matches!(e, StoreError::StorageFull(_));
                    self.refuse(op, &e.to_string(), full);
                }
                (op @ WriteOp::Transition { .. }, r) => {
                    if let Some(id) = op.ends() {
                        // Its last line came before this; closing the lane ends live delivery.
                        self.keys.remove(id);
                        self.queue.close(id);
                    }
                    if let WriteOp::Transition {
                        reply: Some(reply), ..
                    } = op
                    {
                        let _ = reply.send(r.map(|_| ()));
                    }
                }
                (WriteOp::PutModule { reply, .. }, r) => {
                    let _ = reply.send(r.map(|a| matches!(a, Applied::Bool(true))));
                }
                (WriteOp::Create { reply, .. }, r) => {
                    let _ = reply.send(r.map(|_| ()));
                }
                (WriteOp::FailUnfinished { reply, .. }, r) => {
                    let _ = reply.send(r.map(|a| match a {
                        Applied::Count(n) => n,
                        _ => 0,
                    }));
                }
                (WriteOp::Flush { reply }, _) => {
                    let _ = reply.send(());
                }
                (WriteOp::LinesQueued, _) => {}
                #[cfg(test)]
                (WriteOp::PageLimit { .. }, _) => {}
            }
        }
    }

    /// Answers an op that could not be committed; keeps a terminal status to
    /// write as soon as the store accepts it.
    fn refuse(&mut self, op: WriteOp, why: &str, full: bool) {
        let err = || -> StoreError {
            if full {
                StoreError::StorageFull(why.to_owned())
            } else {
                StoreError::Internal(anyhow::anyhow!("database write failed: {why}"))
            }
        };
        match op {
            // Its lane stays open, so a store failure of its lines is applied
            // again when it is retried.
            WriteOp::Transition {
                id,
                to,
                completion: Some(completion),
                reply,
            } if to.is_terminal() => {
                self.retained.push((id, completion));
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err()));
                }
            }
            WriteOp::Transition { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err()));
                }
            }
            WriteOp::PutModule { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::Create { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::FailUnfinished { reply, .. } => drop(reply.send(Err(err()))),
            WriteOp::Flush { reply } => drop(reply.send(())),
            WriteOp::LinesQueued => {}
            #[cfg(test)]
            WriteOp::PageLimit { reply, .. } => drop(reply.send(())),
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// A failure as the workloads it ends will report it.
fn describe(e: &rusqlite::Error) -> String {
    if is_full(e) {
        "the database or disk is full".to_owned()
    } else {
        e.to_string()
    }
}

/// Rows per multi-row INSERT: one statement execution per this many lines
/// (SQLite's per-statement cost dominates small rows); 7 parameters each stays
/// well under SQLite's parameter limit.
const ROWS_PER_INSERT: usize = 256;

/// Inserts the taken lines; returns how many were skipped because their
/// workload is not in the table.
fn insert_lines(tx: &Connection, taken: &Taken, keys: &mut WorkloadKeys) -> rusqlite::Result<u64> {
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
    let mut keyed = Vec::with_capacity(taken.len());
    let mut unknown = 0;
    for lane in &taken.lanes {
        match keys.get(tx, lane.workload)? {
            Some(key) => keyed.extend(lane.lines.iter().map(|r| (key, &**r))),
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

/// The integer key of each workload the writer created and has not finished.
#[derive(Default)]
pub(super) struct WorkloadKeys(HashMap<WorkloadId, i64>);

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

    fn remove(&mut self, id: WorkloadId) {
        self.0.remove(&id);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Applies one control op inside the transaction.
fn apply(
    tx: &Connection,
    op: &WriteOp,
    keys: &mut WorkloadKeys,
    queue: &LineQueue,
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
        WriteOp::Create { new, .. } => {
            create(tx, new)?;
            keys.0.insert(new.id, tx.last_insert_rowid());
            Ok(Applied::Unit)
        }
        WriteOp::Transition {
            id, to, completion, ..
        } => {
            // Some of its lines are not stored: it cannot have completed.
            let failed = match (completion, queue.failure(*id)) {
                (Some(c), Some(why)) => {
                    let mut c = c.clone();
                    c.store_failure(&why);
                    Some(c)
                }
                _ => None,
            };
            let completion = failed.as_ref().or(completion.as_ref());
            let to = completion.map_or(*to, |c| c.status);
            transition(tx, *id, to, completion)?;
            Ok(Applied::Unit)
        }
        WriteOp::FailUnfinished { reason, .. } => Ok(Applied::Count(fail_unfinished(tx, reason)?)),
        WriteOp::LinesQueued | WriteOp::Flush { .. } => Ok(Applied::Unit),
        #[cfg(test)]
        WriteOp::PageLimit { .. } => Ok(Applied::Unit),
    }
}

/// Ends every pending or running workload as failed, as a restart finds them:
/// their line count and end time come from the lines that were stored.
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
             WHERE status IN ('pending', 'running')"
        ))?
        .execute([reason])?;
    Ok(n as u64)
}

fn create(tx: &Connection, new: &NewWorkload) -> StoreResult<()> {
    let known: bool = tx
        .prepare_cached("SELECT 1 FROM modules WHERE hash = ?1")?
        .query_row([&new.module_hash], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return Err(StoreError::ModuleNotFound(new.module_hash.clone()));
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
    completion: Option<&Completion>,
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
                 duration_ms = ?5, line_count = ?6, finished_at = ?7, failure = ?8 WHERE id = ?9",
            )?
            .execute(params![
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
