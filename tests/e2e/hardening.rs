//! The product's promises under hostile guests, hostile clients and faults:
//! bounded memory, no stuck workload, no lost line, one owner per data directory.

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// True once the store holds a line of `id` with seq `seq`.
async fn stored(server: &Server, id: &str, seq: u64) -> bool {
    let (status, page) = server
        .get_json(&format!(
            "/v1/workloads/{id}/logs/history?after={}&limit=1",
            seq - 1
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    !page["lines"].as_array().unwrap().is_empty()
}

/// Counts of workloads that have not ended.
async fn unfinished(server: &Server) -> u64 {
    let mut n = 0;
    for status in ["pending", "running"] {
        let (_, page) = server
            .get_json(&format!("/v1/workloads?status={status}&limit=1"))
            .await;
        n += page["total"].as_u64().unwrap();
    }
    n
}

#[tokio::test]
async fn a_flooding_guest_is_held_to_the_stores_pace_and_others_still_run() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let flooder = server
        .start_wasm("tight", "timeout_ms=600000&max_output_bytes=4000000000")
        .await;
    // Without backpressure the guest outruns the store many times over and the
    // server grows by hundreds of MB a second; with it, memory stays bounded.
    eventually("half a million lines are stored", || async {
        stored(&server, &flooder, 500_000).await.then_some(())
    })
    .await;
    let rss = rss_bytes(server.child.id());
    assert!(
        rss < 512 << 20,
        "server RSS {} MiB while flooding",
        rss >> 20
    );

    // Another workload is not starved meanwhile.
    let (status, hello) = server.run_wasm("hello", "").await;
    assert_eq!(status, 200);
    assert_eq!(hello["status"], "completed", "{hello}");

    let (status, killed) = server.kill(&flooder).await;
    assert_eq!(status, 200, "{killed}");
    assert_eq!(killed["status"], "killed");
    // Every line it wrote is stored, and no more.
    let count = killed["line_count"].as_u64().unwrap();
    assert!(count >= 500_000);
    assert!(stored(&server, &flooder, count - 1).await);
    assert!(!stored(&server, &flooder, count).await);
}

#[tokio::test]
async fn requests_dropped_at_any_point_leave_no_workload_behind() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, module) = server
        .upload(std::fs::read(example("hello")).unwrap())
        .await;
    let addr = server.url.trim_start_matches("http://").to_owned();
    let body = json!({"module": module["hash"]}).to_string();
    let request = format!(
        "POST /v1/workloads HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Cut at every point of the request, then right after all of it, until
    // dropped requests have created enough workloads to have raced their start.
    let cut_everywhere = (0..request.len()).step_by(7);
    let mut created = 0;
    for round in 0.. {
        assert!(
            round < 200,
            "dropped requests created only {created} workloads"
        );
        let cuts: Vec<usize> = match round {
            0 => cut_everywhere.clone().collect(),
            _ => vec![request.len(); 30],
        };
        for cut in cuts {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            conn.write_all(&request.as_bytes()[..cut]).await.unwrap();
            drop(conn);
        }
        let (_, page) = server.get_json("/v1/workloads?limit=1").await;
        created = page["total"].as_u64().unwrap();
        if created >= 20 {
            break;
        }
    }
    // A clean stop waits for open requests and running workloads; what a
    // dropped request left behind would stay pending in the file.
    let status = server.stop();
    assert_eq!(status.code(), Some(0));
    let rows = env.workloads();
    let stuck: Vec<_> = rows
        .iter()
        .filter(|w| w.status == "pending" || w.status == "running")
        .collect();
    assert!(
        stuck.is_empty(),
        "{} of {} workloads stuck",
        stuck.len(),
        rows.len()
    );
}

#[tokio::test]
async fn a_data_directory_has_one_owner_and_readers_beside_it() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, hello) = server.run_wasm("hello", "").await;
    let dir = env.data_dir().display().to_string();
    let pid = format!("pid {}", server.child.id());

    let second = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(second.status.code(), Some(2));
    for out in [&second, &env.run(&["run", &example_str("hello")])] {
        assert_eq!(out.status.code(), Some(2));
        let message = stderr(out);
        assert!(
            message.contains(&dir) && message.contains(&pid),
            "{message}"
        );
        assert!(message.contains("--server"), "{message}");
    }
    // Reading works beside the owner.
    let ls = env.run(&["ls"]);
    assert_eq!(ls.status.code(), Some(0), "{}", stderr(&ls));
    assert!(stdout(&ls).contains(hello["id"].as_str().unwrap()));
    let logs = env.run(&["logs", hello["id"].as_str().unwrap()]);
    assert_eq!(stdout(&logs), "Hello from a Vulcan workload!\n");
    // The server's own workloads were not touched by the refused starts.
    let (_, again) = server
        .get_json(&format!("/v1/workloads/{}", hello["id"].as_str().unwrap()))
        .await;
    assert_eq!(again["status"], "completed");
}

