//! The job queue (`cargo bench --bench queue`), on one real
//! `vulcan serve --max-concurrent 64`:
//!
//! - throughput: `VULCAN_BENCH_JOBS` (default 100,000) async `hello`
//!   submissions from 64 clients: accepted/s, completed/s, the queue wait's
//!   p50/p99 (from the records: `started_at - created_at`), and the server's
//!   resident memory at idle and at its peak;
//! - fairness: with a noisy tenant's `VULCAN_BENCH_BACKLOG` (default 10,000)
//!   jobs queued, a quiet tenant's jobs submitted one after another: their
//!   queue wait p50/p99, beside the same jobs' wait on an idle server;
//! - schedule: a schedule firing every second for
//!   `VULCAN_BENCH_SCHEDULE_SECS` (default 300): how late each firing's
//!   workload was created after its tick, p50/p99/max.
//!
//! `VULCAN_BENCH_PARTS` picks parts (default `throughput,fairness,schedule`);
//! `VULCAN_BENCH_BIN` runs another build.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

mod common;
use common::{BenchServer, env_or};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let parts: String = env_or(
        "VULCAN_BENCH_PARTS",
        "throughput,fairness,schedule".to_owned(),
    );
    let parts: Vec<&str> = parts.split(',').collect();
    if parts.contains(&"throughput") {
        throughput().await?;
    }
    if parts.contains(&"fairness") {
        fairness().await?;
    }
    if parts.contains(&"schedule") {
        schedule().await?;
    }
    Ok(())
}

async fn schedule() -> anyhow::Result<()> {
    let secs: u64 = env_or("VULCAN_BENCH_SCHEDULE_SECS", 300);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let server = BenchServer::start(&data, &["--max-concurrent", "64"])?;
    let http = reqwest::Client::new();
    let hello = std::fs::read(vulcan_test_artifacts::example("hello"))?;
    let hash = common::upload(&http, &server.url, &hello).await?;
    let resp = http
        .post(format!("{}/v1/schedules", server.url))
        .json(&json!({"name": "tick", "cron": "* * * * * *", "spec": {"module": hash}}))
        .send()
        .await?;
    ensure!(resp.status() == 201, "schedule: {}", resp.status());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    server.stop()?;
    let conn = rusqlite::Connection::open(data.join("vulcan.db"))?;
    let mut stmt = conn.prepare("SELECT created_at FROM workloads WHERE schedule = 'tick'")?;
    let mut late: Vec<i64> = stmt
        .query_map([], |r| r.get::<_, i64>(0))?
        .filter_map(Result::ok)
        .map(|at| at.rem_euclid(1000))
        .collect();
    late.sort_unstable();
    println!(
        "schedule: every second for {secs} s: {} firings (of {secs} ticks), lateness after the \
         tick p50 {} ms, p99 {} ms, max {} ms",
        late.len(),
        pct(&late, 0.5),
        pct(&late, 0.99),
        late.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// Runs `n` async submissions of `spec` as `token` from `clients` clients;
/// the ids.
async fn submit(
    url: &str,
    token: Option<&str>,
    spec: &Value,
    n: usize,
    clients: usize,
) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.to_owned(), next.clone());
            let (token, spec) = (token.map(str::to_owned), spec.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let mut req = http.post(format!("{url}/v1/workloads/async")).json(&spec);
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    let resp = req.send().await?;
                    ensure!(resp.status() == 202, "submit: {}", resp.status());
                    let v: Value = resp.json().await?;
                    ids.push(v["id"].as_str().context("no id")?.to_owned());
                }
                anyhow::Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}

