//! The unit of guest output that is numbered, broadcast and stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::workload::WorkloadId;

/// Which channel a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
    /// A structured `log(level, message)` call from an SDK workload.
    Log,
}

impl LogStream {
    /// The stable name used in the database, the API and SSE event names.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Log => "log",
        }
    }
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogStream {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "stdout" => Ok(LogStream::Stdout),
            "stderr" => Ok(LogStream::Stderr),
            "log" => Ok(LogStream::Log),
            other => anyhow::bail!("unknown log stream `{other}`"),
        }
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
        match s {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            other => anyhow::bail!("unknown log level `{other}`"),
        }
    }
}

/// One line of guest output, numbered within its workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The workload that wrote it.
    pub workload_id: WorkloadId,
    /// Position among all the workload's records, from 0, across streams, without gaps.
    pub seq: u64,
    /// The channel it was written to.
    pub stream: LogStream,
    /// Level, for [`LogStream::Log`] records only.
    pub level: Option<LogLevel>,
    /// The text, without its line ending; invalid UTF-8 replaced by U+FFFD.
    pub line: String,
    /// True when the guest's line was longer than [`super::MAX_LINE_BYTES`] and the
    /// next record carries its continuation.
    pub continued: bool,
    /// When the line was completed, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
}
