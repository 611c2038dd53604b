//! Log lines over Server-Sent Events (live, resumable) and as JSON history.
//!
//! The service follows the log (see `service::follow`: every line once, in
//! seq order, committed before it is sent); this module is the wire format.
//! An event's `data` is the line's text (a `log` record's is
//! `{"level","message"}`); with `?format=json` it is the whole [`LogLine`]
//! (seq, stream, level, line, continued, ts), as history pages carry it. Its
//! `id` is the seq, so a reconnecting client resumes with `Last-Event-ID`.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use super::sse::{KEEP_ALIVE, put_event};
use super::workloads::{in_range, parse_id};
use super::{ApiError, AppState};
use crate::logs::LogRecord;
use crate::service::{Caller, LineEncoding};
use crate::view::{LogLine, LogPage};

/// Where to resume.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    after: Option<u64>,
    format: Option<EventFormat>,
}

/// What an SSE event's `data` holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    /// The line's text.
    #[default]
    Text,
    /// The whole [`LogLine`] as JSON.
    Json,
}

/// `GET /v1/workloads/{id}/logs`: SSE, one event per line, then `end`.
pub async fn follow(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a seq number".into()))?,
        ),
        None => None,
    };
    // The header wins: it is what a reconnecting EventSource sends.
    let after = in_range("Last-Event-ID", last_event_id)?.or(in_range("after", query.after)?);
    let format = query.format.unwrap_or_default();
    let rx = state.service().follow(&caller, id, after, format).await?;
    let chunks = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok::<Bytes, Infallible>);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    ))
}

impl LineEncoding for EventFormat {
    fn line(self, buf: &mut BytesMut, r: &LogRecord) {
        encode(buf, self, r)
    }

    fn end(self, buf: &mut BytesMut, record: &str) {
        put_event(buf, None, "end", record.as_bytes());
    }

    fn error(self, buf: &mut BytesMut, error: &str) {
        put_event(buf, None, "error", error.as_bytes());
    }

    fn keep_alive(self, buf: &mut BytesMut) {
        buf.extend_from_slice(KEEP_ALIVE);
    }
}

/// Appends `r` as one event in `format`.
fn encode(buf: &mut BytesMut, format: EventFormat, r: &LogRecord) {
    let (id, stream) = (Some(r.seq), r.stream.as_str());
    match (format, r.level) {
        (EventFormat::Json, _) => {
            let data = serde_json::to_vec(&LogLine::from(r)).unwrap_or_default();
            put_event(buf, id, stream, &data);
        }
        // Structured log lines carry their level (and fields) with the message.
        (EventFormat::Text, Some(level)) => {
            let mut data = json!({"level": level, "message": r.line});
            if !r.fields.is_empty() {
                data["fields"] = json!(r.fields);
            }
            put_event(buf, id, stream, data.to_string().as_bytes());
        }
        (EventFormat::Text, None) => put_event(buf, id, stream, r.line.as_bytes()),
    }
}

/// Query of the history endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    after: Option<u64>,
    limit: Option<u64>,
    /// Only this attempt's lines (a workload with a retry policy).
    attempt: Option<u32>,
}

/// Most lines one history page returns.
const MAX_HISTORY_PAGE: u64 = 10_000;

/// `GET /v1/workloads/{id}/logs/history?after=&limit=&attempt=`.
pub async fn history(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(1_000);
    let after = in_range("after", q.after)?;
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY_PAGE}"
        )));
    }
    if q.attempt == Some(0) {
        return Err(ApiError::BadRequest("attempts are numbered from 1".into()));
    }
    let service = state.service();
    let lines = service
        .history(&caller, id, after, limit, q.attempt)
        .await?;
    Ok(Json(LogPage {
        next_after: lines.last().map(|r| r.seq).or(after),
        lines: lines.iter().map(LogLine::from).collect(),
    }))
}
