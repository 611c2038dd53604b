//! Server load benchmark (`cargo bench --bench server_load`).
//!
//! Drives a real `vulcan serve` over loopback and prints:
//! 1. the cold first run of a new module (upload, then the first run by hash);
//! 2. sync runs of `hello` by hash at 1, 16 and 64 concurrent clients:
//!    workloads/s and p50/p99 latency, each workload persisted with its line
//!    (checked from the responses and the server's list afterwards);
//! 3. the first run after a server restart (artifact loaded, not recompiled);
//! 4. a 1,000,000-line `log-flood` followed live by 10 SSE clients: every
//!    client must receive every seq exactly once; prints the time and the
//!    server's peak RSS.
//!
//! Two baselines are measured in the same run, so the figures read as ratios:
//! `GET /healthz` at the same concurrency (the HTTP round trip plus a store
//! ping: the floor under any request), and `hello` instantiated and run
//! in-process by plain wasmtime with no HTTP and no store (the floor under
//! any workload).
//!
//! 5. side by side, when the `wasmtime` CLI is on PATH (else a message says
//!    the column is skipped): `wasmtime serve -S cli=y` running the
//!    `http-hello` wasi:http component at 1 and 64 clients, and `wasmtime run
//!    -C cache=n hello.wasm` (a whole process) against Vulcan's cold first run
//!    over HTTP, with the ratios. `wasmtime serve` keeps nothing; Vulcan keeps
//!    every record and line durable.
//! 6. sustained sync load at 64 clients, `VULCAN_BENCH_SUSTAIN_ROUNDS` rounds
//!    (default 4) of `VULCAN_BENCH_SUSTAIN_SECS` (default 20): every answer
//!    that is not 2xx is counted (goal 0), and so are the workloads left
//!    pending or running once the load stops (goal 0).
//!
//! Set `VULCAN_BENCH_REQUESTS` (per concurrency level, default 5,000) and
//! `VULCAN_BENCH_LINES` (default 1,000,000) to change the sizes.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::Value;

mod common;
use common::{BenchServer, env_or, follow, ms, upload};

fn main() -> anyhow::Result<()> {
    let requests: usize = env_or("VULCAN_BENCH_REQUESTS", 5_000);
    let lines: u64 = env_or("VULCAN_BENCH_LINES", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Sync WASI blocks on a runtime of its own, so the baseline runs outside ours.
    let hello = std::fs::read(vulcan_test_artifacts::example("hello"))?;
    let plain = plain_wasmtime_hello(&hello, 2_000)?;
    rt.block_on(run(requests, lines, &hello, plain))
}

async fn run(requests: usize, lines: u64, hello: &[u8], plain: Duration) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("server load benchmark (hello by hash, {requests} runs per level)");

    let server = BenchServer::start(dir.path(), &["--max-concurrent", "256"])?;
    let http = reqwest::Client::new();

    // 1. Cold: a module the server has never seen.
    let t = Instant::now();
    let hash = upload(&http, &server.url, hello).await?;
    let upload_time = t.elapsed();
    let t = Instant::now();
    run_by_hash(&http, &server.url, &hash).await?;
    let first_run = t.elapsed();
    println!(
        "  cold: upload + compile {:>8.2} ms, first run {:>6.2} ms",
        ms(upload_time),
        ms(first_run)
    );

    // 2. Throughput and latency, each level against /healthz at the same level.
    println!(
        "  baseline: plain wasmtime instantiate + run of hello, in-process: {:.1} µs",
        plain.as_secs_f64() * 1e6
    );
    let mut total = 1; // the cold run
    let mut ours = Vec::new();
    for clients in [1usize, 16, 64] {
        let run = Probe::Run(hash.clone());
        let commits_before = store_commits(&http, &server.url).await?;
        let workloads = load(&http, &server.url, &run, clients, requests).await?;
        let commits = store_commits(&http, &server.url).await? - commits_before;
        total += requests;
        let health = load(&http, &server.url, &Probe::Health, clients, requests).await?;
        println!(
            "  {clients:>2} clients: {:>8.0} workloads/s  p50 {:>6.2} ms  p99 {:>6.2} ms  \
             p99.9 {:>6.2} ms  max {:>6.2} ms  {:.2} commits/workload   \
             (healthz {:>6.0}/s, p50 {:>5.2} ms; workloads/s = {:.2} of healthz/s)",
            workloads.per_second(),
            ms(workloads.percentile(50)),
            ms(workloads.percentile(99)),
            ms(workloads.permille(999)),
            ms(*workloads.sorted.last().unwrap_or(&Duration::ZERO)),
            commits as f64 / requests as f64,
            health.per_second(),
            ms(health.percentile(50)),
            workloads.per_second() / health.per_second(),
        );
        ours.push((clients, workloads));
    }
    side_by_side(&http, &ours, requests, upload_time + first_run).await?;
    let listed: Value = http
        .get(format!(
            "{}/v1/workloads?status=completed&limit=1",
            server.url
        ))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        listed["total"] == total,
        "expected {total} completed workloads, the server lists {}",
        listed["total"]
    );

    // 5. Sustained load: errors and stuck workloads, not speed.
    let rounds: u32 = env_or("VULCAN_BENCH_SUSTAIN_ROUNDS", 4);
    let secs: u64 = env_or("VULCAN_BENCH_SUSTAIN_SECS", 20);
    for round in 1..=rounds {
        let (ok, failed) = sustain(&http, &server.url, &hash, 64, Duration::from_secs(secs)).await;
        let mut left = 0;
        for status in ["pending", "running"] {
            let page: Value = http
                .get(format!(
                    "{}/v1/workloads?status={status}&limit=1",
                    server.url
                ))
                .send()
                .await?
                .json()
                .await?;
            left += page["total"].as_u64().unwrap_or(0);
        }
        println!(
            "  sustained round {round}/{rounds}: 64 clients for {secs} s: {ok} runs, {failed} not 2xx, \
             {left} left pending/running afterwards   (goal 0 and 0)"
        );
    }

    // 3. Restart: the artifact is on disk, nothing is recompiled.
    server.stop()?;
    let server = BenchServer::start(dir.path(), &["--max-concurrent", "256"])?;
    let t = Instant::now();
    run_by_hash(&http, &server.url, &hash).await?;
    println!("  first run after restart:  {:>6.2} ms", ms(t.elapsed()));

    // 4. A big workload followed live by 10 clients.
    let flood = std::fs::read(vulcan_test_artifacts::example("log-flood"))?;
    let flood_hash = upload(&http, &server.url, &flood).await?;
    let t = Instant::now();
    let created: Value = http
        .post(format!("{}/v1/workloads/async", server.url))
        .json(&serde_json::json!({"module": flood_hash, "args": [lines.to_string()]}))
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    let followers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(follow(http.clone(), server.url.clone(), id.clone())))
        .collect();
    for f in followers {
        let got = f.await??;
        ensure!(got == lines, "a follower got {got} of {lines} lines");
    }
    println!(
        "  {lines} lines to 10 SSE followers: {:>6.3} s, each got every line once; server peak RSS {} MiB",
        t.elapsed().as_secs_f64(),
        server.peak_rss_kib()? / 1024
    );
    server.stop()?;
    Ok(())
}

