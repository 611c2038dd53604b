//! One read model for every client: `status`, `ls` and `logs` print the same
//! bytes from the local database as from a server, and `run` and `submit`
//! exit alike for every way a workload can end.

use std::io::{BufRead as _, BufReader};
use std::process::{Output, Stdio};

use crate::support::*;

/// Every read command, with and without `--json`, run against the server's
/// own data directory and against the server: stdout, stderr and exit code
/// must be byte for byte the same.
#[tokio::test]
async fn status_ls_and_logs_print_the_same_bytes_locally_and_from_a_server() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let cli = Env::new();
    let remote = |args: &[&str]| server.cli(&cli, args);
    let local = |args: &[&str]| env.run(args);

    // Both streams; a 100 KiB line stored as `continued` records and a last
    // line without a newline; SDK `log` records and a JSON output; a failure
    // with an error and kind; a killed workload.
    let mix = server.start_wasm("stderr-mix", "arg=4").await;
    let partial = server.start_wasm("partial-lines", "").await;
    let sum = server
        .start_json(&serde_json::json!({
            "module_base64": b64(&std::fs::read(vulcan_test_artifacts::component("sum")).unwrap()),
            "input": {"a": 1, "b": 1},
        }))
        .await;
    let exit = server.start_wasm("exit-code", "arg=3").await;
    let spin = server.start_wasm("spin", "").await;
    let mut sse = server.sse(&spin, None).await;
    assert_eq!(sse.next().await.unwrap().data, "spinning");
    assert_eq!(server.kill(&spin).await.0, 200);
    for id in [&mix, &partial, &sum, &exit] {
        let (_, _, end) = server.sse(id, None).await.until_end().await;
        assert!(end["finished_at"].is_string(), "{end}");
    }
    let partial_lines = local(&["logs", "--json", &partial]);
    assert!(
        stdout(&partial_lines).contains(r#""continued":true"#),
        "the long line is stored in continued records"
    );

    let mut commands: Vec<Vec<&str>> = vec![
        vec!["ls"],
        vec!["ls", "--json"],
        vec!["ls", "--status", "failed"],
        vec!["ls", "--limit", "2", "--offset", "1"],
        vec!["ls", "--before", &partial, "--limit", "2"],
    ];
    for id in [&mix, &partial, &sum, &exit, &spin] {
        commands.push(vec!["status", id]);
        commands.push(vec!["status", "--json", id]);
        commands.push(vec!["logs", id]);
        commands.push(vec!["logs", "--json", id]);
    }
    for args in &commands {
        let (here, there) = (local(args), remote(args));
        assert_same(args, &here, &there);
    }

    // The printed record is whole: the failure kind and the whole error.
    let status = stdout(&local(&["status", &exit]));
    assert!(status.contains("failure: exit\n"), "{status}");
    assert!(status.contains("exit_code: 3\n"), "{status}");
    let logs = local(&["logs", &partial]);
    assert!(
        stdout(&logs).contains(&format!("\n{}\n", "x".repeat(100 * 1024))),
        "continued records print as the one line the guest wrote"
    );
    assert!(stdout(&logs).ends_with("no newline at the end\n"));
    let sum_logs = local(&["logs", &sum]);
    assert!(
        stderr(&sum_logs).contains("[info] adding 1 and 1"),
        "{}",
        stderr(&sum_logs)
    );
}

fn assert_same(args: &[&str], local: &Output, remote: &Output) {
    assert_eq!(
        local.status.code(),
        remote.status.code(),
        "exit code of {args:?}: local stderr {}, remote stderr {}",
        stderr(local),
        stderr(remote)
    );
    assert_eq!(stdout(local), stdout(remote), "stdout of {args:?}");
    assert_eq!(stderr(local), stderr(remote), "stderr of {args:?}");
    assert!(
        !stdout(local).is_empty() || !stderr(local).is_empty(),
        "{args:?} printed something"
    );
}

/// `vulcan run`, `vulcan submit` (which waits) and `submit --follow` exit with
/// the same code for every kind of ending a test can bring about on all three.
#[tokio::test]
async fn run_and_submit_exit_alike_for_every_kind_of_ending() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let cli = Env::new();
    let trap = fixture(cli.data_dir(), "unreachable");
    let trap = trap.to_str().unwrap();
    let (spin, mem_hog, flood) = (
        example_str("spin"),
        example_str("mem-hog"),
        example_str("log-flood"),
    );
    let (exit_code, hello) = (example_str("exit-code"), example_str("hello"));
    let fails = component_str("fails");
    let fails = fails.as_str();
    // (kind, flags and module, expected exit code)
    let cases: Vec<(&str, Vec<&str>, u8)> = vec![
        ("completed", vec![&hello], 0),
        ("exit", vec![&exit_code, "--", "7"], 7),
        ("timeout", vec!["--timeout", "300ms", &spin], 124),
        (
            "output",
            vec!["--max-output", "1000", &flood, "--", "100000"],
            125,
        ),
        ("trap", vec![trap], 134),
        ("memory", vec!["--max-memory", "16MiB", &mem_hog], 135),
        ("fuel", vec!["--fuel", "1000000", &spin], 136),
        ("returned_error", vec!["--input", r#""x""#, fails], 1),
    ];
    for (kind, args, code) in &cases {
        let mut run = vec!["run"];
        run.extend_from_slice(args);
        let ran = cli.run(&run);
        let mut submit = vec!["--server", server.url.as_str(), "submit"];
        submit.extend_from_slice(args);
        let submitted = cli.run(&submit);
        submit.insert(3, "--follow");
        let followed = cli.run(&submit);
        assert_eq!(
            followed.status.code(),
            Some(i32::from(*code)),
            "submit -f, {kind}: {}",
            stderr(&followed)
        );
        assert_eq!(
            ran.status.code(),
            Some(i32::from(*code)),
            "run, {kind}: {}",
            stderr(&ran)
        );
        assert_eq!(
            submitted.status.code(),
            Some(i32::from(*code)),
            "submit, {kind}: {}",
            stderr(&submitted)
        );
        if *kind != "completed" && *kind != "exit" {
            let failure = format!("failure: {kind}\n");
            assert!(
                stdout(&submitted).contains(&failure),
                "{kind}: {}",
                stdout(&submitted)
            );
        }
    }

    // Killed: Ctrl-C for `run`, DELETE from elsewhere for `submit`.
    let mut running = cli
        .cmd(&["run", &spin])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(running.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "spinning\n", "it runs before it is killed");
    signal(&running, "INT");
    assert_eq!(running.wait().unwrap().code(), Some(137));

    let submitted = cli
        .cmd(&["--server", server.url.as_str(), "submit", &spin])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let id = server.only_running().await;
    let mut sse = server.sse(&id, None).await;
    assert_eq!(sse.next().await.unwrap().data, "spinning");
    assert_eq!(server.kill(&id).await.0, 200);
    let out = submitted.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("failure: killed\n"),
        "{}",
        stdout(&out)
    );
}
