//! Cluster mode: real `vulcan serve` nodes sharing one real `nats-server -js`.

use std::collections::HashMap;

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::*;

/// A cluster node: its server and data directory.
struct Member {
    server: Server,
    env: Env,
    flags: Vec<String>,
}

fn member(nats: &Nats, id: &str, extra: &[&str]) -> Member {
    let env = Env::new();
    let mut flags: Vec<String> = ["--cluster", &nats.url(), "--node-id", id]
        .map(String::from)
        .to_vec();
    flags.extend(extra.iter().map(|f| f.to_string()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    Member {
        server: Server::start(&env, &args),
        env,
        flags,
    }
}

impl Member {
    /// `kill -9`, then the same node again on its data directory.
    fn crash_and_restart(&mut self) {
        self.server.child.kill().unwrap();
        self.server.child.wait().unwrap();
        let args: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.server = Server::start(&self.env, &args);
    }
}

/// Starts `n` workloads that spin forever through `server` and waits until
/// they run: `n` slots of the cluster held.
async fn hold_slots(server: &Server, n: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let spin = upload(
        server,
        std::fs::read(fixture(dir.path(), "started-then-spin")).unwrap(),
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(server.start_json(&json!({"module": spin})).await);
    }
    for id in &ids {
        until(server, id, "it holds a slot", |r| r["status"] == "running").await;
    }
    ids
}

/// A survivor node with its one slot held, and a victim node running a
/// ticker (a line every 2 ms) that a follower on the survivor has seen 50
/// lines of: (survivor, victim, ticker id, that follower).
async fn ticker_on_victim(nats: &Nats) -> (Member, Member, String, SseClient) {
    let survivor = member(nats, "survivor", &["--max-concurrent", "1"]);
    // Held before the victim joins, so the ticker can only run on the victim.
    hold_slots(&survivor.server, 1).await;
    let victim = member(nats, "victim", &[]);
    let ticker = upload(&victim.server, std::fs::read(example("ticker")).unwrap()).await;
    let id = survivor
        .server
        .start_json(&json!({"module": ticker, "args": ["1000000", "2000"]}))
        .await;
    let mut sse = survivor.server.sse(&id, None).await;
    for _ in 0..50 {
        assert_eq!(sse.next().await.unwrap().event, "stdout");
    }
    assert_eq!(record(&survivor.server, &id).await["node"], "victim");
    (survivor, victim, id, sse)
}

/// Asserts that a failed-over record's lines are all readable, each once.
async fn lines_up_to_the_loss(server: &Server, failed: &Value) {
    let count = failed["line_count"].as_u64().unwrap();
    assert!(count >= 50, "{failed}");
    let id = failed["id"].as_str().unwrap();
    assert_eq!(
        seqs(&server.history(id).await),
        (0..count).collect::<Vec<_>>()
    );
}

async fn upload(server: &Server, bytes: Vec<u8>) -> String {
    let (status, info) = server.upload(bytes).await;
    assert!(status == 201 || status == 200, "{status} {info}");
    info["hash"].as_str().unwrap().to_owned()
}

async fn record(server: &Server, id: &str) -> Value {
    let (status, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(status, 200, "{record}");
    record
}

/// The record once `done` holds of it (an answer other than 200, e.g. while
/// NATS is away, counts as not yet).
async fn until(server: &Server, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually(what, || async {
        let (status, r) = server.get_json(&format!("/v1/workloads/{id}")).await;
        (status == 200 && done(&r)).then_some(r)
    })
    .await
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_modules_runs_lists_and_slots() {
    let Some(nats) = Nats::start() else { return };
    let nodes: Vec<Member> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| {
            member(
                &nats,
                id,
                &["--max-concurrent", "2", "--max-spec-size", "4MiB"],
            )
        })
        .collect();
    let [n1, n2, n3] = [&nodes[0].server, &nodes[1].server, &nodes[2].server];

    // Uploaded once, on n1; runnable through every node.
    let hello = upload(n1, std::fs::read(example("hello")).unwrap()).await;
    let mut ran = Vec::new();
    for server in [n1, n2, n3, n3, n2, n1] {
        let spec = json!({"module": hello, "args": ["ada"]});
        let (status, r) = server.post("/v1/workloads", Body::Json(spec)).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["line_count"], 1);
        assert_eq!(r["attempt"], 1);
        assert!(r["node"].as_str().unwrap().starts_with('n'), "{r}");
        ran.push(r["id"].as_str().unwrap().to_owned());
    }
    // n3 never saw the upload, yet knows the module.
    let (status, module) = n3.get_json(&format!("/v1/modules/{hello}")).await;
    assert_eq!(status, 200, "{module}");
    // Every node lists the cluster's modules, with their kind and size.
    let (status, list) = n2.get_json("/v1/modules").await;
    assert_eq!(status, 200, "{list}");
    let listed = list["items"].as_array().unwrap();
    let entry = listed.iter().find(|m| m["hash"] == hello.as_str());
    let entry = entry.unwrap_or_else(|| panic!("{hello} not in {list}"));
    assert_eq!(entry["kind"], "module", "{entry}");
    assert_eq!(
        entry["size"],
        std::fs::read(example("hello")).unwrap().len()
    );
    // Any node reads any workload's record and lines.
    let first = &ran[0];
    assert_eq!(record(n3, first).await["status"], "completed");
    let lines = n2.history(first).await;
    assert_eq!(seqs(&lines), vec![0]);

    // Six spinning workloads fill every slot of the cluster: two on each node.
    let spinning = hold_slots(n1, 6).await;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for id in &spinning {
        let r = record(n2, id).await;
        *per_node
            .entry(r["node"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_node,
        HashMap::from([("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)]),
        "every node runs exactly its --max-concurrent"
    );
    // A seventh waits for a slot, and takes the first one freed.
    let spin = record(n1, &spinning[0]).await["module"]
        .as_str()
        .unwrap()
        .to_owned();
    let seventh = n3.start_json(&json!({"module": spin})).await;
    assert_eq!(record(n3, &seventh).await["status"], "pending");
    let (status, killed) = n3.kill(&spinning[0]).await;
    assert_eq!(status, 200, "{killed}");
    assert_eq!(killed["status"], "killed");
    let r = until(n1, &seventh, "the seventh runs", |r| {
        r["status"] == "running"
    })
    .await;
    assert_eq!(r["attempt"], 1);

    // A sync run that finds every slot taken waits in the queue and runs on
    // whichever node frees one; its caller gets the final record, which the
    // node that ran it also announces on `vulcan.ended.<id>`.
    let mut ends = nats
        .client()
        .await
        .subscribe("vulcan.ended.>")
        .await
        .unwrap();
    let sync = json!({"module": hello, "args": ["queued"]});
    let ((status, queued), _) = tokio::join!(n2.post("/v1/workloads", Body::Json(sync)), async {
        eventually("the sync run is queued", || async {
            let (_, page) = n1.get_json("/v1/workloads?status=pending").await;
            (page["total"] == 1).then_some(())
        })
        .await;
        let (status, killed) = n1.kill(&spinning[1]).await;
        assert_eq!(status, 200, "{killed}");
    });
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["status"], "completed", "{queued}");
    assert_eq!(queued["line_count"], 1, "{queued}");
    let announced = format!("vulcan.ended.{}", queued["id"].as_str().unwrap());
    let end = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let end = ends.next().await.expect("the subscription ended");
            if end.subject.as_str() == announced {
                return end;
            }
        }
    })
    .await
    .expect("the end of the queued sync run was announced");
    let end: Value = serde_json::from_slice(&end.payload).unwrap();
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["node"], queued["node"], "{end}");

    // Kill from any node, whichever runs it: a tight loop ends at once.
    for (id, server) in spinning[2..]
        .iter()
        .chain([&seventh])
        .zip([n1, n2, n3].iter().cycle())
    {
        let (status, r) = server.kill(id).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["status"], "killed", "{r}");
        assert_eq!(r["error"], "killed on request");
    }
    let (status, again) = n2.kill(&seventh).await;
    assert_eq!(status, 409, "{again}");

    // The list of every node shows every workload of the cluster, newest
    // first: each stored before the list was asked for, wherever it ran.
    let total = ran.len() + spinning.len() + 2;
    let (status, page) = n3.get_json("/v1/workloads?limit=500").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], total, "{page}");
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, newest_first);
    let (_, killed) = n1.get_json("/v1/workloads?status=killed&limit=2").await;
    assert_eq!(killed["total"], 7, "{killed}");
    assert_eq!(killed["items"].as_array().unwrap().len(), 2);
    let (status, unknown) = n2
        .get_json("/v1/workloads/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!(status, 404, "{unknown}");

    // Bad submissions are refused and create nothing.
    let missing = json!({"module": format!("sha256:{}", "0".repeat(64))});
    for path in ["/v1/workloads", "/v1/workloads/async"] {
        let (status, answer) = n2.post(path, Body::Json(missing.clone())).await;
        assert_eq!(status, 404, "{answer}");
        assert_error(&answer, "not found");
    }
    let huge = json!({"module": hello, "stdin": "x".repeat(1_500_000)});
    let (status, answer) = n3.post("/v1/workloads", Body::Json(huge)).await;
    assert_eq!(status, 413, "{answer}");
    assert_error(&answer, "NATS max_payload");
    let (_, page) = n1.get_json("/v1/workloads?limit=1").await;
    assert_eq!(page["total"], total, "nothing was created: {page}");
}

