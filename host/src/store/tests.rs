//! The store against a real SQLite file in a temporary directory.

use std::sync::Arc;

use super::*;
use crate::logs::{LogLevel, LogRecord, LogStream};
use crate::workload::{Completion, Limits, Status, WorkloadId};

async fn db_with_module() -> (tempfile::TempDir, Db, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert!(put_module(&db).await);
    assert!(!put_module(&db).await, "stored once");
    (dir, db, MODULE.to_owned())
}

const MODULE: &str = "sha256:abc";

/// Stores the test module; true if it was new.
async fn put_module(db: &Db) -> bool {
    let info = ModuleInfo {
        hash: MODULE.into(),
        kind: "module".into(),
        size: 3,
        created_at: 1,
    };
    db.put_module(info, Arc::from(&b"abc"[..])).await.unwrap()
}

async fn create(db: &Db, hash: &str) -> WorkloadId {
    let id = WorkloadId::new();
    db.create_workload(NewWorkload {
        id,
        module_hash: hash.to_owned(),
        args: vec!["m.wasm".into(), "a b".into()],
        env: vec![("K".into(), "v=\"1\"\n2".into())],
        limits: Limits {
            timeout_ms: Some(5),
            ..Default::default()
        },
    })
    .await
    .unwrap();
    id
}

fn line(id: WorkloadId, seq: u64) -> Arc<LogRecord> {
    Arc::new(LogRecord {
        workload_id: id,
        seq,
        stream: if seq.is_multiple_of(2) {
            LogStream::Stdout
        } else {
            LogStream::Stderr
        },
        level: None,
        line: format!("line {seq}"),
        continued: false,
        ts_ms: 7,
    })
}

fn done(status: Status, lines: u64) -> Completion {
    Completion {
        status,
        exit_code: Some(0),
        error: None,
        output: None,
        duration_ms: 3,
        line_count: lines,
    }
}

#[tokio::test]
async fn create_get_and_lifecycle() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let w = db.workload(id).unwrap();
    assert_eq!(w.status, Status::Pending);
    assert_eq!(w.env, vec![("K".to_owned(), "v=\"1\"\n2".to_owned())]);
    assert_eq!(w.limits.timeout_ms, Some(5));
    assert!(w.started_at.is_none() && w.finished_at.is_none());

    db.mark_running(id).await.unwrap();
    assert!(db.workload(id).unwrap().started_at.is_some());
    db.finish(id, done(Status::Completed, 0)).await.unwrap();
    let w = db.workload(id).unwrap();
    assert_eq!(w.status, Status::Completed);
    assert!(w.finished_at.is_some());
    assert_eq!(w.duration_ms, Some(3));
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let (_dir, db, _) = db_with_module().await;
    let id = WorkloadId::new();
    assert!(matches!(db.workload(id), Err(StoreError::NotFound(x)) if x == id));
    assert!(matches!(
        db.mark_running(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        db.module_info("sha256:nope"),
        Err(StoreError::ModuleNotFound(_))
    ));
}

#[tokio::test]
async fn a_workload_needs_a_stored_module() {
    let (_dir, db, _) = db_with_module().await;
    let err = db
        .create_workload(NewWorkload {
            id: WorkloadId::new(),
            module_hash: "sha256:missing".into(),
            args: vec![],
            env: vec![],
            limits: Limits::default(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ModuleNotFound(_)));
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_terminal_is_final() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let err = db.finish(id, done(Status::Completed, 0)).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::IllegalTransition {
            from: Status::Pending,
            to: Status::Completed,
            ..
        }
    ));
    db.mark_running(id).await.unwrap();
    db.finish(id, done(Status::Killed, 0)).await.unwrap();
    for to in [Status::Completed, Status::Failed, Status::Killed] {
        assert!(matches!(
            db.finish(id, done(to, 0)).await,
            Err(StoreError::IllegalTransition {
                from: Status::Killed,
                ..
            })
        ));
    }
    assert!(db.mark_running(id).await.is_err());
    assert_eq!(db.workload(id).unwrap().status, Status::Killed);
}

#[tokio::test]
async fn list_is_newest_first_with_total_paging_and_filter() {
    let (_dir, db, hash) = db_with_module().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(create(&db, &hash).await);
    }
    db.mark_running(ids[2]).await.unwrap();
    let page = db.list_workloads(3, 0, None).unwrap();
    assert_eq!(page.total, 7);
    let got: Vec<_> = page.items.iter().map(|w| w.id).collect();
    assert_eq!(got, vec![ids[6], ids[5], ids[4]]);
    let page = db.list_workloads(3, 6, None).unwrap();
    assert_eq!(
        page.items.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let running = db.list_workloads(10, 0, Some(Status::Running)).unwrap();
    assert_eq!(running.total, 1);
    assert_eq!(running.items[0].id, ids[2]);
}

#[tokio::test]
async fn batched_lines_are_read_back_in_order_after_a_seq() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let other = create(&db, &hash).await;
    let sink = db.line_sink();
    for seq in 0..10_000 {
        sink.send(line(id, seq));
        if seq < 5 {
            sink.send(line(other, seq));
        }
    }
    db.flush().await;
    let all = db.read_lines(id, None, 100_000).unwrap();
    assert_eq!(all.len(), 10_000);
    assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64));
    assert_eq!(all[1].stream, LogStream::Stderr);
    assert_eq!(all[3].line, "line 3");
    let page = db.read_lines(id, Some(4_999), 3).unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![5000, 5001, 5002]
    );
    assert!(db.read_lines(id, Some(9_999), 10).unwrap().is_empty());
    assert_eq!(db.read_lines(other, None, 100).unwrap().len(), 5);
    assert_eq!(db.lost_lines(), 0);
}

