//! Soak benchmark (`cargo bench --bench soak`): a hostile flooder against a
//! real `vulcan serve` and a real `vulcan run`, with the hardening goals.
//!
//! 1. write→follower latency: `ticker` prints its clock once a millisecond; an
//!    SSE client measures how long each line took to reach it (lines are
//!    published only once committed, so this is the price of durability);
//! 2. `tight` (writes `x\n` in 64 KiB buffers, no limits of its own) floods a
//!    server for `VULCAN_SOAK_SECS` (default 60): the server's RSS, sync runs
//!    of `hello` meanwhile (p50/p99), the flooder's durable lines/s, and how
//!    long DELETE takes to end it;
//! 3. `vulcan run tight > /dev/null` for `VULCAN_SOAK_RUN_SECS` (default 20):
//!    its RSS, and how long it takes to exit after Ctrl-C (SIGINT).
//!
//! Prints each figure beside its goal. Nothing here is a pass/fail test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use vulcan::cli::sse::SseParser;

mod common;
use common::{BenchServer, env_or, ms, rss_kib, upload, vulcan_bin};

fn main() -> anyhow::Result<()> {
    let secs: u64 = env_or("VULCAN_SOAK_SECS", 60);
    let run_secs: u64 = env_or("VULCAN_SOAK_RUN_SECS", 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::var_os("VULCAN_SOAK_LATENCY_ONLY").is_some() {
        // The one part an unbounded build survives: for a before/after figure.
        return rt.block_on(latency_only());
    }
    rt.block_on(serve_soak(secs))?;
    run_soak(run_secs)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

async fn serve_soak(secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start(dir.path(), &[])?;
    let http = reqwest::Client::new();
    let url = server.url.clone();
    let example = |name| std::fs::read(vulcan_test_artifacts::example(name));
    let hello = upload(&http, &url, &example("hello")?).await?;
    let ticker = upload(&http, &url, &example("ticker")?).await?;
    let tight = upload(&http, &url, &example("tight")?).await?;
    println!("soak benchmark ({secs} s of flooding)");

    // 1. write→follower latency.
    print_latency(&http, &url, &ticker, "   (goal p50 ≤ 10 ms)").await?;

    // 2. The flooder, with a quiet workload beside it.
    let limits = json!({"timeout_ms": (secs + 120) * 1000, "max_output_bytes": 4_000_000_000u64});
    let flooder = start(&http, &url, json!({"module": tight, "limits": limits})).await?;
    let pid = server.child.id();
    let t = Instant::now();
    let mut peak_rss = 0;
    let mut quiet = Vec::new();
    while t.elapsed() < Duration::from_secs(secs) {
        peak_rss = peak_rss.max(rss_kib(pid)?);
        let r = Instant::now();
        let resp = http
            .post(format!("{url}/v1/workloads"))
            .json(&json!({"module": hello}))
            .send()
            .await?;
        let status = resp.status();
        let record: Value = resp.json().await?;
        ensure!(
            status == 200 && record["status"] == "completed",
            "hello: {status} {record}"
        );
        quiet.push(r.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = Instant::now();
    let resp = http
        .delete(format!("{url}/v1/workloads/{flooder}"))
        .send()
        .await?;
    let delete = r.elapsed();
    let killed: Value = resp.json().await?;
    ensure!(killed["status"] == "killed", "DELETE answered {killed}");
    let lines = killed["line_count"].as_u64().context("no line_count")?;
    let ran = killed["duration_ms"].as_u64().context("no duration")? as f64 / 1e3;
    quiet.sort_unstable();
    println!(
        "  vulcan serve peak RSS while flooding: {} MiB   (goal ≤ 512 MiB; before: grew ~300 MB/s until OOM-killed at 24.3 GB)",
        peak_rss / 1024
    );
    println!(
        "  1-line sync run beside the flood: p50 {:.2} ms, p99 {:.2} ms over {} runs   (goal p50 ≤ 50 ms; before: 10 s to >120 s)",
        ms(percentile(&quiet, 50)),
        ms(percentile(&quiet, 99)),
        quiet.len()
    );
    println!(
        "  DELETE of the flooder answered with it killed in {:.1} ms   (goal ≤ 100 ms; before: 10 s)",
        ms(delete)
    );
    println!(
        "  flooder's durable lines: {lines} in {ran:.1} s = {:.0} lines/s   (goal ≥ 1,000,000/s)",
        lines as f64 / ran
    );
    server.stop()
}

async fn latency_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start(dir.path(), &[])?;
    let http = reqwest::Client::new();
    let ticker = std::fs::read(vulcan_test_artifacts::example("ticker"))?;
    let ticker = upload(&http, &server.url, &ticker).await?;
    print_latency(&http, &server.url, &ticker, "").await?;
    server.stop()
}

/// Runs `ticker` (a line a millisecond) and prints how long its lines took to
/// reach a live follower.
async fn print_latency(
    http: &reqwest::Client,
    url: &str,
    ticker: &str,
    goal: &str,
) -> anyhow::Result<()> {
    let id = start(
        http,
        url,
        json!({"module": ticker, "args": ["2000", "1000"]}),
    )
    .await?;
    let mut latencies = follow_latencies(http, url, &id).await?;
    latencies.sort_unstable();
    println!(
        "  write→follower latency ({} lines): p50 {:.2} ms, p99 {:.2} ms{goal}",
        latencies.len(),
        ms(percentile(&latencies, 50)),
        ms(percentile(&latencies, 99)),
    );
    Ok(())
}

/// Starts a workload from a JSON spec; returns its id.
async fn start(http: &reqwest::Client, url: &str, spec: Value) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{url}/v1/workloads/async"))
        .json(&spec)
        .send()
        .await?;
    ensure!(resp.status() == 202, "async start: {}", resp.status());
    let v: Value = resp.json().await?;
    Ok(v["id"].as_str().context("no id")?.to_owned())
}

/// Follows `id` to its end; each line holds the guest's clock when written.
async fn follow_latencies(
    http: &reqwest::Client,
    url: &str,
    id: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut resp = http
        .get(format!("{url}/v1/workloads/{id}/logs"))
        .send()
        .await?;
    let mut parser = SseParser::default();
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        for event in parser.push(&chunk) {
            if event.event == "end" {
                return Ok(out);
            }
            let written: u128 = event.data.trim().parse()?;
            out.push(Duration::from_nanos(now.saturating_sub(written) as u64));
        }
    }
    anyhow::bail!("the stream ended without an end event")
}

fn run_soak(secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(vulcan_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("run")
        .arg(vulcan_test_artifacts::example("tight"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start vulcan run")?;
    let t = Instant::now();
    let mut peak = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        peak = peak.max(rss_kib(child.id())?);
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    let exited = stop.elapsed();
    println!(
        "  vulcan run tight > /dev/null for {secs} s: peak RSS {} MiB   (goal ≤ 256 MiB)",
        peak / 1024
    );
    println!(
        "  Ctrl-C to exit: {:.1} ms, exit code {:?}   (goal ≤ 1 s; before: 24 s)",
        ms(exited),
        status.code()
    );
    Ok(())
}