/// A sync run enters the cluster's records only once it has run a while
/// (short ones are written once, final); from then on it is listed and
/// killable from any node, and its caller gets the final record.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_sync_run_is_listed_and_killable_from_another_node() {
    let Some(nats) = Nats::start() else { return };
    let (n1, n2) = (member(&nats, "n1", &[]), member(&nats, "n2", &[]));
    let (n1, n2) = (&n1.server, &n2.server);
    let dir = tempfile::tempdir().unwrap();
    let spin = upload(
        n1,
        std::fs::read(fixture(dir.path(), "started-then-spin")).unwrap(),
    )
    .await;
    let run = n1.post("/v1/workloads", Body::Json(json!({"module": spin})));
    let kill = async {
        let listed = eventually("n2 lists the sync run as running", || async {
            let (_, page) = n2.get_json("/v1/workloads?status=running").await;
            page["items"]
                .as_array()
                .and_then(|items| items.first().cloned())
        })
        .await;
        assert_eq!(listed["node"], "n1", "{listed}");
        let id = listed["id"].as_str().unwrap().to_owned();
        let (status, killed) = n2.kill(&id).await;
        assert_eq!(status, 200, "{killed}");
        killed
    };
    let ((status, ran), killed) = tokio::join!(run, kill);
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["id"], killed["id"], "{ran}");
    assert_eq!(ran["status"], "killed", "{ran}");
    assert_eq!(ran["error"], "killed on request", "{ran}");
    assert_eq!(ran["attempt"], 1, "{ran}");
    let id = ran["id"].as_str().unwrap();
    assert_eq!(record(n2, id).await, ran);
    let count = ran["line_count"].as_u64().unwrap();
    assert!(count >= 1, "it said it started: {ran}");
    assert_eq!(seqs(&n2.history(id).await), (0..count).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_on_another_node_gets_every_line_once_and_resumes() {
    let Some(nats) = Nats::start() else { return };
    let reader = member(&nats, "reader", &["--max-concurrent", "1"]);
    let other = member(&nats, "other", &["--max-concurrent", "1"]);
    // Only `runner` (joining later) has a free slot while these two hold theirs.
    let holders = hold_slots(&reader.server, 2).await;

    let runner = member(&nats, "runner", &[]);
    let flood = upload(&runner.server, std::fs::read(example("log-flood")).unwrap()).await;
    let n = 30_000u64;
    let id = other
        .server
        .start_json(&json!({"module": flood, "args": [n.to_string()]}))
        .await;
    // Part of the stream from one node, the rest from another after a drop.
    let mut first = reader.server.sse(&id, None).await;
    let mut seen = Vec::new();
    while seen.len() < 1234 {
        let ev = first.next().await.expect("stream ended early");
        assert_eq!(ev.event, "stdout");
        assert_eq!(ev.data, format!("line {}", seen.len()));
        seen.push(ev.id.unwrap().parse::<u64>().unwrap());
    }
    drop(first);
    let mut rest = other.server.sse(&id, seen.last().copied()).await;
    let (more, lines, end) = rest.until_end().await;
    seen.extend(more);
    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "every seq exactly once");
    assert_eq!(lines.last().unwrap(), &format!("line {}", n - 1));
    assert_eq!(end["status"], "completed", "{end}");
    assert_eq!(end["node"], "runner");
    assert_eq!(end["line_count"], n);
    // History from a node that did not run it, and a follower arriving after the end.
    assert_eq!(
        seqs(&reader.server.history(&id).await),
        (0..n).collect::<Vec<_>>()
    );
    let (late, _, end) = reader.server.sse(&id, Some(n - 3)).await.until_end().await;
    assert_eq!(late, vec![n - 2, n - 1]);
    assert_eq!(end["line_count"], n);
    for holder in &holders {
        reader.server.kill(holder).await;
    }
}

