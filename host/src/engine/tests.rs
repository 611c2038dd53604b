//! Engine behaviour on hand-written WAT guests: exits, traps, loops, limits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::logs::LogWriter;
use crate::workload::{Limits, WorkloadId, WorkloadSpec};

/// A tee that keeps what the guest wrote and wakes whoever waits for it.
#[derive(Clone, Default)]
struct Captured(Arc<(Mutex<Vec<u8>>, tokio::sync::Notify)>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.0.lock().unwrap().clone()).unwrap()
    }

    /// Resolves once the guest has written `what`.
    async fn written(&self, what: &str) {
        loop {
            let wrote = self.0.1.notified();
            if self.text().contains(what) {
                return;
            }
            wrote.await;
        }
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.0.lock().unwrap().extend_from_slice(b);
        self.0.1.notify_waiters();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const PRINT_HELLO: &str = wat_fixture!("print-hello");
const EXIT_2: &str = wat_fixture!("exit-2");
const UNREACHABLE: &str = wat_fixture!("unreachable");
const SPIN: &str = wat_fixture!("spin");
const STARTED_THEN_SPIN: &str = wat_fixture!("started-then-spin");
const GROW_FOREVER: &str = wat_fixture!("grow-forever");

async fn run(wat: &str, limits: Limits) -> (Outcome, String) {
    let out = Captured::default();
    let outcome = run_with(wat, limits, CancellationToken::new(), out.clone()).await;
    (outcome, out.text())
}

async fn run_with(wat: &str, limits: Limits, cancel: CancellationToken, out: Captured) -> Outcome {
    let runtime = Runtime::new(Default::default(), None).unwrap();
    let module = runtime.compile(&wat::parse_str(wat).unwrap()).unwrap();
    let log = LogWriter::new(WorkloadId::new(), limits.max_output_bytes, None)
        .with_tee(Some(Box::new(out.clone())), None);
    let spec = WorkloadSpec {
        args: vec!["test.wasm".into()],
        limits,
        ..Default::default()
    };
    let report = runtime
        .run(&module, &spec, &GuestIdentity::default(), &log, &cancel)
        .await
        .unwrap();
    report.outcome
}

#[tokio::test]
async fn start_returning_is_exit_zero_and_output_is_captured() {
    let (outcome, out) = run(PRINT_HELLO, Limits::default()).await;
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(out, "hello\n");
}

#[tokio::test]
async fn proc_exit_code_is_the_outcome() {
    assert_eq!(run(EXIT_2, Limits::default()).await.0, Outcome::Exited(2));
}

#[tokio::test]
async fn trap_reports_message_and_wasm_backtrace() {
    let (outcome, _) = run(UNREACHABLE, Limits::default()).await;
    let Outcome::Trapped { message, backtrace } = outcome else {
        panic!("expected a trap, got {outcome:?}");
    };
    assert!(message.contains("unreachable"), "{message}");
    assert_eq!(
        message.matches("wasm trap").count(),
        1,
        "said once: {message}"
    );
    let backtrace = backtrace.expect("a backtrace");
    assert!(backtrace.contains("deep"), "{backtrace}");
}

#[tokio::test]
async fn tight_loop_times_out() {
    let limits = Limits {
        timeout_ms: Some(50),
        ..Default::default()
    };
    let (outcome, _) = run(SPIN, limits).await;
    assert_eq!(outcome, Outcome::TimedOut(Duration::from_millis(50)));
}

#[tokio::test]
async fn tight_loop_is_killed_through_its_token() {
    let (cancel, out) = (CancellationToken::new(), Captured::default());
    let killer = {
        let (cancel, out) = (cancel.clone(), out.clone());
        tokio::spawn(async move {
            // Killed only once it has shown it runs (and is in its loop).
            out.written("started").await;
            cancel.cancel();
        })
    };
    let outcome = run_with(STARTED_THEN_SPIN, Limits::default(), cancel, out.clone()).await;
    killer.await.unwrap();
    assert_eq!(outcome, Outcome::Killed);
    assert_eq!(
        out.text(),
        "started\n",
        "the guest ran before it was killed"
    );
}

#[tokio::test]
async fn memory_growth_past_the_limit_is_a_limit_hit() {
    let limits = Limits {
        max_memory_bytes: Some(4 << 20),
        ..Default::default()
    };
    let (outcome, _) = run(GROW_FOREVER, limits).await;
    assert_eq!(outcome, Outcome::LimitExceeded(LimitHit::Memory(4 << 20)));
}

#[tokio::test]
async fn initial_memory_above_the_limit_is_a_limit_hit() {
    let big = r#"(module (memory (export "memory") 100) (func (export "_start")))"#;
    let limits = Limits {
        max_memory_bytes: Some(1 << 20),
        ..Default::default()
    };
    assert_eq!(
        run(big, limits).await.0,
        Outcome::LimitExceeded(LimitHit::Memory(1 << 20))
    );
}

#[tokio::test]
async fn fuel_runs_out() {
    let limits = Limits {
        fuel: Some(10_000),
        ..Default::default()
    };
    assert_eq!(
        run(SPIN, limits).await.0,
        Outcome::LimitExceeded(LimitHit::Fuel(10_000))
    );
}

#[tokio::test]
async fn output_limit_stops_the_guest() {
    let limits = Limits {
        max_output_bytes: Some(3),
        ..Default::default()
    };
    assert_eq!(
        run(PRINT_HELLO, limits).await.0,
        Outcome::LimitExceeded(LimitHit::Output(3))
    );
}

#[test]
fn bad_modules_are_refused_with_a_reason() {
    let runtime = Runtime::new(Default::default(), None).unwrap();
    let err = |bytes: &[u8]| runtime.compile(bytes).err().expect("refused").0;

    assert!(err(b"hello world, not wasm").contains("\\0asm"));
    let hello = wat::parse_str(PRINT_HELLO).unwrap();
    assert!(err(&hello[..hello.len() / 2]).contains("invalid module"));
    let no_start = wat::parse_str("(module (func (export \"main\")))").unwrap();
    assert!(err(&no_start).contains("_start"));
    let unknown = wat::parse_str(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
    )
    .unwrap();
    assert!(err(&unknown).contains("launch_missiles"));
}

#[test]
fn classify_tells_modules_from_components() {
    let module = wat::parse_str("(module)").unwrap();
    assert_eq!(Runtime::classify(&module).unwrap(), BinaryFormat::Module);
    let component = wat::parse_str("(component)").unwrap();
    assert_eq!(
        Runtime::classify(&component).unwrap(),
        BinaryFormat::Component
    );
    assert!(Runtime::classify(b"\0as").is_err());
}
