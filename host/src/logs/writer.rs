//! Sequencing and fan-out of one workload's output.
//!
//! A [`LogWriter`] is shared by the workload's stdout and stderr (and its
//! structured log calls): each stream has its own [`LineSplitter`], and every
//! completed line takes the next seq of the workload, so seq orders records
//! across streams exactly as they were completed. Each record goes to the
//! [`LineSink`] (the store, which commits it in a batch and only then publishes
//! it live). The writer also enforces the workload's output limit. The sink is
//! bounded: the guest's output stream asks [`LogWriter::poll_room`] before it accepts a write, so a guest that writes faster than the store
//! commits waits (its wasm store yields) instead of growing memory.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::{Fields, LineSink, LineSplitter, LogLevel, LogRecord, LogStream};
use crate::workload::{WorkloadId, now_ms};

/// The guest wrote more than its output limit allows.
#[derive(Debug, thiserror::Error)]
#[error("output limit of {limit} bytes exceeded")]
pub struct OutputLimitExceeded {
    /// The limit, in bytes.
    pub limit: u64,
}

/// The workload's lines can no longer be stored (e.g. the disk is full), so it
/// must stop: it can no longer complete with its whole log.
#[derive(Debug, thiserror::Error)]
#[error("its log lines could not be stored: {0}")]
pub struct LinesNotStored(pub String);

/// Where raw guest bytes are copied as they are written (`vulcan run` uses the
/// process's own stdout and stderr).
pub type RawTee = Box<dyn Write + Send>;

/// Turns one workload's output into numbered records for the broker and store.
#[derive(Clone)]
pub struct LogWriter {
    inner: Arc<Mutex<State>>,
    /// Outside the lock: waiting for room must not hold it.
    sink: Option<Arc<dyn LineSink>>,
}

struct State {
    seq: Sequencer,
    stdout: LineSplitter,
    stderr: LineSplitter,
    tee_stdout: Option<RawTee>,
    tee_stderr: Option<RawTee>,
    /// The tee holding bytes not yet flushed, if any.
    tee_unflushed: Option<LogStream>,
    written: u64,
    max_output: Option<u64>,
    limit_hit: bool,
    /// Structured records below this level are dropped.
    min_level: Option<LogLevel>,
}

