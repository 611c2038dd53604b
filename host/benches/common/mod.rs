//! Helpers the benchmarks share: a real `vulcan serve` child and its API.

#![allow(dead_code, reason = "each benchmark uses a part")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use vulcan::cli::sse::SseParser;

/// Runs a benchmark's async body on a multi-threaded runtime.
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    body: F,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body)
}

/// Uploads a module; returns its hash.
pub async fn upload(http: &reqwest::Client, url: &str, wasm: &[u8]) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{url}/v1/modules"))
        .header("content-type", "application/wasm")
        .body(wasm.to_vec())
        .send()
        .await?;
    ensure!(resp.status().is_success(), "upload: {}", resp.status());
    let v: Value = resp.json().await?;
    Ok(v["hash"].as_str().context("no hash")?.to_owned())
}

/// Starts a workload asynchronously from a JSON spec; returns its id.
pub async fn start(http: &reqwest::Client, url: &str, spec: &Value) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{url}/v1/workloads/async"))
        .json(spec)
        .send()
        .await?;
    ensure!(resp.status().as_u16() == 202, "start: {}", resp.status());
    let v: Value = resp.json().await?;
    Ok(v["id"].as_str().context("no id")?.to_owned())
}

/// A `vulcan serve` child on an ephemeral port.
pub struct BenchServer {
    /// The server process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl BenchServer {
    /// Starts `vulcan serve` on `data_dir` with `extra` flags.
    pub fn start(data_dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(vulcan_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("VULCAN_TOKEN")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start vulcan serve")?;
        let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?);
        let mut line = String::new();
        let url = loop {
            line.clear();
            ensure!(stderr.read_line(&mut line)? > 0, "the server exited early");
            if let Some(rest) = line.trim().strip_prefix("vulcan: listening on ") {
                break rest.split_whitespace().next().unwrap_or("").to_owned();
            }
        };
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Ok(Self { child, url })
    }

    /// The server's peak resident memory.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")
    }

    /// SIGTERM, and a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        ensure!(status.success(), "the server exited with {status}");
        Ok(())
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process now, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The `vulcan` binary under test: this build's, or `VULCAN_BENCH_BIN` (e.g.
/// an older build, for before/after figures from the same run of a benchmark).
pub fn vulcan_bin() -> std::path::PathBuf {
    std::env::var_os("VULCAN_BENCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vulcan").into())
}

/// An environment variable parsed as `T`, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Milliseconds, for printing.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Writes a tenants file of two tenants, `noisy` (with `noisy_extra` TOML
/// lines) and `quiet`, whose tokens are their names.
pub fn noisy_and_quiet_tenants(file: &std::path::Path, noisy_extra: &str) -> anyhow::Result<()> {
    std::fs::write(
        file,
        format!(
            "[[tenants]]\nname = \"noisy\"\ntoken_sha256 = \"{}\"\n{noisy_extra}\
             [[tenants]]\nname = \"quiet\"\ntoken_sha256 = \"{}\"\n",
            vulcan::tenants::token_hash("noisy"),
            vulcan::tenants::token_hash("quiet"),
        ),
    )?;
    Ok(())
}

/// Follows a workload's SSE stream to its end; returns how many lines came,
/// failing on any gap or repeat.
pub async fn follow(http: reqwest::Client, url: String, id: String) -> anyhow::Result<u64> {
    follow_url(http, format!("{url}/v1/workloads/{id}/logs")).await
}

/// [`follow`] for a whole stream URL (e.g. with `?format=json`).
pub async fn follow_url(http: reqwest::Client, stream: String) -> anyhow::Result<u64> {
    let mut resp = http.get(stream).send().await?;
    ensure!(resp.status().is_success(), "follow: {}", resp.status());
    let mut parser = SseParser::default();
    let mut next_seq = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        for event in parser.push(&chunk) {
            if event.event == "end" {
                return Ok(next_seq);
            }
            let seq: u64 = event
                .id
                .as_deref()
                .and_then(|id| id.parse().ok())
                .with_context(|| format!("an event without a seq: {event:?}"))?;
            ensure!(seq == next_seq, "expected seq {next_seq}, got {seq}");
            next_seq += 1;
        }
    }
    bail!("the stream ended without an end event after {next_seq} lines")
}
