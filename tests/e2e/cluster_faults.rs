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
