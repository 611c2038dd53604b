//! The HTTP API of a real `vulcan serve` on a loopback port.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn modules_are_validated_stored_once_and_described() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let bytes = std::fs::read(example("hello")).unwrap();
    let upload = |body: Vec<u8>| {
        server
            .req(Method::POST, "/v1/modules")
            .header("content-type", "application/wasm")
            .body(body)
            .send()
    };
    let first = upload(bytes.clone()).await.unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let info: Value = first.json().await.unwrap();
    let hash = info["hash"].as_str().unwrap().to_owned();
    assert!(hash.starts_with("sha256:") && hash.len() == 71);
    assert_eq!(info["size"], bytes.len());
    assert_eq!(upload(bytes.clone()).await.unwrap().status().as_u16(), 200);

    let (status, got) = server.get_json(&format!("/v1/modules/{hash}")).await;
    assert_eq!((status, got["hash"].as_str()), (200, Some(hash.as_str())));

    let bad = upload(b"definitely not wasm".to_vec()).await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_module");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\\0asm")
    );

    let truncated = upload(bytes[..bytes.len() / 2].to_vec()).await.unwrap();
    assert_eq!(truncated.status().as_u16(), 400);
    let body: Value = truncated.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid module")
    );

    let missing = format!("/v1/modules/sha256:{}", "0".repeat(64));
    assert_eq!(server.get_json(&missing).await.0, 404);
}

#[tokio::test]
async fn all_three_upload_forms_run_synchronously() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let bytes = std::fs::read(example("env-dump")).unwrap();

    // application/wasm with query parameters.
    let (status, w) = server
        .run_wasm(
            "env-dump",
            "arg=one&arg=two%20words&env=K%3Dv%3Dw&timeout_ms=10000",
        )
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["status"], "completed");
    assert_eq!(w["exit_code"], 0);
    assert_eq!(w["args"], json!(["workload.wasm", "one", "two words"]));
    assert_eq!(w["limits"]["timeout_ms"], 10000);
    let id = w["id"].as_str().unwrap();
    let (_, hist) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history"))
        .await;
    let lines: Vec<&str> = hist["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            "K=\"v=w\"",
            "argv[0]=workload.wasm",
            "argv[1]=one",
            "argv[2]=two words"
        ]
    );
    let hash = w["module"].as_str().unwrap().to_owned();

    // application/json, by hash and by base64, with stdin.
    for module in [
        json!({"module": hash}),
        json!({"module_base64": b64(&bytes)}),
    ] {
        let mut spec = module.as_object().unwrap().clone();
        spec.insert("args".into(), json!(["x"]));
        spec.insert("env".into(), json!({"A": "1"}));
        let resp = server
            .req(Method::POST, "/v1/workloads")
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let w: Value = resp.json().await.unwrap();
        assert_eq!(w["status"], "completed");
        assert_eq!(w["module"], hash.as_str());
        assert_eq!(w["line_count"], 3, "A, argv[0], argv[1]");
    }

    // multipart/form-data with a spec part, and stdin through JSON.
    let form = reqwest::multipart::Form::new()
        .part(
            "module",
            reqwest::multipart::Part::bytes(std::fs::read(example("stdin-echo")).unwrap())
                .file_name("stdin-echo.wasm"),
        )
        .part(
            "spec",
            reqwest::multipart::Part::text(json!({"stdin": "piped in\n"}).to_string())
                .mime_str("application/json")
                .unwrap(),
        );
    let resp = server
        .req(Method::POST, "/v1/workloads")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let w: Value = resp.json().await.unwrap();
    assert_eq!(w["status"], "completed");
    let id = w["id"].as_str().unwrap();
    let (_, hist) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history"))
        .await;
    assert_eq!(hist["lines"][0]["line"], "piped in");
    assert_eq!(hist["lines"][1]["stream"], "stderr");
}

