//! The store against a real SQLite file in a temporary directory.

use std::sync::Arc;

use super::*;
use crate::logs::{LogRecord, LogStream};
use crate::workload::{Completion, Limits, Status, WorkloadId};

async fn db_with_module() -> (tempfile::TempDir, Db, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let hash = "sha256:abc".to_owned();
    let info = ModuleInfo {
        hash: hash.clone(),
        kind: "module".into(),
        size: 3,
        created_at: 1,
    };
    assert!(
        db.put_module(info.clone(), Arc::from(&b"abc"[..]))
            .await
            .unwrap()
    );
    assert!(
        !db.put_module(info, Arc::from(&b"abc"[..])).await.unwrap(),
        "stored once"
    );
    (dir, db, hash)
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
