//! Faults of the machine under a single node: a full disk, a server log that
//! cannot be written, a store writer that dies.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::*;

/// A free loopback port (for a server whose stderr says nothing readable).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server started with `cmd` on `port`, whose stderr is not read.
async fn silent_server(mut cmd: Command, port: u16) -> Server {
    let child = cmd.spawn().expect("failed to start vulcan serve");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
        token: None,
    };
    eventually("the server answers /healthz", || async {
        // Refused until it listens.
        let url = format!("{}/healthz", server.url);
        let answer = server.http.get(url).send().await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    server
}

#[tokio::test]
async fn a_server_whose_stdout_and_stderr_are_dev_full_runs_workloads() {
    let env = Env::new();
    let port = free_port();
    let dev_full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut cmd = env.cmd(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    // Debug logs: every request writes to the failing stderr.
    cmd.env("VULCAN_LOG", "debug")
        .stdout(Stdio::from(dev_full()))
        .stderr(Stdio::from(dev_full()));
    let mut server = silent_server(cmd, port).await;
    for _ in 0..3 {
        let (status, w) = server.run_wasm("hello", "arg=dev-full").await;
        assert_eq!(
            (status, w["status"].as_str()),
            (200, Some("completed")),
            "{w}"
        );
    }
    let (status, failed) = server.run_wasm("exit-code", "arg=3").await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["status"], "failed");
    let metrics = server.metrics().await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vulcan_diagnostics_dropped_writes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the dropped-writes gauge");
    assert!(dropped > 0, "{metrics}");
    signal(&server.child, "TERM");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_store_writer_that_dies_fails_loudly_and_the_server_exits_non_zero() {
    let env = Env::new();
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    // Commit 1 is the start's own; the writer dies right after commit 2.
    cmd.env("VULCAN_TEST_FAULT_WRITER_DIES_AT_COMMIT", "2");
    let mut server = Server::spawned(cmd);
    // Which write is the writer's second depends on how writes share
    // commits; each run before it completes, the one it kills answers 503.
    let mut refused = None;
    for _ in 0..5 {
        let (status, answer) = server.run_wasm("hello", "arg=x").await;
        if status == 503 {
            refused = Some(answer);
            break;
        }
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("completed")),
            "{answer}"
        );
    }
    let answer = refused.expect("a run that the dying writer could not store");
    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
    // Until it exits, /healthz says why (and a run is refused the same way).
    if let Ok(r) = server
        .http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
    {
        assert_eq!(r.status().as_u16(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("test fault"),
            "{body}"
        );
    }
    let exit = server.child.wait().unwrap();
    assert!(!exit.success(), "a supervisor must see a failure: {exit:?}");
    assert_eq!(exit.code(), Some(2), "{exit:?}");
    // The next start finds the data directory whole and works.
    let server = Server::start(&env, &[]);
    let (status, w) = server.run_wasm("hello", "arg=again").await;
    assert_eq!(
        (status, w["status"].as_str()),
        (200, Some("completed")),
        "{w}"
    );
}

#[tokio::test]
async fn a_queue_dispatcher_that_dies_fails_health_and_the_server_exits_non_zero() {
    let env = Env::new();
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0", "--max-concurrent", "1"]);
    cmd.env("VULCAN_TEST_FAULT_DISPATCHER_DIES_AT", "1");
    let mut server = Server::spawned(cmd);
    let spinning = server.start_wasm("spin", "").await;
    // The one slot is taken: this one waits in the queue.
    let queued = server.start_wasm("hello", "arg=queued").await;
    let (_, record) = server.get_json(&format!("/v1/workloads/{queued}")).await;
    assert_eq!(record["status"], "pending", "{record}");
    // Its slot freed, the dispatcher takes the queued one, and dies.
    let (status, killed) = server.kill(&spinning).await;
    assert_eq!(status, 200, "{killed}");
    // Until it exits, /healthz says why (`None`: it has exited already).
    let health = eventually("/healthz fails or the server is gone", || async {
        match server
            .http
            .get(format!("{}/healthz", server.url))
            .send()
            .await
        {
            Ok(r) if r.status().as_u16() == 200 => None,
            Ok(r) => Some(Some((
                r.status().as_u16(),
                r.json::<Value>().await.unwrap(),
            ))),
            Err(_) => Some(None),
        }
    })
    .await;
    if let Some((status, body)) = health {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "node_failed", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the job queue's dispatcher panicked: test fault"),
            "{body}"
        );
    }
    let exit = server.child.wait().unwrap();
    assert!(!exit.success(), "a supervisor must see a failure: {exit:?}");
    // Nothing queued was lost: the next start runs it.
    let server = Server::start(&env, &[]);
    let (seqs, lines, end) = server.sse(&queued, None).await.until_end().await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!((seqs.len(), lines.len()), (1, 1), "{lines:?}");
}

/// A tmpfs of `mib` MiB mounted on a new directory, unmounted when dropped;
/// `None` where this process may not mount (not root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }

    fn resize(&self, mib: u32) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_ends_runs_with_507_and_a_prefix_of_their_lines() {
    let Some(disk) = SmallDisk::mount(24) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = disk.dir.path().join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulcan"));
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("VULCAN_LOG")
        .stdin(Stdio::null());
    let server = Server::spawned(cmd);
    let floods = (0..4).map(|_| {
        let server = &server;
        async move {
            server
                .run_wasm("log-flood", "arg=400000&max_output_bytes=4000000000")
                .await
        }
    });
    let answers = futures_util::future::join_all(floods).await;
    let mut full = 0;
    for (status, answer) in &answers {
        match status {
            507 => {
                full += 1;
                assert_eq!(answer["error"]["code"], "storage_full", "{answer}");
                let id = answer["id"].as_str().expect("the workload's id");
                let w = &answer["workload"];
                assert_eq!(w["id"], id, "{answer}");
                assert_eq!(
                    (w["status"].as_str(), w["failure"].as_str()),
                    (Some("failed"), Some("store"))
                );
                // What is stored is the prefix the record counts.
                let count = w["line_count"].as_u64().unwrap();
                let conn = rusqlite::Connection::open(data.join("vulcan.db")).unwrap();
                let (n, max): (i64, Option<i64>) = conn
                    .query_row(
                        "SELECT COUNT(*), MAX(seq) FROM log_records r JOIN workloads w \
                         ON r.workload = w.key WHERE w.id = ?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                assert_eq!(n as u64, count, "{answer}");
                assert_eq!(max.map_or(0, |m| m as u64 + 1), count, "no hole: {answer}");
            }
            200 => assert_eq!(answer["status"], "completed", "{answer}"),
            other => panic!("a flood on a full disk answered {other}: {answer}"),
        }
    }
    assert!(
        full > 0,
        "48 MiB cannot hold four floods of a million lines"
    );
    let (_, list) = server.get_json("/v1/workloads?status=running").await;
    assert_eq!(list["total"], 0, "nothing stays running: {list}");
    // Room again: runs complete without a restart.
    disk.resize(512);
    eventually("a run completes after room returns", || async {
        let (status, w) = server.run_wasm("hello", "arg=room").await;
        (status == 200 && w["status"] == "completed").then_some(())
    })
    .await;
}
