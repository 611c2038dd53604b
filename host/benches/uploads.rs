//! Compile fairness (`cargo bench --bench uploads`): one real `vulcan serve`
//! with two tenants. Prints the quiet tenant's upload p50 (a small module,
//! new bytes each time, so each is compiled) alone, then while the noisy
//! tenant floods uploads of modules with one large function (900 KB of code
//! by default, `VULCAN_BENCH_FUNCTION_KB`) from 4 connections, against the
//! time one of the noisy modules takes to compile alone, measured in the same
//! run. The goal: the quiet p50 during the flood is at most one such compile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

mod common;
use common::{BenchServer, env_or, ms};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

/// A WASI module of `body_kb` KB of code in one function; `n` makes its bytes unique.
fn module(n: u64, body_kb: usize) -> Vec<u8> {
    // `(drop (i32.const 1))` is 3 bytes of code.
    let body = "(drop (i32.const 1)) ".repeat(body_kb * 1000 / 3);
    wat::parse_str(format!(
        "(module (memory (export \"memory\") 1) \
           (func (export \"_start\") (drop (i64.const {n})) {body}))"
    ))
    .expect("a valid module")
}

async fn upload(http: &reqwest::Client, url: &str, token: &str, wasm: Vec<u8>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let resp = http
        .post(format!("{url}/v1/modules"))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "upload: {} {}", resp.status(), resp.text().await?);
    Ok(started.elapsed())
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

async fn run() -> anyhow::Result<()> {
    let quiet_uploads: u64 = env_or("VULCAN_BENCH_REQUESTS", 20);
    let body_kb: usize = env_or("VULCAN_BENCH_FUNCTION_KB", 900);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tenants.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenants]]\nname = \"noisy\"\ntoken_sha256 = \"{}\"\n\
             [[tenants]]\nname = \"quiet\"\ntoken_sha256 = \"{}\"\n",
            vulcan::tenants::token_hash("noisy"),
            vulcan::tenants::token_hash("quiet"),
        ),
    )?;
    let server = BenchServer::start(
        &dir.path().join("data"),
        &["--tenants", file.to_str().context("path")?],
    )?;
    let http = reqwest::Client::new();
    let url = server.url.clone();
    let serial = Arc::new(AtomicU64::new(1));
    let next = || serial.fetch_add(1, Ordering::Relaxed);

    let mut alone = Vec::new();
    for _ in 0..quiet_uploads {
        alone.push(upload(&http, &url, "quiet", module(next(), 1)).await?);
    }
    let mut compiles = Vec::new();
    for _ in 0..3 {
        compiles.push(upload(&http, &url, "noisy", module(next(), body_kb)).await?);
    }
    let one_compile = median(compiles);

    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let (http, url, stop, serial) = (http.clone(), url.clone(), stop.clone(), serial.clone());
        flooders.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let wasm = module(serial.fetch_add(1, Ordering::Relaxed), body_kb);
                upload(&http, &url, "noisy", wasm).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    // Let the flood fill the compile queue first.
    tokio::time::sleep(one_compile * 2).await;
    let mut during = Vec::new();
    for _ in 0..quiet_uploads {
        during.push(upload(&http, &url, "quiet", module(next(), 1)).await?);
    }
    stop.store(true, Ordering::Relaxed);
    let mut flooded = 0;
    for f in flooders {
        flooded += f.await??;
    }
    let (alone, during) = (median(alone), median(during));
    println!(
        "uploads benchmark ({quiet_uploads} quiet uploads per figure; noisy modules of one {body_kb} KB function)"
    );
    println!("one noisy compile alone (median of 3): {:.1} ms", ms(one_compile));
    println!("quiet upload p50 alone: {:.1} ms", ms(alone));
    println!(
        "quiet upload p50 while the noisy tenant floods from 4 connections ({flooded} noisy uploads): \
         {:.1} ms = {:.2}× one noisy compile (goal <= 1×)",
        ms(during),
        during.as_secs_f64() / one_compile.as_secs_f64()
    );
    server.stop()
}
