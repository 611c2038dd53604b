//! Compile fairness (`cargo bench --bench uploads`): one real `vulcan serve`
//! with two tenants. Prints the quiet tenant's upload p50 (a small module,
//! new bytes each time, so each is compiled) alone, then while the noisy
//! tenant floods uploads of modules with one large function (900 KB of code
//! by default, `VULCAN_BENCH_FUNCTION_KB`) from 4 connections, against the
//! time one of the noisy modules takes to compile alone, measured in the same
//! run. The quiet tenant pauses a spread of fractions of one compile between
//! its uploads, as a tenant that uploads now and then would. The goal: the
//! quiet p50 during the flood is at most one such compile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

mod common;
use common::{BenchServer, env_or, ms};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

/// A WASI module of `body_kb` KB of code in one function.
fn module(body_kb: usize) -> Vec<u8> {
    // `(drop (i32.const 1))` is 3 bytes of code.
    let body = "(drop (i32.const 1)) ".repeat(body_kb * 1000 / 3);
    wat::parse_str(format!(
        "(module (memory (export \"memory\") 1) (func (export \"_start\") {body}))"
    ))
    .expect("a valid module")
}

/// `base` with a custom section named `n` at its end: new bytes, so a new
/// compile, at no cost to the client.
fn unique(base: &[u8], n: u64) -> Vec<u8> {
    let name = n.to_string();
    let mut wasm = base.to_vec();
    // Section id 0, its size, then the name's length and the name (all < 128).
    wasm.extend_from_slice(&[0, name.len() as u8 + 1, name.len() as u8]);
    wasm.extend_from_slice(name.as_bytes());
    wasm
}

async fn upload(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    wasm: Vec<u8>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let resp = http
        .post(format!("{url}/v1/modules"))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "upload: {} {}",
        resp.status(),
        resp.text().await?
    );
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
    common::noisy_and_quiet_tenants(&file, "")?;
    let server = BenchServer::start(
        &dir.path().join("data"),
        &["--tenants", file.to_str().context("path")?],
    )?;
    let http = reqwest::Client::new();
    let url = server.url.clone();
    let serial = Arc::new(AtomicU64::new(1));
    let next = || serial.fetch_add(1, Ordering::Relaxed);
    let (small, large) = (module(1), Arc::new(module(body_kb)));

    let mut alone = Vec::new();
    for _ in 0..quiet_uploads {
        alone.push(upload(&http, &url, "quiet", unique(&small, next())).await?);
    }
    let mut compiles = Vec::new();
    for _ in 0..3 {
        compiles.push(upload(&http, &url, "noisy", unique(&large, next())).await?);
    }
    let one_compile = median(compiles);

    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let (http, url, stop, serial) = (http.clone(), url.clone(), stop.clone(), serial.clone());
        let large = Arc::clone(&large);
        flooders.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let wasm = unique(&large, serial.fetch_add(1, Ordering::Relaxed));
                upload(&http, &url, "noisy", wasm).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    // Let the flood fill the compile queue first.
    tokio::time::sleep(one_compile * 2).await;
    // A quiet tenant uploads now and then, not back to back: a pause of a
    // spread of fractions of one compile before each, so it does not always
    // arrive just as a noisy compile has begun.
    let mut during = Vec::new();
    for i in 0..quiet_uploads {
        let fraction = ((i * 7919) % quiet_uploads) as f64 / quiet_uploads as f64;
        tokio::time::sleep(one_compile.mul_f64(fraction)).await;
        during.push(upload(&http, &url, "quiet", unique(&small, next())).await?);
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
    println!(
        "one noisy compile alone (median of 3): {:.1} ms",
        ms(one_compile)
    );
    println!("quiet upload p50 alone: {:.1} ms", ms(alone));
    println!(
        "quiet upload p50 while the noisy tenant floods from 4 connections ({flooded} noisy uploads): \
         {:.1} ms = {:.2}× one noisy compile (goal <= 1×)",
        ms(during),
        during.as_secs_f64() / one_compile.as_secs_f64()
    );
    server.stop()
}
