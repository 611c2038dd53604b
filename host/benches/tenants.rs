//! Tenant isolation figures (`cargo bench --bench tenants`): one real
//! `vulcan serve --max-concurrent 8` with two tenants, printing a quiet
//! tenant's sync `hello` p50/p99 (and its refusals) alone, then while a noisy
//! tenant floods from 16 clients (`log-flood 20000` in a loop): once with the
//! noisy tenant held to `max_concurrent = 4`, once without a quota (the
//! baseline, measured in the same run). The quiet tenant is a client of its
//! own: a thread with its own runtime and connections.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

mod common;
use common::{BenchServer, env_or, ms};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let runs: usize = env_or("VULCAN_BENCH_REQUESTS", 500);
    println!("tenants benchmark ({runs} quiet runs per figure, server --max-concurrent 8)");
    for noisy_quota in [Some(4), None] {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tenants.toml");
        let quota = noisy_quota.map_or(String::new(), |n| format!("max_concurrent = {n}\n"));
        common::noisy_and_quiet_tenants(&file, &quota)?;
        let server = BenchServer::start(
            &dir.path().join("data"),
            &[
                "--tenants",
                file.to_str().context("path")?,
                "--max-concurrent",
                "8",
            ],
        )?;
        let http = reqwest::Client::new();
        let example = |name: &str| std::fs::read(vulcan_test_artifacts::example(name));
        let hello = upload(&http, &server.url, "quiet", &example("hello")?).await?;
        let flood = upload(&http, &server.url, "noisy", &example("log-flood")?).await?;
        let quiet = json!({"module": hello});
        let alone = measure_apart(&server.url, &quiet, runs).await?;

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut flooders = Vec::new();
        for _ in 0..16 {
            let (http, url, stop) = (http.clone(), server.url.clone(), stop.clone());
            let spec = json!({"module": flood, "args": ["20000"]});
            flooders.push(tokio::spawn(async move {
                let mut done = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let resp = http
                        .post(format!("{url}/v1/workloads"))
                        .bearer_auth("noisy")
                        .json(&spec)
                        .send()
                        .await;
                    match resp.map(|r| r.status().as_u16()) {
                        Ok(200) => done += 1,
                        // Refused (quota or a full server): try again shortly.
                        _ => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                done
            }));
        }
        let during = measure_apart(&server.url, &quiet, runs).await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut noisy_runs = 0;
        for f in flooders {
            noisy_runs += f.await?;
        }
        let label = match noisy_quota {
            Some(n) => format!("noisy tenant max_concurrent = {n}"),
            None => "noisy tenant without a quota (baseline)".into(),
        };
        println!("  {label}:");
        println!(
            "    quiet alone:          p50 {:.2} ms, p99 {:.2} ms, refused {}",
            alone.0, alone.1, alone.2
        );
        println!(
            "    quiet during a flood: p50 {:.2} ms, p99 {:.2} ms, refused {} ({:.2}x the p50 alone; the noisy tenant ran {noisy_runs} floods)",
            during.0,
            during.1,
            during.2,
            during.0 / alone.0
        );
        server.stop()?;
    }
    Ok(())
}

async fn upload(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    wasm: &[u8],
) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{url}/v1/modules"))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(wasm.to_vec())
        .send()
        .await?;
    let v: Value = resp.json().await?;
    Ok(v["hash"].as_str().context("no hash")?.to_owned())
}

/// [`measure`] from a client of its own (a thread, a runtime and a
/// connection pool), as another user's would be: the noisy tenant's clients
/// in this process do not delay its requests on their way out and back.
async fn measure_apart(url: &str, spec: &Value, runs: usize) -> anyhow::Result<(f64, f64, usize)> {
    let (url, spec) = (url.to_owned(), spec.clone());
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure(&reqwest::Client::new(), &url, &spec, runs))
    })
    .await?
}

/// `runs` sync runs by the quiet tenant, one at a time: p50 and p99 in ms of
/// those that ran, and how many were refused (503 busy).
async fn measure(
    http: &reqwest::Client,
    url: &str,
    spec: &Value,
    runs: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    let mut took = Vec::with_capacity(runs);
    let mut refused = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let resp = http
            .post(format!("{url}/v1/workloads"))
            .bearer_auth("quiet")
            .json(spec)
            .send()
            .await?;
        match resp.status().as_u16() {
            200 => took.push(ms(started.elapsed())),
            _ => refused += 1,
        }
    }
    took.sort_by(f64::total_cmp);
    let at = |p: f64| {
        took.get(((took.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((at(0.5), at(0.99), refused))
}