#[tokio::test]
async fn after_a_crash_every_line_a_follower_saw_is_stored_and_the_record_adds_up() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("tight", "timeout_ms=600000").await;
    let mut sse = server.sse(&id, None).await;
    let mut seen = 0;
    while seen < 50_000 {
        let ev = sse.next().await.unwrap();
        seen = ev.id.unwrap().parse::<u64>().unwrap();
    }
    server.crash();

    let server = Server::start(&env, &[]);
    let (_, w) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(w["status"], "failed");
    assert_eq!(w["failure"], "host");
    let count = w["line_count"].as_u64().unwrap();
    assert!(
        count > seen,
        "every line a follower saw is stored: {count} > {seen}"
    );
    assert!(stored(&server, &id, count - 1).await && !stored(&server, &id, count).await);
    // The end is the last stored line's time, not the restart's.
    let (_, last) = server
        .get_json(&format!(
            "/v1/workloads/{id}/logs/history?after={}",
            count - 2
        ))
        .await;
    assert_eq!(w["finished_at"], last["lines"][0]["ts"], "{w}");
}

#[tokio::test]
async fn limits_have_server_defaults_and_maxima() {
    let env = Env::new();
    let server = Server::start(
        &env,
        &[
            "--default-timeout",
            "7s",
            "--default-memory",
            "32MiB",
            "--max-memory",
            "64MiB",
        ],
    );
    let (status, w) = server.run_wasm("hello", "").await;
    assert_eq!(status, 200);
    assert_eq!(w["limits"]["timeout_ms"], 7000, "the default applies: {w}");
    assert_eq!(w["limits"]["max_memory_bytes"], 32 << 20);
    let (status, w) = server
        .run_wasm("hello", "timeout_ms=50&max_memory_mb=64")
        .await;
    assert_eq!(status, 200);
    assert_eq!(w["limits"]["timeout_ms"], 50, "a request may lower one");
    let (status, e) = server.run_wasm("hello", "max_memory_mb=65").await;
    assert_eq!(status, 400);
    assert_error(&e, "maximum");

    let bad = env.run(&["serve", "--default-timeout", "2h"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--max-timeout"), "{}", stderr(&bad));
}

#[tokio::test]
async fn specs_are_capped_and_lists_carry_summaries() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-spec-size", "64KiB"]);
    let (_, module) = server
        .upload(std::fs::read(example("hello")).unwrap())
        .await;
    let big = "a".repeat(70_000);
    for spec in [
        json!({"module": module["hash"], "args": [big]}),
        json!({"module": module["hash"], "env": {"K": big}}),
        json!({"module": module["hash"], "stdin": big}),
    ] {
        let (status, e) = server.post("/v1/workloads", Body::Json(spec)).await;
        assert_eq!(status, 413);
        assert_error(&e, "--max-spec-size");
    }
    let id = server
        .start_json(&json!({"module": module["hash"], "args": ["x".repeat(60_000)]}))
        .await;
    let (_, page) = server.get_json("/v1/workloads").await;
    let item = &page["items"][0];
    assert_eq!(item["id"], id.as_str());
    assert!(
        item.get("args").is_none() && item.get("limits").is_none(),
        "{item}"
    );
    let (_, full) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(full["args"][1].as_str().unwrap().len(), 60_000);
}

#[tokio::test]
async fn a_module_too_expensive_to_compile_is_refused() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-function-size", "64KiB"]);
    let body = "(i32.const 1) (drop) ".repeat(30_000);
    let wasm = wat::parse_str(format!("(module (func (export \"_start\") {body}))")).unwrap();
    let (status, e) = server.upload(wasm).await;
    assert_eq!(status, 413, "{e}");
    assert_error(&e, "--max-function-size");
    let (status, _) = server.run_wasm("hello", "").await;
    assert_eq!(status, 200, "small modules still run");
}

