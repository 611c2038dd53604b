//! The job queue on a real `vulcan serve`: work beyond capacity is accepted
//! and queued, never more running than the node's slots, fair share
//! between tenants, the queue kept across a restart, idempotent submits;
//! and on a 3-node cluster, idempotent submits across nodes and the queue
//! as `GET /v1/queue` shows it.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;
use crate::tenants::{As, add_tenant};

/// The most of `records` that ran at once: ends sort before starts at the
/// same millisecond (an end frees the slot a start at that time took).
fn most_at_once(records: &[Value]) -> i64 {
    let mut events: Vec<(i64, i64)> = Vec::new();
    for r in records {
        events.push((ms_of(r, "started_at"), 1));
        events.push((ms_of(r, "finished_at"), -1));
    }
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    most
}

/// Every workload the server lists (as `caller` sees them), all pages.
async fn all_workloads(caller: &As<'_>) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let path = format!("/v1/workloads?limit=500&offset={}", all.len());
        let (status, page) = caller.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            // Pages shift as new workloads arrive: each is kept once.
            let mut seen = std::collections::HashSet::new();
            all.retain(|w: &Value| seen.insert(w["id"].as_str().unwrap().to_owned()));
            return all;
        }
        all.extend(items);
    }
}

/// Submits `spec` `n` times, `at_once` at a time: the ids, in order.
async fn submit_many(caller: &As<'_>, spec: &Value, n: usize, at_once: usize) -> Vec<String> {
    use futures_util::StreamExt as _;
    futures_util::stream::iter(0..n)
        .map(|_| async {
            let (status, body) = caller
                .call(Method::POST, "/v1/workloads/async", Some(spec.clone()))
                .await;
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_owned()
        })
        .buffered(at_once)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_submissions_at_four_slots_are_all_accepted_and_run_four_at_a_time() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "4"]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    let (_, module) = server
        .upload(std::fs::read(example("ticker")).unwrap())
        .await;
    let spec = json!({"module": module["hash"], "args": ["2", "1000"]});
    let ids = submit_many(&anyone, &spec, 500, 64).await;
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        500
    );
    let records = eventually("all 500 ran to their end", || async {
        let all = all_workloads(&anyone).await;
        let done = all.iter().filter(|r| r["status"] == "completed").count();
        (done == 500).then_some(all)
    })
    .await;
    let most = most_at_once(&records);
    assert!(most <= 4, "{most} ran at once with 4 slots");
    let queued = records
        .iter()
        .filter(|r| r["queued_at"].is_string())
        .count();
    assert!(queued > 0, "a burst of 500 at 4 slots queued some");
    for r in &records {
        assert_eq!(r["line_count"], 2, "{r}");
    }
    let metrics = server.metrics().await;
    assert!(metrics.contains("vulcan_workloads_queued 0"), "{metrics}");
    assert!(
        metrics.contains("vulcan_queue_wait_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_tenants_one_job_starts_within_four_turns_of_a_noisy_tenants_two_thousand() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let noisy = add_tenant(&env, &file, "noisy", &[]);
    let quiet = add_tenant(&env, &file, "quiet", &[]);
    let server = Server::start(
        &env,
        &["--max-concurrent", "4", "--tenants", file.to_str().unwrap()],
    );
    let servers = std::slice::from_ref(&server);
    let (noisy, quiet) = (
        As {
            servers,
            token: Some(&noisy),
        },
        As {
            servers,
            token: Some(&quiet),
        },
    );
    let ticker = std::fs::read(example("ticker")).unwrap();
    let (_, module) = noisy.upload(ticker.clone()).await;
    // Each takes a few tens of milliseconds: the backlog lasts.
    let spec = json!({"module": module["hash"], "args": ["5", "5000"]});
    submit_many(&noisy, &spec, 2000, 64).await;
    let (_, queue) = noisy.get("/v1/queue").await;
    assert!(queue["queued"].as_u64().unwrap() > 1000, "{queue}");

    let (_, module) = quiet.upload(ticker).await;
    let (status, answer) = quiet
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module": module["hash"], "args": ["1", "0"]})),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let record = eventually("the quiet tenant's job ran", || async {
        let (_, r) = quiet.get(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "completed").then_some(r)
    })
    .await;
    let (queued_at, started_at) = (ms_of(&record, "queued_at"), ms_of(&record, "started_at"));
    // Noisy jobs that got a slot while the quiet one waited.
    let went_first = all_workloads(&noisy)
        .await
        .iter()
        .filter(|r| r["started_at"].is_string())
        .filter(|r| {
            let s = ms_of(r, "started_at");
            queued_at < s && s < started_at
        })
        .count();
    assert!(
        went_first <= 4,
        "{went_first} of the noisy tenant's jobs started while the quiet one waited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_a_hundred_queued_loses_none_and_runs_none_twice() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "1"]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    // One spinner holds the only slot: everything after it waits.
    let spinner = server.start_wasm("spin", "").await;
    let (_, module) = server
        .upload(std::fs::read(example("stdin-echo")).unwrap())
        .await;
    // Its stdin waits with it in the store and is read back at its start.
    let spec = json!({"module": module["hash"], "stdin": "a\nb\n"});
    let ids = submit_many(&anyone, &spec, 100, 16).await;
    let (_, queue) = server.get_json("/v1/queue").await;
    assert_eq!(queue["queued"], 100, "{queue}");
    assert!(server.stop().success());

    // The spinner was killed by the shutdown; the queue was kept.
    let rows = env.workloads();
    let pending = rows.iter().filter(|r| r.status == "pending").count();
    assert_eq!(pending, 100);

    let server = Server::start(&env, &["--max-concurrent", "1"]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    eventually("the queued hundred ran after the restart", || async {
        let all = all_workloads(&anyone).await;
        let done = all.iter().filter(|r| r["status"] == "completed").count();
        (done == 100).then_some(())
    })
    .await;
    let (_, spun) = server.get_json(&format!("/v1/workloads/{spinner}")).await;
    assert_eq!(spun["status"], "killed", "{spun}");
    for id in &ids {
        let lines = env.lines(id);
        let seen: Vec<(i64, &str)> = lines.iter().map(|l| (l.0, l.2.as_str())).collect();
        assert_eq!(
            seen,
            vec![(0, "a"), (1, "b"), (2, "echoed 4 bytes")],
            "workload {id} ran exactly once, with its stdin"
        );
    }
    let records = all_workloads(&anyone).await;
    assert!(most_at_once(&records) <= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_submit_repeated_twenty_times_at_once_creates_one_workload() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "2"]);
    let hello = b64(&std::fs::read(example("hello")).unwrap());
    let spec = json!({"module_base64": hello, "args": ["x"]});
    let submit = |key: &'static str, spec: Value| {
        let server = &server;
        async move {
            let resp = server
                .req(Method::POST, "/v1/workloads/async")
                .header("Idempotency-Key", key)
                .json(&spec)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let answers =
        futures_util::future::join_all((0..20).map(|_| submit("batch-7", spec.clone()))).await;
    let ids: HashMap<String, usize> = answers.iter().fold(HashMap::new(), |mut m, (s, b)| {
        assert_eq!(*s, 202, "{b}");
        *m.entry(b["id"].as_str().unwrap().to_owned()).or_default() += 1;
        m
    });
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(env.workloads().len(), 1);

    // The same key with another spec is a conflict, and creates nothing.
    let other = json!({"module_base64": hello, "args": ["y"]});
    let (status, body) = submit("batch-7", other).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_conflict");
    assert_eq!(env.workloads().len(), 1);

    // A sync repeat answers the first run's final record.
    let first = ids.keys().next().unwrap();
    let resp = server
        .req(Method::POST, "/v1/workloads")
        .json(&json!({"module_base64": hello, "args": ["x"], "idempotency_key": "batch-7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["id"].as_str(), Some(first.as_str()));
    assert_eq!(record["status"], "completed");
    assert_eq!(env.workloads().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn vulcan_queue_shows_the_depth_per_tenant() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "1"]);
    let spinner = server.start_wasm("spin", "").await;
    for _ in 0..3 {
        server.start_wasm("hello", "").await;
    }
    let out = server.cli(&Env::new(), &["queue"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("3 queued (at most 100000)\n"), "{text}");
    assert!(
        text.contains("TENANT") && text.contains("OLDEST WAIT"),
        "{text}"
    );
    let row: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["-", "3", "1"], "{text}");
    let out = server.cli(&Env::new(), &["queue", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["tenants"][0]["queued"], 3, "{json}");
    assert_eq!(json["tenants"][0]["running"], 1, "{json}");
    let (status, _) = server.kill(&spinner).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_three_nodes_an_idempotent_submit_creates_one_workload_and_the_queue_is_shown() {
    let Some(nats) = Nats::start() else { return };
    let (_envs, servers) = cluster_nodes(&nats, 3, &["--max-concurrent", "1"]);
    let anyone = As {
        servers: &servers,
        token: None,
    };
    let (_, module) = anyone.upload(std::fs::read(example("spin")).unwrap()).await;
    let spin = json!({"module": module["hash"], "idempotency_key": "nightly-1"});
    // Twenty at once, each to a random node.
    let answers = futures_util::future::join_all(
        (0..20).map(|_| anyone.call(Method::POST, "/v1/workloads/async", Some(spin.clone()))),
    )
    .await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, 202, "{b}");
            b["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (_, listed) = anyone.get("/v1/workloads").await;
    assert_eq!(listed["total"], 1, "{listed}");
    let other = json!({"module": module["hash"], "idempotency_key": "nightly-1", "args": ["x"]});
    let (status, body) = anyone
        .call(Method::POST, "/v1/workloads/async", Some(other))
        .await;
    assert_eq!(status, 409, "{body}");

    // Three more spinners fill the other slots; two beyond them wait.
    let mut spinners: Vec<String> = ids.into_iter().collect();
    let plain = json!({"module": module["hash"]});
    spinners.extend(submit_many(&anyone, &plain, 4, 4).await);
    let queue = eventually("two wait in the cluster's queue", || async {
        let (_, queue) = anyone.get("/v1/queue").await;
        (queue["queued"] == 2 && queue["tenants"][0]["running"] == 3).then_some(queue)
    })
    .await;
    assert!(queue["tenants"][0]["oldest_wait_ms"].is_u64(), "{queue}");
    // A run that may not wait long fails `queue_timeout` unstarted.
    let (status, timed_out) = anyone
        .call(
            Method::POST,
            "/v1/workloads",
            Some(json!({"module": module["hash"], "queue_timeout_ms": 1})),
        )
        .await;
    assert_eq!(status, 200, "{timed_out}");
    assert_eq!(timed_out["failure"], "queue_timeout", "{timed_out}");
    // Killed (one taken out of the queue, or stopping as a slot frees).
    for id in &spinners {
        let (status, answer) = anyone
            .call(Method::DELETE, &format!("/v1/workloads/{id}"), None)
            .await;
        assert!(status == 200 || status == 202, "{status}: {answer}");
    }
    for id in &spinners {
        eventually("every spinner ended killed", || async {
            let (_, r) = anyone.get(&format!("/v1/workloads/{id}")).await;
            (r["status"] == "killed").then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_refuses_work_beyond_max_queued_with_queue_full() {
    let Some(nats) = Nats::start() else { return };
    let flags = ["--max-concurrent", "1", "--max-queued", "3"];
    let (_envs, servers) = cluster_nodes(&nats, 1, &flags);
    let anyone = As {
        servers: &servers,
        token: None,
    };
    let (_, module) = anyone.upload(std::fs::read(example("spin")).unwrap()).await;
    let spin = json!({"module": module["hash"]});
    // One runs; the rest wait until the queue, as the node last saw it
    // (every second), holds its maximum.
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let refused = eventually("a submission is refused queue_full", || async {
        let (status, body) = anyone
            .call(Method::POST, "/v1/workloads/async", Some(spin.clone()))
            .await;
        match status {
            202 => {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            }
            _ => Some((status, body)),
        }
    })
    .await;
    let accepted = accepted.into_inner();
    let (status, body) = refused;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert_error(&body, "(--max-queued)");
    assert!(
        accepted >= 4,
        "one running and three queued came first: {accepted}"
    );
    eventually(
        "the queue shows every accepted one but the running one",
        || async {
            let (_, queue) = anyone.get("/v1/queue").await;
            (queue["queued"].as_u64() == Some(accepted - 1)).then_some(())
        },
    )
    .await;
    for id in all_workloads(&anyone).await {
        let id = id["id"].as_str().unwrap().to_owned();
        anyone
            .call(Method::DELETE, &format!("/v1/workloads/{id}"), None)
            .await;
    }
}

/// The workloads (as `caller` sees them) that schedule `name` made.
async fn fired_by(caller: &As<'_>, name: &str) -> Vec<Value> {
    let all = all_workloads(caller).await;
    all.into_iter().filter(|w| w["schedule"] == name).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_fires_each_tick_once_skips_while_one_runs_and_is_managed_by_the_cli() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    let (_, module) = server
        .upload(std::fs::read(example("ticker")).unwrap())
        .await;
    let hash = module["hash"].as_str().unwrap().to_owned();
    let (status, made) = anyone
        .call(
            Method::POST,
            "/v1/schedules",
            Some(json!({"name": "every-2s", "cron": "*/2 * * * * *",
                        "spec": {"module": hash, "args": ["1", "0"]}})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["overlap"], "skip");
    assert!(made["next_fire_at"].is_string(), "{made}");
    let fired = eventually("three ticks fired", || async {
        let fired = fired_by(&anyone, "every-2s").await;
        (fired.len() >= 3).then_some(fired)
    })
    .await;
    // One workload per tick: each made at or just after an even second.
    let mut ticks: Vec<i64> = fired
        .iter()
        .map(|w| ms_of(w, "created_at") / 2000)
        .collect();
    ticks.sort_unstable();
    ticks.dedup();
    assert_eq!(ticks.len(), fired.len(), "a tick fired twice: {fired:?}");
    let (_, shown) = anyone.get("/v1/schedules/every-2s").await;
    assert!(shown["last_fired_at"].is_string(), "{shown}");
    assert!(!shown["last_workloads"].as_array().unwrap().is_empty());
    let (status, _) = anyone
        .call(Method::DELETE, "/v1/schedules/every-2s", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = anyone.get("/v1/schedules/every-2s").await;
    assert_eq!(status, 404);

    // A spinner every second, overlap skip: one runs, the next ticks skip.
    let (_, module) = server.upload(std::fs::read(example("spin")).unwrap()).await;
    let (status, made) = anyone
        .call(
            Method::POST,
            "/v1/schedules",
            Some(json!({"name": "spinner", "cron": "* * * * * *",
                        "spec": {"module": module["hash"]}})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let shown = eventually("two ticks skipped", || async {
        let (_, s) = anyone.get("/v1/schedules/spinner").await;
        (s["skipped"].as_u64() >= Some(2)).then_some(s)
    })
    .await;
    let fired = fired_by(&anyone, "spinner").await;
    assert_eq!(fired.len(), 1, "skip runs one at a time: {shown}");

    // The CLI: pause, list, resume, remove.
    let cli = Env::new();
    let out = server.cli(&cli, &["schedule", "pause", "spinner"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("spinner  paused  \"* * * * * *\""),
        "{}",
        stdout(&out)
    );
    let out = server.cli(&cli, &["schedule", "ls"]);
    assert!(stdout(&out).contains("spinner  paused"), "{}", stdout(&out));
    let out = server.cli(&cli, &["schedule", "resume", "spinner"]);
    assert!(stdout(&out).contains("spinner  active"), "{}", stdout(&out));
    let out = server.cli(&cli, &["schedule", "rm", "spinner"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, _) = server.kill(fired[0]["id"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let out = server.cli(
        &cli,
        &[
            "schedule",
            "add",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--timezone",
            "Europe/Berlin",
            &example_str("hello"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("nightly  active  \"0 3 * * *\" (Europe/Berlin)"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn bad_schedules_get_400_with_what_is_wrong_and_change_nothing() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    let (_, module) = server
        .upload(std::fs::read(example("hello")).unwrap())
        .await;
    let hash = module["hash"].clone();
    let cases = [
        (
            json!({"name": "a", "cron": "61 * * * *", "spec": {"module": hash}}),
            400,
            "not a cron expression",
        ),
        (
            json!({"name": "a", "cron": "* * * * *", "timezone": "Mars/Olympus", "spec": {"module": hash}}),
            400,
            "IANA time zone",
        ),
        (
            json!({"name": "has space", "cron": "* * * * *", "spec": {"module": hash}}),
            400,
            "name",
        ),
        (
            json!({"name": "a", "cron": "* * * * *", "overlap": "sometimes", "spec": {"module": hash}}),
            400,
            "malformed JSON",
        ),
        (
            json!({"name": "a", "cron": "* * * * *", "spec": {"module_base64": b64(b"\0asm")}}),
            400,
            "stored module",
        ),
        (
            json!({"name": "a", "cron": "* * * * *", "spec": {"module": hash, "limits": {"timeout_ms": 0}}}),
            400,
            "timeout_ms",
        ),
    ];
    for (body, want, says) in cases {
        let (status, answer) = anyone
            .call(Method::POST, "/v1/schedules", Some(body.clone()))
            .await;
        assert_eq!(status, want, "{body}: {answer}");
        assert_error(&answer, says);
    }
    let (_, list) = anyone.get("/v1/schedules").await;
    assert_eq!(list["items"], json!([]), "nothing was made");
    let ok = json!({"name": "a", "cron": "0 0 1 1 *", "spec": {"module": hash}});
    let (status, _) = anyone
        .call(Method::POST, "/v1/schedules", Some(ok.clone()))
        .await;
    assert_eq!(status, 201);
    let (status, answer) = anyone.call(Method::POST, "/v1/schedules", Some(ok)).await;
    assert_eq!(status, 409, "{answer}");
    let (status, _) = anyone
        .call(Method::POST, "/v1/schedules/nope/pause", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_three_nodes_a_schedule_fires_once_per_tick_with_one_node_killed() {
    let Some(nats) = Nats::start() else { return };
    let (_envs, mut servers) = cluster_nodes(&nats, 3, &[]);
    let (_, module) = servers[0]
        .upload(std::fs::read(example("ticker")).unwrap())
        .await;
    let spec = json!({"name": "pulse", "cron": "*/2 * * * * *",
                      "spec": {"module": module["hash"], "args": ["1", "0"]}});
    let (status, made) = servers[1].post("/v1/schedules", Body::Json(spec)).await;
    assert_eq!(status, 201, "{made}");
    let firings = |servers: &[Server]| {
        let servers: Vec<(String, reqwest::Client)> = servers
            .iter()
            .map(|s| (s.url.clone(), s.http.clone()))
            .collect();
        async move {
            let (url, http) = &servers[0];
            let page: Value = http
                .get(format!("{url}/v1/workloads?limit=500"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let items = page["items"].as_array().unwrap().clone();
            items
                .into_iter()
                .filter(|w| w["schedule"] == "pulse")
                .collect::<Vec<_>>()
        }
    };
    eventually("two ticks fired on three nodes", || async {
        (firings(&servers).await.len() >= 2).then_some(())
    })
    .await;
    servers.remove(2).crash();
    let before = firings(&servers).await.len();
    let fired = eventually("two more ticks fired on the two left", || async {
        let fired = firings(&servers).await;
        (fired.len() >= before + 2).then_some(fired)
    })
    .await;
    let mut ticks: Vec<i64> = fired
        .iter()
        .map(|w| ms_of(w, "created_at") / 2000)
        .collect();
    ticks.sort_unstable();
    ticks.dedup();
    assert_eq!(ticks.len(), fired.len(), "a tick fired twice: {fired:?}");
}
