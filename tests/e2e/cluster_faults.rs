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

/// Every line of a workload's history, paging through it.
async fn history_seqs(server: &Server, id: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = server
            .get_json(&format!(
                "/v1/workloads/{id}/logs/history?limit=10000{after}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let batch = page["lines"].as_array().unwrap();
        if batch.is_empty() {
            return seqs;
        }
        seqs.extend(batch.iter().map(|l| l["seq"].as_u64().unwrap()));
        after = format!("&after={}", page["next_after"]);
    }
}

/// The consumers of `VULCAN_LOGS` now.
async fn log_consumers(nats: &Nats) -> usize {
    use futures_util::TryStreamExt as _;
    let client = async_nats::connect(format!("127.0.0.1:{}", nats.port))
        .await
        .unwrap();
    let logs = async_nats::jetstream::new(client)
        .get_stream(vulcan::cluster::LOGS_STREAM)
        .await
        .unwrap();
    let names: Vec<String> = logs.consumer_names().try_collect().await.unwrap();
    names.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_nats_loses_no_line_of_a_completed_workload() {
    let Some(nats) = Nats::start() else { return };
    let (a_env, b_env) = (Env::new(), Env::new());
    let a = node(&nats, &a_env, Some("a"), &[]);
    let b = node(&nats, &b_env, Some("b"), &[]);
    let n = 400_000u64;
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
    let done = eventually("it ends", || async {
        let (status, r) = b.get_json(&format!("/v1/workloads/{id}")).await;
        (status == 200 && r["status"] != "running" && r["status"] != "pending").then_some(r)
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["line_count"], n, "{done}");
    let seqs = history_seqs(&b, &id).await;
    assert_eq!(seqs.len() as u64, n, "every line, read from the other node");
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == i as u64),
        "in order, no hole"
    );
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
