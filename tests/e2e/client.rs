//! The `vulcan` CLI against a running server.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::*;

#[tokio::test]
async fn submit_status_ls_logs_and_kill_through_the_server() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let cli = Env::new(); // a different data dir: everything must come from the server
    let with_server = |args: &[&str]| server.cli(&cli, args);

    let out = with_server(&["submit", &example_str("exit-code"), "--", "4"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("status: failed") && text.contains("exit_code: 4"),
        "{text}"
    );
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_owned();

    let out = with_server(&["status", &id]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains(&format!("id: {id}")));

    let out = with_server(&["ls"]);
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));
    assert!(stdout(&out).contains("(1 of 1 workloads)"));

    let out = with_server(&[
        "submit",
        "--async",
        "--json",
        &example_str("stderr-mix"),
        "--",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mix = v["id"].as_str().unwrap().to_owned();
    let out = with_server(&["logs", "-f", &mix]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "out 0\nout 2\n");
    assert_eq!(stderr(&out), "err 1\nerr 3\n");
    let out = with_server(&["logs", &mix]);
    assert_eq!(stdout(&out), "out 0\nout 2\n");
    assert_eq!(stderr(&out), "err 1\nerr 3\n");

    let spin = server.start_wasm("spin", "").await;
    let mut sse = server.sse(&spin, None).await;
    assert_eq!(sse.next().await.unwrap().data, "spinning");
    let out = with_server(&["kill", &spin]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{spin} killed\n"));
    let (_, _, end) = sse.until_end().await;
    assert_eq!(end["status"], "killed");
    let out = with_server(&["logs", "-f", &spin]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "logs -f exits with the workload's code"
    );

    let out = with_server(&["kill", &spin]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already ended"), "{}", stderr(&out));
    let out = cli.run(&["kill", &spin]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--server"));
}

#[tokio::test]
async fn logs_follow_survives_a_dropped_connection() {
    // A loopback proxy in front of the server that cuts the first connection
    // after 64 KiB of the answer: mid-stream, since 50,000 lines are far more.
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let upstream = server.url.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let connections = Arc::clone(&connections);
        async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    if !first {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let (mut in_read, mut in_write) = inbound.split();
                    let (mut out_read, mut out_write) = outbound.split();
                    let request = tokio::io::copy(&mut in_read, &mut out_write);
                    let answer = async {
                        let mut buf = vec![0u8; 8192];
                        let mut forwarded = 0;
                        while forwarded < 64 * 1024 {
                            let n = out_read.read(&mut buf).await.unwrap();
                            assert!(n > 0, "the stream ended before the cut");
                            in_write.write_all(&buf[..n]).await.unwrap();
                            forwarded += n;
                        }
                    };
                    tokio::select! {
                        _ = request => {}
                        _ = answer => {}
                    }
                    // Dropped here: both sides see the connection end.
                });
            }
        }
    });

    let id = server.start_wasm("log-flood", "arg=50000").await;
    let mut follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_vulcan"))
        .args(["--server", &proxy_url, "logs", "-f", &id])
        .env_remove("VULCAN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut got = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        got.push(line);
    }
    let status = follower.wait().await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the follower reconnected after the cut"
    );
    let want: Vec<String> = (0..50_000).map(|i| format!("line {i}")).collect();
    assert_eq!(got.len(), want.len(), "no line lost or repeated");
    assert!(got == want);
}

#[tokio::test]
async fn submit_with_input_prints_the_output_and_exits_with_the_result() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let sum = vulcan_test_artifacts::component("sum");
    let sum = sum.to_str().unwrap();
    let out = env
        .cmd(&[
            "--server",
            &server.url,
            "submit",
            "--input",
            r#"{"a":4,"b":5}"#,
            sum,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("output: {\"sum\":9}\n"),
        "{}",
        stdout(&out)
    );

    let followed = env
        .cmd(&[
            "--server",
            &server.url,
            "submit",
            "--follow",
            "--input",
            r#"{"a":1,"b":1}"#,
            sum,
        ])
        .output()
        .unwrap();
    assert_eq!(followed.status.code(), Some(0), "{}", stderr(&followed));
    assert!(
        stderr(&followed).contains("[info] adding 1 and 1"),
        "{}",
        stderr(&followed)
    );
    assert!(
        stdout(&followed).ends_with("{\"sum\":2}\n"),
        "{}",
        stdout(&followed)
    );

    let fails = vulcan_test_artifacts::component("fails");
    let failed = env
        .cmd(&[
            "--server",
            &server.url,
            "submit",
            "--input",
            "\"x\"",
            fails.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "a returned error exits 1");
    assert!(
        stdout(&failed).contains("error: invalid digit"),
        "{}",
        stdout(&failed)
    );
}
