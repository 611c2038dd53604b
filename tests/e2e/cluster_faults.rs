//! Cluster mode when NATS or the nodes misbehave: a stalled NATS, two nodes
//! with one id, a shutdown with NATS gone, log readers that must not pile up.

use serde_json::json;

use crate::support::*;

/// `vulcan serve --cluster` on `env` as node `id`.
fn node(nats: &Nats, env: &Env, id: Option<&str>, extra: &[&str]) -> Server {
    let url = nats.url();
    let mut flags = vec!["--cluster", url.as_str()];
    if let Some(id) = id {
        flags.extend(["--node-id", id]);
    }
    flags.extend_from_slice(extra);
    Server::start(env, &flags)
}

/// Waits for `child` to exit (failing the test after a minute) and returns its status.
fn exited(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_live_node_with_the_same_id_is_refused_at_start() {
    let Some(nats) = Nats::start() else { return };
    let first_env = Env::new();
    let first = node(&nats, &first_env, Some("twin"), &[]);
    let pid = first.child.id();
    // The same --node-id.
    let second = Env::new();
    let out = second.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cluster",
        &nats.url(),
        "--node-id",
        "twin",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("node id `twin` is in use by a live node"),
        "{said}"
    );
    assert!(
        said.contains(&format!("pid {pid}")),
        "names the other: {said}"
    );
    // The first still works; once it leaves, the id is free again.
    let (status, w) = first.run_wasm("hello", "arg=x").await;
    assert_eq!(
        (status, w["status"].as_str()),
        (200, Some("completed")),
        "{w}"
    );
    assert!(first.stop().success());
    let again = node(&nats, &second, Some("twin"), &[]);
    let (status, w) = again.run_wasm("hello", "arg=y").await;
    assert_eq!(
        (status, w["status"].as_str()),
        (200, Some("completed")),
        "{w}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_data_directory_is_refused_while_its_original_runs() {
    let Some(nats) = Nats::start() else { return };
    let original = Env::new();
    let running = node(&nats, &original, None, &[]);
    let copy = Env::new();
    std::fs::copy(
        original.data_dir().join("node-id"),
        copy.data_dir().join("node-id"),
    )
    .unwrap();
    let out = copy.run(&["serve", "--listen", "127.0.0.1:0", "--cluster", &nats.url()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is in use by a live node"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("node-id"),
        "says what to do: {}",
        stderr(&out)
    );
    drop(running);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_node_whose_nats_is_stalled() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let mut server = node(&nats, &env, Some("stalled"), &["--shutdown-timeout", "3s"]);
    let ticker = {
        let (status, m) = server
            .upload(std::fs::read(example("ticker")).unwrap())
            .await;
        assert_eq!(status, 201, "{m}");
        m["hash"].as_str().unwrap().to_owned()
    };
    let id = server
        .start_json(&json!({"module": ticker, "args": ["1000000", "100"]}))
        .await;
    eventually("it runs", || async {
        let (_, r) = server.get_json(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "running").then_some(())
    })
    .await;
    // No RST, no answer: every NATS request times out.
    signal(&nats.child, "STOP");
    signal(&server.child, "TERM");
    let status = exited(&mut server.child);
    signal(&nats.child, "CONT");
    assert!(status.code().is_some(), "it exited by itself: {status:?}");
    // What it could not publish is settled when it comes back.
    let server = node(&nats, &env, Some("stalled"), &[]);
    let failed = eventually("the interrupted run is failed", || async {
        let (_, r) = server.get_json(&format!("/v1/workloads/{id}")).await;
        (r["status"] != "running").then_some(r)
    })
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
}

/// The consumers of `VULCAN_LOGS` now.
async fn log_consumers(nats: &Nats) -> usize {
    use futures_util::TryStreamExt as _;
    let logs = nats.logs_stream().await;
    let names: Vec<String> = logs.consumer_names().try_collect().await.unwrap();
    names.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_nats_loses_no_line_of_a_completed_workload() {
    let Some(nats) = Nats::start() else { return };
    let (a_env, b_env) = (Env::new(), Env::new());
    let a = node(&nats, &a_env, Some("a"), &[]);
    let b = node(&nats, &b_env, Some("b"), &[]);
    let n = 200_000u64;
    let id = a
        .start_wasm("log-flood", &format!("arg={n}&max_output_bytes=4000000000"))
        .await;
    eventually("the flood is under way", || async {
        let (status, page) = a
            .get_json(&format!(
                "/v1/workloads/{id}/logs/history?after=20000&limit=1"
            ))
            .await;
        (status == 200 && page["lines"].as_array().is_some_and(|l| !l.is_empty())).then_some(())
    })
    .await;
    // The fault itself lasts this long (no RST: publishes time out).
    signal(&nats.child, "STOP");
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    signal(&nats.child, "CONT");
    // A flood of a debug build beside other tests: minutes, not one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let done = loop {
        let (status, r) = b.get_json(&format!("/v1/workloads/{id}")).await;
        if status == 200 && r["status"] != "running" && r["status"] != "pending" {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "it did not end: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["line_count"], n, "{done}");
    let seqs: Vec<u64> = (b.history(&id).await.iter())
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len() as u64, n, "every line, read from the other node");
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == i as u64),
        "in order, no hole"
    );
    // Batches did not fall back to a line or two a message around the
    // stall. (A publisher sends what came during its last round trip: a
    // debug build beside other tests averages some 20 lines a message.)
    let messages = log_messages(&nats, &id).await;
    assert!(messages * 4 < n, "{messages} messages for {n} lines");
}

/// How many messages `id`'s log holds in `VULCAN_LOGS`.
async fn log_messages(nats: &Nats, id: &str) -> u64 {
    use futures_util::TryStreamExt as _;
    let logs = nats.logs_stream().await;
    let subject = format!("vulcan.logs.{id}");
    let counts: Vec<(String, usize)> = logs
        .info_with_subjects(&subject)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    counts.iter().map(|(_, n)| *n as u64).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn log_reads_hold_no_consumers_after_they_end() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let server = node(&nats, &env, Some("reader"), &[]);
    let (status, w) = server.run_wasm("log-flood", "arg=30000").await;
    assert_eq!(
        (status, w["status"].as_str()),
        (200, Some("completed")),
        "{w}"
    );
    let id = w["id"].as_str().unwrap().to_owned();
    let before = log_consumers(&nats).await;
    for i in 0..1_000u64 {
        let (status, page) = server
            .get_json(&format!(
                "/v1/workloads/{id}/logs/history?after={}&limit=100",
                (i * 29) % 29_000
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["lines"].as_array().unwrap().len(), 100);
    }
    assert_eq!(
        log_consumers(&nats).await,
        before,
        "history pages hold no consumer"
    );
    for _ in 0..200 {
        let mut sse = server.sse(&id, Some(29_990)).await;
        assert!(sse.next().await.is_some());
    }
    // Each follower's consumer goes with it (the server deletes it; its
    // inactivity threshold alone would keep them 30 s).
    eventually("the followers' consumers are gone", || async {
        (log_consumers(&nats).await == before).then_some(())
    })
    .await;
}

/// A TCP proxy from a loopback port to NATS that can stop forwarding
/// without closing anything (no RST: the node's requests just go unanswered,
/// as across a partition), and that holds each chunk for `delay` (a slow
/// link: every round trip takes twice that).
struct StallingProxy {
    port: u16,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallingProxy {
    async fn start(to: u16, delay: std::time::Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [(cr, sw), (sr, cw)].map(|(r, w)| (r, w)) {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            while flag.load(Ordering::Acquire) {
                                // Neither reads nor writes: bytes pile up in the kernel.
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            }
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            while flag.load(Ordering::Acquire) {
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { port, stalled }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::Release);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_node_answers_in_time_and_says_what_ran() {
    let Some(nats) = Nats::start() else { return };
    let proxy = StallingProxy::start(nats.port, std::time::Duration::ZERO).await;
    let env = Env::new();
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let mut server = Server::start(&env, &["--cluster", &url, "--node-id", "cut"]);
    // Every answer must come well before a client would give up.
    server.http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    let (status, up) = server
        .upload(std::fs::read(example("ticker")).unwrap())
        .await;
    assert_eq!(status, 201, "{up}");
    let ticker = up["hash"].as_str().unwrap().to_owned();
    let run = |n: &'static str| {
        let (server, ticker) = (&server, ticker.clone());
        async move {
            let resp = server
                .req(reqwest::Method::POST, "/v1/workloads")
                .json(&json!({"module": ticker, "args": [n, "100"]}))
                .send()
                .await
                .expect("an answer before the client's timeout");
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, ok) = run("2").await;
    assert_eq!(
        (status, ok["status"].as_str()),
        (200, Some("completed")),
        "{ok}"
    );

    proxy.stall(true);
    // Admitted before the stall shows: it runs here, and the answer says so.
    let (status, ran) = run("10").await;
    assert_eq!(status, 503, "{ran}");
    assert_eq!(ran["error"]["code"], "cluster_unavailable", "{ran}");
    let ran_id = ran["id"].as_str().expect("it ran: its id").to_owned();
    assert_eq!(ran["workload"]["status"], "completed", "{ran}");
    // Once the stall shows, nothing is started.
    let refused = eventually("submissions are refused at once", || async {
        let (status, answer) = run("1").await;
        assert_eq!(status, 503, "{answer}");
        answer["id"].is_null().then_some(answer)
    })
    .await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NATS has not answered"),
        "{refused}"
    );

    proxy.stall(false);
    // What the 503 said ran reaches the cluster as it said.
    let recorded = eventually("the run is recorded in the cluster", || async {
        let (status, r) = server.get_json(&format!("/v1/workloads/{ran_id}")).await;
        (status == 200 && r["status"] == "completed").then_some(r)
    })
    .await;
    assert_eq!(recorded["line_count"], 10, "{recorded}");
    let (status, again) = eventually("it takes work again", || async {
        let (status, r) = run("1").await;
        (status == 200).then_some((status, r))
    })
    .await;
    assert_eq!((status, again["status"].as_str()), (200, Some("completed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_deleted_on_one_node_is_gone_from_every_node() {
    let Some(nats) = Nats::start() else { return };
    let (a_env, b_env) = (Env::new(), Env::new());
    let a = node(&nats, &a_env, Some("a"), &[]);
    let b = node(&nats, &b_env, Some("b"), &[]);
    let (status, m) = a.upload(std::fs::read(example("hello")).unwrap()).await;
    assert_eq!(status, 201, "{m}");
    let hash = m["hash"].as_str().unwrap().to_owned();
    // Both nodes have run it: both hold a copy.
    for server in [&a, &b] {
        let (status, r) = server
            .post("/v1/workloads", Body::Json(json!({"module": hash})))
            .await;
        assert_eq!(
            (status, r["status"].as_str()),
            (200, Some("completed")),
            "{r}"
        );
    }
    let resp = a
        .req(reqwest::Method::DELETE, &format!("/v1/modules/{hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    // Gone from the cluster at once, to look at from any node.
    let (status, _) = b.get_json(&format!("/v1/modules/{hash}")).await;
    assert_eq!(status, 404);
    // The other node drops its own copy once told: then it runs it no more.
    eventually("the other node dropped its copy", || async {
        let (status, _) = b
            .post("/v1/workloads", Body::Json(json!({"module": hash})))
            .await;
        (status == 404).then_some(())
    })
    .await;
    let (_, list) = a.get_json("/v1/modules").await;
    assert_eq!(list["total"], 0, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_sweep_of_a_lost_node_does_not_stop_the_sweepers_heartbeat() {
    let Some(nats) = Nats::start() else { return };
    // The sweepers reach NATS over a slow link: each of their round trips
    // takes 50 ms, so going over 200 lost workloads takes them seconds.
    let slow = StallingProxy::start(nats.port, std::time::Duration::from_millis(25)).await;
    let (a_env, b_env, c_env) = (Env::new(), Env::new(), Env::new());
    let slow_url = format!("nats://127.0.0.1:{}", slow.port);
    let a = Server::start(&a_env, &["--cluster", &slow_url, "--node-id", "a"]);
    let b = node(&nats, &b_env, Some("b"), &["--max-concurrent", "256"]);
    // C too: B's heartbeat then stays until a slow sweep ends, so A is
    // sure to find B lost, however the two nodes' beats fall.
    let c = Server::start(&c_env, &["--cluster", &slow_url, "--node-id", "c"]);
    let sleep = {
        let (status, m) = b.upload(std::fs::read(example("sleep")).unwrap()).await;
        assert_eq!(status, 201, "{m}");
        m["hash"].as_str().unwrap().to_owned()
    };
    // A's own long run, which must still be running at the end.
    let own = a
        .start_json(&json!({"module": sleep, "args": ["600000"]}))
        .await;
    let mut lost = Vec::new();
    for _ in 0..200 {
        lost.push(
            b.start_json(&json!({"module": sleep, "args": ["600000"]}))
                .await,
        );
    }
    for id in [&own].into_iter().chain(lost.iter().take(1)) {
        eventually("it runs", || async {
            let (_, r) = c.get_json(&format!("/v1/workloads/{id}")).await;
            (r["status"] == "running").then_some(())
        })
        .await;
    }
    b.crash();
    // A goes over every one of b's workloads, which takes its slow link
    // ten seconds or more.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let swept = |m: String| {
        m.lines()
            .find_map(|l| l.strip_prefix("vulcan_cluster_lost_nodes_swept_total "))
            .is_some_and(|n| n.trim() != "0")
    };
    while !swept(a.metrics().await) {
        assert!(
            std::time::Instant::now() < deadline,
            "a never finished its sweep"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, r) = c.get_json(&format!("/v1/workloads/{}", lost[199])).await;
    assert_eq!(r["failure"], "node_lost", "{r}");
    let (_, mine) = c.get_json(&format!("/v1/workloads/{own}")).await;
    assert_eq!(
        mine["status"], "running",
        "a kept beating through its sweep: {mine}"
    );
}
