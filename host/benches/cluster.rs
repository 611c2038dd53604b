//! Cluster benchmark (`cargo bench --bench cluster`): real `vulcan serve`
//! nodes on one real `nats-server -js`, each part on a fresh server, printing:
//!
//! 1. `sleep 50` (a workload that holds a slot without a core) by 24 sync
//!    clients through one node with `--max-concurrent 4`, then through three:
//!    workloads/s and the ratio (goal ≥ 2.5×);
//! 2. CPU-bound `hello` by 16 sync clients through three nodes against one
//!    single-node server (no NATS), both up at once and measured in five
//!    alternate turns: the median ratio (goal ≥ 0.7×) and its range;
//! 3. sync `hello` at 1 client through the cluster: p50/p99 (goal p50 ≤ 2 ms);
//! 4. a 1,000,000-line `log-flood` followed from a node that did not run it
//!    by 10 SSE clients: every seq exactly once, lines/s;
//! 5. failover: seconds from `kill -9` of the node running a workload to its
//!    record leaving `running`;
//! 6. node memory: each node's resident memory after 10,000 and after
//!    `VULCAN_BENCH_MEMORY_RUNS` (default 200,000) short runs through three
//!    nodes, each node's list brought up to every record first (goal: growth
//!    <= 32 MiB).
//!
//! `VULCAN_BENCH_PARTS` (e.g. `hello,memory`; default all) picks parts by
//! name: `slots`, `hello`, `flood`, `failover`, `memory`.
//!
//! The NATS server is `VULCAN_NATS_SERVER`, or `target/nats/bin/nats-server`
//! (which the cluster tests install). `VULCAN_BENCH_REQUESTS` (default 2,000)
//! and `VULCAN_BENCH_LINES` (default 1,000,000) change the sizes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

mod common;
use common::{BenchServer, env_or, follow, ms, start, upload};

/// Turns of `hello` through the single node and then the cluster.
const HELLO_TURNS: usize = 5;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

