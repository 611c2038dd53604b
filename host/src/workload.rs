//! What a workload is: its id, what it was asked to run, its lifecycle states
//! and its final record. Plain data shared by every stage; no I/O here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outbound::OutboundRule;

/// A workload's id: a ULID, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(ulid::Ulid);

impl WorkloadId {
    /// A fresh id.
    #[expect(
        clippy::new_without_default,
        reason = "a fresh random id is not a default"
    )]
    pub fn new() -> Self {
        // Monotonic within a millisecond too, so ids sort in creation order.
        static GENERATOR: std::sync::Mutex<Option<ulid::Generator>> = std::sync::Mutex::new(None);
        let mut guard = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
        let generator = guard.get_or_insert_with(ulid::Generator::new);
        Self(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()))
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An id that is not a ULID.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a workload id (expected a 26-character ULID)")]
pub struct BadWorkloadId(String);

impl FromStr for WorkloadId {
    type Err = BadWorkloadId;
    fn from_str(s: &str) -> Result<Self, BadWorkloadId> {
        ulid::Ulid::from_string(s)
            .map(Self)
            .map_err(|_| BadWorkloadId(s.chars().take(64).collect()))
    }
}

impl Serialize for WorkloadId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WorkloadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Resource limits enforced on one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock time before the workload is stopped as timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Largest linear memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    /// Units of wasm fuel before the workload is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Bytes of stdout plus stderr before the workload is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

impl Limits {
    /// The timeout as a `Duration`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

/// A host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preopen {
    /// Directory on the host.
    pub host: PathBuf,
    /// Where the guest sees it (`/` allowed).
    pub guest: String,
    /// Whether the guest may create, change or delete files in it.
    pub writable: bool,
}

/// Where the guest's standard input comes from.
#[derive(Debug, Clone, Default)]
pub enum Stdin {
    /// No input: the guest reads end-of-file.
    #[default]
    Empty,
    /// These bytes, then end-of-file.
    Bytes(Vec<u8>),
    /// The host process's own stdin, streamed (used by `vulcan run`).
    Inherit,
}

/// Everything needed to run one workload, besides the module itself.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSpec {
    /// Full argv, argv[0] included.
    pub args: Vec<String>,
    /// Exactly the environment the guest sees, in order.
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Stdin,
    /// Directories the guest may see; nothing else of the host filesystem is visible.
    pub preopens: Vec<Preopen>,
    /// Enforced limits.
    pub limits: Limits,
    /// Input: a Vulcan-world workload's `run` argument; a plain WASI
    /// workload's stdin when `stdin` is empty.
    pub input: Option<Vec<u8>>,
    /// SDK `log` records below this level are dropped (not stored, not numbered).
    pub log_level: Option<LogLevel>,
    /// Hosts a component may send HTTP requests to; empty: none.
    pub allowed_hosts: Vec<OutboundRule>,
    /// The tenant it runs for; `None` on a server without tenants.
    pub tenant: Option<String>,
    /// The schedule whose firing created it, if one did.
    pub schedule: Option<String>,
    /// When its failed attempts run again; `None`: never.
    pub retry: Option<RetryPolicy>,
}

/// A workload's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, not started.
    Pending,
    /// Executing.
    Running,
    /// Ran to its end with exit code 0.
    Completed,
    /// Ended any other way: non-zero exit, trap, timeout or a limit.
    Failed,
    /// Stopped on request.
    Killed,
}

impl Status {
    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Killed => "killed",
        }
    }

    /// True for the states a workload never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Killed)
    }

    /// Whether the lifecycle allows moving from `self` to `to`.
    pub fn can_become(self, to: Status) -> bool {
        matches!(
            (self, to),
            (Status::Pending, Status::Running)
                | (Status::Pending, Status::Failed | Status::Killed)
                | (
                    Status::Running,
                    Status::Completed | Status::Failed | Status::Killed
                )
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "killed" => Status::Killed,
            other => anyhow::bail!(
                "unknown status `{other}` (expected pending, running, completed, failed or killed)"
            ),
        })
    }
}

/// Severity of a structured log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Finest-grained tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal information.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    /// Every level, lowest first.
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
    ];

    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl FromStr for LogLevel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        LogLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown log level `{s}`"))
    }
}

/// Why a workload did not complete: one kind per way a run can end badly, so
/// that callers branch on the kind and never on an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The guest exited with a non-zero code.
    Exit,
    /// The wall-clock limit passed.
    Timeout,
    /// Linear memory would have grown past its limit.
    Memory,
    /// The guest used up its fuel.
    Fuel,
    /// The guest wrote more than its output limit.
    Output,
    /// The guest trapped.
    Trap,
    /// An SDK workload's `run` returned an error.
    ReturnedError,
    /// Stopped on request.
    Killed,
    /// Its log lines could not be stored (e.g. the disk is full).
    Store,
    /// The host failed around the guest (setup, a crash, a restart).
    Host,
    /// The node running it was lost (cluster mode).
    NodeLost,
    /// It waited in the queue past its `queue_timeout_ms` and never started.
    QueueTimeout,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 12] = [
        FailureKind::Exit,
        FailureKind::Timeout,
        FailureKind::Memory,
        FailureKind::Fuel,
        FailureKind::Output,
        FailureKind::Trap,
        FailureKind::ReturnedError,
        FailureKind::Killed,
        FailureKind::Store,
        FailureKind::Host,
        FailureKind::NodeLost,
        FailureKind::QueueTimeout,
    ];

    /// The stable snake_case name used in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Exit => "exit",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Fuel => "fuel",
            FailureKind::Output => "output",
            FailureKind::Trap => "trap",
            FailureKind::ReturnedError => "returned_error",
            FailureKind::Killed => "killed",
            FailureKind::Store => "store",
            FailureKind::Host => "host",
            FailureKind::NodeLost => "node_lost",
            FailureKind::QueueTimeout => "queue_timeout",
        }
    }
}

