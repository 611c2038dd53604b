//! Retries on a real `vulcan serve`: a job that needs a flaky upstream (the
//! `fetch` component with `require_success`, against a real HTTP server on
//! loopback that fails its first answers) runs again by its policy, one
//! record across its attempts, every attempt's lines readable, followed
//! live across the attempts; a kill during a backoff stops the retries;
//! a retry waiting out its backoff survives a restart; bad policies are
//! refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use vulcan_test_artifacts::component;

use crate::support::*;

/// An HTTP server on loopback whose every path answers 503 for its first
/// `failures` requests and 200 after; it counts the requests per path.
struct FlakyUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl FlakyUpstream {
    fn start(failures: usize) -> FlakyUpstream {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let counts = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let counts = Arc::clone(&counts);
            async move {
                let mut counts = counts.lock().unwrap();
                let n = counts.entry(uri.path().to_owned()).or_insert(0);
                *n += 1;
                match *n <= failures {
                    true => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not yet"),
                    false => (axum::http::StatusCode::OK, "done"),
                }
            }
        });
        FlakyUpstream {
            addr: serve_on_loopback(app),
            seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self, path: &str) -> usize {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// A run of `fetch` that needs `url` to answer 2xx, with `retry`.
fn flaky_spec(upstream: &FlakyUpstream, path: &str, retry: Value) -> Value {
    json!({
        "module_base64": b64(&std::fs::read(component("fetch")).unwrap()),
        "input": {"url": upstream.url(path), "require_success": true},
        "allowed_hosts": [upstream.url("")],
        "retry": retry,
    })
}

fn seqs_of(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_fails_twice_is_retried_and_every_attempts_lines_stay_readable() {
    let upstream = FlakyUpstream::start(2);
    let env = Env::new();
    let server = Server::start(&env, &["--allow-private-outbound"]);
    let retry = json!({"max_attempts": 5, "backoff_ms": 20, "on": ["returned_error"]});

    // Async, followed live from before its first line to its end.
    let id = server
        .start_json(&flaky_spec(&upstream, "/async", retry.clone()))
        .await;
    let mut sse = server.sse(&id, None).await;
    let (seqs, _, end) = sse.until_end().await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["attempt"], 3, "{end}");
    // Two lines an attempt ("sending", "answered"); seqs go on across them.
    assert_eq!(seqs, (0..6).collect::<Vec<u64>>(), "{end}");
    assert_eq!(upstream.requests("/async"), 3);
    let attempts = end["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{end}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i + 1, "{a}");
        assert_eq!(a["failure"], "returned_error", "{a}");
        assert!(a["error"].as_str().unwrap().contains("answered 503"), "{a}");
        assert_eq!(
            (a["first_seq"].as_u64(), a["lines"].as_u64()),
            (Some(2 * i as u64), Some(2))
        );
        assert!(ms_of(a, "retry_at") >= ms_of(a, "ended_at"), "{a}");
    }
    assert_eq!(end["retry"]["max_attempts"], 5, "{end}");

    // Each attempt's lines on their own; an attempt that never ran is 404.
    for (attempt, want) in [(1, vec![0, 1]), (2, vec![2, 3]), (3, vec![4, 5])] {
        let (status, page) = server
            .get_json(&format!(
                "/v1/workloads/{id}/logs/history?attempt={attempt}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(seqs_of(page["lines"].as_array().unwrap()), want);
    }
    let (status, answer) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history?attempt=4"))
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_error(&answer, "has no attempt 4; it is on attempt 3");
    assert_eq!(
        seqs_of(&server.history(&id).await),
        (0..6).collect::<Vec<u64>>()
    );
    // The CLI, remotely and on the data directory, picks the same range.
    let cli = Env::new();
    for out in [
        server.cli(&cli, &["logs", &id, "--attempt", "2", "--json"]),
        env.run(&["logs", &id, "--attempt", "2", "--json"]),
    ] {
        assert!(out.status.success(), "{}", stderr(&out));
        let lines: Vec<Value> = (stdout(&out).lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(seqs_of(&lines), vec![2, 3], "{}", stdout(&out));
    }
    let status = server.cli(&cli, &["status", &id]);
    let said = stdout(&status);
    assert!(said.contains("attempt: 3\n"), "{said}");
    assert!(said.contains("attempt 1: returned_error after"), "{said}");
    let row = env
        .workloads()
        .into_iter()
        .find(|w| w.id == id)
        .expect("its row");
    assert_eq!(row.line_count, 6);

    // Sync: the caller gets the last attempt's record.
    let (status, ran) = server
        .post(
            "/v1/workloads",
            Body::Json(flaky_spec(&upstream, "/sync", retry.clone())),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(
        (ran["status"].as_str(), ran["attempt"].as_u64()),
        (Some("completed"), Some(3))
    );
    assert_eq!(upstream.requests("/sync"), 3);

    // Out of attempts: the last attempt's failure is the final status.
    let (status, ran) = server
        .post(
            "/v1/workloads",
            Body::Json(flaky_spec(
                &upstream,
                "/short",
                json!({"max_attempts": 2, "backoff_ms": 0}),
            )),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["status"], "failed", "{ran}");
    assert_eq!(ran["failure"], "returned_error", "{ran}");
    assert_eq!(
        (
            ran["attempt"].as_u64(),
            ran["attempts"].as_array().map(Vec::len)
        ),
        (Some(2), Some(1))
    );
    assert_eq!(upstream.requests("/short"), 2);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("vulcan_workload_retries_total 5"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_the_backoff_stops_the_retries() {
    let upstream = FlakyUpstream::start(usize::MAX);
    let env = Env::new();
    // One waiting workload at most: a retry's backoff counts.
    let server = Server::start(&env, &["--allow-private-outbound", "--max-queued", "1"]);
    // An hour's backoff: the kill comes while it waits.
    let retry = json!({"max_attempts": 3, "backoff_ms": 3_600_000});
    let id = server
        .start_json(&flaky_spec(&upstream, "/kill", retry))
        .await;
    let waiting = eventually(
        "its first attempt failed and it waits to be retried",
        || async {
            let (_, w) = server.get_json(&format!("/v1/workloads/{id}")).await;
            (w["status"] == "pending" && w["attempt"] == 2).then_some(w)
        },
    )
    .await;
    assert_eq!(
        waiting["attempts"][0]["failure"], "returned_error",
        "{waiting}"
    );
    // A slot is free, but the retry that waits fills --max-queued.
    let hello = json!({"module_base64": b64(&std::fs::read(component("greet")).unwrap())});
    let (status, full) = server
        .post("/v1/workloads/async", Body::Json(hello.clone()))
        .await;
    assert_eq!(status, 503, "{full}");
    assert_eq!(full["error"]["code"], "queue_full", "{full}");
    assert_error(&full, "queued or to be retried");
    let (status, killed) = server.kill(&id).await;
    assert_eq!(status, 200, "{killed}");
    assert_eq!(killed["status"], "killed", "{killed}");
    assert!(
        killed["error"]
            .as_str()
            .unwrap()
            .contains("waited to be retried"),
        "{killed}"
    );
    assert_eq!(killed["attempts"].as_array().unwrap().len(), 1, "{killed}");
    // A follower that arrives now gets the first attempt's lines and the end.
    let (seqs, _, end) = server.sse(&id, None).await.until_end().await;
    assert_eq!((seqs, end["status"].as_str()), (vec![0, 1], Some("killed")));
    assert_eq!(upstream.requests("/kill"), 1);
    // Its place is free again.
    let (status, accepted) = server.post("/v1/workloads/async", Body::Json(hello)).await;
    assert_eq!(status, 202, "{accepted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_waiting_out_its_backoff_runs_after_a_restart() {
    let upstream = FlakyUpstream::start(1);
    let env = Env::new();
    let server = Server::start(&env, &["--allow-private-outbound"]);
    // Long enough for the restart to come first, short enough to wait out.
    let retry = json!({"max_attempts": 2, "backoff_ms": 3_000, "max_backoff_ms": 3_000});
    let id = server
        .start_json(&flaky_spec(&upstream, "/restart", retry))
        .await;
    eventually("its first attempt failed", || async {
        let (_, w) = server.get_json(&format!("/v1/workloads/{id}")).await;
        (w["status"] == "pending").then_some(())
    })
    .await;
    assert!(server.stop().success());
    let server = Server::start(&env, &["--allow-private-outbound"]);
    let (seqs, _, end) = server.sse(&id, None).await.until_end().await;
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["attempt"], 2, "{end}");
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    assert_eq!(upstream.requests("/restart"), 2);
}

#[tokio::test]
async fn bad_retry_policies_get_400_with_what_is_wrong_and_create_nothing() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let hello = b64(&std::fs::read(component("greet")).unwrap());
    for (retry, says) in [
        (
            json!({"max_attempts": 0}),
            "retry.max_attempts must be between 1 and 20, got 0",
        ),
        (json!({"max_attempts": 1000}), "got 1000"),
        (
            json!({"max_attempts": 3, "backoff_ms": -5}),
            "retry.backoff_ms must be 0 or more, got -5",
        ),
        (
            json!({"max_attempts": 3, "on": ["killed"]}),
            "`killed` is not a failure kind that can be retried",
        ),
        (
            json!({"max_attempts": 3, "on": ["sometimes"]}),
            "`sometimes` is not a failure kind",
        ),
        (
            json!({"max_attempts": 3, "jitter": true}),
            "unknown field `jitter`",
        ),
        (json!({"backoff_ms": 3}), "retry.max_attempts is required"),
    ] {
        let (status, answer) = server
            .post(
                "/v1/workloads/async",
                Body::Json(json!({"module_base64": hello, "retry": retry})),
            )
            .await;
        assert_eq!(status, 400, "{retry}: {answer}");
        assert_error(&answer, says);
    }
    let (status, answer) = server.get_json("/v1/workloads?limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(answer["total"], 0, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_refuses_a_retry_policy_rather_than_ignore_it() {
    let Some(nats) = Nats::start() else { return };
    let (_envs, nodes) = cluster_nodes(&nats, 1, &[]);
    let hello = b64(&std::fs::read(component("greet")).unwrap());
    let (status, answer) = nodes[0]
        .post(
            "/v1/workloads/async",
            Body::Json(json!({"module_base64": hello, "retry": {"max_attempts": 2}})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_error(
        &answer,
        "retry policies are not available in cluster mode yet",
    );
}
