//! The CLI's HTTP client, and the commands only a server can do: `submit`,
//! `kill` and `logs -f`. (`status`, `ls` and `logs` go through
//! [`super::backend`], which this client implements for a server.)

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::print::{self, LinePrinter};
use super::sse::SseParser;
use super::{LimitsArgs, exit, parse};
use crate::outbound::OutboundRule;
use crate::view::{LogLine, WorkloadView};
use crate::workload::{LogLevel, WorkloadId};

/// Talks to one server.
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080`), authenticating
    /// with `VULCAN_TOKEN` when set.
    pub fn new(server: &str) -> anyhow::Result<Self> {
        let base = server.trim_end_matches('/').to_owned();
        anyhow::ensure!(
            base.starts_with("http://"),
            "`{server}` is not a server URL (expected http://HOST:PORT)"
        );
        Ok(Self {
            base,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            token: std::env::var("VULCAN_TOKEN").ok().filter(|t| !t.is_empty()),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        bail!("server answered {status}: {message}")
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send(req).await?;
        let url = resp.url().path().to_owned();
        resp.json()
            .await
            .with_context(|| format!("unexpected answer from the server to {url}"))
    }

    /// Sends `method path` with an optional JSON body; the JSON answer
    /// (`null` when there is none, as for a 204).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = self.send(req).await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// Uploads a module; its `sha256:` hash.
    pub async fn upload(&self, bytes: Vec<u8>) -> anyhow::Result<String> {
        let req = self
            .request(reqwest::Method::POST, "/v1/modules")
            .header("content-type", "application/wasm")
            .body(bytes);
        let info: Value = self.json(req).await?;
        info["hash"]
            .as_str()
            .map(str::to_owned)
            .context("the server's upload answer has no hash")
    }

    /// GETs `path` and reads the answer as a `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }
}

/// Arguments of `vulcan submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Return at once with the workload's id instead of waiting for it
    #[arg(long = "async")]
    run_async: bool,
    /// Follow the workload's logs live (implies --async) and exit with its exit code
    #[arg(long, short)]
    follow: bool,
    /// Set an environment variable for the guest (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse::env_pair)]
    env: Vec<(String, String)>,
    #[command(flatten)]
    limits: LimitsArgs,
    /// Input: a JSON value, or @FILE for a file's bytes (an SDK workload's
    /// argument; a plain WASI program's stdin)
    #[arg(long, value_name = "JSON|@FILE", value_parser = parse::input)]
    input: Option<parse::InputBytes>,
    /// Drop SDK `log` records below this level (trace, debug, info, warn, error)
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Let the workload send HTTP requests to this host, as scheme://host[:port]
    /// (repeatable; the server may narrow what it permits)
    #[arg(long = "allow-host", value_name = "URL", value_parser = parse::outbound_rule)]
    allowed_hosts: Vec<OutboundRule>,
    /// Run a failed attempt again, up to this many attempts in all
    #[arg(long = "retry", value_name = "ATTEMPTS")]
    retry_attempts: Option<u32>,
    /// Wait this long before the second attempt, doubling for each later
    /// one (e.g. 500ms, 2s; default 1s)
    #[arg(long, value_name = "DURATION", value_parser = parse::duration, requires = "retry_attempts")]
    retry_backoff: Option<Duration>,
    /// Never wait longer than this between attempts (default 1h)
    #[arg(long, value_name = "DURATION", value_parser = parse::duration, requires = "retry_attempts")]
    retry_max_backoff: Option<Duration>,
    /// Retry only failures of this kind (repeatable; default exit, trap,
    /// timeout, returned_error, host)
    #[arg(long, value_name = "KIND", requires = "retry_attempts")]
    retry_on: Vec<String>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// The module (.wasm) to upload and run
    module: PathBuf,
    /// Arguments passed to the guest (after `--`)
    #[arg(last = true)]
    args: Vec<String>,
}