#[tokio::test]
async fn clients_that_stall_are_disconnected() {
    let env = Env::new();
    let server = Server::start(&env, &["--client-timeout", "1s"]);
    let addr = server.url.trim_start_matches("http://").to_owned();

    // A connection that never sends a request is closed.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest).await;

    // A body that stops arriving gets 408, whichever way it is parsed.
    for (content_type, start) in [
        ("application/json", "{\"module\""),
        (
            "multipart/form-data; boundary=XX",
            "--XX\r\nContent-Disposition: form-data; name=\"module\"\r\n\r\n\0asm",
        ),
    ] {
        let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/workloads HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
             Content-Length: 1000\r\n\r\n{start}"
        );
        slow.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = slow.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{content_type}: {answer}"
        );
        assert!(answer.contains("request_timeout"), "{answer}");
    }

    // A follower that stops reading a flood is disconnected (and may resume).
    let flooder = server.start_wasm("tight", "timeout_ms=600000").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr.parse().unwrap()).await.unwrap();
    stalled
        .write_all(
            format!("GET /v1/workloads/{flooder}/logs HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let followers = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("vulcan_log_followers "))
            .unwrap()
            .parse()
            .unwrap()
    };
    eventually("the follower is counted", || async {
        (followers(&server.metrics().await) == 1).then_some(())
    })
    .await;
    eventually("the stalled follower is dropped", || async {
        (followers(&server.metrics().await) == 0).then_some(())
    })
    .await;
    assert_eq!(server.kill(&flooder).await.0, 200);
}

#[tokio::test]
async fn out_of_range_and_malformed_input_is_refused_with_the_json_shape() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, hello) = server.run_wasm("hello", "").await;
    let id = hello["id"].as_str().unwrap();
    let huge = u64::MAX.to_string();
    for path in [
        format!("/v1/workloads?offset={huge}"),
        format!("/v1/workloads/{id}/logs/history?after={huge}"),
        format!("/v1/workloads/{id}/logs/history?after=9223372036854775808"),
        format!("/v1/workloads/{id}/logs?after={huge}"),
    ] {
        let (status, e) = server.get_json(&path).await;
        assert_eq!(status, 400, "{path}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{path}");
    }
    let resp = server
        .req(Method::GET, &format!("/v1/workloads/{id}/logs"))
        .header("Last-Event-ID", &huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Path and method errors have the JSON shape too.
    for (method, path, code) in [
        (Method::GET, "/v1/workloads/%ff/logs", 400),
        (Method::PUT, "/v1/workloads", 405),
    ] {
        let resp = server.req(method, path).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code, "{path}");
        let e: Value = resp.json().await.unwrap();
        assert!(
            e["error"]["code"].is_string() && e["error"]["message"].is_string(),
            "{e}"
        );
    }

    let (_, module) = server
        .upload(std::fs::read(example("hello")).unwrap())
        .await;
    for (spec, says) in [
        (
            json!({"module": module["hash"], "args": ["a\u{0}b"]}),
            "NUL",
        ),
        (
            json!({"module": module["hash"], "env": {"A=B": "1"}}),
            "`=`",
        ),
        (
            json!({"module": module["hash"], "env": {"": "1"}}),
            "non-empty",
        ),
        (
            json!({"module": module["hash"], "env": {"K": "v\u{0}"}}),
            "NUL",
        ),
    ] {
        let (status, e) = server.post("/v1/workloads", Body::Json(spec)).await;
        assert_eq!(status, 400);
        assert_error(&e, says);
    }
    let wasm = std::fs::read(example("hello")).unwrap();
    for (first, second) in [("module", "module"), ("spec", "spec")] {
        let part = |name: &str| match name {
            "module" => reqwest::multipart::Part::bytes(wasm.clone()),
            _ => reqwest::multipart::Part::text("{}"),
        };
        let mut form = reqwest::multipart::Form::new()
            .part(first, part(first))
            .part(second, part(second));
        if first == "spec" {
            form = form.part("module", part("module"));
        }
        let (status, e) = server.post("/v1/workloads", Body::Form(form)).await;
        assert_eq!(status, 400);
        assert_error(&e, "more than one");
    }
    assert_eq!(unfinished(&server).await, 0);
    let (_, all) = server.get_json("/v1/workloads").await;
    assert_eq!(all["total"], 1, "bad input changed nothing");
}

#[tokio::test]
async fn tokens_empty_or_in_any_case() {
    let env = Env::new();
    let out = env.run(&["serve", "--listen", "127.0.0.1:0", "--token", ""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let out = env
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .env("VULCAN_TOKEN", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let server = Server::start(&env, &["--token", "s3cret"]);
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = server
            .http
            .get(format!("{}/v1/workloads", server.url))
            .header("authorization", format!("{scheme} s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{scheme}");
    }
}

#[tokio::test]
async fn a_delete_answer_says_what_actually_happened() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    for _ in 0..30 {
        // Races the workload's own end.
        let id = server.start_wasm("hello", "").await;
        let (status, answer) = server.kill(&id).await;
        let (_, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
        match status {
            200 => assert_eq!(answer["status"], record["status"], "{answer}"),
            409 => assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(record["status"].as_str().unwrap()),
                "{answer} vs {record}"
            ),
            other => panic!("DELETE answered {other}: {answer}"),
        }
        assert!(["killed", "completed"].contains(&record["status"].as_str().unwrap()));
    }
}

/// CPU time (ticks) and niceness of each of `pid`'s threads named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<(u64, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the command, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let (utime, stime) = (fields[11].parse::<u64>(), fields[12].parse::<u64>());
        out.push((utime.unwrap() + stime.unwrap(), fields[16].parse().unwrap()));
    }
    out
}