impl LogWriter {
    /// A writer for `workload` feeding `sink` (durable, then live) that refuses
    /// stdout/stderr bytes beyond `max_output` in total; without a sink,
    /// records are only numbered and teed.
    pub fn new(
        workload: WorkloadId,
        max_output: Option<u64>,
        sink: Option<Arc<dyn LineSink>>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                seq: Sequencer {
                    workload,
                    next: 0,
                    sink: sink.clone(),
                },
                stdout: LineSplitter::new(),
                stderr: LineSplitter::new(),
                tee_stdout: None,
                tee_stderr: None,
                tee_unflushed: None,
                written: 0,
                max_output,
                limit_hit: false,
                min_level: None,
            })),
            sink,
        }
    }

    /// Also copies raw stdout/stderr bytes to these writers, unchanged.
    pub fn with_tee(self, stdout: Option<RawTee>, stderr: Option<RawTee>) -> Self {
        {
            let mut s = self.lock();
            s.tee_stdout = stdout;
            s.tee_stderr = stderr;
        }
        self
    }

    /// Accepts bytes the guest wrote to stdout or stderr.
    pub fn write(&self, stream: LogStream, bytes: &[u8]) -> Result<(), OutputLimitExceeded> {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.count_output(bytes.len())?;
        s.tee(stream, bytes);
        let (splitter, seq) = match stream {
            LogStream::Stderr => (&mut s.stderr, &mut s.seq),
            _ => (&mut s.stdout, &mut s.seq),
        };
        splitter.push(bytes, |line, continued| seq.emit(stream, line, continued));
        Ok(())
    }

    /// Pushes bytes buffered in the tees out (the runner calls this every tick,
    /// so a guest that prints a prompt and then blocks still shows it).
    pub fn flush_tee(&self) {
        self.lock().flush_tee();
    }

    /// Numbers its first record `seq` (a retried workload's lines go on
    /// from its earlier attempts').
    pub fn starting_at(self, seq: u64) -> Self {
        self.lock().seq.next = seq;
        self
    }

    /// Drops structured records below `level` (stdout and stderr are kept).
    pub fn with_min_level(self, level: Option<LogLevel>) -> Self {
        self.lock().min_level = level;
        self
    }

    /// Records one structured log call, with its key/value fields, as a single
    /// record (newlines kept), unless it is below the minimum level. Its bytes
    /// count against the output limit as stdout and stderr do.
    pub fn log(
        &self,
        level: LogLevel,
        message: &str,
        fields: Fields,
    ) -> Result<(), OutputLimitExceeded> {
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.min_level.is_some_and(|min| level < min) {
            return Ok(());
        }
        s.count_output(message.len() + fields.bytes())?;
        if s.tee_stderr.is_some() {
            // A terminal shows structured lines too, marked with their level.
            let line = match fields.is_empty() {
                true => format!("[{}] {message}\n", level.as_str()),
                false => format!("[{}] {message} {fields}\n", level.as_str()),
            };
            s.tee(LogStream::Stderr, line.as_bytes());
        }
        s.seq.emit_fields(level, message, fields);
        Ok(())
    }

    /// Flushes partial lines and returns how many records were written.
    ///
    /// Further writes after this still work (a guest cannot write after it ended,
    /// but a late stream flush must not panic).
    pub fn finish(&self) -> u64 {
        let mut guard = self.lock();
        let s = &mut *guard;
        let seq = &mut s.seq;
        s.stdout
            .finish(|line, c| seq.emit(LogStream::Stdout, line, c));
        s.stderr
            .finish(|line, c| seq.emit(LogStream::Stderr, line, c));
        s.flush_tee();
        s.seq.next
    }

    /// The output limit, once the guest has tried to write past it.
    pub fn output_limit_hit(&self) -> Option<u64> {
        let s = self.lock();
        if s.limit_hit { s.max_output } else { None }
    }

    /// Ready once the store can take more of this workload's lines.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.sink {
            Some(sink) => sink.poll_room(cx),
            None => Poll::Ready(()),
        }
    }

    /// True when the store can take more of this workload's lines now.
    pub fn has_room(&self) -> bool {
        self.sink.as_ref().is_none_or(|s| s.has_room())
    }

    /// Waits until the store can take more of this workload's lines.
    pub async fn room(&self) {
        std::future::poll_fn(|cx| self.poll_room(cx)).await
    }

    /// Why this workload's lines can no longer be stored, once that happened:
    /// the workload must stop and fail.
    pub fn store_failure(&self) -> Option<String> {
        self.sink.as_ref().and_then(|s| s.failure())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // State stays consistent across a panic (every field update is complete
        // before anything can panic), so poison is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Counts `bytes` more of output against the limit.
    fn count_output(&mut self, bytes: usize) -> Result<(), OutputLimitExceeded> {
        self.written += bytes as u64;
        match self.max_output {
            Some(limit) if self.written > limit => {
                // Remembered, because a guest may ignore the write error it gets.
                self.limit_hit = true;
                Err(OutputLimitExceeded { limit })
            }
            _ => Ok(()),
        }
    }

    /// Copies raw bytes to the stream's tee without flushing: a tee may buffer
    /// (one write per guest write would cost a syscall per line), and is flushed
    /// every tick and at the end. Bytes of the other stream are flushed first,
    /// so a terminal shared by both shows them in the order they were written.
    fn tee(&mut self, stream: LogStream, bytes: &[u8]) {
        let stream = match stream {
            LogStream::Stderr => LogStream::Stderr,
            _ => LogStream::Stdout,
        };
        if self.tee_unflushed.is_some_and(|s| s != stream) {
            self.flush_tee();
        }
        let tee = match stream {
            LogStream::Stderr => &mut self.tee_stderr,
            _ => &mut self.tee_stdout,
        };
        if let Some(tee) = tee {
            // The terminal is a convenience copy: a closed pipe must not stop the
            // workload or its durable log.
            if tee.write_all(bytes).is_err() {
                *tee = Box::new(std::io::sink());
            }
            self.tee_unflushed = Some(stream);
        }
    }

    fn flush_tee(&mut self) {
        let tee = match self.tee_unflushed.take() {
            Some(LogStream::Stderr) => &mut self.tee_stderr,
            Some(_) => &mut self.tee_stdout,
            None => return,
        };
        if let Some(tee) = tee
            && tee.flush().is_err()
        {
            *tee = Box::new(std::io::sink());
        }
    }
}

/// Numbers a workload's records and hands them to its sink.
struct Sequencer {
    workload: WorkloadId,
    next: u64,
    sink: Option<Arc<dyn LineSink>>,
}

impl Sequencer {
    /// Emits one line of stdout or stderr.
    fn emit(&mut self, stream: LogStream, line: &[u8], continued: bool) {
        let line = String::from_utf8_lossy(line).into_owned();
        self.send(stream, None, line, continued, Fields::default());
    }

    /// Emits one structured record with its fields.
    fn emit_fields(&mut self, level: LogLevel, message: &str, fields: Fields) {
        self.send(
            LogStream::Log,
            Some(level),
            message.to_owned(),
            false,
            fields,
        );
    }