/// `vulcan submit`.
pub async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let bytes = parse::read_module(&args.module)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(name) = args.module.file_name() {
        query.append_pair("argv0", &name.to_string_lossy());
    }
    for a in &args.args {
        query.append_pair("arg", a);
    }
    for (k, v) in &args.env {
        query.append_pair("env", &format!("{k}={v}"));
    }
    if let Some(input) = &args.input {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&input.0);
        query.append_pair("input_base64", &b64);
    }
    if let Some(level) = args.log_level {
        query.append_pair("log_level", level.as_str());
    }
    for host in &args.allowed_hosts {
        query.append_pair("allowed_host", &host.to_string());
    }
    let limits = args.limits.to_limits();
    let pairs = [
        ("timeout_ms", limits.timeout_ms),
        ("max_memory_bytes", limits.max_memory_bytes),
        ("fuel", limits.fuel),
        ("max_output_bytes", limits.max_output_bytes),
    ];
    for (key, value) in pairs {
        if let Some(v) = value {
            query.append_pair(key, &v.to_string());
        }
    }
    if let Some(attempts) = args.retry_attempts {
        query.append_pair("retry_max_attempts", &attempts.to_string());
        let backoffs = [
            ("retry_backoff_ms", args.retry_backoff),
            ("retry_max_backoff_ms", args.retry_max_backoff),
        ];
        for (key, value) in backoffs {
            if let Some(d) = value {
                query.append_pair(key, &d.as_millis().to_string());
            }
        }
        for kind in &args.retry_on {
            query.append_pair("retry_on", kind);
        }
    }
    let path = if args.run_async || args.follow {
        "/v1/workloads/async"
    } else {
        "/v1/workloads"
    };
    let req = client
        .request(reqwest::Method::POST, &format!("{path}?{}", query.finish()))
        .header("content-type", "application/wasm")
        .body(bytes);
    if args.run_async || args.follow {
        #[derive(serde::Deserialize)]
        struct Accepted {
            id: WorkloadId,
        }
        let accepted: Accepted = client.json(req).await?;
        let id = accepted.id;
        if args.follow {
            eprintln!("vulcan: workload {id}");
            return follow(client, id, args.json).await;
        }
        match args.json {
            true => println!("{}", serde_json::json!({"id": id, "status": "pending"})),
            false => println!("id: {id}\nstatus: pending"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let w: WorkloadView = client.json(req).await?;
    let mut out = std::io::stdout().lock();
    print::workload(&mut out, &w, args.json)?;
    Ok(ExitCode::from(exit::for_view(&w.summary)))
}

/// `vulcan kill ID`.
pub async fn kill(client: &Client, id: WorkloadId) -> anyhow::Result<ExitCode> {
    let answer: Value = client
        .json(client.request(reqwest::Method::DELETE, &format!("/v1/workloads/{id}")))
        .await?;
    // 200 carries the final record (killed, or how it ended if that came
    // first); 202 means it is still stopping.
    match answer["status"].as_str() {
        Some("killing") | None => println!("{id} is stopping"),
        Some(status) => println!("{id} {status}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `vulcan whoami`: the tenant, its role and its quota use.
pub async fn whoami(client: &Client) -> anyhow::Result<ExitCode> {
    let me: Value = client.get("/v1/whoami").await?;
    match me["tenant"].as_str() {
        None => println!("no tenants: this server is open to every caller (admin)"),
        Some(name) => {
            let role = if me["admin"] == true {
                "admin"
            } else {
                "tenant"
            };
            let quota = match me["max_concurrent"].as_u64() {
                Some(max) => format!("{}/{max} running", me["running"]),
                None => format!("{} running, no quota", me["running"]),
            };
            let logs = match (me["log_bytes"].as_u64(), me["max_log_bytes"].as_u64()) {
                (Some(n), Some(max)) => format!(
                    "; logs {} of {} stored ({} when full)",
                    bytes(n),
                    bytes(max),
                    me["on_log_quota"].as_str().unwrap_or("prune_oldest")
                ),
                (Some(n), None) => format!("; logs {} stored, no quota", bytes(n)),
                _ => String::new(),
            };
            println!("{name} ({role}): {quota}{logs}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vulcan queue`: how many workloads wait, per tenant, and the oldest wait.
pub async fn queue(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let queue: Value = client.get("/v1/queue").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&queue)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} queued (at most {})",
        queue["queued"], queue["max_queued"]
    );
    let tenants = queue["tenants"].as_array().cloned().unwrap_or_default();
    if tenants.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:>8} {:>8} {:>14}",
        "TENANT", "QUEUED", "RUNNING", "OLDEST WAIT"
    );
    for t in tenants {
        let wait = match t["oldest_wait_ms"].as_u64() {
            Some(ms) => {
                humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
            }
            None => "-".into(),
        };
        let count = |key: &str| t[key].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:>8} {:>8} {:>14}",
            t["tenant"].as_str().unwrap_or("-"),
            count("queued"),
            count("running"),
            wait
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A byte count the way a person reads it (binary units, one decimal).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut unit) = (n as f64, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// How often `logs -f` reconnects in a row before giving up.
const MAX_RECONNECTS: u32 = 50;

/// `vulcan logs -f ID`: follows the SSE stream, reconnecting with
/// `Last-Event-ID` after a dropped connection (no line lost or repeated), and
/// exits with the workload's exit code.
pub async fn follow(client: &Client, id: WorkloadId, json: bool) -> anyhow::Result<ExitCode> {
    let mut printer = LinePrinter::terminal(json);
    let mut last: Option<String> = None;
    let mut failures = 0u32;
    let path = format!("/v1/workloads/{id}/logs?format=json");
    loop {
        let mut req = client.request(reqwest::Method::GET, &path);
        if let Some(l) = &last {
            req = req.header("Last-Event-ID", l);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => {
                // 4xx will not get better by retrying; the record says why.
                client
                    .send(client.request(reqwest::Method::GET, &format!("/v1/workloads/{id}")))
                    .await?;
                bail!("server answered {} for the log stream", r.status());
            }
            other => {
                failures += 1;
                if failures > MAX_RECONNECTS {
                    match other {
                        Ok(r) => bail!("server answered {}", r.status()),
                        Err(e) => return Err(e).context("lost the server"),
                    }
                }
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        'events: while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for ev in parser.push(&chunk) {
                match ev.event.as_str() {
                    "end" => {
                        let record: WorkloadView = serde_json::from_str(&ev.data)
                            .context("the server ended the stream without a readable record")?;
                        printer.ending(&record)?;
                        return Ok(ExitCode::from(exit::for_view(&record.summary)));
                    }
                    // The server could not go on (e.g. a failed read): resume.
                    "error" => {
                        tracing::warn!(error = %ev.data, "the log stream broke off; resuming");
                        break 'events;
                    }
                    _ => {}
                }
                let line: LogLine = serde_json::from_str(&ev.data)
                    .with_context(|| format!("unreadable log event: {}", ev.data))?;
                printer.line(&line)?;
                failures = 0;
                last = Some(line.seq.to_string());
            }
            printer.flush()?;
        }
        // The connection dropped before `end`: resume after the last line seen.
        failures += 1;
        if failures > MAX_RECONNECTS {
            bail!("the log stream kept dropping; giving up");
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

/// How long to wait before reconnect attempt `n`.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(100 * u64::from(n.min(20)))
}