#[tokio::test]
#[cfg(target_os = "linux")]
async fn a_long_running_guest_computes_on_the_nicer_guest_threads() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "4"]);
    let pid = server.child.id();
    // Workers start on their own threads, and each lowers its own priority
    // below the server's (whatever niceness the tests run at).
    let server_nice = threads_named(pid, "vulcan")[0].1;
    let guest_nice = (server_nice + 10).min(19);
    let guests = eventually("one guest thread per slot, each nicer", || async {
        let guests = threads_named(pid, "vulcan-guest");
        (guests.len() == 4 && guests.iter().all(|&(_, nice)| nice == guest_nice)).then_some(guests)
    })
    .await;
    let busy_before: u64 = guests.iter().map(|(cpu, _)| cpu).sum();

    let id = server.start_wasm("spin", "").await;
    eventually("the spinning guest computes on a guest thread", || async {
        let busy: u64 = threads_named(pid, "vulcan-guest")
            .iter()
            .map(|(cpu, _)| cpu)
            .sum();
        (busy > busy_before + 10).then_some(())
    })
    .await;
    // The server's own threads still answer at once.
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(server.kill(&id).await.0, 200);
}

/// Opens an SSE stream on a raw connection and reads until the first bytes of
/// its body have arrived, then keeps the connection without reading more:
/// a follower that stalled. Returns the connection and the status.
async fn stalled_follower(server: &Server, path: &str) -> (tokio::net::TcpStream, u16) {
    let addr = server.url.trim_start_matches("http://").to_owned();
    // A small receive window, so the kernel holds little of what it is sent.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr.parse().unwrap()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = String::from_utf8_lossy(&seen[9..12]).parse().unwrap();
            // A refusal is whole; a stream has begun once its body has.
            if status != 200 || seen.len() > end + 4 {
                return (conn, status);
            }
        }
    }
}

#[tokio::test]
async fn followers_are_capped_and_a_stalled_one_holds_a_bounded_buffer() {
    const FOLLOWERS: usize = 300;
    let env = Env::new();
    // Stalled followers are kept (not disconnected for stalling) meanwhile.
    let server = Server::start(
        &env,
        &[
            "--max-followers",
            &FOLLOWERS.to_string(),
            "--client-timeout",
            "10m",
        ],
    );
    // Longer than the kernel's socket buffers hold, so a stalled follower
    // stays stalled rather than ending.
    let (_, w) = server.run_wasm("log-flood", "arg=100000").await;
    assert_eq!(w["line_count"], 100_000, "{w}");
    let path = format!(
        "/v1/workloads/{}/logs?format=json",
        w["id"].as_str().unwrap()
    );
    // One whole read first, so what any read warms up is in the baseline.
    let mut sse = server.sse(w["id"].as_str().unwrap(), None).await;
    assert_eq!(sse.until_end().await.0.len(), 100_000);
    let before = rss_bytes(server.child.id());
    let mut held = Vec::new();
    for _ in 0..FOLLOWERS {
        let (conn, status) = stalled_follower(&server, &path).await;
        assert_eq!(status, 200);
        held.push(conn);
    }
    // Each stalled follower has begun its replay: what it holds is at its
    // bound (a replayed page, queued chunks), not the log's size.
    let grown = rss_bytes(server.child.id()).saturating_sub(before);
    eprintln!(
        "{FOLLOWERS} stalled followers of a 100,000-line log: server grew {} KiB ({} KiB each)",
        grown >> 10,
        (grown >> 10) / FOLLOWERS as u64
    );
    assert!(
        grown <= (FOLLOWERS as u64) * (256 << 10) + (64 << 20),
        "{FOLLOWERS} stalled followers grew the server by {} MiB",
        grown >> 20
    );
    // The node's cap: one more is refused, with a time to retry.
    let resp = server
        .http
        .get(format!("{}{path}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-followers"),
        "{body}"
    );
    // A follower that leaves frees its place.
    drop(held.pop());
    eventually("a freed follower place", || async {
        let (conn, status) = stalled_follower(&server, &path).await;
        (status == 200).then_some(conn)
    })
    .await;
}
