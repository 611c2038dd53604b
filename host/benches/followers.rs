//! Followers' memory (`cargo bench --bench followers`): one real `vulcan
//! serve`, one workload of 20,000 lines, then 2,000 `?format=json` SSE
//! followers reading it to its end at once (`VULCAN_BENCH_FOLLOWERS`,
//! `VULCAN_BENCH_LINES` to change). Prints the server's resident memory
//! before, at its peak, and per follower, and checks every follower got
//! every seq once. The goal: the peak stays at or under 512 MiB.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use serde_json::json;

mod common;
use common::{BenchServer, env_or, rss_kib};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let followers: usize = env_or("VULCAN_BENCH_FOLLOWERS", 2_000);
    let lines: u64 = env_or("VULCAN_BENCH_LINES", 20_000);
    let dir = tempfile::tempdir()?;
    // The default --max-followers (4,096) admits them all; an older build
    // (VULCAN_BENCH_BIN) has no such flag.
    let server = BenchServer::start(dir.path(), &[])?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let flood = std::fs::read(vulcan_test_artifacts::example("log-flood"))?;
    let hash = common::upload(&http, &server.url, &flood).await?;
    let resp = http
        .post(format!("{}/v1/workloads", server.url))
        .json(&json!({"module": hash, "args": [lines.to_string()]}))
        .send()
        .await?;
    let record: serde_json::Value = resp.json().await?;
    ensure!(
        record["line_count"] == lines,
        "the flood ended short: {record}"
    );
    let id = record["id"].as_str().context("no id")?.to_owned();
    let pid = server.child.id();
    let before = rss_kib(pid)?;

    let started = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..followers {
        let (http, url) = (
            http.clone(),
            format!("{}/v1/workloads/{id}/logs?format=json", server.url),
        );
        readers.push(tokio::spawn(common::follow_url(http, url)));
    }
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if peak == u64::MAX {
                return peak;
            }
        }
    });
    for reader in readers {
        let got = reader.await??;
        ensure!(got == lines, "a follower got {got} of {lines} lines");
    }
    let elapsed = started.elapsed();
    sampler.abort();
    let peak = server.peak_rss_kib()?;
    println!(
        "{followers} followers (?format=json) of a {lines}-line log: all complete in {:.2} s \
         ({:.0} lines/s in all)",
        elapsed.as_secs_f64(),
        (followers as f64 * lines as f64) / elapsed.as_secs_f64()
    );
    println!(
        "server RSS: {} MiB before, peak {} MiB (goal <= 512 MiB), {} KiB per follower at the peak",
        before >> 10,
        peak >> 10,
        peak.saturating_sub(before) / followers as u64
    );
    server.stop()
}
