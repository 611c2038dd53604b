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
    /// Every stream.
    pub const ALL: [LogStream; 3] = [LogStream::Stdout, LogStream::Stderr, LogStream::Log];

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
        LogStream::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown log stream `{s}`"))
    }
}

pub use crate::workload::LogLevel;

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
    /// Key/value fields of a structured `log` record, in the order given.
    #[serde(default, skip_serializing_if = "Fields::is_empty")]
    pub fields: Fields,
}

/// Key/value fields of a `log` record, kept in the order the guest gave them;
/// JSON shows them as an object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes of every key and value.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string fields")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Fields, M::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = m.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Fields(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

impl fmt::Display for Fields {
    /// `k=v k2=v2`, for terminals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{k}={v}")?;
        }
        Ok(())
    }
}
