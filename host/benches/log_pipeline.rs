//! Log pipeline benchmark (`cargo bench --bench log_pipeline`).
//!
//! 1. `log-flood N` through the full pipeline (engine → LogWriter → broker +
//!    batched SQLite writer), timed until the terminal status is committed,
//!    i.e. until every line is durable: prints lines/s.
//! 2. The same N lines inserted the naive way, one transaction per line, into a
//!    fresh database with the same schema and pragmas: prints lines/s and the ratio.
//! 3. `vulcan run log-flood N > /dev/null` wall time against a reference that
//!    only prints, measured in the same run: this bench binary re-run as a plain
//!    wasmtime host (what `wasmtime run` does: compile, link async WASI
//!    preview1 with inherited stdout, call `_start`; no store, no log
//!    pipeline), and the `wasmtime` CLI too if it is on PATH. Best of 3 each.
//!
//! N defaults to 1,000,000; set `VULCAN_BENCH_LINES` to change it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vulcan::node::{Node, NodeOptions};
use vulcan::runner::Creation;
use vulcan::store::Db;
use vulcan::workload::{Status, WorkloadSpec};

// The allocator the `vulcan` binary ships with, so the in-process pipeline is
// measured as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set in a child run of this binary: act as the plain-wasmtime reference.
const REFERENCE_ENV: &str = "VULCAN_BENCH_REFERENCE_MODULE";

fn main() -> anyhow::Result<()> {
    if let Ok(module) = std::env::var(REFERENCE_ENV) {
        return plain_wasmtime_run(&module);
    }
    let lines: u64 = std::env::var("VULCAN_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let module = vulcan_test_artifacts::example("log-flood");
    println!("log pipeline benchmark: {lines} lines of log-flood");

    let pipeline = full_pipeline(&module, lines)?;
    let pipeline_rate = lines as f64 / pipeline.as_secs_f64();
    println!(
        "  full pipeline, durable:        {:>8.3} s  {:>12.0} lines/s",
        pipeline.as_secs_f64(),
        pipeline_rate
    );

    let naive = naive_inserts(lines)?;
    let naive_rate = lines as f64 / naive.as_secs_f64();
    println!(
        "  naive, 1 transaction per line: {:>8.3} s  {:>12.0} lines/s",
        naive.as_secs_f64(),
        naive_rate
    );
    println!(
        "  ratio pipeline / naive:        {:>8.1}x",
        pipeline_rate / naive_rate
    );

    // Best of three for both sides: whole-process timings are noisy.
    let mut vulcan = Duration::MAX;
    for _ in 0..3 {
        // A fresh data directory each time: compiles, like the reference.
        let dir = tempfile::tempdir()?;
        vulcan = vulcan.min(time_command(
            Command::new(env!("CARGO_BIN_EXE_vulcan"))
                .arg("--data-dir")
                .arg(dir.path())
                .arg("run")
                .arg(&module)
                .arg("--")
                .arg(lines.to_string()),
        )?);
    }
    println!(
        "  vulcan run > /dev/null:        {:>8.3} s  (prints and persists; best of 3)",
        vulcan.as_secs_f64()
    );
    let mut reference = Duration::MAX;
    for _ in 0..3 {
        reference = reference.min(time_command(
            Command::new(std::env::current_exe()?)
                .env(REFERENCE_ENV, &module)
                .arg(lines.to_string()),
        )?);
    }
    let mut wasmtime: anyhow::Result<Duration> = Ok(Duration::MAX);
    for _ in 0..3 {
        let t = time_command(
            Command::new("wasmtime")
                .arg("run")
                .arg(&module)
                .arg(lines.to_string()),
        );
        wasmtime = wasmtime.and_then(|best: Duration| Ok(best.min(t?)));
    }
    println!(
        "  plain wasmtime > /dev/null:    {:>8.3} s  (prints only; best of 3); vulcan run / plain = {:.2}",
        reference.as_secs_f64(),
        vulcan.as_secs_f64() / reference.as_secs_f64()
    );
    match wasmtime {
        Ok(wasmtime) => println!(
            "  wasmtime run > /dev/null:      {:>8.3} s  (prints only; best of 3); vulcan run / wasmtime run = {:.2}",
            wasmtime.as_secs_f64(),
            vulcan.as_secs_f64() / wasmtime.as_secs_f64()
        ),
        Err(_) => {
            println!("  wasmtime run:                  (wasmtime CLI not installed; skipped)")
        }
    }
    Ok(())
}

/// The reference: runs `module` the way `wasmtime run` does (async WASI
/// preview1 on a tokio runtime, output straight to this process's stdout).
/// Arguments after the program name go to the guest.
fn plain_wasmtime_run(module: &str) -> anyhow::Result<()> {
    use wasmtime_wasi::WasiCtxBuilder;
    use wasmtime_wasi::p1::WasiP1Ctx;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let engine = wasmtime::Engine::default();
        let mut linker = wasmtime::Linker::<WasiP1Ctx>::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |cx| cx)?;
        let mut guest_args = vec![module.to_owned()];
        guest_args.extend(std::env::args().skip(1));
        let wasi = WasiCtxBuilder::new()
            .inherit_stdout()
            .inherit_stderr()
            .args(&guest_args)
            .build_p1();
        let mut store = wasmtime::Store::new(&engine, wasi);
        let module = wasmtime::Module::from_file(&engine, module)?;
        let instance = linker.instantiate_async(&mut store, &module).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        match start.call_async(&mut store, ()).await {
            Ok(()) => Ok(()),
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) if exit.0 == 0 => Ok(()),
                _ => Err(anyhow::Error::from(e)),
            },
        }
    })
}

fn full_pipeline(module: &std::path::Path, lines: u64) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let bytes = bytes::Bytes::from(std::fs::read(module)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let node = Node::open(dir.path(), NodeOptions::default()).await?;
        let (info, compiled, _) = node.registry().register(bytes).await?;
        let spec = WorkloadSpec {
            args: vec!["log-flood.wasm".into(), lines.to_string()],
            ..Default::default()
        };
        let started = Instant::now();
        let run = node
            .runner()
            .start(compiled, info.hash, spec, None, Creation::Overlapped)
            .await?;
        let record = run.done.await??;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            record.status == Status::Completed,
            "log-flood failed: {record:?}"
        );
        anyhow::ensure!(
            record.line_count == lines,
            "wrong line count {}",
            record.line_count
        );
        let stored = node.db().read_lines(record.id, Some(lines - 2), 10).await?;
        anyhow::ensure!(
            stored.len() == 1 && stored[0].seq == lines - 1,
            "last line not stored"
        );
        Ok(elapsed)
    })
}

fn naive_inserts(lines: u64) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    // Same schema and pragmas as the real store, via the real migrations.
    drop(Db::open(dir.path())?);
    let conn = rusqlite::Connection::open(dir.path().join(vulcan::store::DB_FILE))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let id = 1; // a workload key; the naive design is about transactions, not keys
    let started = Instant::now();
    let mut stmt = conn.prepare(
        "INSERT INTO log_records (workload, seq, stream, level, line, continued, created_at) \
         VALUES (?1, ?2, 0, NULL, ?3, 0, ?4)",
    )?;
    for seq in 0..lines as i64 {
        conn.execute_batch("BEGIN")?;
        stmt.execute(rusqlite::params![id, seq, format!("line {seq}"), 0])?;
        conn.execute_batch("COMMIT")?;
    }
    Ok(started.elapsed())
}

fn time_command(cmd: &mut Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    let elapsed = started.elapsed();
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(elapsed)
}