impl FromStr for FailureKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        FailureKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown failure kind `{s}`"))
    }
}

impl FailureKind {
    /// Whether a policy may retry this kind: a kill, a queue timeout (it
    /// never ran) and lost lines (its log would have a hole) are final.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            FailureKind::Killed | FailureKind::QueueTimeout | FailureKind::Store
        )
    }
}

/// When a failed attempt runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retried).
    pub max_attempts: u32,
    /// Backoff before the second attempt; it doubles for each later one.
    pub backoff_ms: u64,
    /// The backoff never grows past this.
    pub max_backoff_ms: u64,
    /// Failure kinds that are retried.
    pub on: Vec<FailureKind>,
}

/// One earlier attempt of a workload, as its record keeps it and the API
/// shows it (times in RFC 3339 both ways).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its number, from 1.
    pub attempt: u32,
    /// When it started, ms since the Unix epoch.
    #[serde(with = "crate::workload::ms_as_rfc3339::option")]
    pub started_at: Option<i64>,
    /// When it ended.
    #[serde(with = "crate::workload::ms_as_rfc3339")]
    pub ended_at: i64,
    /// How long it ran.
    pub duration_ms: u64,
    /// Its exit code, when it exited.
    pub exit_code: Option<i32>,
    /// How it failed.
    pub failure: Option<FailureKind>,
    /// Why (cut to a kilobyte).
    pub error: Option<String>,
    /// The seq of its first line: seqs go on across attempts.
    pub first_seq: u64,
    /// How many lines it wrote (seqs `first_seq..first_seq + lines`).
    pub lines: u64,
    /// When the next attempt may start.
    #[serde(with = "crate::workload::ms_as_rfc3339")]
    pub retry_at: i64,
}

/// A workload as stored: its spec summary, state and result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// Its id.
    pub id: WorkloadId,
    /// Lifecycle state.
    pub status: Status,
    /// `sha256:<hex>` of the module it runs.
    pub module_hash: String,
    /// The argv it was given.
    pub args: Vec<String>,
    /// The environment it was given.
    pub env: Vec<(String, String)>,
    /// Its limits.
    pub limits: Limits,
    /// Hosts it may send HTTP requests to.
    pub allowed_hosts: Vec<OutboundRule>,
    /// Its minimum SDK log level.
    pub log_level: Option<LogLevel>,
    /// The guest's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Why it failed or was killed.
    pub error: Option<String>,
    /// What kind of failure ended it; `None` while running and on success.
    pub failure: Option<FailureKind>,
    /// Bytes an SDK workload returned.
    pub output: Option<Vec<u8>>,
    /// Wall-clock run time.
    pub duration_ms: Option<u64>,
    /// Records it wrote (the next seq).
    pub line_count: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_at: i64,
    /// Start time, ms since the Unix epoch.
    pub started_at: Option<i64>,
    /// End time, ms since the Unix epoch; set on every terminal status.
    pub finished_at: Option<i64>,
    /// The tenant it runs for; `None` on a server without tenants.
    pub tenant: Option<String>,
    /// When retention deleted its lines, ms since the Unix epoch.
    pub pruned_at: Option<i64>,
    /// When it was queued (it waited for a slot), ms since the Unix epoch.
    pub queued_at: Option<i64>,
    /// The schedule whose firing created it.
    pub schedule: Option<String>,
    /// When its failed attempts run again.
    pub retry: Option<RetryPolicy>,
    /// Its current (or last) attempt, from 1.
    pub attempt: u32,
    /// Its earlier attempts, oldest first.
    pub attempts: Vec<Attempt>,
}

/// The final state a finished run writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Completed, failed or killed.
    pub status: Status,
    /// The guest's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// What kind of failure it was, if any.
    pub failure: Option<FailureKind>,
    /// Returned bytes, for SDK workloads.
    pub output: Option<Vec<u8>>,
    /// Wall-clock run time.
    pub duration_ms: u64,
    /// Records written.
    pub line_count: u64,
}

impl Completion {
    /// A failure that happened on the host's side, outside the guest.
    pub fn host_failure(error: String, line_count: u64) -> Self {
        Self {
            status: Status::Failed,
            exit_code: None,
            error: Some(error),
            failure: Some(FailureKind::Host),
            output: None,
            duration_ms: 0,
            line_count,
        }
    }