/// The mean time plain wasmtime takes to instantiate and run `hello` to its
/// end, compiled once, with output to memory: no HTTP, no store, no limits.
fn plain_wasmtime_hello(wasm: &[u8], runs: u32) -> anyhow::Result<Duration> {
    use wasmtime_wasi::WasiCtxBuilder;
    use wasmtime_wasi::p1::WasiP1Ctx;
    use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::new(&engine, wasm)?;
    let mut linker = wasmtime::Linker::<WasiP1Ctx>::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |cx| cx)?;
    let pre = linker.instantiate_pre(&module)?;
    let start = Instant::now();
    for _ in 0..runs {
        let stdout = MemoryOutputPipe::new(1 << 16);
        let wasi = WasiCtxBuilder::new().stdout(stdout.clone()).build_p1();
        let mut store = wasmtime::Store::new(&engine, wasi);
        let instance = pre.instantiate(&mut store)?;
        instance
            .get_typed_func::<(), ()>(&mut store, "_start")?
            .call(&mut store, ())?;
        ensure!(!stdout.contents().is_empty(), "hello printed nothing");
    }
    Ok(start.elapsed() / runs)
}

/// Vulcan's figures beside `wasmtime serve` and `wasmtime run` measured now,
/// or a message saying why that column is skipped.
async fn side_by_side(
    http: &reqwest::Client,
    ours: &[(usize, Load)],
    requests: usize,
    our_cold: Duration,
) -> anyhow::Result<()> {
    let version = std::process::Command::new("wasmtime")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let Some(version) = version else {
        println!(
            "  wasmtime serve column skipped: no `wasmtime` CLI on PATH (cargo install wasmtime-cli)"
        );
        return Ok(());
    };
    println!(
        "  side by side with {version} (it persists nothing; Vulcan keeps every record and line):"
    );
    let component = vulcan_test_artifacts::component("http-hello");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut serve = std::process::Command::new("wasmtime")
        .args(["serve", "-S", "cli=y", "--addr", &addr])
        .arg(&component)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("failed to start wasmtime serve")?;
    let url = format!("http://{addr}");
    let ready = Instant::now();
    while Probe::Plain.send(http, &url).await.is_err() {
        ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "wasmtime serve did not answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (clients, vulcan) in ours.iter().filter(|(c, _)| [1, 64].contains(c)) {
        let plain = load(http, &url, &Probe::Plain, *clients, requests).await?;
        println!(
            "    {clients:>2} clients: wasmtime serve {:>6.0}/s p50 {:>5.2} ms p99 {:>5.2} ms | \
             vulcan {:>6.0}/s p50 {:>5.2} ms p99 {:>5.2} ms | vulcan/wasmtime: req/s {:.2}x, p50 {:.2}x, p99 {:.2}x",
            plain.per_second(),
            ms(plain.percentile(50)),
            ms(plain.percentile(99)),
            vulcan.per_second(),
            ms(vulcan.percentile(50)),
            ms(vulcan.percentile(99)),
            vulcan.per_second() / plain.per_second(),
            ms(vulcan.percentile(50)) / ms(plain.percentile(50)),
            ms(vulcan.percentile(99)) / ms(plain.percentile(99)),
        );
    }
    let _ = serve.kill();
    let _ = serve.wait();
    // A whole `wasmtime run` process with its cache off, median of five.
    let hello = vulcan_test_artifacts::example("hello");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = std::process::Command::new("wasmtime")
            .args(["run", "-C", "cache=n"])
            .arg(&hello)
            .output()?;
        ensure!(out.status.success(), "wasmtime run failed");
        runs.push(t.elapsed());
    }
    runs.sort_unstable();
    println!(
        "    cold: wasmtime run -C cache=n {:>6.2} ms | vulcan upload + compile + first run {:>6.2} ms | vulcan/wasmtime {:.2}x",
        ms(runs[2]),
        ms(our_cold),
        ms(our_cold) / ms(runs[2]),
    );
    Ok(())
}

