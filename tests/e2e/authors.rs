//! What a workload author meets: why a run ended in every command, errors
//! that name the fix, settings, the `log` crate, minimum levels, and output
//! shown as it was returned.

use std::process::Output;

use serde_json::json;
use vulcan_test_artifacts::component;

use crate::support::*;

/// The end of a run, as every command tells it on stderr.
fn says(out: &Output, what: &str) {
    assert!(
        stderr(out).contains(what),
        "expected {what:?} in:\n{}",
        stderr(out)
    );
}

#[tokio::test]
async fn every_command_says_why_a_workload_ended() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let cli = Env::new();
    let remote = |args: &[&str]| server.cli(&cli, args);
    let spin = example_str("spin");
    let fails = component_str("fails");
    for (args, why) in [
        (
            vec!["--timeout", "300ms", spin.as_str()],
            "vulcan: timed out after 300ms",
        ),
        (
            vec!["--input", "7", fails.as_str()],
            "vulcan: the workload returned an error: refusing to accept 7",
        ),
    ] {
        let mut run = vec!["run"];
        run.extend_from_slice(&args);
        says(&cli.run(&run), why);
        let mut follow = vec!["submit", "--follow"];
        follow.extend_from_slice(&args);
        let followed = remote(&follow);
        says(&followed, why);
        // `logs -f` of the same (ended) workload says it too.
        let id = stderr(&followed)
            .lines()
            .find_map(|l| l.strip_prefix("vulcan: workload "))
            .unwrap()
            .to_owned();
        says(&remote(&["logs", "-f", &id]), why);
    }

    let trap = fixture(cli.data_dir(), "unreachable");
    let out = cli.run(&["run", trap.to_str().unwrap()]);
    assert_eq!(
        stderr(&out).matches("wasm trap").count(),
        1,
        "{}",
        stderr(&out)
    );
}