/// A NATS client of the test's own.
/// Whether `id`'s log has any message on its subject of `VULCAN_LOGS`.
async fn on_log_subject(nats: &Nats, id: &str) -> bool {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let logs = nats.logs_stream().await;
    match logs
        .get_last_raw_message_by_subject(&format!("vulcan.logs.{id}"))
        .await
    {
        Ok(_) => true,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => false,
        Err(e) => panic!("reading the log subject of {id}: {e}"),
    }
}

/// The final record of a sync run of `module` with one argument, which completed.
async fn run_sync(server: &Server, module: &str, arg: &str) -> Value {
    let spec = json!({"module": module, "args": [arg]});
    let (status, ran) = server.post("/v1/workloads", Body::Json(spec)).await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["status"], "completed", "{ran}");
    ran
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_sync_run_keeps_its_few_lines_in_its_record() {
    let Some(nats) = Nats::start() else { return };
    let runner = member(&nats, "runner", &[]);
    let reader = member(&nats, "reader", &[]);
    let mix = upload(
        &runner.server,
        std::fs::read(example("stderr-mix")).unwrap(),
    )
    .await;
    let ran = run_sync(&runner.server, &mix, "5").await;
    assert_eq!(ran["line_count"], 5, "{ran}");
    let id = ran["id"].as_str().unwrap();
    assert!(
        !on_log_subject(&nats, id).await,
        "its lines went inside its record, not on the log's subject"
    );
    // The record as the API shows it does not carry them.
    let shown = record(&reader.server, id).await;
    assert_eq!(shown, ran);
    assert!(shown.get("log").is_none(), "{shown}");
    // From another node: history, a page after a line, and SSE, resumed too.
    let lines = reader.server.history(id).await;
    assert_eq!(seqs(&lines), vec![0, 1, 2, 3, 4]);
    assert_eq!(lines[1]["stream"], "stderr", "{lines:?}");
    assert_eq!(lines[4]["line"], "out 4", "{lines:?}");
    let (_, page) = reader
        .server
        .get_json(&format!("/v1/workloads/{id}/logs/history?after=2&limit=1"))
        .await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["lines"][0]["seq"], 3, "{page}");
    let (all, data, end) = reader.server.sse(id, None).await.until_end().await;
    assert_eq!(all, vec![0, 1, 2, 3, 4]);
    assert_eq!(data[0], "out 0");
    assert_eq!(end, ran);
    let (rest, _, _) = reader.server.sse(id, Some(2)).await.until_end().await;
    assert_eq!(rest, vec![3, 4]);

    // No line at all: nothing on the subject, and an empty log.
    let silent = run_sync(&runner.server, &mix, "0").await;
    let silent = silent["id"].as_str().unwrap();
    assert!(!on_log_subject(&nats, silent).await);
    assert!(reader.server.history(silent).await.is_empty());
    let (none, _, end) = reader.server.sse(silent, None).await.until_end().await;
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(end["line_count"], 0, "{end}");

    // What a run returned and how it ended, in the record any node reads:
    // the cluster's record is written from the run's end, not read back
    // from this node's store.
    let component = |name: &str| std::fs::read(vulcan_test_artifacts::component(name)).unwrap();
    let sum = upload(&runner.server, component("sum")).await;
    let spec = json!({"module": sum, "input": {"a": 2, "b": 40}});
    let (status, summed) = runner.server.post("/v1/workloads", Body::Json(spec)).await;
    assert_eq!(status, 200, "{summed}");
    assert_eq!(summed["status"], "completed", "{summed}");
    assert_eq!(summed["output"], json!({"sum": 42}), "{summed}");
    assert!(summed["duration_ms"].is_u64(), "{summed}");
    assert!(summed["finished_at"].is_string(), "{summed}");
    assert_eq!(
        record(&reader.server, summed["id"].as_str().unwrap()).await,
        summed
    );
    let greet = upload(&runner.server, component("greet")).await;
    let spec = json!({"module": greet, "input_base64": "IkJvYiI="});
    let (_, greeted) = runner.server.post("/v1/workloads", Body::Json(spec)).await;
    assert_eq!(greeted["output_text"], "Hello, Bob!", "{greeted}");
    let fails = upload(&runner.server, component("fails")).await;
    let spec = json!({"module": fails, "input": "nope"});
    let (_, failed) = runner.server.post("/v1/workloads", Body::Json(spec)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("invalid digit"),
        "{failed}"
    );
    assert_eq!(
        record(&reader.server, failed["id"].as_str().unwrap()).await,
        failed
    );

    // More than a record carries: on the log's subject, as any other log.
    let flood = upload(&runner.server, std::fs::read(example("log-flood")).unwrap()).await;
    let big = run_sync(&runner.server, &flood, "2000").await;
    let big = big["id"].as_str().unwrap();
    assert!(on_log_subject(&nats, big).await);
    assert_eq!(
        seqs(&reader.server.history(big).await),
        (0..2000).collect::<Vec<_>>()
    );

    // The node that ran them keeps its own copy of each, as a single node
    // would, though nobody waited for it: there once the node has stopped.
    let (ran_id, big) = (ran["id"].as_str().unwrap(), big.to_owned());
    assert!(runner.server.stop().success());
    let own: HashMap<String, WorkloadRow> = runner
        .env
        .workloads()
        .into_iter()
        .map(|w| (w.id.clone(), w))
        .collect();
    assert_eq!(own.len(), 6, "{own:?}");
    for (id, status, lines) in [
        (ran_id, "completed", 5),
        (silent, "completed", 0),
        (
            failed["id"].as_str().unwrap(),
            "failed",
            failed["line_count"].as_i64().unwrap(),
        ),
        (&big, "completed", 2000),
    ] {
        let row = &own[id];
        assert_eq!(
            (row.status.as_str(), row.line_count),
            (status, lines),
            "{row:?}"
        );
        assert_eq!(runner.env.lines(id).len(), lines as usize, "{row:?}");
    }
    assert_eq!(runner.env.lines(ran_id)[4].2, "out 4");
}

