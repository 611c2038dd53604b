//! `vulcan run` on the example guests.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use crate::support::*;

#[test]
fn hello_prints_exits_zero_and_is_recorded() {
    let env = Env::new();
    let out = env.run(&["run", &example_str("hello")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"Hello from a Vulcan workload!\n");
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    let w = env.only_workload();
    assert_eq!(w.status, "completed");
    assert_eq!(w.exit_code, Some(0));
    assert!(w.finished_at.is_some());
    assert_eq!(w.line_count, 1);
    let lines = env.lines(&w.id);
    assert_eq!(
        lines,
        vec![(
            0,
            "stdout".into(),
            "Hello from a Vulcan workload!".into(),
            false
        )]
    );
}

#[test]
fn guest_exit_code_passes_through() {
    let env = Env::new();
    let out = env.run(&["run", &example_str("exit-code"), "--", "7"]);
    assert_eq!(out.status.code(), Some(7));
    let w = env.only_workload();
    assert_eq!((w.status.as_str(), w.exit_code), ("failed", Some(7)));
    assert_eq!(w.error.as_deref(), Some("exited with code 7"));
}

#[test]
fn interleaved_streams_keep_their_order_and_stream() {
    let env = Env::new();
    let out = env.run(&["run", &example_str("stderr-mix"), "--", "6"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "out 0\nout 2\nout 4\n");
    assert_eq!(stderr(&out), "err 1\nerr 3\nerr 5\n");
    let w = env.only_workload();
    let got: Vec<_> = env
        .lines(&w.id)
        .into_iter()
        .map(|(seq, stream, line, _)| (seq, stream, line))
        .collect();
    let want: Vec<_> = (0..6)
        .map(|i| {
            let stream = if i % 2 == 0 { "stdout" } else { "stderr" };
            let prefix = if i % 2 == 0 { "out" } else { "err" };
            (i, stream.to_owned(), format!("{prefix} {i}"))
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn line_rules_hold_end_to_end_and_the_terminal_gets_raw_bytes() {
    let env = Env::new();
    let out = env.run(&["run", &example_str("partial-lines")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut raw = b"one line in pieces\ncrlf line\r\n".to_vec();
    raw.extend(vec![b'x'; 100 * 1024]);
    raw.extend_from_slice(b"\nbad \xff\xfe utf8\n\nno newline at the end");
    assert_eq!(out.stdout, raw, "binary output survives the pipe unchanged");

    let w = env.only_workload();
    let lines = env.lines(&w.id);
    let shape: Vec<_> = lines
        .iter()
        .map(|(seq, _, line, cont)| (*seq, line.len(), *cont))
        .collect();
    assert_eq!(
        shape,
        vec![
            (0, 18, false),
            (1, 9, false),
            (2, 64 * 1024, true),
            (3, 36 * 1024, false),
            (4, "bad \u{FFFD}\u{FFFD} utf8".len(), false),
            (5, 0, false),
            (6, 21, false),
        ]
    );
    assert_eq!(lines[0].2, "one line in pieces");
    assert_eq!(lines[1].2, "crlf line");
    assert_eq!(lines[4].2, "bad \u{FFFD}\u{FFFD} utf8");
    assert_eq!(lines[6].2, "no newline at the end");
    assert_eq!(w.line_count, 7);
}

#[test]
fn log_flood_persists_every_line_without_gaps() {
    let env = Env::new();
    let out = env
        .cmd(&["run", &example_str("log-flood"), "--", "200000"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let w = env.only_workload();
    assert_eq!(w.status, "completed");
    assert_eq!(w.line_count, 200_000);
    let conn = env.sqlite();
    let (count, min, max, bad): (i64, i64, i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), MIN(seq), MAX(seq), \
             SUM(line != 'line ' || seq OR stream != 'stdout') \
             FROM log_lines WHERE workload_id = ?1",
            [&w.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    // Primary key (workload, seq) makes seqs unique; count = max + 1 means no gap.
    assert_eq!((count, min, max, bad), (200_000, 0, 199_999, 0));
}

#[test]
fn spin_is_stopped_by_timeout() {
    let env = Env::new();
    let out = env.run(&["run", "--timeout", "300ms", &example_str("spin")]);
    assert_eq!(out.status.code(), Some(124));
    assert!(
        stderr(&out).contains("timed out after 300ms"),
        "{}",
        stderr(&out)
    );
    let w = env.only_workload();
    assert_eq!(w.status, "failed");
    assert!(w.finished_at.is_some());
    let ran = w.duration_ms.unwrap();
    assert!((300..30_000).contains(&ran), "ran {ran} ms");
    assert_eq!(
        env.lines(&w.id).len(),
        1,
        "the line before the loop is kept"
    );
}

#[test]
fn ctrl_c_kills_the_workload_and_records_it() {
    let env = Env::new();
    let mut child = env
        .cmd(&["run", &example_str("spin")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "spinning\n", "the guest is running");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    let w = env.only_workload();
    assert_eq!(w.status, "killed");
    assert!(w.finished_at.is_some());
}

#[test]
fn mem_hog_is_stopped_by_max_memory() {
    let env = Env::new();
    let out = env.run(&["run", "--max-memory", "16MiB", &example_str("mem-hog")]);
    assert_eq!(out.status.code(), Some(135), "{}", stderr(&out));
    assert!(stderr(&out).contains("memory limit of 16777216 bytes exceeded"));
    assert_eq!(env.only_workload().status, "failed");
}

#[test]
fn fuel_and_output_limits_are_enforced() {
    let env = Env::new();
    let out = env.run(&["run", "--fuel", "1000000", &example_str("spin")]);
    assert_eq!(out.status.code(), Some(136), "{}", stderr(&out));
    let out = env
        .cmd(&[
            "run",
            "--max-output",
            "1KiB",
            &example_str("log-flood"),
            "--",
            "100000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        out.stdout.len() <= 1024,
        "no more than the limit reaches the terminal"
    );
    let rows = env.workloads();
    assert!(rows.iter().all(|w| w.status == "failed"), "{rows:?}");
}

#[test]
fn fs_read_sees_its_preopen_and_cannot_escape_it() {
    let env = Env::new();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("input.txt"), "inside\n").unwrap();
    std::fs::write(root.path().join("secret.txt"), "outside\n").unwrap();
    let preopen = format!("{}::/data", data.display());
    for outside in [
        "/data/../secret.txt",
        "/secret.txt",
        "/etc/passwd",
        &root.path().join("secret.txt").display().to_string(),
    ] {
        let out = env.run(&[
            "run",
            "--dir-ro",
            &preopen,
            &example_str("fs-read"),
            "--",
            "/data/input.txt",
            outside,
        ]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
        assert!(text.starts_with("read /data/input.txt: inside\n"), "{text}");
        assert!(text.contains(&format!("denied {outside}")), "{text}");
    }
}

#[test]
fn guest_sees_exactly_its_env_and_args_never_the_hosts() {
    let env = Env::new();
    let out = env
        .cmd(&[
            "run",
            "--env",
            "PLAIN=1",
            "--env",
            "TRICKY=a=b \"quoted\"\nsecond line",
            &example_str("env-dump"),
            "--",
            "x y",
            "--flag",
        ])
        .env("VULCAN_HOST_SECRET", "must-not-leak")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        "PLAIN=\"1\"\nTRICKY=\"a=b \\\"quoted\\\"\\nsecond line\"\n\
         argv[0]=env-dump.wasm\nargv[1]=x y\nargv[2]=--flag\n"
    );
}

#[test]
fn stdin_is_passed_to_the_guest_byte_for_byte() {
    let env = Env::new();
    let mut child = env
        .cmd(&["run", &example_str("stdin-echo")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, input);
    assert_eq!(stderr(&out), "echoed 10000 bytes\n");
}

#[test]
fn a_trap_is_never_success() {
    let env = Env::new();
    let module = fixture(env.data_dir(), "unreachable");
    let out = env.run(&["run", module.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(134));
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    let w = env.only_workload();
    assert_eq!(w.status, "failed");
    assert!(w.error.unwrap().contains("wasm backtrace"));
}

#[test]
fn bad_input_is_one_clear_line_exit_2_and_writes_nothing() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("notes.wasm");
    std::fs::write(&not_wasm, "just some text\n").unwrap();
    let hello = std::fs::read(example("hello")).unwrap();
    let truncated = dir.path().join("truncated.wasm");
    std::fs::write(&truncated, &hello[..hello.len() / 3]).unwrap();
    let unknown = wat_file(
        dir.path(),
        "unknown.wasm",
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["run".into(), not_wasm.display().to_string()],
            "not a WebAssembly binary",
        ),
        (
            vec!["run".into(), truncated.display().to_string()],
            "invalid module",
        ),
        (
            vec!["run".into(), "/no/such/module.wasm".into()],
            "cannot read module",
        ),
        (
            vec!["run".into(), unknown.display().to_string()],
            "launch_missiles",
        ),
        (
            vec![
                "run".into(),
                "--timeout".into(),
                "soon".into(),
                example_str("hello"),
            ],
            "not a duration",
        ),
        (
            vec![
                "run".into(),
                "--max-memory".into(),
                "lots".into(),
                example_str("hello"),
            ],
            "not a size",
        ),
        (
            vec![
                "run".into(),
                "--env".into(),
                "NOEQUALS".into(),
                example_str("hello"),
            ],
            "KEY=VALUE",
        ),
        (
            vec![
                "run".into(),
                "--dir".into(),
                "/no/such/dir".into(),
                example_str("hello"),
            ],
            "not a directory",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.run(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    assert!(env.workloads().is_empty(), "bad input created no workload");
}

#[test]
fn version_and_help_explain_themselves() {
    let env = Env::new();
    let out = env.run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).trim(),
        format!("vulcan {}", env!("CARGO_PKG_VERSION"))
    );
    let help = stdout(&env.run(&["help"]));
    for cmd in ["run", "ls", "logs"] {
        assert!(help.contains(cmd), "{help}");
    }
    let run_help = stdout(&env.run(&["run", "--help"]));
    for flag in [
        "--env",
        "--dir",
        "--timeout",
        "--max-memory",
        "--fuel",
        "--max-output",
        "124",
        "134",
    ] {
        assert!(
            run_help.contains(flag),
            "run --help lacks {flag}: {run_help}"
        );
    }
}