#[tokio::test]
async fn async_run_returns_at_once_and_finishes_in_the_background() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let resp = server
        .req(Method::POST, "/v1/workloads/async?arg=9")
        .header("content-type", "application/wasm")
        .body(std::fs::read(example("exit-code")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = resp.json().await.unwrap();
    let id = v["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/workloads/{id}"));
    let (_, _, end) = server.sse(id, None).await.until_end().await;
    assert_eq!(end["status"], "failed");
    assert_eq!(end["exit_code"], 9);
    let (status, w) = server.get_json(&location).await;
    assert_eq!(status, 200);
    assert_eq!(w, end, "the end event carries the final record");
    assert!(w["finished_at"].is_string());
}

#[tokio::test]
async fn list_is_paginated_newest_first_and_filterable() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let mut ids = Vec::new();
    for code in [0, 1, 0, 2, 0] {
        let (_, w) = server.run_wasm("exit-code", &format!("arg={code}")).await;
        ids.push(w["id"].as_str().unwrap().to_owned());
    }
    let (status, page) = server.get_json("/v1/workloads?limit=2&offset=1").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            page["total"].as_u64(),
            page["limit"].as_u64(),
            page["offset"].as_u64()
        ),
        (Some(5), Some(2), Some(1))
    );
    let got: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[3].as_str(), ids[2].as_str()]);
    let (_, failed) = server.get_json("/v1/workloads?status=failed").await;
    assert_eq!(failed["total"], 2);
    let (_, default) = server.get_json("/v1/workloads").await;
    assert_eq!(default["limit"], 50);
    assert_eq!(server.get_json("/v1/workloads?limit=501").await.0, 400);
    assert_eq!(
        server.get_json("/v1/workloads?status=sleeping").await.0,
        400
    );
}

#[tokio::test]
async fn kill_stops_a_spinning_guest_and_a_second_kill_conflicts() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("spin", "").await;
    let mut sse = server.sse(&id, None).await;
    let first = sse.next().await.unwrap();
    assert_eq!(first.data, "spinning", "the guest is in its loop");

    // DELETE answers once it has stopped, with what actually happened.
    let (status, killed) = server.kill(&id).await;
    assert_eq!(status, 200, "{killed}");
    assert_eq!(killed["status"], "killed");
    assert_eq!(killed["failure"], "killed");
    let (_, _, end) = sse.until_end().await;
    assert_eq!(end["status"], "killed");
    assert_eq!(end["error"], "killed on request");
    assert!(end["finished_at"].is_string());

    let (status, body) = server.kill(&id).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test]
async fn sse_delivers_every_line_in_order_to_several_and_late_subscribers() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("log-flood", "arg=20000").await;
    let mut a = server.sse(&id, None).await;
    let mut b = server.sse(&id, None).await;
    let (a_seqs, a_lines, a_end) = a.until_end().await;
    let (b_seqs, _, _) = b.until_end().await;
    let want: Vec<u64> = (0..20_000).collect();
    assert_eq!(a_seqs, want);
    assert_eq!(b_seqs, want);
    assert_eq!(a_lines[19_999], "line 19999");
    assert_eq!(a_end["line_count"], 20_000);

    // After the end: a replay of the stored lines, then `end`, then close.
    let (late, _, _) = server.sse(&id, None).await.until_end().await;
    assert_eq!(late, want);
    // Resuming from a position replays only what follows it.
    let (tail, _, _) = server.sse(&id, Some(19_995)).await.until_end().await;
    assert_eq!(tail, vec![19_996, 19_997, 19_998, 19_999]);
    let resp = server
        .req(Method::GET, &format!("/v1/workloads/{id}/logs?after=19998"))
        .send()
        .await
        .unwrap();
    assert!(resp.text().await.unwrap().contains("id: 19999\n"));
}

