//! The read model: how a workload and its lines look to every client.
//!
//! The API serializes these types (JSON bodies, SSE `end` and `?format=json`
//! events); the CLI deserializes them from a server or builds them from its
//! local database, and prints them one way. One shape per thing, so a field
//! cannot mean one thing locally and another against a server. Builds views
//! from records; never reads or writes storage itself.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::logs::{Fields, LogLevel, LogRecord, LogStream};
use crate::outbound::OutboundRule;
use crate::store::ModuleInfo;
use crate::workload::{Attempt, RetryPolicy};
use crate::workload::{Completion, FailureKind, Limits, Status, WorkloadId, WorkloadRecord};

/// A workload as a list shows it: its state and result, without its spec or
/// output, so that a page stays small whatever the workloads were given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSummary {
    /// Its id.
    pub id: WorkloadId,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// `sha256:<hex>` of its module.
    pub module: String,
    /// The guest's exit code, when it has one.
    pub exit_code: Option<i32>,
    /// Why it failed; in a list, only the first line, at most
    /// [`SUMMARY_ERROR_CHARS`] characters.
    pub error: Option<String>,
    /// What kind of failure ended it (null on success).
    pub failure: Option<FailureKind>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
    /// How many log records it wrote.
    pub line_count: u64,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it started running (RFC 3339).
    pub started_at: Option<String>,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// The cluster node that claimed it (cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Which attempt it is on: with a retry policy, from 1; in a cluster,
    /// how many times a node has claimed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The tenant it runs for (servers with tenants only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// When retention deleted its lines (RFC 3339); its logs then answer 410.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_at: Option<String>,
    /// When it was queued for want of a free slot (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
    /// The schedule whose firing created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// Longest error a list item carries; the record has the whole one.
pub const SUMMARY_ERROR_CHARS: usize = 200;

impl From<WorkloadRecord> for WorkloadSummary {
    fn from(w: WorkloadRecord) -> Self {
        Self {
            id: w.id,
            status: w.status,
            module: w.module_hash,
            exit_code: w.exit_code,
            error: w.error.map(|e| {
                let first = e.lines().next().unwrap_or("");
                first.chars().take(SUMMARY_ERROR_CHARS).collect()
            }),
            failure: w.failure,
            duration_ms: w.duration_ms,
            line_count: w.line_count,
            created_at: rfc3339(w.created_at),
            started_at: w.started_at.map(rfc3339),
            finished_at: w.finished_at.map(rfc3339),
            node: None,
            attempt: w.retry.is_some().then_some(w.attempt),
            tenant: w.tenant,
            pruned_at: w.pruned_at.map(rfc3339),
            queued_at: w.queued_at.map(rfc3339),
            schedule: w.schedule,
        }
    }
}

/// A whole workload: its summary with the whole error, its spec and output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadView {
    /// State and result.
    #[serde(flatten)]
    pub summary: WorkloadSummary,
    /// Its argv.
    pub args: Vec<String>,
    /// The limits it ran under.
    pub limits: Limits,
    /// Hosts it may send HTTP requests to (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<OutboundRule>,
    /// Its minimum SDK log level (left out when all are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// An SDK workload's returned output when it is JSON: exactly the bytes
    /// it returned (key order and spacing kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<RawJson>,
    /// The output when it is text but not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_text: Option<String>,
    /// The output as base64 when it is neither JSON nor text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_base64: Option<String>,
    /// When its failed attempts run again (left out when never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Its earlier attempts, oldest first; each one's lines are the seqs
    /// `first_seq..first_seq + lines` (left out when there were none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

impl From<WorkloadRecord> for WorkloadView {
    fn from(mut w: WorkloadRecord) -> Self {
        let (output, output_text, output_base64) = output_fields(w.output.take());
        let (args, limits, allowed_hosts, log_level, error) = (
            std::mem::take(&mut w.args),
            std::mem::take(&mut w.limits),
            std::mem::take(&mut w.allowed_hosts),
            w.log_level,
            w.error.clone(),
        );
        let retry = w.retry.clone();
        let attempts = std::mem::take(&mut w.attempts);
        let mut summary = WorkloadSummary::from(w);
        summary.error = error;
        Self {
            summary,
            args,
            limits,
            allowed_hosts,
            log_level,
            output,
            output_text,
            output_base64,
            retry,
            attempts,
        }
    }
}

