//! Tenants on a real `vulcan serve`: tokens from a tenants file written by
//! `vulcan tenant add`, isolation on every endpoint, quotas, `whoami`, and
//! the file's bad inputs.

use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// Requests with one tenant's token (or none), each to one of `servers`
/// chosen at random (the nodes of a cluster, or one server).
pub struct As<'a> {
    pub servers: &'a [Server],
    pub token: Option<&'a str>,
}

impl As<'_> {
    /// The server this request goes to.
    fn server(&self) -> &Server {
        use std::hash::{BuildHasher as _, RandomState};
        let pick = RandomState::new().hash_one(std::time::Instant::now());
        &self.servers[(pick % self.servers.len() as u64) as usize]
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let server = self.server();
        let mut req = server.http.request(method, format!("{}{path}", server.url));
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn upload(&self, bytes: Vec<u8>) -> (u16, Value) {
        let server = self.server();
        let mut req = server
            .http
            .post(format!("{}/v1/modules", server.url))
            .header("content-type", "application/wasm")
            .body(bytes);
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Status of `GET path` as an SSE client (headers only).
    pub async fn follow_status(&self, path: &str) -> u16 {
        let server = self.server();
        let mut req = server.http.get(format!("{}{path}", server.url));
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        req.send().await.unwrap().status().as_u16()
    }
}

/// `vulcan tenant add NAME --tenants FILE EXTRA...`: the printed token.
pub fn add_tenant(env: &Env, file: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["tenant", "add", name, "--tenants", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    assert!(token.starts_with("vlc_") && token.len() == 68, "{token}");
    token
}

#[tokio::test]
async fn every_endpoint_keeps_tenants_apart_and_admins_see_all() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &[]);
    let bob = add_tenant(&env, &file, "bob", &[]);
    let root = add_tenant(&env, &file, "root", &["--admin"]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(&alice) && !text.contains(&bob),
        "tokens are stored hashed"
    );
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    keeps_tenants_apart(std::slice::from_ref(&server), [&alice, &bob, &root]).await;
}

