//! Outbound HTTP from components: only to the hosts a run's spec allows,
//! capped by the operator, never to loopback or private addresses unless the
//! operator allows them, every refusal recorded, every request inside the
//! workload's timeout. The far side is a real HTTP server on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};

use serde_json::{Value, json};
use vulcan_test_artifacts::component;

use crate::support::*;

/// A request the upstream server received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    path: String,
    host: String,
    body: String,
}

/// An HTTP server on a loopback port, on a thread of its own, that records
/// every request and answers with JSON describing it.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start() -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: String| {
                let record = Arc::clone(&record);
                async move {
                    let seen = Seen {
                        method: method.to_string(),
                        path: uri.to_string(),
                        host: headers
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_owned())
                            .unwrap_or_default(),
                        body,
                    };
                    let answer = json!({"upstream": "hello", "path": seen.path});
                    record.lock().unwrap().push(seen);
                    axum::Json(answer)
                }
            },
        );
        Upstream {
            addr: serve_on_loopback(app),
            seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A loopback port that accepts connections and never answers; `accepted`
/// receives each connection's peer address, in the order they came.
fn silent_upstream() -> (SocketAddr, mpsc::Receiver<SocketAddr>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(peer) = conn.peer_addr() else { continue };
            held.push(conn);
            if tx.send(peer).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

fn fetch_spec(input: Value, allowed_hosts: &[&str]) -> Value {
    json!({
        "module_base64": b64(&std::fs::read(component("fetch")).unwrap()),
        "input": input,
        "allowed_hosts": allowed_hosts,
    })
}

/// The SDK `error` records of a workload's history.
async fn error_records(server: &Server, id: &str) -> Vec<Value> {
    let (status, page) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["level"] == "error")
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_component_reaches_only_the_hosts_its_spec_allows() {
    let upstream = Upstream::start();
    let env = Env::new();
    let server = Server::start(&env, &["--allow-private-outbound"]);
    let allowed = upstream.url("");

    // Listed: the request goes out with its method, path, body and Host.
    let input = json!({"url": upstream.url("/items?x=1"), "method": "POST", "body": "ping"});
    let (status, record) = server
        .post("/v1/workloads", Body::Json(fetch_spec(input, &[&allowed])))
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["output"]["status"], 200, "{record}");
    assert_eq!(record["output"]["content_type"], "application/json");
    let body: Value = serde_json::from_str(record["output"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"upstream": "hello", "path": "/items?x=1"}));
    assert_eq!(
        record["allowed_hosts"],
        json!([allowed]),
        "the record keeps what was allowed"
    );
    assert_eq!(
        upstream.seen(),
        vec![Seen {
            method: "POST".into(),
            path: "/items?x=1".into(),
            host: upstream.addr.to_string(),
            body: "ping".into(),
        }]
    );

    // Not listed, or listed with another port or scheme: refused, recorded,
    // and nothing reaches the upstream server.
    let other_port = format!("http://127.0.0.1:{}", upstream.addr.port() + 1);
    let https = format!("https://{}", upstream.addr);
    for (allowed_hosts, why) in [
        (vec![], "is not in this run's allowed_hosts, which is empty"),
        (
            vec![other_port.as_str()],
            "is not in this run's allowed_hosts (http://127.0.0.1:",
        ),
        (
            vec![https.as_str()],
            "is not in this run's allowed_hosts (https://",
        ),
    ] {
        let input = json!({"url": upstream.url("/secret")});
        let (status, record) = server
            .post(
                "/v1/workloads",
                Body::Json(fetch_spec(input, &allowed_hosts)),
            )
            .await;
        assert_eq!(status, 200, "{record}");
        assert_eq!(record["status"], "failed", "{record}");
        assert_eq!(record["failure"], "returned_error", "{record}");
        let error = record["error"].as_str().unwrap();
        assert!(
            error.contains(&format!(
                "GET {}: the host refused it",
                upstream.url("/secret")
            )),
            "{error}"
        );
        let refusals = error_records(&server, record["id"].as_str().unwrap()).await;
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let line = refusals[0]["line"].as_str().unwrap();
        assert!(line.starts_with("outbound request refused: "), "{line}");
        assert!(line.contains(why), "{line}");
        assert_eq!(refusals[0]["fields"]["url"], upstream.url("/secret"));
        assert_eq!(refusals[0]["fields"]["method"], "GET");
    }
    assert_eq!(upstream.seen().len(), 1, "no refused request was sent");
}

