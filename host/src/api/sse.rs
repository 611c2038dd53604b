//! The Server-Sent Events wire format, written straight into a follower's
//! batch buffer: many events go out as one body chunk instead of one frame
//! each. The bytes are those of axum's `Event` (`id`, `event`, then `data`
//! lines), except that empty data is still sent as an empty `data:` line:
//! an event without one is never dispatched, and an empty line the guest
//! printed must still arrive with its seq.

use bytes::{BufMut as _, BytesMut};

/// The comment a follower sends when nothing happened for a while, so that
/// proxies and clients keep the connection.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Appends one event; `id` and `event` must not contain CR or LF (seqs and
/// stream names never do). Each CR or LF in `data` starts a new `data:` line,
/// as the SSE format requires.
pub fn put_event(buf: &mut BytesMut, id: Option<u64>, event: &str, data: &[u8]) {
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(itoa::Buffer::new().format(id).as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_bytes());
    buf.put_slice(b"\ndata: ");
    let mut start = 0;
    for end in memchr::memchr2_iter(b'\n', b'\r', data) {
        buf.put_slice(&data[start..=end]);
        buf.put_slice(b"data: ");
        start = end + 1;
    }
    buf.put_slice(&data[start..]);
    buf.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse as _;
    use axum::response::sse::{Event, Sse};
    use http_body_util::BodyExt as _;

    use super::*;

    /// What axum's `Sse` writes for the same events.
    async fn axum_bytes(events: Vec<Event>) -> Vec<u8> {
        let stream = tokio_stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
        let body = Sse::new(stream).into_response().into_body();
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn events_are_the_bytes_axum_writes() {
        let cases: [(Option<u64>, &str, &str); 5] = [
            (Some(0), "stdout", "hello"),
            (Some(18_446_744_073_709_551_615), "stderr", "x"),
            (Some(7), "log", "a\nb\rc\r\nd"),
            (Some(8), "stdout", "<script>alert(1)</script> ünïcødé"),
            (None, "end", r#"{"status":"completed"}"#),
        ];
        let mut ours = BytesMut::new();
        let mut theirs = Vec::new();
        for (id, event, data) in cases {
            put_event(&mut ours, id, event, data.as_bytes());
            let mut e = Event::default();
            if let Some(id) = id {
                e = e.id(id.to_string());
            }
            theirs.push(e.event(event).data(data));
        }
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&axum_bytes(theirs).await)
        );
    }

    #[test]
    fn an_empty_line_is_still_an_event_with_data() {
        let mut buf = BytesMut::new();
        put_event(&mut buf, Some(3), "stdout", b"");
        assert_eq!(&buf[..], b"id: 3\nevent: stdout\ndata: \n\n");
        let events = crate::cli::sse::SseParser::default().push(&buf);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].id.as_deref(), events[0].data.as_str()),
            (Some("3"), "")
        );
    }
}