#[tokio::test]
async fn resuming_mid_stream_loses_and_repeats_nothing() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("log-flood", "arg=100000").await;
    let mut first = server.sse(&id, None).await;
    let mut seen = Vec::new();
    while let Some(ev) = first.next().await {
        seen.push(ev.id.unwrap().parse::<u64>().unwrap());
        if seen.len() == 5_000 {
            break;
        }
    }
    drop(first); // the client disconnects mid-stream
    let (rest, _, end) = server
        .sse(&id, seen.last().copied())
        .await
        .until_end()
        .await;
    seen.extend(rest);
    assert_eq!(
        seen,
        (0..100_000).collect::<Vec<u64>>(),
        "every seq exactly once"
    );
    assert_eq!(end["status"], "completed");
}

#[tokio::test]
async fn history_pages_through_every_line() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, w) = server.run_wasm("log-flood", "arg=2500").await;
    let id = w["id"].as_str().unwrap();
    let mut after: Option<u64> = None;
    let mut seqs = Vec::new();
    loop {
        let path = match after {
            Some(a) => format!("/v1/workloads/{id}/logs/history?limit=1000&after={a}"),
            None => format!("/v1/workloads/{id}/logs/history?limit=1000"),
        };
        let (status, page) = server.get_json(&path).await;
        assert_eq!(status, 200);
        let lines = page["lines"].as_array().unwrap();
        if lines.is_empty() {
            assert_eq!(page["next_after"].as_u64(), after);
            break;
        }
        assert!(lines.len() <= 1000);
        for l in lines {
            seqs.push(l["seq"].as_u64().unwrap());
            assert_eq!(l["stream"], "stdout");
            assert!(l["ts"].as_str().unwrap().ends_with('Z'));
        }
        after = page["next_after"].as_u64();
    }
    assert_eq!(seqs, (0..2500).collect::<Vec<u64>>());
    assert_eq!(
        server
            .get_json(&format!("/v1/workloads/{id}/logs/history?limit=10001"))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_one_error_shape() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-upload", "128KiB"]);
    let hello = std::fs::read(example("hello")).unwrap();
    let post = |ct: &'static str, body: Vec<u8>| {
        server
            .req(Method::POST, "/v1/workloads")
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (
            post("application/wasm", b"nope".to_vec()).await.unwrap(),
            400,
            "invalid_module",
        ),
        (
            post("application/json", b"{\"module\":".to_vec())
                .await
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            post(
                "application/json",
                br#"{"module_base64":"AAAA","bogus":1}"#.to_vec(),
            )
            .await
            .unwrap(),
            400,
            "bad_request",
        ),
        (
            post("application/json", br#"{"args":[]}"#.to_vec())
                .await
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            post(
                "application/json",
                format!(r#"{{"module":"sha256:{}"}}"#, "a".repeat(64)).into_bytes(),
            )
            .await
            .unwrap(),
            404,
            "not_found",
        ),
        (
            post("text/plain", hello.clone()).await.unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            server
                .req(Method::GET, "/v1/workloads/01ARZ3NDEKTSV4RRFFQ69G5FAV")
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            server
                .req(Method::GET, "/v1/workloads/garbage")
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            server
                .req(Method::GET, "/v1/workloads/01ARZ3NDEKTSV4RRFFQ69G5FAV/logs")
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            server
                .req(Method::DELETE, "/v1/workloads/01ARZ3NDEKTSV4RRFFQ69G5FAV")
                .send()
                .await
                .unwrap(),
            404,
            "not_found",
        ),
    ];
    for (resp, status, code) in cases {
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    // An error to a request whose body was not read closes the connection,
    // so no client reuses one that may still hold unread bytes; other
    // errors keep it, a body read to its end included.
    let resp = post("text/plain", hello.clone()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    assert_eq!(resp.headers()["connection"], "close");
    let resp = post("application/json", b"{\"module\": ".to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.headers().get("connection").is_none());
    let resp = server
        .req(Method::GET, "/v1/workloads/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.headers().get("connection").is_none());
    // Refused from its declared length, before a byte of it is read.
    let (status, body) = server
        .head_only(&format!(
            "POST /v1/workloads HTTP/1.1\r\nContent-Type: application/wasm\r\nContent-Length: {}",
            200 * 1024
        ))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    let (_, page) = server.get_json("/v1/workloads").await;
    assert_eq!(page["total"], 0, "no bad request created a workload");
    assert_eq!(server.get_json("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_full_server_queues_a_sync_run_until_a_slot_frees_and_a_full_queue_answers_503() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "1", "--max-queued", "1"]);
    let id = server.start_wasm("spin", "").await;
    // The sync caller waits in the queue while the spinner holds the slot.
    let waiting = server
        .req(Method::POST, "/v1/workloads")
        .header("content-type", "application/wasm")
        .body(std::fs::read(example("hello")).unwrap())
        .send();
    let waiting = tokio::spawn(waiting);
    eventually("the sync run waits in the queue", || async {
        let (_, queue) = server.get_json("/v1/queue").await;
        (queue["queued"] == 1).then_some(())
    })
    .await;
    let resp = server
        .req(Method::POST, "/v1/workloads/async")
        .header("content-type", "application/wasm")
        .body(std::fs::read(example("hello")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(server.kill(&id).await.0, 200);
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status().as_u16(), 200, "it ran once the slot was free");
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["status"], "completed");
    assert!(record["queued_at"].is_string(), "{record}");
    let (_, _, end) = server.sse(&id, None).await.until_end().await;
    assert_eq!(end["status"], "killed");
}

#[tokio::test]
async fn a_token_guards_everything_but_healthz() {
    let env = Env::new();
    let server = Server::start(&env, &["--token", "s3cret"]);
    let anon = reqwest::Client::new();
    let resp = anon
        .get(format!("{}/v1/workloads", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = anon
        .get(format!("{}/metrics", server.url))
        .bearer_auth("s3cres")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    // The console's data endpoints are guarded like the rest; its pages and
    // assets hold no data and are open, so a browser can ask for the token.
    for path in ["/v1/modules", "/v1/stats"] {
        let resp = anon
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
    }
    for path in [
        "/",
        "/console/app.js",
        "/workloads/01J0000000000000000000000",
    ] {
        let resp = anon
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains("s3cret"), "{path}");
    }
    let health = anon
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(
        server.get_json("/v1/workloads").await.0,
        200,
        "with the token"
    );
}

#[tokio::test]
async fn metrics_count_workloads_lines_and_cache_use() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    server.run_wasm("log-flood", "arg=10").await;
    server.run_wasm("exit-code", "arg=3").await;
    let (_, w) = server.run_wasm("log-flood", "arg=5").await;
    let hash = w["module"].as_str().unwrap();
    let resp = server
        .req(Method::POST, "/v1/workloads")
        .json(&json!({"module": hash}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Every line any workload wrote, as their records count them.
    let (_, page) = server.get_json("/v1/workloads").await;
    let lines: u64 = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["line_count"].as_u64().unwrap())
        .sum();
    assert!(lines > 15, "the by-hash run printed its default count too");
    let text = server.metrics().await;
    let lines_total = format!("vulcan_log_lines_total {lines}");
    for expected in [
        "vulcan_workloads_finished_total{status=\"completed\"} 3",
        "vulcan_workloads_finished_total{status=\"failed\"} 1",
        "vulcan_workloads_running 0",
        lines_total.as_str(),
        "vulcan_workload_duration_seconds_count 4",
        "vulcan_module_compiles_total 2",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    assert!(text.contains("vulcan_module_cache_hits_total 2"), "{text}");
}

#[tokio::test]
async fn a_restart_keeps_everything_and_fails_what_a_crash_left_running() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, done) = server.run_wasm("log-flood", "arg=300").await;
    let spinning = server.start_wasm("spin", "").await;
    let mut sse = server.sse(&spinning, None).await;
    assert_eq!(sse.next().await.unwrap().data, "spinning");
    server.crash();

    let server = Server::start(&env, &[]);
    let id = done["id"].as_str().unwrap();
    let (status, w) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(w, done);
    let (_, hist) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history?limit=10000"))
        .await;
    assert_eq!(hist["lines"].as_array().unwrap().len(), 300);

    let (_, orphan) = server.get_json(&format!("/v1/workloads/{spinning}")).await;
    assert_eq!(orphan["status"], "failed");
    assert!(orphan["error"].as_str().unwrap().contains("vulcan stopped"));
    assert!(orphan["finished_at"].is_string());
    let (_, _, end) = server.sse(&spinning, None).await.until_end().await;
    assert_eq!(
        end["status"], "failed",
        "a dead workload's stream ends at once"
    );

    // A second restart needs no recompile: the artifact is on disk.
    drop(server);
    let server = Server::start(&env, &[]);
    let (status, _) = server.run_wasm("log-flood", "arg=1").await;
    assert_eq!(status, 200);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("vulcan_module_compiles_total 0"),
        "{metrics}"
    );

    // Without its artifact, a run by hash compiles the stored bytes again.
    drop(server);
    std::fs::remove_dir_all(env.data_dir().join("artifacts")).unwrap();
    let server = Server::start(&env, &[]);
    let hash = vulcan::registry::module_hash(&std::fs::read(example("log-flood")).unwrap());
    let resp = server
        .req(Method::POST, "/v1/workloads")
        .json(&json!({"module": hash, "args": ["2"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["line_count"], 2);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("vulcan_module_compiles_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_kills_running_workloads_flushes_and_exits_zero() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("spin", "").await;
    let mut sse = server.sse(&id, None).await;
    assert_eq!(sse.next().await.unwrap().data, "spinning");
    let status = server.stop();
    assert_eq!(status.code(), Some(0));
    let row = env.workloads().into_iter().find(|w| w.id == id).unwrap();
    assert_eq!(row.status, "killed");
    assert!(row.error.unwrap().contains("server shut down"));
    assert!(row.finished_at.is_some());
    assert_eq!(env.lines(&id).len(), 1);
}

#[tokio::test]
async fn a_follower_gets_every_seq_an_empty_line_included() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("partial-lines", "").await;
    let (seqs, lines, end) = server.sse(&id, None).await.until_end().await;
    let count = end["line_count"].as_u64().unwrap();
    assert_eq!(seqs, (0..count).collect::<Vec<_>>(), "{lines:?}");
    let stored: Vec<String> = env.lines(&id).into_iter().map(|l| l.2).collect();
    assert_eq!(lines, stored, "each event carries its stored line");
    assert!(lines.iter().any(String::is_empty), "{lines:?}");
}

#[tokio::test]
async fn a_completed_answer_means_the_record_and_every_line_are_committed() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, first) = server.run_wasm("log-flood", "arg=300").await;
    let hash = first["module"].as_str().unwrap().to_owned();
    // Many at once, so their lifecycle commits share transactions.
    let runs = (0..24u64).map(|i| {
        let (server, env, hash) = (&server, &env, hash.clone());
        async move {
            let resp = server
                .req(Method::POST, "/v1/workloads")
                .json(&json!({"module": hash, "args": [(100 + i * 10).to_string()]}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let record: serde_json::Value = resp.json().await.unwrap();
            let id = record["id"].as_str().unwrap().to_owned();
            // Read straight from the file the moment the answer arrives.
            let row = env
                .workloads()
                .into_iter()
                .find(|w| w.id == id)
                .expect("the record is committed");
            assert_eq!(row.status, "completed", "{record}");
            assert_eq!(record["status"], "completed");
            let lines = env.lines(&id);
            assert_eq!(lines.len() as u64, 100 + i * 10, "every line is stored");
            assert_eq!(record["line_count"], lines.len() as u64);
            assert_eq!(row.line_count, lines.len() as i64);
        }
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn a_module_that_does_not_fit_the_instance_pool_fails_with_a_clear_error() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "2"]);
    let wasm =
        wat::parse_str(r#"(module (table 100000 funcref) (memory 1) (func (export "_start")))"#)
            .unwrap();
    let resp = server
        .req(Method::POST, "/v1/workloads")
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .unwrap();
    // Refused at upload, before anything is stored or run.
    assert_eq!(resp.status().as_u16(), 400);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_module", "{answer}");
    assert_error(&answer, "does not fit in pooling allocator requirements");
    assert_error(&answer, "exceeds the limit of 65536");
    let (_, page) = server.get_json("/v1/workloads").await;
    assert_eq!(page["total"], 0, "nothing was created");
    // The pool is not harmed: the next workload runs.
    let (_, next) = server.run_wasm("hello", "").await;
    assert_eq!(next["status"], "completed", "{next}");
}

#[test]
fn an_instance_pool_larger_than_the_address_space_stops_the_server_at_start() {
    // 100,000 workloads of 4 memory slots, each 4 GiB plus guards: petabytes,
    // beyond a 48-bit address space.
    let out = Env::new().run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-concurrent",
        "100000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "failed to reserve the instance pool for 100000 workloads (4 memory slots each, \
             every slot 4 GiB of address space and its guards); lower --max-concurrent"
        ),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn modules_are_listed_and_activity_is_sampled_for_the_console() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, empty) = server.get_json("/v1/modules").await;
    assert_eq!(
        empty,
        json!({"items": [], "total": 0, "limit": 1000, "offset": 0})
    );
    let (_, w) = server.run_wasm("log-flood", "arg=7").await;
    server.run_wasm("hello", "").await;
    let (status, list) = server.get_json("/v1/modules").await;
    assert_eq!(status, 200);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    assert!(
        items
            .iter()
            .any(|m| m["hash"] == w["module"] && m["kind"] == "module")
    );
    // Newest first.
    assert!(items[0]["created_at"].as_str() >= items[1]["created_at"].as_str());

    // Once a second the server closes an interval: what ended, what was written.
    let (workloads, lines) = eventually("both runs are in the samples", || async {
        let (_, stats) = server.get_json("/v1/stats").await;
        let samples = stats["samples"].as_array().unwrap().clone();
        let sum = |key: &str| {
            samples
                .iter()
                .map(|s| s[key].as_u64().unwrap())
                .sum::<u64>()
        };
        (sum("workloads") >= 2).then(|| (sum("workloads"), sum("lines")))
    })
    .await;
    assert_eq!((workloads, lines), (2, 8));
}

#[tokio::test]
async fn module_lists_are_paged() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    for name in ["hello", "spin", "exit-code"] {
        let (status, _) = server.upload(std::fs::read(example(name)).unwrap()).await;
        assert_eq!(status, 201);
    }
    let (status, page) = server.get_json("/v1/modules?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        (
            page["total"].as_u64(),
            page["items"].as_array().unwrap().len()
        ),
        (Some(3), 2)
    );
    let (_, rest) = server.get_json("/v1/modules?limit=2&offset=2").await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1, "{rest}");
    let first: Vec<&Value> = page["items"].as_array().unwrap().iter().collect();
    assert!(
        !first.contains(&&rest["items"][0]),
        "no module on two pages"
    );
    let (status, bad) = server.get_json("/v1/modules?limit=0").await;
    assert_eq!(status, 400, "{bad}");
    // An open server's caller deletes for everyone.
    let hash = rest["items"][0]["hash"].as_str().unwrap();
    let resp = server
        .req(reqwest::Method::DELETE, &format!("/v1/modules/{hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let (_, after) = server.get_json("/v1/modules").await;
    assert_eq!(after["total"], 2, "{after}");
}