#[tokio::test]
async fn terminal_status_is_committed_after_the_lines_before_it() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink();
    for seq in 0..2_500 {
        sink.send(line(id, seq));
    }
    // No flush: the status write alone must carry every earlier line with it.
    db.finish(id, done(Status::Completed, 2_500)).await.unwrap();
    assert_eq!(db.read_lines(id, None, 10_000).unwrap().len(), 2_500);
}

#[tokio::test]
async fn a_bad_line_batch_does_not_lose_the_status_beside_it() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink();
    sink.send(line(id, 0));
    sink.send(line(id, 0)); // duplicate key: this batch fails
    db.finish(id, done(Status::Completed, 1)).await.unwrap();
    assert_eq!(db.workload(id).unwrap().status, Status::Completed);
    assert_eq!(db.lost_lines(), 2);
}

#[tokio::test]
async fn reopening_is_idempotent_and_keeps_data() {
    let (dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.line_sink().send(line(id, 0));
    db.flush().await;
    drop(db);
    for _ in 0..2 {
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.workload(id).unwrap().id, id);
        assert_eq!(db.read_lines(id, None, 10).unwrap().len(), 1);
        let version: i64 = db
            .with_reader(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(version as usize, SCHEMA_VERSION);
    }
}

#[tokio::test]
async fn fail_unfinished_marks_only_pending_and_running() {
    let (_dir, db, hash) = db_with_module().await;
    let pending = create(&db, &hash).await;
    let running = create(&db, &hash).await;
    let finished = create(&db, &hash).await;
    db.mark_running(running).await.unwrap();
    db.mark_running(finished).await.unwrap();
    db.finish(finished, done(Status::Completed, 0))
        .await
        .unwrap();
    assert_eq!(db.fail_unfinished("server crashed").await.unwrap(), 2);
    for id in [pending, running] {
        let w = db.workload(id).unwrap();
        assert_eq!(w.status, Status::Failed);
        assert_eq!(w.error.as_deref(), Some("server crashed"));
        assert!(w.finished_at.is_some());
    }
    assert_eq!(db.workload(finished).unwrap().status, Status::Completed);
}

#[tokio::test]
async fn lines_of_an_unknown_workload_are_counted_lost_and_spare_the_rest() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let sink = db.line_sink();
    sink.send(line(id, 0));
    sink.send(line(WorkloadId::new(), 0));
    sink.send(line(id, 1));
    db.flush().await;
    assert_eq!(db.read_lines(id, None, 10).unwrap().len(), 2);
    assert_eq!(db.lost_lines(), 1);
}

#[tokio::test]
async fn a_version_1_database_is_migrated_with_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let id = WorkloadId::new();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO workloads (id, status, module_hash, args, env, limits, line_count, created_at) \
             VALUES (?1, 'completed', 'sha256:abc', '[]', '[]', '{}', 3, 1)",
            [id.to_string()],
        )
        .unwrap();
        for (seq, stream) in ["stdout", "stderr", "log"].iter().enumerate() {
            conn.execute(
                "INSERT INTO log_lines (workload_id, seq, stream, level, line, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                params![
                    id.to_string(),
                    seq as i64,
                    stream,
                    (*stream == "log").then_some("warn"),
                    format!("old {seq}")
                ],
            )
            .unwrap();
        }
    }
    let db = Db::open(dir.path()).unwrap();
    let lines = db.read_lines(id, None, 10).unwrap();
    let got: Vec<_> = lines
        .iter()
        .map(|r| (r.seq, r.stream, r.level, r.line.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (0, LogStream::Stdout, None, "old 0"),
            (1, LogStream::Stderr, None, "old 1"),
            (2, LogStream::Log, Some(LogLevel::Warn), "old 2"),
        ]
    );
    assert_eq!(db.workload(id).unwrap().line_count, 3);
    // The old shape stays readable as a view.
    let streams: Vec<String> = db
        .with_reader(|c| {
            let mut stmt =
                c.prepare("SELECT stream FROM log_lines WHERE workload_id = ?1 ORDER BY seq")?;
            let rows = stmt.query_map([id.to_string()], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .unwrap();
    assert_eq!(streams, ["stdout", "stderr", "log"]);

    // A workload created afterwards gets its own key: old lines stay with theirs.
    put_module(&db).await;
    let new = create(&db, MODULE).await;
    db.line_sink().send(line(new, 0));
    db.flush().await;
    assert_eq!(db.read_lines(new, None, 10).unwrap().len(), 1);
    assert_eq!(db.read_lines(id, None, 10).unwrap().len(), 3);
}

#[tokio::test]
async fn a_full_batch_commits_without_waiting_for_linger() {
    let dir = tempfile::tempdir().unwrap();
    let batch = BatchConfig {
        max_batch: 4,
        linger: Duration::from_secs(3600),
    };
    let db = Db::open_with(dir.path(), batch).unwrap();
    put_module(&db).await;
    let id = create(&db, MODULE).await;
    let sink = db.line_sink();
    for seq in 0..4 {
        sink.send(line(id, seq));
    }
    // A full batch: committed with no op and no flush.
    while db.read_lines(id, None, 10).unwrap().len() < 4 {
        tokio::task::yield_now().await;
    }
    // A lone line waits for its (hour-long) linger, or for an op such as a flush.
    sink.send(line(id, 4));
    assert_eq!(db.read_lines(id, None, 10).unwrap().len(), 4);
    db.flush().await;
    assert_eq!(db.read_lines(id, None, 10).unwrap().len(), 5);
}