/// How many workloads `token` sees with `status`.
async fn count(url: &str, token: Option<&str>, status: &str) -> anyhow::Result<u64> {
    let mut req = reqwest::Client::new().get(format!("{url}/v1/workloads?status={status}&limit=1"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let v: Value = req.send().await?.json().await?;
    v["total"].as_u64().context("no total")
}

/// Waits until `token` sees `n` completed workloads (polling the list).
async fn until_completed(url: &str, token: Option<&str>, n: u64) -> anyhow::Result<()> {
    while count(url, token, "completed").await? < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Queue waits (ms) of the workloads in `file`'s `ids` (all when empty).
fn waits(file: &std::path::Path, ids: &[String]) -> anyhow::Result<Vec<i64>> {
    let conn = rusqlite::Connection::open(file)?;
    let mut stmt = conn.prepare("SELECT id, started_at - created_at FROM workloads")?;
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut out: Vec<i64> = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .filter_map(Result::ok)
        .filter(|(id, _)| wanted.is_empty() || wanted.contains(id.as_str()))
        .map(|(_, w)| w)
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn throughput() -> anyhow::Result<()> {
    let n: usize = env_or("VULCAN_BENCH_JOBS", 100_000);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let server = BenchServer::start(&data, &["--max-concurrent", "64"])?;
    let hello = std::fs::read(vulcan_test_artifacts::example("hello"))?;
    let hash = common::upload(&reqwest::Client::new(), &server.url, &hello).await?;
    let idle = common::rss_kib(server.child.id())?;
    let started = Instant::now();
    submit(&server.url, None, &json!({"module": hash}), n, 64).await?;
    let accepted = started.elapsed();
    until_completed(&server.url, None, n as u64).await?;
    let completed = started.elapsed();
    let peak = server.peak_rss_kib()?;
    server.stop()?;
    let waits = waits(&data.join("vulcan.db"), &[])?;
    println!("queue throughput: {n} async hello submissions, 64 clients, --max-concurrent 64");
    println!(
        "  accepted  {:>8.0}/s ({:.1} s)",
        n as f64 / accepted.as_secs_f64(),
        accepted.as_secs_f64()
    );
    println!(
        "  completed {:>8.0}/s ({:.1} s)",
        n as f64 / completed.as_secs_f64(),
        completed.as_secs_f64()
    );
    println!(
        "  queue wait p50 {} ms, p99 {} ms, max {} ms",
        pct(&waits, 0.5),
        pct(&waits, 0.99),
        waits.last().copied().unwrap_or(0)
    );
    println!(
        "  server RSS idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB)",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(idle) as f64 / 1024.0
    );
    Ok(())
}

async fn fairness() -> anyhow::Result<()> {
    let backlog: usize = env_or("VULCAN_BENCH_BACKLOG", 10_000);
    const QUIET_JOBS: usize = 50;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tenants.toml");
    common::noisy_and_quiet_tenants(&file, "")?;
    let data = dir.path().join("data");
    let args = [
        "--max-concurrent",
        "64",
        "--tenants",
        file.to_str().context("path")?,
    ];
    let server = BenchServer::start(&data, &args)?;
    let http = reqwest::Client::new();
    let ticker = std::fs::read(vulcan_test_artifacts::example("ticker"))?;
    let mut hashes = Vec::new();
    for token in ["noisy", "quiet"] {
        let resp = http
            .post(format!("{}/v1/modules", server.url))
            .bearer_auth(token)
            .header("content-type", "application/wasm")
            .body(ticker.clone())
            .send()
            .await?;
        let v: Value = resp.json().await?;
        hashes.push(v["hash"].as_str().context("no hash")?.to_owned());
    }
    // The noisy tenant's jobs take 100 ms each, so its backlog lasts; the
    // quiet tenant's are short.
    let noisy_job = json!({"module": hashes[0], "args": ["2", "50000"]});
    let quiet_job = json!({"module": hashes[1], "args": ["1", "0"]});
    // The quiet tenant alone first: its wait on an idle server.
    let alone = submit(&server.url, Some("quiet"), &quiet_job, QUIET_JOBS, 1).await?;
    until_completed(&server.url, Some("quiet"), QUIET_JOBS as u64).await?;
    submit(&server.url, Some("noisy"), &noisy_job, backlog, 64).await?;
    let mut beside = Vec::new();
    for i in 0..QUIET_JOBS {
        let id = submit(&server.url, Some("quiet"), &quiet_job, 1, 1).await?;
        beside.extend(id);
        until_completed(&server.url, Some("quiet"), (QUIET_JOBS + i + 1) as u64).await?;
    }
    let queued = count(&server.url, Some("noisy"), "pending").await?;
    server.stop()?;
    let quiet_file = data.join("tenants").join("quiet.db");
    let (alone, beside) = (waits(&quiet_file, &alone)?, waits(&quiet_file, &beside)?);
    println!(
        "fairness: a quiet tenant's jobs ({QUIET_JOBS}, one at a time) while a noisy tenant's \
         {backlog} wait (still {queued} pending at the end), --max-concurrent 64"
    );
    println!(
        "  quiet wait alone    p50 {:>4} ms, p99 {:>4} ms",
        pct(&alone, 0.5),
        pct(&alone, 0.99)
    );
    println!(
        "  quiet wait beside   p50 {:>4} ms, p99 {:>4} ms",
        pct(&beside, 0.5),
        pct(&beside, 0.99)
    );
    Ok(())
}
