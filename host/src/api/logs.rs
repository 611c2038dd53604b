//! Log lines over Server-Sent Events (live, resumable) and as JSON history.
//!
//! Lines are published live only after they are committed, in seq order, so
//! every line a follower sees is durable, and the hand-over from stored to live
//! lines never loses or repeats one:
//! 1. subscribe to the broker first, so nothing published from now on is missed;
//! 2. replay every stored line after the client's position (everything
//!    published before we subscribed is stored);
//! 3. forward live records, skipping seqs already sent; when a live record is
//!    ahead of the next expected seq (published before we subscribed, or after
//!    a lag), the lines in between are already stored: fill the gap from there;
//! 4. when the channel closes, the terminal status is committed: send what is
//!    left in the store, then `end` with the final record.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::workloads::{WorkloadView, in_range, parse_id, rfc3339};
use super::{ApiError, AppState};
use crate::logs::{BrokerEvent, LogRecord};
use crate::workload::WorkloadId;

/// Lines read from the store per query while replaying.
const REPLAY_PAGE: u64 = 2_000;

/// Where to resume.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    after: Option<u64>,
}

/// `GET /v1/workloads/{id}/logs`: SSE, one event per line, then `end`.
pub async fn follow(
    State(state): State<AppState>,
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
    state.db().workload(id)?;

    let (tx, rx) = mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let followers = state.inner.metrics.followers.clone();
        followers.inc();
        // Ends quietly when the client goes away (the send fails), including a
        // client that stopped reading and was disconnected for it.
        let _ = stream_lines(state, id, after, tx).await;
        followers.dec();
    });
    let events = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok::<Event, Infallible>);
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    ))
}

/// The client left; stop streaming.
struct Gone;

struct Cursor {
    /// The last seq sent, if any.
    sent: Option<u64>,
}

impl Cursor {
    fn next(&self) -> u64 {
        self.sent.map_or(0, |s| s + 1)
    }
}

async fn send_record(
    tx: &mpsc::Sender<Event>,
    cursor: &mut Cursor,
    r: &LogRecord,
) -> Result<(), Gone> {
    let mut event = Event::default()
        .id(r.seq.to_string())
        .event(r.stream.as_str());
    event = match r.level {
        // Structured log lines carry their level with the message.
        Some(level) => event.data(json!({"level": level, "message": r.line}).to_string()),
        None => event.data(&r.line),
    };
    tx.send(event).await.map_err(|_| Gone)?;
    cursor.sent = Some(r.seq);
    Ok(())
}

/// Sends every stored line after the cursor, up to (not including) `until`.
async fn replay(
    state: &AppState,
    id: WorkloadId,
    cursor: &mut Cursor,
    until: Option<u64>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Gone> {
    loop {
        if until.is_some_and(|u| cursor.next() >= u) {
            return Ok(());
        }
        let db = state.db().clone();
        let after = cursor.sent;
        let read = tokio::task::spawn_blocking(move || db.read_lines(id, after, REPLAY_PAGE))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
        let page = match read {
            Ok(page) => page,
            Err(error) => {
                // Not "no more lines": the follower must know its stream is cut.
                tracing::error!(workload = %id, %error, "failed to read stored lines for a follower");
                let _ = tx
                    .send(Event::default().event("error").data(
                        json!({"error": {"code": "internal", "message": "failed to read the stored lines; reconnect with Last-Event-ID"}}).to_string(),
                    ))
                    .await;
                return Err(Gone);
            }
        };
        if page.is_empty() {
            return Ok(());
        }
        for r in &page {
            if until.is_some_and(|u| r.seq >= u) {
                return Ok(());
            }
            send_record(tx, cursor, r).await?;
        }
    }
}

async fn stream_lines(
    state: AppState,
    id: WorkloadId,
    after: Option<u64>,
    tx: mpsc::Sender<Event>,
) -> Result<(), Gone> {
    let mut cursor = Cursor { sent: after };
    let subscription = state.inner.runner.broker().subscribe(id);
    replay(&state, id, &mut cursor, None, &tx).await?;
    if let Some(mut sub) = subscription {
        while let Some(event) = sub.recv().await {
            match event {
                BrokerEvent::Line(r) => {
                    if r.seq < cursor.next() {
                        continue;
                    }
                    if r.seq > cursor.next() {
                        replay(&state, id, &mut cursor, Some(r.seq), &tx).await?;
                    }
                    send_record(&tx, &mut cursor, &r).await?;
                }
                BrokerEvent::Lagged(_) => {
                    replay(&state, id, &mut cursor, None, &tx).await?;
                }
            }
        }
    }
    // Closed: the terminal status and every line before it are committed.
    replay(&state, id, &mut cursor, None, &tx).await?;
    let record = state
        .db()
        .workload(id)
        .map(|w| serde_json::to_string(&WorkloadView::from(w)).unwrap_or_default())
        .unwrap_or_else(|e| json!({"error": e.to_string()}).to_string());
    tx.send(Event::default().event("end").data(record))
        .await
        .map_err(|_| Gone)
}

/// Query of the history endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    after: Option<u64>,
    limit: Option<u64>,
}

/// Most lines one history page returns.
const MAX_HISTORY_PAGE: u64 = 10_000;

/// `GET /v1/workloads/{id}/logs/history?after=&limit=`.
pub async fn history(
    State(state): State<AppState>,
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
    state.db().workload(id)?;
    let db = state.db().clone();
    let lines = tokio::task::spawn_blocking(move || db.read_lines(id, after, limit))
        .await
        .map_err(|e| anyhow::anyhow!("history task failed: {e}"))??;
    let next_after = lines.last().map(|r| r.seq).or(after);
    let lines: Vec<_> = lines
        .iter()
        .map(|r| {
            let mut v = json!({
                "seq": r.seq,
                "stream": r.stream,
                "line": r.line,
                "ts": rfc3339(r.ts_ms),
            });
            if let Some(level) = r.level {
                v["level"] = json!(level);
            }
            if r.continued {
                v["continued"] = json!(true);
            }
            v
        })
        .collect();
    Ok(Json(json!({"lines": lines, "next_after": next_after})))
}