#[test]
fn build_mistakes_get_errors_that_name_the_fix() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("target/wasm32-wasip2/release/nope.wasm");
    let out = env.run(&["run", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    says(&out, "nope.wasm");
    says(&out, "--target wasm32-wasip2");
    says(&out, r#"crate-type = ["cdylib"]"#);

    // A native executable: this test binary itself.
    let native = std::env::current_exe().unwrap();
    let out = env.run(&["run", native.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    says(&out, "native executable");
    says(&out, "--target wasm32-wasip2");

    // An SDK workload built for wasip1 is a core module importing the SDK's host.
    let wasip1 = wat_file(
        dir.path(),
        "sdk-wasip1.wasm",
        r#"(module
             (import "vulcan:workload/host@0.1.0" "log" (func (param i32 i32 i32)))
             (memory (export "memory") 1)
             (func (export "run") (param i32 i32) (result i32) (i32.const 0)))"#,
    );
    let out = env.run(&["run", wasip1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    says(&out, "built as a core module (wasm32-wasip1)");
    says(&out, "--target wasm32-wasip2");

    // --input to a plain program goes to its stdin, and it says so.
    let out = env.run(&["run", "--input", r#""hi""#, &example_str("stdin-echo")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    says(&out, "--input goes to the stdin of");

    // An SDK workload that wants JSON and got nothing.
    let out = env.run(&["run", &component_str("sum")]);
    assert_eq!(out.status.code(), Some(1));
    says(&out, "no input was given");
    assert!(!stderr(&out).contains("EOF"), "{}", stderr(&out));
    assert_eq!(
        env.workloads().len(),
        2,
        "the refused modules recorded nothing"
    );
}

#[test]
fn settings_come_from_the_env_and_the_log_crate_is_forwarded() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let word = dir.path().join("word.txt");
    std::fs::write(&word, "hey").unwrap();
    let input = format!("@{}", word.display());
    let settings = component_str("settings");
    let out = env.run(&[
        "run",
        "--env",
        "TIMES=3",
        "--env",
        "SEPARATOR=-",
        "--input",
        &input,
        &settings,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hey-hey-hey\n");
    says(&out, r#"[info] settings::repeat: repeating "hey" 3 times"#);
    says(&out, "[debug] settings read times=3 separator=-\n");
    let row = env.workloads().remove(0);
    let lines = env.lines(&row.id);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0].1, "log", "recorded as a log record");
    // Fields are stored with the record, in the order given, and shown.
    let logs = env.run(&["logs", "--json", &row.id]);
    let records: Vec<serde_json::Value> = stdout(&logs)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[1]["level"], "debug");
    assert_eq!(
        records[1]["fields"],
        json!({"times": "3", "separator": "-"})
    );
    assert!(
        stdout(&logs).contains(r#""fields":{"times":"3","separator":"-"}"#),
        "in the order given: {}",
        stdout(&logs)
    );
    says(
        &env.run(&["logs", &row.id]),
        "[debug] settings read times=3 separator=-\n",
    );

    let out = env.run(&["run", "--env", "TIMES=lots", "--input", &input, &settings]);
    assert_eq!(out.status.code(), Some(1));
    says(
        &out,
        r#"the setting `TIMES` is "lots", which is not a valid u32"#,
    );
    let out = env.run(&["run", "--env", "TIMES=500", "--input", &input, &settings]);
    says(&out, "TIMES is 500; at most 100 repetitions");

    // A minimum level drops what is below it: nothing is stored or shown.
    let out = env.run(&["run", "--log-level", "warn", "--input", &input, &settings]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hey hey\n");
    assert!(!stderr(&out).contains("repeating"), "{}", stderr(&out));
    let newest = env.workloads().pop().unwrap();
    assert_eq!(newest.line_count, 0);
}

#[tokio::test]
async fn output_is_shown_as_it_was_returned() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let settings = std::fs::read(component("settings")).unwrap();
    // Text that is JSON with its keys out of order comes back byte for byte.
    let text = r#"{"zebra": 1, "apple": [true]}"#;
    let (status, record) = server
        .post(
            "/v1/workloads",
            Body::Json(json!({
                "module_base64": b64(&settings),
                "input_base64": b64(text.as_bytes()),
                "env": {"TIMES": "1"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{record}");
    let raw = server
        .req(
            reqwest::Method::GET,
            &format!("/v1/workloads/{}", record["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.contains(&format!(r#""output":{text}"#)), "{raw}");
    // The SSE record of a log call carries its fields.
    let (_, events, _) = server
        .sse(record["id"].as_str().unwrap(), None)
        .await
        .until_end()
        .await;
    let with_fields: serde_json::Value = events
        .iter()
        .find(|e| e.contains("settings read"))
        .map(|e| serde_json::from_str(e).unwrap())
        .expect("the debug record is streamed");
    assert_eq!(
        with_fields["fields"],
        json!({"times": "1", "separator": " "})
    );

    // Text that is not JSON is text, in the record and on the terminal.
    let cli = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let word = dir.path().join("word.txt");
    std::fs::write(&word, "hey").unwrap();
    let input = format!("@{}", word.display());
    let greet = [
        "--server",
        server.url.as_str(),
        "submit",
        "--input",
        &input,
        "--env",
        "TIMES=2",
    ];
    let mut sync = greet.to_vec();
    let path = component_str("settings");
    sync.push(&path);
    let out = cli.run(&sync);
    assert!(
        stdout(&out).contains("output_text: hey hey\n"),
        "{}",
        stdout(&out)
    );
    let mut follow = greet.to_vec();
    follow.insert(3, "--follow");
    follow.push(&path);
    let out = cli.run(&follow);
    assert_eq!(stdout(&out), "hey hey\n", "{}", stderr(&out));
}

#[test]
fn sdk_log_records_count_against_the_output_limit() {
    let env = Env::new();
    let greet = component_str("greet");
    // Its stdout and stderr lines come to 28 bytes; its log records to more.
    let out = env.run(&["run", "--max-output", "30", "--input", r#""Ada""#, &greet]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    says(&out, "output limit of 30 bytes exceeded");
    let out = env.run(&[
        "run",
        "--max-output",
        "10KiB",
        "--input",
        r#""Ada""#,
        &greet,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