/// The consumers reading `VULCAN_LOGS` right now.
async fn log_readers(logs: &async_nats::jetstream::stream::Stream) -> Vec<String> {
    use futures_util::TryStreamExt as _;
    logs.consumer_names().try_collect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_whose_log_reader_is_lost_reopens_it_and_misses_nothing() {
    let Some(nats) = Nats::start() else { return };
    let (survivor, _victim, id, mut sse) = ticker_on_victim(&nats).await;
    let mut seen: Vec<u64> = (0..50).collect();

    // Its consumer deleted under it, as a NATS server that lost it would.
    let logs = nats.logs_stream().await;
    let lost = log_readers(&logs).await;
    assert_eq!(lost.len(), 1, "one follower, one reader: {lost:?}");
    logs.delete_consumer(&lost[0]).await.unwrap();

    // The stream goes on from where it was, on a reader of its own.
    for _ in 0..50 {
        let ev = sse.next().await.expect("the follower was cut");
        assert_eq!(ev.event, "stdout", "{ev:?}");
        seen.push(ev.id.unwrap().parse().unwrap());
    }
    let now = log_readers(&logs).await;
    assert!(
        now.len() == 1 && now != lost,
        "a new reader replaced {lost:?}: {now:?}"
    );
    assert_eq!(survivor.server.kill(&id).await.0, 200);
    let (rest, _, end) = sse.until_end().await;
    seen.extend(rest);
    assert_eq!(end["status"], "killed", "{end}");
    let count = end["line_count"].as_u64().unwrap();
    assert_eq!(
        seen,
        (0..count).collect::<Vec<_>>(),
        "every seq exactly once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_fails_its_workloads_and_the_others_go_on() {
    let Some(nats) = Nats::start() else { return };
    let (survivor, victim, id, mut sse) = ticker_on_victim(&nats).await;

    let lost_at = std::time::Instant::now();
    victim.server.crash();
    let failed = until(&survivor.server, &id, "it is failed", |r| {
        r["status"] != "running"
    })
    .await;
    println!(
        "failover: {:.1} s from kill -9 to the record leaving running",
        lost_at.elapsed().as_secs_f64()
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["failure"], "node_lost", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("node victim was lost"),
        "{failed}"
    );
    // Its lines up to the loss are there, each once, from the survivor.
    lines_up_to_the_loss(&survivor.server, &failed).await;
    // The follower that was watching gets the rest and the end.
    let (_, _, end) = sse.until_end().await;
    assert_eq!(end["status"], "failed");

    // The survivor keeps working.
    let holder = survivor
        .server
        .get_json("/v1/workloads?status=running")
        .await
        .1["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    survivor.server.kill(&holder).await;
    let hello = upload(&survivor.server, std::fs::read(example("hello")).unwrap()).await;
    let (status, r) = survivor
        .server
        .post("/v1/workloads", Body::Json(json!({"module": hello})))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["node"], "survivor");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_that_resumes_cannot_change_what_moved_on() {
    let Some(nats) = Nats::start() else { return };
    let (survivor, victim, id, _sse) = ticker_on_victim(&nats).await;
    signal(&victim.server.child, "STOP");
    let failed = until(&survivor.server, &id, "it is failed over", |r| {
        r["status"] != "running"
    })
    .await;
    assert_eq!(failed["failure"], "node_lost", "{failed}");

    // Resumed, the victim's next batch is refused: its workload stops there,
    // failed for its lines, and the cluster's record and log stay as they were.
    signal(&victim.server.child, "CONT");
    let local = eventually("the victim stops its workload", || async {
        victim
            .env
            .workloads()
            .into_iter()
            .find(|w| w.id == id && w.status != "running")
    })
    .await;
    assert_eq!(local.status, "failed", "{local:?}");
    assert!(
        local
            .error
            .as_deref()
            .unwrap_or("")
            .contains("taken over by the cluster"),
        "{local:?}"
    );
    assert_eq!(record(&survivor.server, &id).await, failed);
    lines_up_to_the_loss(&survivor.server, &failed).await;
    assert_eq!(record(&victim.server, &id).await, failed);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_at_once_fails_what_it_was_running() {
    let Some(nats) = Nats::start() else { return };
    let mut solo = member(&nats, "solo", &[]);
    let ticker = upload(&solo.server, std::fs::read(example("ticker")).unwrap()).await;
    let id = solo
        .server
        .start_json(&json!({"module": ticker, "args": ["1000000", "2000"]}))
        .await;
    let mut sse = solo.server.sse(&id, None).await;
    for _ in 0..50 {
        sse.next().await.unwrap();
    }
    drop(sse);
    // Back well within the 5 s a loss takes to be noticed.
    solo.crash_and_restart();
    let failed = until(&solo.server, &id, "it is failed", |r| {
        r["status"] != "running"
    })
    .await;
    assert_eq!(failed["failure"], "node_lost", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("node solo restarted"),
        "{failed}"
    );
    lines_up_to_the_loss(&solo.server, &failed).await;
    // And it takes new work.
    let (status, r) = solo
        .server
        .post(
            "/v1/workloads",
            Body::Json(json!({"module": ticker, "args": ["2", "0"]})),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_nats_refuses_submissions_and_loses_no_line() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let node = member(&nats, "solo", &[]);
    let server = &node.server;
    let ticker = upload(server, std::fs::read(example("ticker")).unwrap()).await;
    let n = 400u64;
    let id = server
        .start_json(&json!({"module": ticker, "args": [n.to_string(), "5000"]}))
        .await;
    let mut sse = server.sse(&id, None).await;
    for _ in 0..10 {
        sse.next().await.unwrap();
    }
    drop(sse);

    nats.crash();
    let refused = eventually("a submission is refused", || async {
        let (status, answer) = server
            .post("/v1/workloads/async", Body::Json(json!({"module": ticker})))
            .await;
        (status == 503).then_some(answer)
    })
    .await;
    assert_eq!(refused["error"]["code"], "cluster_unavailable", "{refused}");

    nats.restart();
    let r = until(server, &id, "it completes", |r| r["status"] == "completed").await;
    assert_eq!(r["line_count"], n, "{r}");
    assert_eq!(
        seqs(&server.history(&id).await),
        (0..n).collect::<Vec<_>>(),
        "no line lost across the outage"
    );
    // Submissions work again without restarting the node.
    let (status, again) = eventually("submissions are taken again", || async {
        let (status, r) = server
            .post(
                "/v1/workloads",
                Body::Json(json!({"module": ticker, "args": ["3", "0"]})),
            )
            .await;
        (status == 200).then_some((status, r))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "completed", "{again}");
    let metrics = server.metrics().await;
    assert!(metrics.contains("vulcan_cluster_connected 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_cluster_is_a_clear_error_at_start() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = env.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cluster",
        &format!("nats://127.0.0.1:{port}"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("failed to connect to the cluster at nats://127.0.0.1:"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["serve", "--node-id", "x"]);
    assert_eq!(out.status.code(), Some(2), "--node-id needs --cluster");
}
