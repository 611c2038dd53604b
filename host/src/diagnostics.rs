//! The server's own output: its log (tracing) and its few printed lines.
//!
//! Owns how diagnostics reach stderr and what happens when they cannot: a
//! full disk under the log file, a closed pipe or `/dev/full` must never stop
//! a thread that logs (the store's writer logs its own faults). A write that
//! fails is dropped and counted ([`dropped_writes`], in `/metrics`); nothing
//! here ever panics or retries. Owns nothing of the guests' output.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Diagnostic writes dropped because stderr failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many diagnostic writes were dropped since the process started.
pub fn dropped_writes() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Stderr that reports every write as done: a failure is counted, not raised
/// (tracing-subscriber would print it with `eprintln!`, which panics when
/// stderr is the thing that fails).
#[derive(Clone, Copy, Default)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

/// Prints one line of the server's own to stderr (its address, that it
/// stopped), dropping it if stderr fails.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(LossyStderr, "{line}");
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    #[test]
    fn a_write_always_reports_success() {
        // Whatever stderr is in the test harness, the writer never errs.
        let mut w = super::LossyStderr;
        assert_eq!(w.write(b"diagnostics test line\n").unwrap(), 22);
        assert!(w.flush().is_ok());
    }
}