/// Every endpoint as alice, bob, an admin and anonymous, each request to
/// one of `servers` at random: another tenant's workload or module is an
/// unknown one, lists are scoped, the admin sees all.
pub async fn keeps_tenants_apart(servers: &[Server], [alice, bob, root]: [&str; 3]) {
    let (alice, bob, root) = (
        As {
            servers,
            token: Some(alice),
        },
        As {
            servers,
            token: Some(bob),
        },
        As {
            servers,
            token: Some(root),
        },
    );
    let anon = As {
        servers,
        token: None,
    };

    let hello = std::fs::read(example("hello")).unwrap();
    let (status, module) = alice.upload(hello.clone()).await;
    assert_eq!(status, 201);
    let hash = module["hash"].as_str().unwrap().to_owned();
    let (status, ran) = alice
        .call(Method::POST, "/v1/workloads", Some(json!({"module": hash})))
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["tenant"], "alice");
    let a = ran["id"].as_str().unwrap().to_owned();
    // Bob uploads the same bytes: new to him (nothing says alice has them).
    let (status, his) = bob.upload(hello).await;
    assert_eq!(status, 201, "{his}");
    let (_, ran) = bob
        .call(Method::POST, "/v1/workloads", Some(json!({"module": hash})))
        .await;
    let b = ran["id"].as_str().unwrap().to_owned();
    let unknown = "01J0000000000000000000000A";

    // (request, alice, bob, admin, anonymous)
    let table: Vec<(Method, String, Option<Value>, [u16; 4])> = vec![
        (
            Method::GET,
            format!("/v1/workloads/{a}"),
            None,
            [200, 404, 200, 401],
        ),
        (
            Method::GET,
            format!("/v1/workloads/{a}/logs/history"),
            None,
            [200, 404, 200, 401],
        ),
        (
            Method::DELETE,
            format!("/v1/workloads/{a}"),
            None,
            [409, 404, 409, 401],
        ),
        (
            Method::GET,
            format!("/v1/workloads/{unknown}"),
            None,
            [404, 404, 404, 401],
        ),
        (
            Method::GET,
            "/v1/workloads".into(),
            None,
            [200, 200, 200, 401],
        ),
        (
            Method::GET,
            "/v1/modules".into(),
            None,
            [200, 200, 200, 401],
        ),
        (Method::GET, "/metrics".into(), None, [403, 403, 200, 401]),
        (Method::GET, "/v1/stats".into(), None, [403, 403, 200, 401]),
        (Method::GET, "/v1/whoami".into(), None, [200, 200, 200, 401]),
        (Method::GET, "/healthz".into(), None, [200, 200, 200, 200]),
    ];
    for (method, path, body, expected) in table {
        let mut got = [0u16; 4];
        for (i, who) in [&alice, &bob, &root, &anon].iter().enumerate() {
            got[i] = who.call(method.clone(), &path, body.clone()).await.0;
        }
        assert_eq!(
            got, expected,
            "{method} {path} as [alice, bob, admin, anonymous]"
        );
    }
    // SSE answers before its body: the status is what matters.
    let sse = format!("/v1/workloads/{a}/logs");
    let got = [
        alice.follow_status(&sse).await,
        bob.follow_status(&sse).await,
        root.follow_status(&sse).await,
        anon.follow_status(&sse).await,
    ];
    assert_eq!(got, [200, 404, 200, 401], "GET {sse}");
    // Another tenant's id reads exactly as an unknown one.
    let (_, probe) = bob.get(&format!("/v1/workloads/{a}")).await;
    assert_eq!(probe["error"]["message"], format!("workload {a} not found"));

    // Lists show each tenant its own, and the admin everything.
    let ids = |list: &Value| -> Vec<String> {
        let items = list["items"].as_array().unwrap();
        items
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&alice.get("/v1/workloads").await.1), vec![a.clone()]);
    assert_eq!(ids(&bob.get("/v1/workloads").await.1), vec![b.clone()]);
    assert_eq!(
        ids(&root.get("/v1/workloads").await.1),
        vec![b.clone(), a.clone()]
    );
    let (_, bobs) = bob.get("/v1/workloads?status=completed").await;
    assert_eq!(bobs["total"], 1);

    // Modules: each sees its own; a module only another tenant uploaded is
    // unknown, to look at or to run.
    let fib = std::fs::read(example("exit-code")).unwrap();
    let (_, only_alice) = alice.upload(fib).await;
    let secret = only_alice["hash"].as_str().unwrap();
    assert_eq!(bob.get(&format!("/v1/modules/{secret}")).await.0, 404);
    let (status, _) = bob
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module": secret})),
        )
        .await;
    assert_eq!(status, 404);
    let hashes = |list: &Value| -> Vec<String> {
        let items = list["items"].as_array().unwrap();
        items
            .iter()
            .map(|m| m["hash"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(!hashes(&bob.get("/v1/modules").await.1).contains(&secret.to_owned()));
    assert!(hashes(&alice.get("/v1/modules").await.1).contains(&secret.to_owned()));
    assert_eq!(root.get(&format!("/v1/modules/{secret}")).await.0, 200);

    let (_, me) = alice.get("/v1/whoami").await;
    assert_eq!(
        (me["tenant"].as_str(), me["admin"].as_bool()),
        (Some("alice"), Some(false))
    );
}

#[tokio::test]
async fn a_tenant_at_its_quota_queues_and_others_still_run() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let noisy = add_tenant(&env, &file, "noisy", &["--max-concurrent", "2"]);
    let quiet = add_tenant(&env, &file, "quiet", &[]);
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    let (noisy_as, quiet_as) = (
        As {
            servers: std::slice::from_ref(&server),
            token: Some(&noisy),
        },
        As {
            servers: std::slice::from_ref(&server),
            token: Some(&quiet),
        },
    );
    let spin = b64(&std::fs::read(example("spin")).unwrap());
    let mut spinning = Vec::new();
    for _ in 0..2 {
        let (status, body) = noisy_as
            .call(
                Method::POST,
                "/v1/workloads/async",
                Some(json!({"module_base64": spin})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        spinning.push(body["id"].as_str().unwrap().to_owned());
    }
    // A third waits in the queue: accepted, pending, never running while
    // two of its tenant's run.
    let (status, body) = noisy_as
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module_base64": spin})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let waiting = body["id"].as_str().unwrap().to_owned();
    let (_, record) = noisy_as.get(&format!("/v1/workloads/{waiting}")).await;
    assert_eq!(record["status"], "pending", "{record}");
    let (_, queue) = noisy_as.get("/v1/queue").await;
    assert_eq!(queue["queued"], 1, "{queue}");
    assert_eq!(
        queue["tenants"].as_array().unwrap().len(),
        1,
        "its own line only: {queue}"
    );

    // The quiet tenant is not held up by the noisy one's quota.
    let hello = b64(&std::fs::read(example("hello")).unwrap());
    let (status, ran) = quiet_as
        .call(
            Method::POST,
            "/v1/workloads",
            Some(json!({"module_base64": hello})),
        )
        .await;
    assert_eq!((status, ran["status"].as_str()), (200, Some("completed")));

    // `vulcan whoami` shows the quota in use.
    let out = env
        .cmd(&["--server", &server.url, "whoami"])
        .env("VULCAN_TOKEN", &noisy)
        .output()
        .unwrap();
    assert!(
        stdout(&out).starts_with("noisy (tenant): 2/2 running; logs "),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // Once one ends, the queued one takes its place.
    let (status, _) = noisy_as
        .call(
            Method::DELETE,
            &format!("/v1/workloads/{}", spinning[0]),
            None,
        )
        .await;
    assert_eq!(status, 200);
    eventually("the queued run starts", || async {
        let (_, record) = noisy_as.get(&format!("/v1/workloads/{waiting}")).await;
        (record["status"] == "running").then_some(())
    })
    .await;
    for id in [&spinning[1], &waiting] {
        let (status, _) = noisy_as
            .call(Method::DELETE, &format!("/v1/workloads/{id}"), None)
            .await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_tenant_cannot_ask_for_more_than_its_limits() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.json");
    let token = "small-token";
    std::fs::write(
        &file,
        json!({"tenants": [{
            "name": "small",
            "token_sha256": vulcan::tenants::token_hash(token),
            "max_timeout_ms": 1000,
            "max_fuel": 100000000,
        }]})
        .to_string(),
    )
    .unwrap();
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    let small = As {
        servers: std::slice::from_ref(&server),
        token: Some(token),
    };
    let hello = b64(&std::fs::read(example("hello")).unwrap());
    let (status, body) = small
        .call(
            Method::POST,
            "/v1/workloads",
            Some(json!({"module_base64": hello, "limits": {"timeout_ms": 5000}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant `small`"),
        "{body}"
    );
    let (status, ran) = small
        .call(
            Method::POST,
            "/v1/workloads",
            Some(json!({"module_base64": hello})),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["limits"]["timeout_ms"], 1000, "{ran}");
    assert_eq!(ran["limits"]["fuel"], 100000000, "{ran}");
}

#[test]
fn a_bad_tenants_file_stops_the_server_at_start() {
    let env = Env::new();
    let dir = env.data_dir();
    let hash = vulcan::tenants::token_hash("same");
    let cases = [
        (
            "garbage.toml",
            "this is [not toml".to_owned(),
            "does not parse",
        ),
        (
            "twice.toml",
            format!(
                "[[tenants]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\n\
                 [[tenants]]\nname = \"b\"\ntoken_sha256 = \"{hash}\"\n"
            ),
            "same token",
        ),
        (
            "short.toml",
            "[[tenants]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n".to_owned(),
            "64 hex digits",
        ),
        (
            "unknown.toml",
            format!("[[tenants]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nrole = \"x\"\n"),
            "does not parse",
        ),
    ];
    for (name, text, says) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = env.run(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tenants",
            path.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
    }
    let missing = env.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tenants",
        "/nonexistent/t.toml",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("failed to read the tenants file"));

    // `tenant add` refuses a name twice and leaves the file as it was.
    let file = dir.join("tenants.toml");
    add_tenant(&env, &file, "alice", &[]);
    let before = std::fs::read(&file).unwrap();
    let again = env.run(&[
        "tenant",
        "add",
        "alice",
        "--tenants",
        file.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert!(
        stdout(&again).is_empty(),
        "no token printed for a refused tenant"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[tokio::test]
async fn retention_deletes_old_lines_in_the_background_and_their_logs_answer_410() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let short = add_tenant(&env, &file, "short", &[]);
    let keep = add_tenant(&env, &file, "keep", &[]);
    // `keep` overrides the server's retention with a day of its own.
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replacen(
        "name = \"keep\"",
        "name = \"keep\"\nretain_for_ms = 86400000",
        1,
    );
    std::fs::write(&file, text).unwrap();
    let server = Server::start(
        &env,
        &["--tenants", file.to_str().unwrap(), "--retain-for", "300ms"],
    );
    let (short_as, keep_as) = (
        As {
            servers: std::slice::from_ref(&server),
            token: Some(&short),
        },
        As {
            servers: std::slice::from_ref(&server),
            token: Some(&keep),
        },
    );
    let b64_of = |name: &str| b64(&std::fs::read(example(name)).unwrap());
    // Running long past the retention: never touched.
    let (_, spinning) = short_as
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module_base64": b64_of("spin")})),
        )
        .await;
    let spinning = spinning["id"].as_str().unwrap().to_owned();
    let flood = json!({"module_base64": b64_of("log-flood"), "args": ["100000"]});
    let (status, old) = short_as
        .call(Method::POST, "/v1/workloads", Some(flood))
        .await;
    assert_eq!(status, 200, "{old}");
    let old = old["id"].as_str().unwrap().to_owned();
    let kept_run = json!({"module_base64": b64_of("log-flood"), "args": ["1000"]});
    let (_, kept) = keep_as
        .call(Method::POST, "/v1/workloads", Some(kept_run))
        .await;
    let kept = kept["id"].as_str().unwrap().to_owned();
    // Each tenant's workloads and lines are in a file of its own.
    let in_main: i64 = (env.sqlite())
        .query_row("SELECT COUNT(*) FROM workloads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(in_main, 0, "tenants' workloads are not in the main file");
    let pages = |env: &Env| -> i64 {
        env.tenant_sqlite("short")
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    };
    let before = pages(&env);

    let gone = eventually("the old workload's lines are gone", || async {
        let (status, body) = short_as
            .get(&format!("/v1/workloads/{old}/logs/history"))
            .await;
        (status == 410).then_some(body)
    })
    .await;
    assert_eq!(gone["error"]["code"], "gone", "{gone}");
    assert_eq!(
        short_as
            .follow_status(&format!("/v1/workloads/{old}/logs"))
            .await,
        410
    );
    let (status, record) = short_as.get(&format!("/v1/workloads/{old}")).await;
    assert_eq!(status, 200, "the record stays");
    assert!(record["pruned_at"].is_string(), "{record}");
    let count = |id: &str| -> i64 {
        env.tenant_sqlite("short")
            .query_row(
                "SELECT COUNT(*) FROM log_lines WHERE workload_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(count(&old), 0);
    assert!(pages(&env) < before, "the file gave its pages back");

    // Another tenant's own, longer retention keeps its lines; a running
    // workload keeps its lines however long it runs.
    let (status, page) = keep_as
        .get(&format!("/v1/workloads/{kept}/logs/history?limit=5000"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["lines"].as_array().unwrap().len(), 1000);
    let (status, page) = short_as
        .get(&format!("/v1/workloads/{spinning}/logs/history"))
        .await;
    assert_eq!(
        (status, page["lines"][0]["line"].as_str()),
        (200, Some("spinning"))
    );
    let (status, _) = short_as
        .call(Method::DELETE, &format!("/v1/workloads/{spinning}"), None)
        .await;
    assert_eq!(status, 200);
}

/// Bytes `log-flood 1000` stores: "line 0" … "line 999".
const FLOOD_1000_BYTES: u64 = 1000 * 5 + 10 + 90 * 2 + 900 * 3;

/// Runs `log-flood 1000` `times` times in a row, synchronously: the ids.
async fn floods(who: &As<'_>, times: usize) -> Vec<String> {
    let module = b64(&std::fs::read(example("log-flood")).unwrap());
    let mut ids = Vec::new();
    for _ in 0..times {
        let run = json!({"module_base64": module, "args": ["1000"]});
        let (status, record) = who.call(Method::POST, "/v1/workloads", Some(run)).await;
        assert_eq!(
            (status, record["status"].as_str()),
            (200, Some("completed"))
        );
        ids.push(record["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Status of `id`'s history: 200 with all 1,000 lines, or 410 once pruned.
async fn history(who: &As<'_>, id: &str) -> u16 {
    let (status, page) = who
        .get(&format!("/v1/workloads/{id}/logs/history?limit=5000"))
        .await;
    if status == 200 {
        assert_eq!(page["lines"].as_array().unwrap().len(), 1000, "{id}");
    }
    status
}

#[tokio::test]
async fn stored_log_bytes_quotas_prune_the_oldest_or_refuse_new_runs() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    // Room for two runs' lines and a half: the third run is over it.
    let cap = (FLOOD_1000_BYTES * 5 / 2).to_string();
    let capped = add_tenant(&env, &file, "capped", &["--max-log-bytes", &cap]);
    let strict = add_tenant(
        &env,
        &file,
        "strict",
        &["--max-log-bytes", "10000", "--on-log-quota", "refuse"],
    );
    let free = add_tenant(&env, &file, "free", &[]);
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    let who = |token| As {
        servers: std::slice::from_ref(&server),
        token: Some(token),
    };
    let (capped_as, strict_as, free_as) = (who(&capped), who(&strict), who(&free));

    // prune_oldest: four runs' lines exceed the cap; the two oldest go.
    let ids = floods(&capped_as, 4).await;
    let whoami = eventually("capped is back under its quota", || async {
        let (_, me) = capped_as.get("/v1/whoami").await;
        (me["log_bytes"] == 2 * FLOOD_1000_BYTES).then_some(me)
    })
    .await;
    assert_eq!(whoami["max_log_bytes"], FLOOD_1000_BYTES * 5 / 2);
    assert_eq!(whoami["on_log_quota"], "prune_oldest");
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(history(&capped_as, id).await);
    }
    assert_eq!(
        statuses,
        [410, 410, 200, 200],
        "oldest first, and only those"
    );
    // What whoami counts is what its file holds.
    let stored: i64 = env
        .tenant_sqlite("capped")
        .query_row(
            "SELECT SUM(length(CAST(line AS BLOB))) FROM log_lines l \
             JOIN workloads w ON w.id = l.workload_id WHERE w.tenant = 'capped'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored as u64, 2 * FLOOD_1000_BYTES);

    // refuse: once over, new runs get 429 and nothing is deleted.
    let kept = floods(&strict_as, 2).await;
    let module = b64(&std::fs::read(example("hello")).unwrap());
    let resp = server
        .http
        .post(format!("{}/v1/workloads", server.url))
        .bearer_auth(&strict)
        .json(&json!({"module_base64": module}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(
        resp.headers().get("retry-after").is_none(),
        "waiting does not free room"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "log_quota_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("15780 bytes") && message.contains("10000"),
        "{message}"
    );
    for id in &kept {
        assert_eq!(history(&strict_as, id).await, 200);
    }
    // Another tenant is not held back by either.
    let (status, _) = free_as
        .call(
            Method::POST,
            "/v1/workloads",
            Some(json!({"module_base64": module})),
        )
        .await;
    assert_eq!(status, 200);
    let out = env
        .cmd(&["--server", &server.url, "whoami"])
        .env("VULCAN_TOKEN", &strict)
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("logs 15.4 KiB of 9.8 KiB stored (refuse when full)"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn a_server_wide_byte_cap_prunes_the_oldest_finished_workloads() {
    let env = Env::new();
    let cap = (FLOOD_1000_BYTES * 3 / 2).to_string();
    let server = Server::start(&env, &["--retain-bytes", &cap]);
    let anyone = As {
        servers: std::slice::from_ref(&server),
        token: None,
    };
    let ids = floods(&anyone, 3).await;
    eventually("the store is back under its cap", || async {
        let (_, me) = anyone.get("/v1/whoami").await;
        (me["log_bytes"] == FLOOD_1000_BYTES).then_some(())
    })
    .await;
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(history(&anyone, id).await);
    }
    assert_eq!(statuses, [410, 410, 200]);
}

#[tokio::test]
async fn a_tenants_followers_are_capped_apart_from_others() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &["--max-followers", "2"]);
    let bob = add_tenant(&env, &file, "bob", &[]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("max_followers = 2"), "{text}");
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    let sleep = std::fs::read(example("sleep")).unwrap();
    let start = |token: String| {
        let (server, sleep) = (&server, sleep.clone());
        async move {
            let resp = server
                .http
                .post(format!("{}/v1/workloads/async?arg=60000", server.url))
                .bearer_auth(token)
                .header("content-type", "application/wasm")
                .body(sleep)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202);
            let v: Value = resp.json().await.unwrap();
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let (a, b) = (start(alice.clone()).await, start(bob.clone()).await);
    let follow = |token: &str, id: &str| {
        server
            .http
            .get(format!("{}/v1/workloads/{id}/logs", server.url))
            .bearer_auth(token)
            .send()
    };
    // Alice's two streams stay open; her third is refused, bob's is not.
    let mut open = Vec::new();
    for _ in 0..2 {
        let resp = follow(&alice, &a).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        open.push(resp);
    }
    let refused = follow(&alice, &a).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_followers"),
        "{body}"
    );
    let his = follow(&bob, &b).await.unwrap();
    assert_eq!(his.status().as_u16(), 200);
    // Closing one of hers frees its place.
    drop(open.pop());
    eventually("alice's freed follower place", || async {
        let resp = follow(&alice, &a).await.unwrap();
        (resp.status().as_u16() == 200).then_some(resp)
    })
    .await;
}

#[tokio::test]
async fn modules_are_deleted_by_their_owners_and_the_bytes_go_with_the_last() {
    let env = Env::new();
    let file = env.data_dir().join("tenants.toml");
    let alice = add_tenant(&env, &file, "alice", &[]);
    let bob = add_tenant(&env, &file, "bob", &[]);
    let root = add_tenant(&env, &file, "root", &["--admin"]);
    let server = Server::start(&env, &["--tenants", file.to_str().unwrap()]);
    let who = |token| As {
        servers: std::slice::from_ref(&server),
        token: Some(token),
    };
    let (alice, bob, root) = (who(&alice), who(&bob), who(&root));
    let hello = std::fs::read(example("hello")).unwrap();
    let (_, m) = alice.upload(hello.clone()).await;
    let hash = m["hash"].as_str().unwrap().to_owned();
    assert_eq!(bob.upload(hello).await.0, 201);
    let path = format!("/v1/modules/{hash}");
    // Alice takes hers back; bob's stays, and still runs.
    assert_eq!(alice.call(Method::DELETE, &path, None).await.0, 204);
    assert_eq!(alice.get(&path).await.0, 404);
    assert_eq!(alice.call(Method::DELETE, &path, None).await.0, 404, "once");
    let (status, ran) = alice
        .call(Method::POST, "/v1/workloads", Some(json!({"module": hash})))
        .await;
    assert_eq!(status, 404, "{ran}");
    assert_eq!(bob.get(&path).await.0, 200);
    let (status, ran) = bob
        .call(Method::POST, "/v1/workloads", Some(json!({"module": hash})))
        .await;
    assert_eq!(
        (status, ran["status"].as_str()),
        (200, Some("completed")),
        "{ran}"
    );
    // Not while a workload of bob's runs it.
    let spin = std::fs::read(example("spin")).unwrap();
    let (_, s) = bob.upload(spin).await;
    let spin_hash = s["hash"].as_str().unwrap().to_owned();
    let (status, started) = bob
        .call(
            Method::POST,
            "/v1/workloads/async",
            Some(json!({"module": spin_hash})),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let spin_path = format!("/v1/modules/{spin_hash}");
    let (status, refused) = bob.call(Method::DELETE, &spin_path, None).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "conflict");
    let id = started["id"].as_str().unwrap();
    assert_eq!(
        bob.call(Method::DELETE, &format!("/v1/workloads/{id}"), None)
            .await
            .0,
        200
    );
    eventually("the spinner ends", || async {
        let (_, r) = bob.get(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "killed").then_some(())
    })
    .await;
    assert_eq!(bob.call(Method::DELETE, &spin_path, None).await.0, 204);
    // Bob was the last owner of hello: its bytes and compiled copy go.
    assert_eq!(bob.call(Method::DELETE, &path, None).await.0, 204);
    assert_eq!(root.get(&path).await.0, 404, "gone for everyone");
    let rows: i64 = env
        .sqlite()
        .query_row("SELECT COUNT(*) FROM modules", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    let artifacts = std::fs::read_dir(env.data_dir().join("artifacts")).map_or(0, |d| d.count());
    assert_eq!(artifacts, 0, "no compiled copy is left");
}
