//! A minimal Server-Sent Events parser for the CLI's `logs -f`.

/// One SSE event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental parser: feed bytes, collect complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        // Lines are read in place and the consumed prefix dropped once, so a
        // large chunk of many events costs linear time.
        let buf = std::mem::take(&mut self.buf);
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &buf) {
            let line = String::from_utf8_lossy(&buf[start..nl]);
            start = nl + 1;
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.has_data {
                    let mut ev = std::mem::take(&mut self.current);
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    out.push(ev);
                }
                self.current = SseEvent::default();
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => self.current.id = Some(value.to_owned()),
                "event" => self.current.event = value.to_owned(),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        self.buf = buf;
        self.buf.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let text = b": keep-alive\n\nid: 0\nevent: stdout\ndata: hello\n\nid: 1\nevent: log\ndata: a\ndata: b\n\nevent: end\ndata: {}\n\n";
        for split in 0..text.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&text[..split]);
            events.extend(p.push(&text[split..]));
            assert_eq!(events.len(), 3, "split at {split}");
            assert_eq!(events[0].id.as_deref(), Some("0"));
            assert_eq!(events[0].event, "stdout");
            assert_eq!(events[0].data, "hello");
            assert_eq!(events[1].data, "a\nb");
            assert_eq!(events[2].event, "end");
        }
    }

    #[test]
    fn empty_data_line_is_an_event() {
        let mut p = SseParser::default();
        let events = p.push(b"id: 5\nevent: stdout\ndata: \n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "");
    }
}