impl WorkloadView {
    /// Where attempt `n`'s lines are: the seq before its first (`after`
    /// for a read; `None`: from the start) and the end of its range
    /// (`None` while it may still write); `Err` says which attempt it is on.
    pub fn attempt_lines(&self, n: u32) -> Result<(Option<u64>, Option<u64>), String> {
        let s = &self.summary;
        let current = s.attempt.unwrap_or(1);
        let Some((first, end)) = crate::retry::seqs_of(&self.attempts, current, s.line_count, n)
        else {
            return Err(format!(
                "workload {} has no attempt {n}; it is on attempt {current}",
                s.id
            ));
        };
        let writing = n == current && !s.status.is_terminal();
        Ok((first.checked_sub(1), (!writing).then_some(end)))
    }
}

/// One tenant's line of `GET /v1/queue`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantQueue {
    /// The tenant (`null` on a server without tenants).
    pub tenant: Option<String>,
    /// How many of its workloads wait.
    pub queued: u64,
    /// How many of its workloads run.
    pub running: u64,
    /// When its oldest waiting workload was queued (RFC 3339).
    pub oldest_queued_at: Option<String>,
    /// How long that one has waited so far.
    pub oldest_wait_ms: Option<u64>,
}

/// What a kill did.
pub enum KillOutcome {
    /// It ended (killed, or on its own first): its final record.
    Ended(Box<WorkloadView>),
    /// It is still stopping.
    Stopping,
    /// It had ended before the request, with this status.
    AlreadyEnded(Status),
}

impl WorkloadView {
    /// This running view as it ended (`finished_at` in ms since the Unix
    /// epoch): the record a store would answer for that end.
    pub fn end(mut self, completion: Completion, finished_at: i64) -> Self {
        let Completion {
            status,
            exit_code,
            error,
            failure,
            output,
            duration_ms,
            line_count,
        } = completion;
        (self.output, self.output_text, self.output_base64) = output_fields(output);
        let summary = &mut self.summary;
        summary.status = status;
        summary.exit_code = exit_code;
        summary.error = error;
        summary.failure = failure;
        summary.duration_ms = Some(duration_ms);
        summary.line_count = line_count;
        summary.finished_at = Some(rfc3339(finished_at));
        self
    }
}

/// An SDK workload's returned bytes as the view shows them: JSON as
/// written, else text, else base64.
fn output_fields(bytes: Option<Vec<u8>>) -> (Option<RawJson>, Option<String>, Option<String>) {
    let Some(bytes) = bytes else {
        return (None, None, None);
    };
    match String::from_utf8(bytes) {
        Ok(text) => match serde_json::from_str::<&RawValue>(&text) {
            Ok(json) => (Some(RawJson(json.to_owned())), None, None),
            Err(_) => (None, Some(text), None),
        },
        Err(e) => {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(e.as_bytes());
            (None, None, Some(b64))
        }
    }
}

/// JSON kept as the text it was written as.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<RawValue>);

impl RawJson {
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// One page of the workload list, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadList {
    /// The workloads on this page.
    pub items: Vec<WorkloadSummary>,
    /// How many match in all.
    pub total: u64,
    /// The page size asked for.
    pub limit: u64,
    /// How many of the newest were skipped.
    pub offset: u64,
}

/// One log record as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its position in the workload's log, from 0, across streams.
    pub seq: u64,
    /// Where it was written.
    pub stream: LogStream,
    /// The level of a structured `log` record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// The text, without its line ending.
    pub line: String,
    /// The guest's line goes on in the next record of this stream (it was
    /// longer than a record holds, or the guest ended mid-line).
    #[serde(default, skip_serializing_if = "is_false")]
    pub continued: bool,
    /// When it was written (RFC 3339).
    pub ts: String,
    /// Key/value fields of a `log` record, in the order given.
    #[serde(default, skip_serializing_if = "Fields::is_empty")]
    pub fields: Fields,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl From<&LogRecord> for LogLine {
    fn from(r: &LogRecord) -> Self {
        Self {
            seq: r.seq,
            stream: r.stream,
            level: r.level,
            line: r.line.clone(),
            continued: r.continued,
            ts: rfc3339(r.ts_ms),
            fields: r.fields.clone(),
        }
    }
}

