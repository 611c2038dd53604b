//! Tenants and retention on a cluster: the single-node contract (scoping,
//! quotas, 410 after retention) kept by real `vulcan serve` nodes over one
//! real `nats-server -js`, each request sent to a node chosen at random.

use std::path::Path;

use reqwest::Method;
use serde_json::json;

use crate::support::*;
use crate::tenants::{As, add_tenant, keeps_tenants_apart};

/// `n` nodes sharing `nats`, all with the tenants file `tenants`: their
/// data directories and servers.
fn nodes(nats: &Nats, tenants: &Path, n: usize, extra: &[&str]) -> (Vec<Env>, Vec<Server>) {
    let mut args = vec!["--tenants", tenants.to_str().unwrap()];
    args.extend_from_slice(extra);
    cluster_nodes(nats, n, &args)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_three_nodes_every_endpoint_keeps_tenants_apart() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &[]);
    let bob = add_tenant(&env, &file, "bob", &[]);
    let root = add_tenant(&env, &file, "root", &["--admin"]);
    let (_envs, servers) = nodes(&nats, &file, 3, &[]);
    keeps_tenants_apart(&servers, [&alice, &bob, &root]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_max_concurrent_holds_cluster_wide_under_a_burst_from_every_node() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &["--max-concurrent", "2"]);
    // Each node could run 4 of them: only the tenant's quota holds them back.
    let (_envs, servers) = nodes(&nats, &file, 3, &["--max-concurrent", "4"]);
    let alice = As {
        servers: &servers,
        token: Some(&alice),
    };
    let (_, module) = alice
        .upload(std::fs::read(example("ticker")).unwrap())
        .await;
    let ticker = module["hash"].as_str().unwrap().to_owned();
    // 30 submissions at once, each to a random node, each retried after a
    // 429 as a client would: all are accepted in the end.
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let submit = || async {
        loop {
            let spec = json!({"module": ticker, "args": ["20", "5000"]});
            let (status, body) = alice
                .call(Method::POST, "/v1/workloads/async", Some(spec))
                .await;
            match status {
                202 => return body["id"].as_str().unwrap().to_owned(),
                429 => {
                    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // A client's pause before it retries (Retry-After says 1 s).
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => panic!("{other}: {body}"),
            }
        }
    };
    let ids = futures_util::future::join_all((0..30).map(|_| submit())).await;
    assert!(refused.into_inner() > 0, "the burst met the quota");
    let mut spans = Vec::new();
    let mut nodes_used = std::collections::HashSet::new();
    for id in &ids {
        let record = eventually("every submission ran to its end", || async {
            let (status, r) = alice.get(&format!("/v1/workloads/{id}")).await;
            (status == 200 && r["status"] == "completed").then_some(r)
        })
        .await;
        nodes_used.insert(record["node"].as_str().unwrap().to_owned());
        spans.push((ms_of(&record, "started_at"), ms_of(&record, "finished_at")));
    }
    // The most that ran at once: at each start, how many had started and
    // not yet finished.
    let most = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most <= 2,
        "{most} of the tenant's workloads ran at once on {nodes_used:?}: {spans:?}"
    );
    let (_, me) = alice.get("/v1/whoami").await;
    assert_eq!(me["running"], 0, "every place was given back: {me}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_nodes_quota_places_are_given_back_to_its_tenant() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &["--max-concurrent", "1"]);
    let root = add_tenant(&env, &file, "root", &["--admin"]);
    // The survivor's one slot is held by the admin's spinner, so alice's
    // workload can only run on the victim.
    let (_survivor_env, survivor) = nodes(&nats, &file, 1, &["--max-concurrent", "1"]);
    let root_as = As {
        servers: &survivor,
        token: Some(&root),
    };
    let spin = b64(&std::fs::read(example("spin")).unwrap());
    let (status, held) = root_as
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module_base64": spin})),
        )
        .await;
    assert_eq!(status, 202, "{held}");
    let held = held["id"].as_str().unwrap().to_owned();
    eventually("the admin's spinner holds the survivor's slot", || async {
        let (_, r) = root_as.get(&format!("/v1/workloads/{held}")).await;
        (r["status"] == "running").then_some(())
    })
    .await;
    let victim_env = Env::new();
    let args = [
        "--cluster",
        &nats.url(),
        "--node-id",
        "victim",
        "--tenants",
        file.to_str().unwrap(),
    ];
    let victim = Server::start(&victim_env, &args);
    let alice_as = As {
        servers: &survivor,
        token: Some(&alice),
    };
    let (status, body) = alice_as
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module_base64": spin})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let running = eventually("alice's spinner runs on the victim", || async {
        let (_, r) = alice_as.get(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "running").then_some(r)
    })
    .await;
    assert_eq!(running["node"], "victim");
    let (status, body) = alice_as
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module_base64": spin})),
        )
        .await;
    assert_eq!(status, 429, "her one place is held: {body}");

    victim.crash();
    let lost = eventually("the lost node's workload is failed", || async {
        let (_, r) = alice_as.get(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "failed").then_some(r)
    })
    .await;
    assert_eq!(lost["failure"], "node_lost", "{lost}");
    // Its place came back with it: alice may submit again (queued behind
    // the admin's spinner, but accepted).
    let again = eventually("alice's place is given back", || async {
        let (status, body) = alice_as
            .call(
                Method::POST,
                "/v1/workloads/async",
                Some(json!({"module_base64": spin})),
            )
            .await;
        (status == 202).then_some(body)
    })
    .await;
    assert_eq!(again["status"], "pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_on_a_cluster_purges_the_stream_and_every_node_answers_410() {
    let Some(nats) = Nats::start() else { return };
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &[]);
    let keep = add_tenant(&env, &file, "keep", &[]);
    // `keep` overrides the cluster's retention with a day of its own.
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replacen(
        "name = \"keep\"",
        "name = \"keep\"\nretain_for_ms = 86400000",
        1,
    );
    std::fs::write(&file, text).unwrap();
    let (_envs, servers) = nodes(&nats, &file, 3, &["--retain-for", "1s"]);
    let (alice, keep) = (
        As {
            servers: &servers,
            token: Some(&alice),
        },
        As {
            servers: &servers,
            token: Some(&keep),
        },
    );
    let flood = b64(&std::fs::read(example("log-flood")).unwrap());
    let run = async |who: &As<'_>, lines: &str| {
        let spec = json!({"module_base64": flood, "args": [lines]});
        let (status, record) = who.call(Method::POST, "/v1/workloads", Some(spec)).await;
        assert_eq!(status, 200, "{record}");
        record["id"].as_str().unwrap().to_owned()
    };
    let old = run(&alice, "20000").await;
    let kept = run(&keep, "2000").await;
    let stream = nats.logs_stream().await;
    let stored = async |id: &str| {
        stream
            .direct_get_last_for_subject(format!("vulcan.logs.{id}"))
            .await
            .is_ok()
    };
    assert!(stored(&kept).await, "the kept lines are in the stream");
    for server in &servers {
        let on = As {
            servers: std::slice::from_ref(server),
            token: alice.token,
        };
        let gone = eventually(
            "the old workload's lines are gone on every node",
            || async {
                let (status, body) = on.get(&format!("/v1/workloads/{old}/logs/history")).await;
                (status == 410).then_some(body)
            },
        )
        .await;
        assert_eq!(gone["error"]["code"], "gone", "{gone}");
        assert_eq!(
            on.follow_status(&format!("/v1/workloads/{old}/logs")).await,
            410
        );
        let (status, record) = on.get(&format!("/v1/workloads/{old}")).await;
        assert_eq!(status, 200, "the record stays: {record}");
        assert!(record["pruned_at"].is_string(), "{record}");
        assert_eq!(record["line_count"], 20_000, "{record}");
    }
    assert!(!stored(&old).await, "the stream holds none of its lines");
    assert!(stored(&kept).await, "the other tenant's are kept");
    // The tenant with its own day of retention keeps every line.
    let (status, page) = keep
        .get(&format!("/v1/workloads/{kept}/logs/history?limit=10000"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["lines"].as_array().unwrap().len(), 2_000);
}
