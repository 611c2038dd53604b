//! `vulcan ls` and `vulcan logs` on the local database.

use crate::support::*;

#[test]
fn ls_and_logs_read_back_what_run_recorded() {
    let env = Env::new();
    assert_eq!(
        env.run(&["run", &example_str("hello")]).status.code(),
        Some(0)
    );
    let mix = env.run(&["run", &example_str("stderr-mix"), "--", "4"]);
    assert_eq!(mix.status.code(), Some(0));
    let rows = env.workloads();
    let (hello, mixed) = (&rows[0], &rows[1]);

    let ls = env.run(&["ls"]);
    assert_eq!(ls.status.code(), Some(0));
    let text = stdout(&ls);
    let mixed_at = text.find(&mixed.id).expect("listed");
    let hello_at = text.find(&hello.id).expect("listed");
    assert!(mixed_at < hello_at, "newest first:\n{text}");
    assert!(text.contains("(2 of 2 workloads)"), "{text}");

    let json: serde_json::Value =
        serde_json::from_slice(&env.run(&["ls", "--json", "--limit", "1"]).stdout).unwrap();
    assert_eq!(json["total"], 2);
    assert_eq!(json["items"][0]["id"], mixed.id.as_str());
    assert_eq!(json["items"].as_array().unwrap().len(), 1);

    let logs = env.run(&["logs", &mixed.id]);
    assert_eq!(logs.status.code(), Some(0));
    // As the guest wrote them: stdout lines to stdout, stderr lines to stderr.
    assert_eq!(stdout(&logs), "out 0\nout 2\n");
    assert_eq!(stderr(&logs), "err 1\nerr 3\n");

    let logs = env.run(&["logs", "--json", &mixed.id]);
    let records: Vec<serde_json::Value> = stdout(&logs)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4);
    assert_eq!(records[1]["stream"], "stderr");
    assert_eq!(records[3]["seq"], 3);
}

#[test]
fn logs_of_an_unknown_or_malformed_id_fail_clearly() {
    let env = Env::new();
    let out = env.run(&["logs", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = env.run(&["logs", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a workload id"),
        "{}",
        stderr(&out)
    );
}