/// One page of a workload's stored log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    /// The lines, in seq order.
    pub lines: Vec<LogLine>,
    /// Where the next page starts (pass it as `after`); null before any line.
    pub next_after: Option<u64>,
}

/// A stored module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleView {
    /// `sha256:<hex>` of its bytes.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// Core module or component.
    pub kind: String,
    /// When it was first stored (RFC 3339).
    pub created_at: String,
}

impl From<ModuleInfo> for ModuleView {
    fn from(m: ModuleInfo) -> Self {
        Self {
            hash: m.hash,
            size: m.size,
            kind: m.kind,
            created_at: rfc3339(m.created_at),
        }
    }
}

pub use crate::workload::{parse_rfc3339, rfc3339};

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WorkloadRecord {
        WorkloadRecord {
            id: WorkloadId::new(),
            status: Status::Failed,
            module_hash: "sha256:ab".into(),
            args: vec!["a.wasm".into(), "x".into()],
            env: vec![("K".into(), "V".into())],
            limits: Limits {
                timeout_ms: Some(5),
                ..Limits::default()
            },
            allowed_hosts: vec!["https://api.example.com".parse().unwrap()],
            log_level: Some(LogLevel::Info),
            exit_code: None,
            error: Some("first line\nsecond line".into()),
            failure: Some(FailureKind::Trap),
            output: Some(br#"{"b":1,"a":[true]}"#.to_vec()),
            duration_ms: Some(3),
            line_count: 2,
            created_at: 1,
            started_at: Some(2),
            finished_at: None,
            tenant: None,
            pruned_at: None,
            queued_at: None,
            schedule: None,
            retry: None,
            attempt: 1,
            attempts: Vec::new(),
        }
    }

    #[test]
    fn a_view_reads_back_as_itself() {
        let view = WorkloadView::from(record());
        let json = serde_json::to_string(&view).unwrap();
        let back: WorkloadView = serde_json::from_str(&json).unwrap();
        assert_eq!(back, view);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(
            view.summary.error.as_deref(),
            Some("first line\nsecond line")
        );
        assert!(
            !json.contains("\"env\""),
            "the environment is not shown: {json}"
        );
    }

    #[test]
    fn output_comes_back_as_it_was_returned() {
        let view = WorkloadView::from(record());
        let json = serde_json::to_string(&view).unwrap();
        assert!(
            json.contains(r#""output":{"b":1,"a":[true]}"#),
            "key order kept: {json}"
        );
        let mut text = record();
        text.output = Some(b"Hello, Bob!".to_vec());
        let view = WorkloadView::from(text);
        assert_eq!(view.output_text.as_deref(), Some("Hello, Bob!"));
        assert_eq!((view.output, view.output_base64), (None, None));
        let mut binary = record();
        binary.output = Some(vec![0xff, 0x00]);
        let view = WorkloadView::from(binary);
        assert_eq!(view.output_base64.as_deref(), Some("/wA="));
    }

    #[test]
    fn a_summary_keeps_the_first_line_of_the_error() {
        let summary = WorkloadSummary::from(record());
        assert_eq!(summary.error.as_deref(), Some("first line"));
    }

    #[test]
    fn a_line_says_continued_only_when_it_is() {
        let mut r = LogRecord {
            workload_id: WorkloadId::new(),
            seq: 7,
            stream: LogStream::Stdout,
            level: None,
            line: "abc".into(),
            continued: false,
            ts_ms: 0,
            fields: Fields::default(),
        };
        let plain = serde_json::to_value(LogLine::from(&r)).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"seq": 7, "stream": "stdout", "line": "abc", "ts": "1970-01-01T00:00:00.000Z"})
        );
        r.continued = true;
        let line = LogLine::from(&r);
        let back: LogLine = serde_json::from_value(serde_json::to_value(&line).unwrap()).unwrap();
        assert!(back.continued);
    }
}