/// The server's `vulcan_store_commits` (0 from a build without it).
async fn store_commits(http: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("vulcan_store_commits "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// What a load benchmark sends.
#[derive(Clone)]
enum Probe {
    /// A sync run of the module with this hash.
    Run(String),
    /// `GET /healthz`.
    Health,
    /// `GET /` of `wasmtime serve` running `http-hello`.
    Plain,
}

impl Probe {
    async fn send(&self, http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
        match self {
            Probe::Run(hash) => run_by_hash(http, url, hash).await,
            Probe::Health => {
                let resp = http.get(format!("{url}/healthz")).send().await?;
                ensure!(resp.status() == 200, "healthz: {}", resp.status());
                resp.bytes().await?;
                Ok(())
            }
            Probe::Plain => {
                let resp = http.get(format!("{url}/")).send().await?;
                ensure!(resp.status() == 200, "wasmtime serve: {}", resp.status());
                ensure!(
                    &resp.bytes().await?[..] == b"hello\n",
                    "wasmtime serve: wrong body"
                );
                Ok(())
            }
        }
    }
}

/// The wall time and sorted latencies of one load level.
struct Load {
    elapsed: Duration,
    sorted: Vec<Duration>,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.sorted.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: usize) -> Duration {
        self.permille(p * 10)
    }

    fn permille(&self, p: usize) -> Duration {
        let i = (self.sorted.len() * p / 1000).min(self.sorted.len() - 1);
        self.sorted[i]
    }
}

/// One sync run; fails unless it completed with its one line stored.
async fn run_by_hash(http: &reqwest::Client, url: &str, hash: &str) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{url}/v1/workloads"))
        .json(&serde_json::json!({ "module": hash }))
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    ensure!(
        status == 200 && v["status"] == "completed" && v["line_count"] == 1,
        "run: {status} {v}"
    );
    Ok(())
}

/// `requests` probes spread over `clients` concurrent loops, each its own task.
async fn load(
    http: &reqwest::Client,
    url: &str,
    probe: &Probe,
    clients: usize,
    requests: usize,
) -> anyhow::Result<Load> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, probe, next) =
                (http.clone(), url.to_owned(), probe.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                    let t = Instant::now();
                    probe.send(&http, &url).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut sorted = Vec::with_capacity(requests);
    for t in tasks {
        sorted.extend(t.await??);
    }
    let elapsed = start.elapsed();
    sorted.sort_unstable();
    Ok(Load { elapsed, sorted })
}

/// Sync runs of `hash` by `clients` loops for `duration`; returns how many
/// were answered 2xx and how many were not (or failed to be answered).
async fn sustain(
    http: &reqwest::Client,
    url: &str,
    hash: &str,
    clients: usize,
    duration: Duration,
) -> (u64, u64) {
    let until = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, hash) = (http.clone(), url.to_owned(), hash.to_owned());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until {
                    let resp = http
                        .post(format!("{url}/v1/workloads"))
                        .json(&serde_json::json!({ "module": hash }))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            ok += 1;
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        if let Ok((o, f)) = t.await {
            ok += o;
            failed += f;
        }
    }
    (ok, failed)
}
