//! Deep list pages (`cargo bench --bench lists`): one `vulcan serve` with two
//! tenants, whose workloads are in two files of their own, holding
//! `VULCAN_BENCH_WORKLOADS` (default 200,000) workloads, half each. The
//! admin's list (merged across the files) is asked for a page of 50 at
//! offset 0, at offset 100,000, and by key (`before` the 100,000th id):
//! request time (median of 5) and the server's peak resident memory during
//! those requests (its high-water mark is reset before each).
//!
//! `VULCAN_BENCH_BIN` runs another build (e.g. an older one) for the
//! before/after figures.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

mod common;
use common::{BenchServer, env_or, ms};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

/// How many requests each figure is the median of.
const TURNS: usize = 5;

async fn run() -> anyhow::Result<()> {
    let total: usize = env_or("VULCAN_BENCH_WORKLOADS", 200_000);
    let deep = total / 2;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tenants.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenants]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n\n\
             [[tenants]]\nname = \"bob\"\ntoken_sha256 = \"{}\"\n\n\
             [[tenants]]\nname = \"root\"\nadmin = true\ntoken_sha256 = \"{}\"\n",
            sha256("alice"),
            sha256("bob"),
            sha256("root")
        ),
    )?;
    let server = BenchServer::start(
        &dir.path().join("data"),
        &[
            "--tenants",
            file.to_str().context("path")?,
            "--max-concurrent",
            "64",
        ],
    )?;
    let http = reqwest::Client::new();
    let hello = std::fs::read(vulcan_test_artifacts::example("hello"))?;
    println!("list pages over {total} workloads in two tenants' files");
    let started = Instant::now();
    for tenant in ["alice", "bob"] {
        let hash = upload_as(&http, &server.url, tenant, &hello).await?;
        runs(&http, &server.url, tenant, &hash, total / 2).await?;
    }
    println!(
        "  ({total} runs in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let page = |query: String| {
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            let resp = http
                .get(format!("{url}/v1/workloads?{query}"))
                .bearer_auth("root")
                .send()
                .await?;
            ensure!(resp.status() == 200, "list: {}", resp.status());
            anyhow::Ok(resp.json::<Value>().await?)
        }
    };
    // The id at the deep offset, for the keyset page.
    let at = page(format!("limit=1&offset={}", deep - 1)).await?;
    let before = at["items"][0]["id"].as_str().context("no id")?.to_owned();
    for (what, query) in [
        ("offset 0", "limit=50".to_owned()),
        ("offset 100,000", format!("limit=50&offset={deep}")),
        ("before=<id> (keyset)", format!("limit=50&before={before}")),
    ] {
        let mut took = Vec::new();
        let mut peak = 0u64;
        for _ in 0..TURNS {
            let base = reset_peak(server.child.id())?;
            let t = Instant::now();
            let Ok(listed) = page(query.clone()).await else {
                // An older build has no keyset paging.
                println!("  {what:<22} refused by this build");
                break;
            };
            took.push(t.elapsed());
            ensure!(listed["items"].as_array().map(Vec::len) == Some(50));
            ensure!(listed["total"] == total as u64, "{}", listed["total"]);
            peak = peak.max(server.peak_rss_kib()?.saturating_sub(base));
        }
        if took.len() < TURNS {
            continue;
        }
        took.sort_unstable();
        println!(
            "  {what:<22} {:>8.2} ms (median of {TURNS}), peak RSS above the base {:>6.1} MiB",
            ms(took[TURNS / 2]),
            peak as f64 / 1024.0
        );
    }
    Ok(())
}

/// Resets the process's peak RSS to its current RSS; that RSS (KiB).
fn reset_peak(pid: u32) -> anyhow::Result<u64> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .context("resetting the peak RSS (/proc/PID/clear_refs)")?;
    common::rss_kib(pid)
}

fn sha256(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

async fn upload_as(
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

/// `n` sync runs of `hash` as `token` by 64 clients.
async fn runs(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    hash: &str,
    n: usize,
) -> anyhow::Result<()> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (http, url, token, next) =
                (http.clone(), url.to_owned(), token.to_owned(), next.clone());
            let spec = json!({"module": hash});
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let resp = http
                        .post(format!("{url}/v1/workloads"))
                        .bearer_auth(&token)
                        .json(&spec)
                        .send()
                        .await?;
                    ensure!(resp.status() == 200, "run: {}", resp.status());
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}
