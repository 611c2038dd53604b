//! The one printer of the read model: a workload as `key: value` lines, a
//! list as a table, log lines as the guest wrote them, or any of them as JSON.
//! Every command prints through here, whether its views came from the local
//! database or a server, so both print the same bytes.

use std::io::{self, Write};

use serde_json::Value;

use crate::logs::LogStream;
use crate::view::{LogLine, WorkloadList, WorkloadSummary, WorkloadView};
use crate::workload::FailureKind;

/// Prints one workload: JSON, or `key: value` lines (absent values left out).
pub fn workload(out: &mut impl Write, w: &WorkloadView, json: bool) -> io::Result<()> {
    if json {
        return json_line(out, w);
    }
    let s = &w.summary;
    let raw_output = w
        .output
        .as_ref()
        .map(|o| Value::String(o.as_str().to_owned()));
    let allowed_hosts = (!w.allowed_hosts.is_empty()).then(|| {
        let hosts: Vec<String> = w.allowed_hosts.iter().map(ToString::to_string).collect();
        Value::from(hosts.join(", "))
    });
    // With a retry policy: which attempt, and the policy in a line.
    let (attempt, retry) = match &w.retry {
        Some(r) => {
            let on: Vec<&str> = r.on.iter().map(|k| k.as_str()).collect();
            let policy = format!(
                "up to {} attempts, backoff {} ms doubling to at most {} ms, on {}",
                r.max_attempts,
                r.backoff_ms,
                r.max_backoff_ms,
                on.join(", ")
            );
            (s.attempt.map(Value::from), Some(Value::from(policy)))
        }
        None => (None, None),
    };
    let fields: [(&str, Option<Value>); 20] = [
        ("id", Some(s.id.to_string().into())),
        ("status", Some(s.status.as_str().into())),
        ("exit_code", s.exit_code.map(Value::from)),
        ("failure", s.failure.map(|f| f.as_str().into())),
        ("error", s.error.clone().map(Value::from)),
        ("duration_ms", s.duration_ms.map(Value::from)),
        ("line_count", Some(s.line_count.into())),
        ("attempt", attempt),
        ("retry", retry),
        // As the workload returned it: JSON as written, text as text.
        ("output", raw_output),
        ("output_text", w.output_text.clone().map(Value::from)),
        ("output_base64", w.output_base64.clone().map(Value::from)),
        ("module", Some(s.module.clone().into())),
        ("allowed_hosts", allowed_hosts),
        ("log_level", w.log_level.map(|l| l.as_str().into())),
        ("schedule", s.schedule.clone().map(Value::from)),
        ("created_at", Some(s.created_at.clone().into())),
        ("queued_at", s.queued_at.clone().map(Value::from)),
        ("started_at", s.started_at.clone().map(Value::from)),
        ("finished_at", s.finished_at.clone().map(Value::from)),
    ];
    for (key, value) in fields {
        match value {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => writeln!(out, "{key}: {text}")?,
            Some(other) => writeln!(out, "{key}: {other}")?,
        }
    }
    for a in &w.attempts {
        let failure = a.failure.map_or("failed", |f| f.as_str());
        let error = a
            .error
            .as_deref()
            .and_then(|e| e.lines().next())
            .unwrap_or("");
        writeln!(
            out,
            "attempt {}: {failure} after {} ms, lines {}..{}: {error}",
            a.attempt,
            a.duration_ms,
            a.first_seq,
            a.first_seq + a.lines
        )?;
    }
    Ok(())
}

/// Prints a page of workloads: JSON, or an aligned table and a count.
pub fn list(out: &mut impl Write, page: &WorkloadList, json: bool) -> io::Result<()> {
    if json {
        return json_line(out, page);
    }
    writeln!(
        out,
        "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  MODULE",
        "ID", "STATUS", "EXIT", "DURATION", "LINES"
    )?;
    for w in &page.items {
        table_row(out, w)?;
    }
    writeln!(out, "({} of {} workloads)", page.items.len(), page.total)
}

fn table_row(out: &mut impl Write, w: &WorkloadSummary) -> io::Result<()> {
    writeln!(
        out,
        "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  {}",
        w.id,
        w.status.as_str(),
        w.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
        w.duration_ms
            .map_or_else(|| "-".into(), |d| format!("{d}ms")),
        w.line_count,
        w.module.get(..19).unwrap_or(&w.module),
    )
}

fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)
}

