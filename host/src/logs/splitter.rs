//! Line splitting rules for one output stream.
//!
//! A line ends at `\n`, and a `\r` right before it is dropped. Bytes without a
//! newline wait for more; [`LineSplitter::finish`] flushes them when the guest is
//! done. A line longer than [`MAX_LINE_BYTES`] is cut into pieces of that size,
//! each but the last marked `continued`, so one guest cannot make the host buffer
//! an unbounded line.

/// The largest record a single line produces; longer lines are split.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Turns a byte stream into lines as the bytes arrive.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// A splitter with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `emit(line, continued)` for each record they complete.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let (head, rest) = data.split_at(nl);
            data = &rest[1..];
            if self.pending.is_empty() && head.len() <= MAX_LINE_BYTES + 1 {
                // Fast path: the whole line is in this write; no copy needed.
                let line = strip_cr(head);
                if line.len() <= MAX_LINE_BYTES {
                    emit(line, false);
                    continue;
                }
            }
            self.pending.extend_from_slice(head);
            self.emit_full_pieces(&mut emit);
            let line = strip_cr(&self.pending);
            emit(line, false);
            self.pending.clear();
        }
        if !data.is_empty() {
            self.pending.extend_from_slice(data);
            self.emit_full_pieces(&mut emit);
        }
    }

    /// Flushes a final line that had no newline.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.pending.is_empty() {
            emit(&self.pending, false);
            self.pending.clear();
        }
    }

    /// Emits every piece that is known to be followed by more of the same line.
    ///
    /// A piece of exactly `MAX_LINE_BYTES` is held back until the next byte shows
    /// whether the line goes on; otherwise a line of exactly that size would end in
    /// a spurious empty continuation record.
    fn emit_full_pieces(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        let mut start = 0;
        while self.pending.len() - start > MAX_LINE_BYTES {
            emit(&self.pending[start..start + MAX_LINE_BYTES], true);
            start += MAX_LINE_BYTES;
        }
        if start > 0 {
            self.pending.drain(..start);
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(writes: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new();
        for w in writes {
            s.push(w, |l, c| out.push((l.to_vec(), c)));
        }
        s.finish(|l, c| out.push((l.to_vec(), c)));
        out
    }

    fn lines(writes: &[&[u8]]) -> Vec<String> {
        split(writes)
            .into_iter()
            .map(|(l, _)| String::from_utf8(l).unwrap())
            .collect()
    }

    #[test]
    fn newline_ends_a_line_and_cr_before_it_is_dropped() {
        assert_eq!(lines(&[b"a\nb\r\nc\r\n"]), ["a", "b", "c"]);
    }

    #[test]
    fn a_lone_cr_is_kept() {
        assert_eq!(lines(&[b"a\rb\n"]), ["a\rb"]);
    }

    #[test]
    fn partial_lines_wait_for_more_bytes() {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        s.push(b"hel", |l, _| out.push(l.to_vec()));
        assert!(out.is_empty(), "no line before the newline");
        s.push(b"lo\nwor", |l, _| out.push(l.to_vec()));
        assert_eq!(out, [b"hello".to_vec()]);
        s.push(b"ld\n", |l, _| out.push(l.to_vec()));
        assert_eq!(out, [b"hello".to_vec(), b"world".to_vec()]);
    }

    #[test]
    fn cr_split_from_its_newline_across_writes_is_dropped() {
        assert_eq!(lines(&[b"a\r", b"\n"]), ["a"]);
    }

    #[test]
    fn final_line_without_newline_is_flushed_on_finish() {
        assert_eq!(lines(&[b"a\nlast"]), ["a", "last"]);
    }

    #[test]
    fn empty_lines_are_lines() {
        assert_eq!(lines(&[b"\n\na\n\n"]), ["", "", "a", ""]);
    }

    #[test]
    fn nothing_written_gives_no_line() {
        assert!(split(&[]).is_empty());
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn long_line_is_split_into_continued_pieces() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        let out = split(&[&input]);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].0.len(), MAX_LINE_BYTES);
        assert!(out[0].1);
        assert_eq!(out[1].0.len(), MAX_LINE_BYTES);
        assert!(out[1].1);
        assert_eq!(out[2].0.len(), 10);
        assert!(!out[2].1, "the last piece is not continued");
        assert_eq!(out[3], (b"next".to_vec(), false));
        let joined: Vec<u8> = out[..3].iter().flat_map(|(l, _)| l.clone()).collect();
        assert_eq!(joined, long);
    }

    #[test]
    fn long_line_written_in_small_chunks_is_split_the_same_way() {
        let long = vec![b'y'; MAX_LINE_BYTES + 100];
        let chunks: Vec<&[u8]> = long.chunks(999).collect();
        let mut writes = chunks.clone();
        writes.push(b"\n");
        let out = split(&writes);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].0.len(), out[0].1), (MAX_LINE_BYTES, true));
        assert_eq!((out[1].0.len(), out[1].1), (100, false));
    }

    #[test]
    fn line_of_exactly_the_maximum_is_one_record() {
        let mut input = vec![b'z'; MAX_LINE_BYTES];
        input.push(b'\n');
        let out = split(&[&input[..100], &input[100..]]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.len(), out[0].1), (MAX_LINE_BYTES, false));
    }

    #[test]
    fn long_unterminated_line_is_flushed_in_pieces() {
        let out = split(&[&vec![b'q'; MAX_LINE_BYTES + 1]]);
        assert_eq!(out.len(), 2);
        assert!(out[0].1);
        assert_eq!((out[1].0.len(), out[1].1), (1, false));
    }

    #[test]
    fn invalid_utf8_bytes_pass_through_unchanged() {
        // The splitter is byte-exact; lossy decoding happens when records are made.
        let out = split(&[b"ok\xff\xfe\n"]);
        assert_eq!(out, [(b"ok\xff\xfe".to_vec(), false)]);
    }
}
