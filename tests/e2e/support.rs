//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use vulcan_test_artifacts::example;

/// A temporary data directory and a way to run `vulcan` against it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `vulcan --data-dir <tmp> <args>`, with a scrubbed, known environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vulcan"));
        cmd.arg("--data-dir").arg(self.data_dir()).args(args);
        cmd.env_remove("VULCAN_DATA_DIR").env_remove("VULCAN_LOG");
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("failed to spawn vulcan")
    }

    /// Opens the database file directly, as an independent reader.
    pub fn sqlite(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data_dir().join("vulcan.db")).unwrap()
    }

    /// Every workload row: (id, status, exit_code, error, line_count, finished_at).
    pub fn workloads(&self) -> Vec<WorkloadRow> {
        if !self.data_dir().join("vulcan.db").exists() {
            return Vec::new();
        }
        let conn = self.sqlite();
        let mut stmt = conn
            .prepare(
                "SELECT id, status, exit_code, error, line_count, finished_at, duration_ms \
                 FROM workloads ORDER BY id",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok(WorkloadRow {
                id: r.get(0)?,
                status: r.get(1)?,
                exit_code: r.get(2)?,
                error: r.get(3)?,
                line_count: r.get(4)?,
                finished_at: r.get(5)?,
                duration_ms: r.get(6)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// The only workload row; panics unless there is exactly one.
    pub fn only_workload(&self) -> WorkloadRow {
        let mut rows = self.workloads();
        assert_eq!(rows.len(), 1, "expected exactly one workload: {rows:?}");
        rows.remove(0)
    }

    /// (seq, stream, line, continued) of a workload, in seq order.
    pub fn lines(&self, id: &str) -> Vec<(i64, String, String, bool)> {
        let conn = self.sqlite();
        let mut stmt = conn
            .prepare(
                "SELECT seq, stream, line, continued FROM log_lines \
                 WHERE workload_id = ?1 ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadRow {
    pub id: String,
    pub status: String,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub line_count: i64,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
}

pub fn example_str(name: &str) -> String {
    example(name).to_str().unwrap().to_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `wat` compiled to a `.wasm` file in `dir`.
pub fn wat_file(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path
}