/// Prints log lines as the guest wrote them: stdout lines to stdout, stderr
/// lines and `log` records (as `[level] message`) to stderr, a `continued`
/// line without its line break; or one JSON [`LogLine`] per line to stdout.
pub struct LinePrinter<O: Write, E: Write> {
    json: bool,
    stdout: O,
    stderr: E,
    /// The stream written last, flushed before the other is written to, so a
    /// terminal shows both in seq order.
    last: Option<LogStream>,
}

impl LinePrinter<io::BufWriter<io::Stdout>, io::BufWriter<io::Stderr>> {
    /// A printer to this process's stdout and stderr.
    pub fn terminal(json: bool) -> Self {
        Self::new(
            json,
            io::BufWriter::new(io::stdout()),
            io::BufWriter::new(io::stderr()),
        )
    }
}

impl<O: Write, E: Write> LinePrinter<O, E> {
    /// A printer to these writers.
    pub fn new(json: bool, stdout: O, stderr: E) -> Self {
        Self {
            json,
            stdout,
            stderr,
            last: None,
        }
    }

    /// Prints one line.
    pub fn line(&mut self, l: &LogLine) -> io::Result<()> {
        if self.json {
            return json_line(&mut self.stdout, l);
        }
        let to_stderr = l.stream != LogStream::Stdout;
        if self
            .last
            .is_some_and(|s| (s != LogStream::Stdout) != to_stderr)
        {
            self.flush()?;
        }
        self.last = Some(l.stream);
        let out: &mut dyn Write = match to_stderr {
            true => &mut self.stderr,
            false => &mut self.stdout,
        };
        if let Some(level) = l.level {
            write!(out, "[{}] ", level.as_str())?;
        }
        out.write_all(l.line.as_bytes())?;
        if !l.fields.is_empty() {
            write!(out, " {}", l.fields)?;
        }
        if !l.continued {
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Prints what a followed workload ended with: its output after its logs
    /// (as `vulcan run` does), and why it failed.
    pub fn ending(&mut self, w: &WorkloadView) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        match (&w.output, &w.output_text, &w.output_base64) {
            (Some(json), _, _) => writeln!(self.stdout, "{}", json.as_str())?,
            (None, Some(text), _) => writeln!(self.stdout, "{text}")?,
            (None, None, Some(b64)) => writeln!(self.stdout, "output_base64: {b64}")?,
            (None, None, None) => {}
        }
        self.stdout.flush()?;
        if let Some(why) = end_message(&w.summary) {
            writeln!(self.stderr, "vulcan: {why}")?;
        }
        self.stderr.flush()
    }

    /// Pushes everything printed so far out.
    pub fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush()?;
        self.stderr.flush()
    }
}

/// Why a workload did not complete, as a sentence for stderr; `None` when it
/// completed or exited with a code of its own (its exit status says it).
pub fn end_message(w: &WorkloadSummary) -> Option<String> {
    let failure = w.failure?;
    let error = w.error.as_deref().unwrap_or(failure.as_str());
    Some(match failure {
        FailureKind::Exit => return None,
        FailureKind::ReturnedError => format!("the workload returned an error: {error}"),
        _ => error.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogLevel;

    fn line(seq: u64, stream: LogStream, text: &str, continued: bool) -> LogLine {
        LogLine {
            seq,
            stream,
            level: (stream == LogStream::Log).then_some(LogLevel::Warn),
            line: text.into(),
            continued,
            ts: String::new(),
            fields: Default::default(),
        }
    }

    #[test]
    fn lines_go_to_their_stream_and_continued_lines_are_joined() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut p = LinePrinter::new(false, &mut out, &mut err);
        p.line(&line(0, LogStream::Stdout, "ab", true)).unwrap();
        p.line(&line(1, LogStream::Stdout, "cd", false)).unwrap();
        p.line(&line(2, LogStream::Stderr, "oops", false)).unwrap();
        p.line(&line(3, LogStream::Log, "careful", false)).unwrap();
        p.flush().unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "abcd\n");
        assert_eq!(String::from_utf8(err).unwrap(), "oops\n[warn] careful\n");
    }

    #[test]
    fn json_lines_are_log_lines() {
        let mut out = Vec::new();
        let mut p = LinePrinter::new(true, &mut out, io::sink());
        let l = line(4, LogStream::Stdout, "x", true);
        p.line(&l).unwrap();
        let back: LogLine = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, l);
    }
}