/// A `nats-server -js` on a free loopback port.
struct Nats {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> anyhow::Result<Self> {
        let binary = std::env::var_os("VULCAN_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nats/bin/nats-server")
            });
        ensure!(
            binary.exists(),
            "no nats-server at {} (run the cluster tests once, or set VULCAN_NATS_SERVER)",
            binary.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` nodes on `nats`, named n1…, with `max` slots each.
fn nodes(nats: &Nats, dir: &Path, n: usize, max: usize) -> anyhow::Result<Vec<BenchServer>> {
    (1..=n)
        .map(|i| {
            let id = format!("n{i}");
            let max = max.to_string();
            BenchServer::start(
                &dir.join(&id),
                &[
                    "--cluster",
                    &nats.url,
                    "--node-id",
                    &id,
                    "--max-concurrent",
                    &max,
                ],
            )
        })
        .collect()
}

async fn run() -> anyhow::Result<()> {
    let requests: usize = env_or("VULCAN_BENCH_REQUESTS", 2_000);
    let lines: u64 = env_or("VULCAN_BENCH_LINES", 1_000_000);
    let http = reqwest::Client::new();
    let example = |name: &str| std::fs::read(vulcan_test_artifacts::example(name));
    let (hello, sleep, flood, ticker) = (
        example("hello")?,
        example("sleep")?,
        example("log-flood")?,
        example("ticker")?,
    );
    println!("cluster benchmark ({requests} runs per measurement)");
    let parts: String = env_or("VULCAN_BENCH_PARTS", "all".to_owned());
    let part = |name: &str| parts == "all" || parts.split(',').any(|p| p == name);
    let dir = tempfile::tempdir()?;
    if part("slots") {
        slots(&http, &sleep, requests).await?;
    }
    if part("hello") {
        hello_ratio(&http, &hello, dir.path(), requests).await?;
    }
    if part("flood") {
        flood_followed(&http, &flood, dir.path(), lines).await?;
    }
    if part("failover") {
        failover(&http, &ticker, dir.path()).await?;
    }
    if part("memory") {
        let runs: usize = env_or("VULCAN_BENCH_MEMORY_RUNS", 200_000);
        node_memory(&http, &hello, dir.path(), runs).await?;
    }
    Ok(())
}

/// Part 1, slots: a sleeping workload scales with the nodes' slots.
async fn slots(http: &reqwest::Client, sleep: &[u8], requests: usize) -> anyhow::Result<()> {
    let sleeps = (requests / 4).max(48);
    let mut per_second = Vec::new();
    for n in [1, 3] {
        let (nats, dir) = (Nats::start()?, tempfile::tempdir()?);
        let servers = nodes(&nats, dir.path(), n, 4)?;
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let hash = upload(http, &urls[0], sleep).await?;
        let spec = json!({"module": hash, "args": ["50"]});
        // Every node fetches and compiles the module once before the clock runs.
        load(http, &urls, &spec, 24, 48).await?;
        let (elapsed, _) = load(http, &urls, &spec, 24, sleeps).await?;
        let rate = sleeps as f64 / elapsed.as_secs_f64();
        println!("  sleep 50 ms, 24 clients, {n} node(s) x 4 slots: {rate:>7.1} workloads/s");
        per_second.push(rate);
    }
    println!(
        "  three nodes / one node: {:.2}x (goal >= 2.5x)",
        per_second[1] / per_second[0]
    );
    Ok(())
}

/// Parts 2 and 3, CPU-bound hello: the coordination overhead, and latency.
/// Both are up at once and measured in turns, so that a slower moment of
/// the machine falls on both alike.
async fn hello_ratio(
    http: &reqwest::Client,
    hello: &[u8],
    dir: &Path,
    requests: usize,
) -> anyhow::Result<()> {
    let single = BenchServer::start(&dir.join("single"), &["--max-concurrent", "64"])?;
    let hash = upload(http, &single.url, hello).await?;
    let spec = json!({"module": hash});
    let single_url = std::slice::from_ref(&single.url);
    load(http, single_url, &spec, 16, 200).await?;
    let nats = Nats::start()?;
    let servers = nodes(&nats, dir, 3, 64)?;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    upload(http, &urls[0], hello).await?;
    load(http, &urls, &spec, 16, 200).await?;
    let rate = |d: Duration| requests as f64 / d.as_secs_f64();
    let (mut alone, mut clustered, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..HELLO_TURNS {
        let (single_took, _) = load(http, single_url, &spec, 16, requests).await?;
        let (cluster_took, _) = load(http, &urls, &spec, 16, requests).await?;
        alone.push(rate(single_took));
        clustered.push(rate(cluster_took));
        ratios.push(rate(cluster_took) / rate(single_took));
    }
    drop(single);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (alone, clustered, ratio) = (
        median(&mut alone),
        median(&mut clustered),
        median(&mut ratios),
    );
    println!(
        "  hello, 16 clients, median of {HELLO_TURNS} turns: single node {alone:>7.0}/s, \
         3-node cluster {clustered:>7.0}/s: {ratio:.2}x (goal >= 0.7x; turns {:.2}x to {:.2}x)",
        ratios[0],
        ratios[ratios.len() - 1],
    );
    let (_, mut latencies) = load(http, &urls[..1], &spec, 1, requests.min(1_000)).await?;
    latencies.sort_unstable();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "  hello, 1 client through the cluster: p50 {:.2} ms, p99 {:.2} ms (goal p50 <= 2 ms)",
        ms(pct(50)),
        ms(pct(99))
    );
    drop(servers);
    drop(nats);
    Ok(())
}

/// Part 4, a flood followed from another node.
async fn flood_followed(
    http: &reqwest::Client,
    flood: &[u8],
    dir: &Path,
    lines: u64,
) -> anyhow::Result<()> {
    let nats = Nats::start()?;
    let servers = nodes(&nats, dir.join("flood").as_path(), 2, 8)?;
    let hash = upload(http, &servers[0].url, flood).await?;
    let id = start(
        http,
        &servers[0].url,
        &json!({"module": hash, "args": [lines.to_string()]}),
    )
    .await?;
    let ran_on = until_node(http, &servers[0].url, &id).await?;
    // servers[i] is node n{i+1}: follow from the one that did not run it.
    let reader = match ran_on.as_str() {
        "n1" => servers[1].url.clone(),
        _ => servers[0].url.clone(),
    };
    let started = Instant::now();
    println!("  (flood claimed by {ran_on}; following from {reader})");
    let followers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(follow(http.clone(), reader.clone(), id.clone())))
        .collect();
    for f in followers {
        let got = f.await??;
        ensure!(got == lines, "a follower got {got} of {lines} lines");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {lines} lines run on {ran_on}, followed from another node by 10 SSE clients: \
         every seq once, {secs:.2} s, {:.0} lines/s per client",
        lines as f64 / secs
    );
    drop(servers);
    drop(nats);
    Ok(())
}

/// Part 5, failover.
async fn failover(http: &reqwest::Client, ticker: &[u8], dir: &Path) -> anyhow::Result<()> {
    let nats = Nats::start()?;
    let mut servers = nodes(&nats, dir.join("failover").as_path(), 2, 4)?;
    let hash = upload(http, &servers[0].url, ticker).await?;
    let id = start(
        http,
        &servers[0].url,
        &json!({"module": hash, "args": ["1000000", "1000"]}),
    )
    .await?;
    let ran_on = until_node(http, &servers[0].url, &id).await?;
    let victim = if ran_on == "n1" { 0 } else { 1 };
    let survivor = servers[1 - victim].url.clone();
    let killed_at = Instant::now();
    servers[victim].child.kill()?;
    servers[victim].child.wait()?;
    loop {
        let record = get(http, &survivor, &id).await?;
        if record["status"] != "running" {
            ensure!(record["failure"] == "node_lost", "{record}");
            break;
        }
        ensure!(
            killed_at.elapsed() < Duration::from_secs(60),
            "never failed over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  failover: {:.2} s from kill -9 of the node to its workload leaving running (goal <= 10 s)",
        killed_at.elapsed().as_secs_f64()
    );
    drop(servers.remove(0));
    Ok(())
}

/// Part 6, node memory against the number of runs the cluster has seen.
async fn node_memory(
    http: &reqwest::Client,
    hello: &[u8],
    dir: &Path,
    runs: usize,
) -> anyhow::Result<()> {
    let nats = Nats::start()?;
    let servers = nodes(&nats, dir.join("memory").as_path(), 3, 64)?;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let hash = upload(http, &urls[0], hello).await?;
    let spec = json!({"module": hash});
    let mut done = 0;
    let mut after = Vec::new();
    for target in [10_000, runs.max(10_000)] {
        let (took, _) = load(http, &urls, &spec, 64, target - done).await?;
        let rate = (target - done) as f64 / took.as_secs_f64();
        done = target;
        let caught_up = Instant::now();
        let mut rss = Vec::new();
        for (server, url) in servers.iter().zip(&urls) {
            // A list brings the node's index up to every record.
            let list: Value = http
                .get(format!("{url}/v1/workloads?limit=1"))
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                list["total"] == done as u64,
                "{url} lists {}",
                list["total"]
            );
            rss.push(common::rss_kib(server.child.id())?);
        }
        println!(
            "  after {done:>7} runs ({rate:.0} runs/s; each node's list caught up in {:.1} s): \
             node RSS {} MiB",
            caught_up.elapsed().as_secs_f64() / servers.len() as f64,
            rss.iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        after.push(rss);
    }
    let growth = (after[0].iter().zip(&after[1]))
        .map(|(a, b)| (*b as f64 - *a as f64) / 1024.0)
        .fold(f64::MIN, f64::max);
    println!(
        "  node memory: most growth of a node from 10,000 to {done} runs {growth:.1} MiB \
         (goal <= 32 MiB)"
    );
    Ok(())
}

/// `total` sync runs of `spec` by `clients` loops spread over `urls`; the
/// wall time and every latency. Fails unless each run completed.
async fn load(
    http: &reqwest::Client,
    urls: &[String],
    spec: &Value,
    clients: usize,
    total: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let begun = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, url, spec, next) = (
                http.clone(),
                urls[c % urls.len()].clone(),
                spec.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let t = Instant::now();
                    let resp = http
                        .post(format!("{url}/v1/workloads"))
                        .json(&spec)
                        .send()
                        .await?;
                    let status = resp.status();
                    let v: Value = resp.json().await?;
                    ensure!(
                        status == 200 && v["status"] == "completed",
                        "run: {status} {v}"
                    );
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((begun.elapsed(), all))
}

async fn get(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{url}/v1/workloads/{id}"))
        .send()
        .await?
        .json()
        .await?)
}

/// The node a workload runs on, once it has been claimed.
async fn until_node(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = get(http, url, id).await?;
        if let Some(node) = record["node"].as_str() {
            return Ok(node.to_owned());
        }
        ensure!(Instant::now() < deadline, "never claimed: {record}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