    fn send(
        &mut self,
        stream: LogStream,
        level: Option<LogLevel>,
        line: String,
        continued: bool,
        fields: Fields,
    ) {
        let record = Arc::new(LogRecord {
            workload_id: self.workload,
            seq: self.next,
            stream,
            level,
            line,
            continued,
            ts_ms: now_ms(),
            fields,
        });
        self.next += 1;
        if let Some(sink) = &self.sink {
            sink.send(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::{BrokerEvent, LogBroker};
    use crate::store::Db;

    /// A writer over a real store whose committed lines are published to `broker`.
    async fn stored_writer(broker: &LogBroker) -> (tempfile::TempDir, Db, WorkloadId, LogWriter) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let id = crate::store::tests_support::create_workload(&db).await;
        let sink = db.line_sink(id, Some(Box::new(broker.open(id)))).unwrap();
        (dir, db, id, LogWriter::new(id, None, Some(Arc::new(sink))))
    }

    #[test]
    fn records_below_the_minimum_level_are_dropped_without_a_gap() {
        let out = Shared::default();
        let writer = LogWriter::new(WorkloadId::new(), None, None)
            .with_tee(None, Some(Box::new(out.clone())))
            .with_min_level(Some(LogLevel::Warn));
        for (level, message) in [
            (LogLevel::Debug, "noise"),
            (LogLevel::Warn, "careful"),
            (LogLevel::Info, "more noise"),
            (LogLevel::Error, "broken"),
        ] {
            writer.log(level, message, Fields::default()).unwrap();
        }
        assert_eq!(writer.finish(), 2, "only two records were numbered");
        assert_eq!(&*out.0.lock().unwrap(), b"[warn] careful\n[error] broken\n");
    }

    #[tokio::test]
    async fn seq_spans_both_streams_in_completion_order() {
        let broker = LogBroker::default();
        let (_dir, db, id, writer) = stored_writer(&broker).await;
        let mut sub = broker.subscribe(id).unwrap();
        writer.write(LogStream::Stdout, b"out-partial").unwrap();
        writer.write(LogStream::Stderr, b"err1\n").unwrap();
        writer.write(LogStream::Stdout, b" done\nout2\n").unwrap();
        writer
            .log(LogLevel::Warn, "careful\nnow", Fields::default())
            .unwrap();
        writer.write(LogStream::Stderr, b"tail").unwrap();
        assert_eq!(writer.finish(), 5);
        // Lines are published once committed; the terminal status closes the channel.
        crate::store::tests_support::complete(&db, id, 5).await;
        let mut got = Vec::new();
        while let Some(BrokerEvent::Line(r)) = sub.recv().await {
            got.push((r.seq, r.stream, r.level, r.line.clone()));
        }
        assert_eq!(
            got,
            vec![
                (0, LogStream::Stderr, None, "err1".to_owned()),
                (1, LogStream::Stdout, None, "out-partial done".to_owned()),
                (2, LogStream::Stdout, None, "out2".to_owned()),
                (
                    3,
                    LogStream::Log,
                    Some(LogLevel::Warn),
                    "careful\nnow".to_owned()
                ),
                (4, LogStream::Stderr, None, "tail".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced_lossily() {
        let broker = LogBroker::default();
        let (_dir, db, id, writer) = stored_writer(&broker).await;
        let mut sub = broker.subscribe(id).unwrap();
        writer.write(LogStream::Stdout, b"a\xffb\n").unwrap();
        crate::store::tests_support::complete(&db, id, 1).await;
        let Some(BrokerEvent::Line(r)) = sub.recv().await else {
            panic!("expected a line")
        };
        assert_eq!(r.line, "a\u{FFFD}b");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffered_tees_sharing_a_terminal_keep_the_write_order() {
        let terminal = Shared::default();
        let buffered = || Box::new(std::io::BufWriter::new(terminal.clone()));
        let writer = LogWriter::new(WorkloadId::new(), None, None)
            .with_tee(Some(buffered()), Some(buffered()));
        writer.write(LogStream::Stdout, b"out 1\n").unwrap();
        writer.write(LogStream::Stdout, b"out 2\n").unwrap();
        writer.write(LogStream::Stderr, b"err 1\n").unwrap();
        writer.write(LogStream::Stdout, b"out 3").unwrap();
        writer.flush_tee();
        assert_eq!(
            &*terminal.0.lock().unwrap(),
            b"out 1\nout 2\nerr 1\nout 3",
            "a flush pushes out everything buffered"
        );
        writer.write(LogStream::Stdout, b"\n").unwrap();
        writer.finish();
        assert_eq!(
            &*terminal.0.lock().unwrap(),
            b"out 1\nout 2\nerr 1\nout 3\n"
        );
    }

    #[test]
    fn tee_gets_exact_bytes_and_output_limit_is_enforced() {
        let out = Shared::default();
        let writer = LogWriter::new(WorkloadId::new(), Some(10), None)
            .with_tee(Some(Box::new(out.clone())), None);
        writer.write(LogStream::Stdout, b"\x00\xff\r\n").unwrap();
        writer.write(LogStream::Stdout, b"12345").unwrap();
        let err = writer.write(LogStream::Stdout, b"toolong").unwrap_err();
        assert_eq!(err.limit, 10);
        assert_eq!(&*out.0.lock().unwrap(), b"\x00\xff\r\n12345");
        assert_eq!(writer.finish(), 2, "the partial line is still flushed");
    }

    #[test]
    fn log_records_count_against_the_output_limit() {
        let writer = LogWriter::new(WorkloadId::new(), Some(10), None);
        writer
            .log(LogLevel::Info, "12345", Fields::default())
            .unwrap();
        let fields = Fields(vec![("k".into(), "1234".into())]);
        let err = writer.log(LogLevel::Info, "x", fields).unwrap_err();
        assert_eq!(err.limit, 10);
        assert_eq!(writer.output_limit_hit(), Some(10));
        assert_eq!(writer.finish(), 1, "the record past the limit was not kept");
    }
}