    /// Turns this into a failure because the workload's lines could not be
    /// stored: whatever the guest did, it did not complete with its whole log.
    pub fn store_failure(&mut self, why: &str) {
        self.status = Status::Failed;
        self.failure = Some(FailureKind::Store);
        self.error = Some(format!("its log lines could not be stored: {why}"));
    }
}

/// What a queued workload needs to run beyond its record: the bytes it is
/// given and how long it may wait. Kept with its pending record, so the
/// queue survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedInput {
    /// Its stdin, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Its input, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_base64: Option<String>,
    /// When it fails with `queue_timeout` if it has not started, ms since
    /// the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// A retry waiting out its backoff: not started before this, ms since
    /// the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    /// Read back without its bytes, it had stdin or input (never stored).
    #[serde(skip)]
    pub has_bytes: bool,
}

impl QueuedInput {
    /// What `spec` needs kept to run later, with its queue deadline.
    pub fn of(spec: &WorkloadSpec, deadline_ms: Option<i64>) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let stdin_base64 = match &spec.stdin {
            Stdin::Bytes(b) => Some(b64.encode(b)),
            _ => None,
        };
        let input_base64 = spec.input.as_ref().map(|b| b64.encode(b));
        Self {
            has_bytes: stdin_base64.is_some() || input_base64.is_some(),
            stdin_base64,
            input_base64,
            deadline_ms,
            not_before_ms: None,
        }
    }

    /// Its stdin and input, decoded.
    pub fn bytes(&self) -> anyhow::Result<(Stdin, Option<Vec<u8>>)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |s: &Option<String>| s.as_deref().map(|s| b64.decode(s)).transpose();
        let stdin = match decode(&self.stdin_base64)? {
            Some(bytes) => Stdin::Bytes(bytes),
            None => Stdin::Empty,
        };
        Ok((stdin, decode(&self.input_base64)?))
    }

    /// The spec a queued record runs with: the record's, with these bytes.
    pub fn spec(&self, record: &WorkloadRecord) -> anyhow::Result<WorkloadSpec> {
        let (stdin, input) = self.bytes()?;
        Ok(WorkloadSpec {
            args: record.args.clone(),
            env: record.env.clone(),
            stdin,
            preopens: Vec::new(),
            limits: record.limits.clone(),
            input,
            log_level: record.log_level,
            allowed_hosts: record.allowed_hosts.clone(),
            tenant: record.tenant.clone(),
            schedule: record.schedule.clone(),
            retry: record.retry.clone(),
        })
    }
}

/// An idempotent submission's key and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The client's key.
    pub key: String,
    /// A digest of the submission (module and spec): the same key with
    /// another fingerprint is a conflict.
    pub fingerprint: String,
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds since the Unix epoch of an RFC 3339 time [`rfc3339`] wrote.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// A time kept as ms since the Unix epoch, written as RFC 3339 (for
/// `#[serde(with)]`): what the API shows is what is stored.
pub mod ms_as_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `ms` as RFC 3339.
    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*ms))
    }

    /// Reads an RFC 3339 time as ms.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_rfc3339(&text)
            .ok_or_else(|| D::Error::custom(format!("`{text}` is not an RFC 3339 time")))
    }

    /// The same for an optional time.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

        /// Writes `ms`, if any, as RFC 3339.
        pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => s.serialize_str(&super::super::rfc3339(*ms)),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional RFC 3339 time as ms.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(text) => super::super::parse_rfc3339(&text)
                    .map(Some)
                    .ok_or_else(|| D::Error::custom(format!("`{text}` is not an RFC 3339 time"))),
                None => Ok(None),
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a list of workloads asks for.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Most items.
    pub limit: u64,
    /// Items skipped (after `before`, when given).
    pub offset: u64,
    /// Only workloads created before this one (keyset paging: the last id
    /// of the previous page).
    pub before: Option<WorkloadId>,
    /// Only workloads with this status.
    pub status: Option<Status>,
    /// Only this tenant's workloads (an admin's filter; a tenant's own
    /// lists are always its own).
    pub tenant: Option<String>,
}

impl ListRequest {
    /// Everyone's workloads, `limit` of them after the newest `offset`.
    pub fn page(limit: u64, offset: u64) -> Self {
        Self {
            limit,
            offset,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_kind_reads_back_from_its_name_and_serde_agrees() {
        for kind in FailureKind::ALL {
            assert_eq!(kind.as_str().parse::<FailureKind>().unwrap(), kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        assert!("nope".parse::<FailureKind>().is_err());
    }

    #[test]
    fn every_log_level_and_stream_reads_back_from_its_name_and_serde_agrees() {
        for level in LogLevel::ALL {
            assert_eq!(level.as_str().parse::<LogLevel>().unwrap(), level);
            assert_eq!(serde_json::to_value(level).unwrap(), level.as_str());
        }
        for stream in crate::logs::LogStream::ALL {
            assert_eq!(
                stream.as_str().parse::<crate::logs::LogStream>().unwrap(),
                stream
            );
            assert_eq!(serde_json::to_value(stream).unwrap(), stream.as_str());
        }
        assert!("loud".parse::<LogLevel>().is_err());
    }
}
