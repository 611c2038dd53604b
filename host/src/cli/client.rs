//! The CLI against a running server (`--server URL`): submit, status, ls, logs, kill.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use serde_json::Value;

use super::sse::SseParser;
use super::{LimitsArgs, exit, parse};

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

    async fn json(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.send(req).await?.json().await?)
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
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    /// The module (.wasm) to upload and run
    module: PathBuf,
    /// Arguments passed to the guest (after `--`)
    #[arg(last = true)]
    args: Vec<String>,
}

/// Prints a workload record, as JSON or `key: value` lines.
fn print_record(w: &Value, json: bool) {
    if json {
        println!("{w}");
        return;
    }
    for key in [
        "id",
        "status",
        "exit_code",
        "error",
        "duration_ms",
        "line_count",
        "output",
        "output_base64",
        "module",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        match &w[key] {
            Value::Null => {}
            Value::String(s) => println!("{key}: {s}"),
            other => println!("{key}: {other}"),
        }
    }
}

/// The exit code `vulcan run` would have given for a finished workload record.
pub fn exit_code_of(w: &Value) -> ExitCode {
    if let Some(code) = w["exit_code"].as_i64() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let code = match w["status"].as_str() {
        Some("completed") => 0,
        Some("killed") => exit::KILLED,
        _ => match w["failure"].as_str().map(str::parse) {
            Some(Ok(kind)) => exit::for_failure(kind),
            _ => exit::TRAP,
        },
    };
    ExitCode::from(code)
}

/// `vulcan submit`.
pub async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module {}", args.module.display()))?;
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
    let limits = args.limits.to_limits();
    let pairs = [
        ("timeout_ms", limits.timeout_ms),
        (
            "max_memory_mb",
            limits.max_memory_bytes.map(|b| b.div_ceil(1 << 20)),
        ),
        ("fuel", limits.fuel),
        ("max_output_bytes", limits.max_output_bytes),
    ];
    for (key, value) in pairs {
        if let Some(v) = value {
            query.append_pair(key, &v.to_string());
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
    let w = client.json(req).await?;
    if args.follow {
        let id = w["id"]
            .as_str()
            .context("the server returned no id")?
            .to_owned();
        eprintln!("vulcan: workload {id}");
        return follow(client, &id, false).await;
    }
    print_record(&w, args.json);
    Ok(if args.run_async {
        ExitCode::SUCCESS
    } else {
        exit_code_of(&w)
    })
}

/// `vulcan status ID`.
pub async fn status(client: &Client, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let w = client
        .json(client.request(reqwest::Method::GET, &format!("/v1/workloads/{id}")))
        .await?;
    print_record(&w, json);
    Ok(ExitCode::SUCCESS)
}

/// `vulcan kill ID`.
pub async fn kill(client: &Client, id: &str) -> anyhow::Result<ExitCode> {
    let answer = client
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

/// `vulcan ls --server`.
pub async fn ls(
    client: &Client,
    limit: u64,
    offset: u64,
    status: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/workloads?limit={limit}&offset={offset}");
    if let Some(s) = status {
        path.push_str(&format!("&status={s}"));
    }
    let page = client
        .json(client.request(reqwest::Method::GET, &path))
        .await?;
    if json {
        println!("{page}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  MODULE",
        "ID", "STATUS", "EXIT", "DURATION", "LINES"
    );
    let items = page["items"].as_array().cloned().unwrap_or_default();
    for w in &items {
        let show = |v: &Value, suffix: &str| match v {
            Value::Null => "-".to_owned(),
            v => format!("{v}{suffix}"),
        };
        println!(
            "{:<26}  {:<9}  {:>4}  {:>9}  {:>7}  {}",
            w["id"].as_str().unwrap_or("?"),
            w["status"].as_str().unwrap_or("?"),
            show(&w["exit_code"], ""),
            show(&w["duration_ms"], "ms"),
            w["line_count"],
            w["module"].as_str().unwrap_or("").get(..19).unwrap_or(""),
        );
    }
    println!("({} of {} workloads)", items.len(), page["total"]);
    Ok(ExitCode::SUCCESS)
}

/// `vulcan logs --server ID`: every stored line, from history pages.
pub async fn history(client: &Client, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut after: Option<u64> = None;
    let mut out = std::io::stdout().lock();
    loop {
        let mut path = format!("/v1/workloads/{id}/logs/history?limit=10000");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        let page = client
            .json(client.request(reqwest::Method::GET, &path))
            .await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        if lines.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        for l in &lines {
            if json {
                writeln!(out, "{l}")?;
            } else {
                writeln!(out, "{}", l["line"].as_str().unwrap_or(""))?;
            }
        }
        after = page["next_after"].as_u64();
    }
}

/// How often `logs -f` reconnects in a row before giving up.
const MAX_RECONNECTS: u32 = 50;

/// `vulcan logs -f ID`: follows the SSE stream, reconnecting with
/// `Last-Event-ID` after a dropped connection (no line lost or repeated), and
/// exits with the workload's exit code.
pub async fn follow(client: &Client, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut last: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let mut req = client.request(reqwest::Method::GET, &format!("/v1/workloads/{id}/logs"));
        if let Some(l) = &last {
            req = req.header("Last-Event-ID", l);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => {
                // 4xx will not get better by retrying.
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
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
                continue;
            }
        };
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for ev in parser.push(&chunk) {
                if ev.event == "end" {
                    let record: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                    // An SDK workload's output comes after its logs, as with `vulcan run`.
                    if !json {
                        match (&record["output"], &record["output_base64"]) {
                            (Value::Null, Value::String(b64)) => println!("output_base64: {b64}"),
                            (Value::Null, _) => {}
                            (Value::String(s), _) => println!("{s}"),
                            (other, _) => println!("{other}"),
                        }
                    }
                    return Ok(exit_code_of(&record));
                }
                failures = 0;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"seq": ev.id.as_deref().and_then(|s| s.parse::<u64>().ok()), "stream": ev.event, "line": ev.data})
                    );
                } else {
                    match ev.event.as_str() {
                        "stderr" => eprintln!("{}", ev.data),
                        "log" => {
                            let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                            eprintln!(
                                "[{}] {}",
                                v["level"].as_str().unwrap_or("log"),
                                v["message"].as_str().unwrap_or(&ev.data)
                            );
                        }
                        _ => println!("{}", ev.data),
                    }
                }
                if ev.id.is_some() {
                    last = ev.id;
                }
            }
        }
        // The connection dropped before `end`: resume after the last line seen.
        failures += 1;
        if failures > MAX_RECONNECTS {
            bail!("the log stream kept dropping; giving up");
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}
