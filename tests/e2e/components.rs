//! Components: SDK workloads of the Vulcan world and plain WASI preview2
//! commands, through `vulcan run` and through the API.

use reqwest::Method;
use serde_json::{Value, json};
use vulcan_test_artifacts::component;

use crate::support::*;

/// (stream, level, line) of every stored line of `id`, in seq order.
fn leveled_lines(env: &Env, id: &str) -> Vec<(String, Option<String>, String)> {
    let conn = env.sqlite();
    let mut stmt = conn
        .prepare("SELECT stream, level, line FROM log_lines WHERE workload_id = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn module_kinds(env: &Env) -> Vec<String> {
    let conn = env.sqlite();
    let mut stmt = conn
        .prepare("SELECT kind FROM modules ORDER BY kind")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn sdk_workload_runs_locally_with_input_output_and_leveled_logs() {
    let env = Env::new();
    let out = env.run(&["run", "--input", r#"{"a":2,"b":40}"#, &component_str("sum")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "{\"sum\":42}\n");
    assert!(
        stderr(&out).contains("[info] adding 2 and 40"),
        "{}",
        stderr(&out)
    );
    let row = env.only_workload();
    assert_eq!(row.status, "completed");
    let output: Vec<u8> = env
        .sqlite()
        .query_row("SELECT output FROM workloads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(output, br#"{"sum":42}"#);
    assert_eq!(
        leveled_lines(&env, &row.id),
        vec![("log".into(), Some("info".into()), "adding 2 and 40".into())]
    );
    assert_eq!(module_kinds(&env), vec!["vulcan-workload"]);
}

#[test]
fn greet_logs_at_every_level_and_sees_only_its_spec() {
    let env = Env::new();
    let out = env.run(&[
        "run",
        "--input",
        r#""Ada""#,
        "--env",
        "ONLY=this",
        &component_str("greet"),
        "--",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("Hello, Ada!\n"), "{}", stdout(&out));
    let row = env.only_workload();
    let lines = leveled_lines(&env, &row.id);
    let levels: Vec<_> = lines.iter().filter_map(|l| l.1.clone()).collect();
    assert_eq!(levels, ["trace", "debug", "info", "warn", "error"]);
    assert_eq!(lines[0].2, format!("starting workload {}", row.id));
    assert!(lines[1].2.starts_with("module sha256:"));
    assert_eq!(lines[3].2, r#"args ["greet.wasm", "x"]"#);
    assert_eq!(lines[4].2, r#"env [("ONLY", "this")]"#);
    assert_eq!(
        lines[5..],
        [
            ("stdout".into(), None, "stdout: hello".into()),
            ("stderr".into(), None, "stderr: hello".into())
        ]
    );
}

#[test]
fn a_returned_error_fails_the_workload_with_its_message() {
    let env = Env::new();
    let out = env.run(&["run", "--input", r#""x""#, &component_str("fails")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid digit found in string"));
    let row = env.only_workload();
    assert_eq!(row.status, "failed");
    assert_eq!(row.error.as_deref(), Some("invalid digit found in string"));
    // Its log line before the error is kept.
    assert_eq!(leveled_lines(&env, &row.id).len(), 1);
}

#[test]
fn a_wasip2_command_gets_args_and_its_input_on_stdin() {
    let env = Env::new();
    let out = env.run(&[
        "run",
        "--input",
        r#"{"k":1}"#,
        &component_str("wasip2-hello"),
        "--",
        "a",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Hello from a WASI preview2 component!\nargs: [\"a\", \"b\"]\ninput: {\"k\":1}\n"
    );
    let failed = env.run(&["run", &component_str("wasip2-hello"), "--", "fail"]);
    assert_eq!(failed.status.code(), Some(1), "a failing command exits 1");
    assert_eq!(module_kinds(&env), vec!["wasi-command"]);
}

#[test]
fn component_limits_fuel_timeout_and_memory_are_enforced() {
    let env = Env::new();
    let fib = component_str("fib");
    let fuel = env.run(&["run", "--fuel", "100000", "--input", r#"{"n":40}"#, &fib]);
    assert_eq!(fuel.status.code(), Some(136), "{}", stderr(&fuel));
    let timeout = env.run(&["run", "--timeout", "200ms", "--input", r#"{"n":60}"#, &fib]);
    assert_eq!(timeout.status.code(), Some(124), "{}", stderr(&timeout));
    // The input is copied into guest memory: 8 MiB cannot fit in 2 MiB.
    let big = env.data_dir().join("big.json");
    std::fs::write(&big, format!("\"{}\"", "x".repeat(8 << 20))).unwrap();
    let memory = env.run(&[
        "run",
        "--max-memory",
        "2MiB",
        "--input",
        &format!("@{}", big.display()),
        &component_str("greet"),
    ]);
    assert_eq!(memory.status.code(), Some(135), "{}", stderr(&memory));
    let statuses: Vec<_> = env.workloads().into_iter().map(|w| w.status).collect();
    assert_eq!(statuses, ["failed", "failed", "failed"]);
}

#[tokio::test]
async fn components_through_the_api_sync_async_sse_history_and_kill() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let upload = |name: &str| {
        let bytes = std::fs::read(component(name)).unwrap();
        let server = &server;
        async move {
            let (status, info) = server.upload(bytes).await;
            assert_eq!(status, 201, "{info}");
            info
        }
    };
    let sum = upload("sum").await;
    assert_eq!(sum["kind"], "vulcan-workload");
    let run = |spec: Value| {
        let server = &server;
        async move {
            let resp = server
                .req(Method::POST, "/v1/workloads")
                .json(&spec)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };

    // Sync, JSON input and output.
    let (status, record) = run(json!({"module": sum["hash"], "input": {"a": 1, "b": 2}})).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["output"], json!({"sum": 3}));

    // Async: the output is in the final record, at the end of the log stream.
    let id = server
        .start_json(&json!({"module": sum["hash"], "input": {"a": 20, "b": 22}}))
        .await;
    let (_, lines, end) = server.sse(&id, None).await.until_end().await;
    assert_eq!(lines.len(), 1);
    assert_eq!(end["output"], json!({"sum": 42}));
    let (_, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(record["output"], json!({"sum": 42}));

    // Output that is text but not JSON comes back as text; input_base64 works too.
    let greet = upload("greet").await;
    let (_, record) = run(json!({"module": greet["hash"], "input_base64": "IkJvYiI="})).await;
    assert_eq!(record["output_text"], "Hello, Bob!", "{record}");
    assert!(record["output_base64"].is_null(), "{record}");
    let id = record["id"].as_str().unwrap();
    let mut sse = server.sse(id, None).await;
    let first = sse.next().await.unwrap();
    assert_eq!(first.event, "log");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["level"], "trace");
    assert!(data["message"].as_str().unwrap().contains(id));
    let (_, history) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history"))
        .await;
    let levels: Vec<_> = history["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["level"].clone())
        .collect();
    assert_eq!(
        levels,
        [
            json!("trace"),
            json!("debug"),
            json!("info"),
            json!("warn"),
            json!("error"),
            Value::Null,
            Value::Null
        ]
    );

    // A returned error.
    let fails = upload("fails").await;
    let (_, record) = run(json!({"module": fails["hash"], "input": "nope"})).await;
    assert_eq!(record["status"], "failed");
    assert!(record["error"].as_str().unwrap().contains("invalid digit"));

    // A plain preview2 command, its input on stdin.
    let hello = upload("wasip2-hello").await;
    assert_eq!(hello["kind"], "wasi-command");
    let (_, record) = run(json!({"module": hello["hash"], "input": [1, 2]})).await;
    assert_eq!(record["status"], "completed", "{record}");
    let id = record["id"].as_str().unwrap();
    let (_, history) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history"))
        .await;
    assert_eq!(history["lines"][2]["line"], "input: [1,2]");

    // Async, then killed while computing.
    let fib = upload("fib").await;
    let id = server
        .start_json(&json!({"module": fib["hash"], "input": {"n": 90}}))
        .await;
    let mut sse = server.sse(&id, None).await;
    assert_eq!(server.kill(&id).await.0, 200);
    let (_, _, end) = sse.until_end().await;
    assert_eq!(end["status"], "killed");
}

#[tokio::test]
async fn uploads_of_components_the_host_cannot_run_are_refused() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let refuse = |wat: &str| {
        let bytes = wat::parse_str(wat).unwrap();
        let server = &server;
        async move {
            let (status, body) = server.upload(bytes).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["code"], "invalid_module", "{body}");
            body["error"]["message"].as_str().unwrap().to_owned()
        }
    };
    // Another world: it exports neither entry point.
    let message = refuse(r#"(component (core module $m) (core instance (instantiate $m)))"#).await;
    assert!(message.contains("targets another world"), "{message}");

    // The right export, but an import the host does not provide.
    let message = refuse(
        r#"(component
            (import "acme:missing/api" (instance (export "f" (func))))
            (core module $m
              (memory (export "memory") 1)
              (func (export "run") (param i32 i32) (result i32) unreachable)
              (func (export "realloc") (param i32 i32 i32 i32) (result i32) unreachable))
            (core instance $i (instantiate $m))
            (type $out (result (list u8) (error string)))
            (func (export "run") (param "input" (list u8)) (result $out)
              (canon lift (core func $i "run") (memory (core memory $i "memory"))
                (realloc (core func $i "realloc")))))"#,
    )
    .await;
    assert!(message.contains("acme:missing/api"), "{message}");

    let (_, page) = server.get_json("/v1/workloads").await;
    assert_eq!(page["total"], 0);
}

const USERS: &str = r#"{"users":[{"name":"Ada","age":36},{"name":"Alan","age":41}]}"#;

#[test]
fn json_transform_reshapes_a_document_locally() {
    let env = Env::new();
    let out = env.run(&["run", "--input", USERS, &component_str("json-transform")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (printed, output) = stdout(&out)
        .split_once('\n')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap();
    assert_eq!(printed, "transformed 2 users");
    let output: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(
        output,
        json!({"count": 2, "names": ["Ada", "Alan"], "oldest": "Alan"})
    );
    let bad = env.run(&["run", "--input", "[1]", &component_str("json-transform")]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("expected {\"users\": [...]}"));
}

#[tokio::test]
async fn json_transform_through_the_api_survives_a_restart_without_recompiling() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (_, info) = server
        .upload(std::fs::read(component("json-transform")).unwrap())
        .await;
    let hash = info["hash"].clone();
    assert_eq!(server.stop().code(), Some(0));

    // The compiled component comes back from its artifact on disk.
    let server = Server::start(&env, &[]);
    let spec = json!({"module": hash, "input": serde_json::from_str::<Value>(USERS).unwrap()});
    let record: Value = server
        .req(Method::POST, "/v1/workloads")
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["output"]["oldest"], "Alan");
    assert_eq!(record["line_count"], 1);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("vulcan_module_compiles_total 0"),
        "{metrics}"
    );
}