#[tokio::test]
async fn private_addresses_are_refused_unless_the_operator_allows_them() {
    let upstream = Upstream::start();
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let by_name = format!("http://localhost:{}", upstream.addr.port());
    for (url, allowed, why) in [
        (
            upstream.url("/"),
            upstream.url(""),
            "127.0.0.1 is a loopback address; this server does not allow requests to \
             non-public addresses (--allow-private-outbound)",
        ),
        (
            format!("{by_name}/"),
            by_name.clone(),
            "localhost resolves to ",
        ),
    ] {
        let (status, record) = server
            .post(
                "/v1/workloads",
                Body::Json(fetch_spec(json!({"url": url}), &[&allowed])),
            )
            .await;
        assert_eq!(status, 200, "{record}");
        assert_eq!(record["failure"], "returned_error", "{record}");
        assert!(
            record["error"]
                .as_str()
                .unwrap()
                .contains("loopback, private or otherwise non-public"),
            "{record}"
        );
        let refusals = error_records(&server, record["id"].as_str().unwrap()).await;
        let line = refusals[0]["line"].as_str().unwrap();
        assert!(line.contains(why), "{line}");
    }
    assert!(
        upstream.seen().is_empty(),
        "nothing reached the loopback server"
    );
}

#[tokio::test]
async fn the_operator_caps_what_a_spec_may_list() {
    let upstream = Upstream::start();
    let env = Env::new();
    let cap = upstream.url("");
    let server = Server::start(
        &env,
        &["--allow-outbound", &cap, "--allow-private-outbound"],
    );
    let input = json!({"url": upstream.url("/")});
    let (status, answer) = server
        .post(
            "/v1/workloads",
            Body::Json(fetch_spec(input.clone(), &["https://api.example.com"])),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "outbound_not_permitted");
    assert_error(
        &answer,
        "allowed host `https://api.example.com` is not permitted on this server",
    );
    let (status, answer) = server
        .post(
            "/v1/workloads",
            Body::Json(fetch_spec(input.clone(), &["api.example.com"])),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error(
        &answer,
        "`api.example.com` is not an allowed host: no scheme",
    );
    let (_, page) = server.get_json("/v1/workloads").await;
    assert_eq!(page["total"], 0, "a refused spec created nothing");

    let (status, record) = server
        .post("/v1/workloads", Body::Json(fetch_spec(input, &[&cap])))
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(upstream.seen().len(), 1);

    // A pattern that does not parse stops the server before it listens.
    let out = Env::new().run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--allow-outbound",
        "ftp://x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--allow-outbound: `ftp://x` is not an allowed host"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_request_that_never_answers_ends_with_the_timeout_or_a_kill() {
    let env = Env::new();
    let server = Server::start(&env, &["--allow-private-outbound"]);
    let spec = |addr: SocketAddr| {
        fetch_spec(
            json!({"url": format!("http://{addr}/slow")}),
            &[&format!("http://{addr}")],
        )
    };
    let (addr, _accepted) = silent_upstream();
    let mut timed = spec(addr);
    timed["limits"] = json!({"timeout_ms": 300});
    let (status, record) = server.post("/v1/workloads", Body::Json(timed)).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["failure"], "timeout", "{record}");

    let (addr, accepted) = silent_upstream();
    let id = server.start_json(&spec(addr)).await;
    // Once the upstream holds its connection, the guest is waiting on it.
    tokio::task::spawn_blocking(move || accepted.recv().unwrap())
        .await
        .unwrap();
    let (status, answer) = server.kill(&id).await;
    assert_eq!(status, 200, "{answer}");
    let record = eventually("the killed workload ends", || async {
        let (_, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
        (record["status"] != "running").then_some(record)
    })
    .await;
    assert_eq!(record["status"], "killed", "{record}");
}

#[test]
fn vulcan_run_allows_hosts_from_its_flags() {
    let upstream = Upstream::start();
    let env = Env::new();
    let fetch = component_str("fetch");
    let input = json!({"url": upstream.url("/run")}).to_string();
    let allowed = upstream.url("");
    let out = env.run(&[
        "run",
        "--allow-host",
        &allowed,
        "--allow-private-outbound",
        "--input",
        &input,
        &fetch,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let output: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(output["status"], 200);
    assert_eq!(upstream.seen()[0].path, "/run");

    let out = env.run(&["run", "--allow-host", &allowed, "--input", &input, &fetch]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("[error] outbound request refused: 127.0.0.1 is a loopback address"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("vulcan: the workload returned an error: GET "),
        "{}",
        stderr(&out)
    );

    let out = env.run(&["run", "--allow-host", "api.example.com", &fetch]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`api.example.com` is not an allowed host: no scheme"),
        "{}",
        stderr(&out)
    );
    assert_eq!(upstream.seen().len(), 1, "the refused run sent nothing");
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn guests_that_open_thousands_of_requests_cannot_take_the_servers_sockets() {
    const GUESTS: usize = 10;
    const NODE_INFLIGHT: usize = 200;
    let env = Env::new();
    let server = Server::start(
        &env,
        &[
            "--allow-private-outbound",
            "--max-outbound-inflight-node",
            &NODE_INFLIGHT.to_string(),
        ],
    );
    assert_eq!(server.get_json("/healthz").await.0, 200);
    let baseline = open_fds(server.child.id());
    // An upstream that accepts every connection and never answers.
    let (addr, accepted) = silent_upstream();
    let spec = json!({
        "module_base64": b64(&std::fs::read(component("fan-out")).unwrap()),
        "input": {"url": format!("http://{addr}/"), "count": 21_000},
        "allowed_hosts": [format!("http://{addr}")],
    });
    let mut ids = Vec::new();
    for _ in 0..GUESTS {
        ids.push(server.start_json(&spec).await);
    }
    // Until every guest has ended, the server answers and holds a bounded
    // number of sockets: each guest 32 in flight, the node at most 200. Once
    // every guest has been refused for queueing too many, they are killed.
    let probe = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let (mut probes, mut most_fds, mut refused) = (0, 0, std::collections::HashSet::new());
    loop {
        let health = probe
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .expect("/healthz did not answer while guests flooded outbound");
        assert_eq!(health.status().as_u16(), 200);
        probes += 1;
        most_fds = most_fds.max(open_fds(server.child.id()));
        for id in &ids {
            if !refused.contains(id) && !error_records(&server, id).await.is_empty() {
                refused.insert(id.clone());
                if refused.len() == GUESTS {
                    for id in &ids {
                        server.kill(id).await;
                    }
                }
            }
        }
        let (status, list) = server.get_json("/v1/workloads?status=running").await;
        assert_eq!(status, 200, "{list}");
        if list["total"] == 0 {
            break;
        }
    }
    let connections = accepted.try_iter().count();
    eprintln!(
        "{probes} probes answered; most open fds {most_fds} (baseline {baseline}); \
         {connections} connections reached the upstream"
    );
    assert!(connections > 0, "no request reached the upstream");
    // The node's bound, plus the API's own connections and some slack.
    assert!(
        most_fds <= baseline + NODE_INFLIGHT + 32,
        "the server held {most_fds} fds (baseline {baseline}, bound {NODE_INFLIGHT})"
    );
    for id in &ids {
        let (_, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
        assert_eq!(record["status"], "killed", "{record}");
        // Requests past what may wait were refused at once, and said so once.
        let refusals = error_records(&server, id).await;
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let line = refusals[0]["line"].as_str().unwrap();
        assert!(
            line.contains("waiting for a place (--max-outbound-inflight)"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn https_to_a_name_that_resolves_to_loopback_never_connects() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (addr, accepted) = silent_upstream();
    let url = format!("https://localhost:{}", addr.port());
    let (status, record) = server
        .post(
            "/v1/workloads",
            Body::Json(fetch_spec(json!({"url": format!("{url}/")}), &[&url])),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["failure"], "returned_error", "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("loopback, private or otherwise non-public"),
        "{error}"
    );
    let refusals = error_records(&server, record["id"].as_str().unwrap()).await;
    let line = refusals[0]["line"].as_str().unwrap();
    assert!(line.contains("localhost resolves to "), "{line}");
    // A marker connection of our own comes after any the server made: every
    // connection accepted before it is one the guest's request made.
    let marker = std::net::TcpStream::connect(addr).unwrap();
    let mine = marker.local_addr().unwrap();
    let before: Vec<SocketAddr> = accepted.iter().take_while(|peer| *peer != mine).collect();
    assert!(
        before.is_empty(),
        "the guest's request reached the loopback listener: {before:?}"
    );
}
