//! The wire format of a batch of lines in `VULCAN_LOGS`: one JSON array of
//! compact lines per message, with the last seq and the end in headers.

use std::sync::Arc;

use bytes::Bytes;

use serde::{Deserialize, Serialize};

use crate::logs::{Fields, LogLevel, LogRecord, LogStream};
use crate::workload::WorkloadId;

use super::buffer::cost;

/// A line as the cluster carries it: short keys, defaults left out (a
/// flood's batches are mostly this framing).
#[derive(Serialize)]
pub(in crate::cluster) struct WireLine<'a> {
    s: u64,
    t: LogStream,
    #[serde(skip_serializing_if = "Option::is_none")]
    l: Option<LogLevel>,
    m: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    c: bool,
    ts: i64,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    f: &'a Fields,
}

#[derive(Deserialize)]
pub(in crate::cluster) struct WireLineOwned {
    s: u64,
    t: LogStream,
    #[serde(default)]
    l: Option<LogLevel>,
    m: String,
    #[serde(default)]
    c: bool,
    ts: i64,
    #[serde(default)]
    f: Fields,
}

/// Encodes records from the front of `batch` into one message of at most
/// `limit` bytes (at least one record); the payload and how many it holds.
pub(in crate::cluster) fn encode_batch(batch: &[Arc<LogRecord>], limit: usize) -> (Bytes, usize) {
    // Sized for what it will most likely hold: a short log's few lines do
    // not take (and fault in) a flood's buffer.
    let likely: usize = batch.iter().map(|r| cost(r)).sum();
    let mut out = Vec::with_capacity(likely.min(limit));
    out.push(b'[');
    let mut n = 0;
    for r in batch {
        let before = out.len();
        if n > 0 {
            out.push(b',');
        }
        let wire = WireLine {
            s: r.seq,
            t: r.stream,
            l: r.level,
            m: &r.line,
            c: r.continued,
            ts: r.ts_ms,
            f: &r.fields,
        };
        // Serializing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &wire);
        if n > 0 && out.len() + 1 > limit {
            out.truncate(before);
            break;
        }
        n += 1;
    }
    out.push(b']');
    (Bytes::from(out), n)
}

/// The records of one message of `id`'s log.
pub(in crate::cluster) fn decode_batch(
    id: WorkloadId,
    payload: &[u8],
) -> serde_json::Result<Vec<LogRecord>> {
    let lines: Vec<WireLineOwned> = serde_json::from_slice(payload)?;
    Ok(lines
        .into_iter()
        .map(|w| LogRecord {
            workload_id: id,
            seq: w.s,
            stream: w.t,
            level: w.l,
            line: w.m,
            continued: w.c,
            ts_ms: w.ts,
            fields: w.f,
        })
        .collect())
}
