//! The store against a real SQLite file in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use super::write_sql::WorkloadKeys;
use super::writer::Writer;
use super::*;
use crate::logs::{LineSink, LogLevel, LogRecord, LogStream};
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
    db.put_module(info, bytes::Bytes::from_static(b"abc"))
        .await
        .unwrap()
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
        allowed_hosts: vec!["http://127.0.0.1:8080".parse().unwrap()],
        log_level: Some(LogLevel::Warn),
        running: false,
        queued: None,
        idempotency: None,
        schedule: None,
        tenant: None,
        retry: None,
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
        fields: Default::default(),
    })
}

fn done(status: Status, lines: u64) -> Completion {
    Completion {
        status,
        exit_code: Some(0),
        error: None,
        failure: None,
        output: None,
        duration_ms: 3,
        line_count: lines,
    }
}

#[tokio::test]
async fn create_get_and_lifecycle() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let w = db.workload(id).await.unwrap();
    assert_eq!(w.status, Status::Pending);
    assert_eq!(w.env, vec![("K".to_owned(), "v=\"1\"\n2".to_owned())]);
    assert_eq!(w.limits.timeout_ms, Some(5));
    assert_eq!(
        w.allowed_hosts,
        vec!["http://127.0.0.1:8080".parse().unwrap()]
    );
    assert_eq!(w.log_level, Some(LogLevel::Warn));
    assert!(w.started_at.is_none() && w.finished_at.is_none());

    db.mark_running(id).await.unwrap();
    assert!(db.workload(id).await.unwrap().started_at.is_some());
    db.finish(id, done(Status::Completed, 0)).await.unwrap();
    let w = db.workload(id).await.unwrap();
    assert_eq!(w.status, Status::Completed);
    assert!(w.finished_at.is_some());
    assert_eq!(w.duration_ms, Some(3));
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let (_dir, db, _) = db_with_module().await;
    let id = WorkloadId::new();
    assert!(matches!(db.workload(id).await, Err(StoreError::NotFound(x)) if x == id));
    assert!(matches!(
        db.mark_running(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        db.module_info("sha256:nope").await,
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
            allowed_hosts: vec![],
            log_level: None,
            running: false,
            queued: None,
            idempotency: None,
            schedule: None,
            tenant: None,
            retry: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ModuleNotFound(_)));
}

#[tokio::test]
async fn a_module_is_owned_only_by_the_tenants_that_uploaded_it() {
    let (dir, db, hash) = db_with_module().await;
    let not_owned = |r: StoreResult<()>| matches!(r, Err(StoreError::ModuleNotFound(_)));
    assert!(
        not_owned(db.check_owned("a", &hash).await),
        "nobody owns it yet"
    );
    assert!(db.own_module("a", &hash).await.unwrap());
    db.check_owned("a", &hash).await.unwrap();
    db.check_owned("a", &hash).await.unwrap();
    assert!(not_owned(db.check_owned("b", &hash).await), "a's, not b's");
    assert!(not_owned(db.check_owned("a", "sha256:other").await));
    // Ownership found by a read (after a restart) is as good as one recorded.
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    db.check_owned("a", &hash).await.unwrap();
    assert!(not_owned(db.check_owned("b", &hash).await));
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
    assert_eq!(db.workload(id).await.unwrap().status, Status::Killed);
}

#[tokio::test]
async fn list_is_newest_first_with_total_paging_and_filter() {
    let (_dir, db, hash) = db_with_module().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(create(&db, &hash).await);
    }
    db.mark_running(ids[2]).await.unwrap();
    let page = db
        .list_workloads(&crate::workload::ListRequest::page(3, 0))
        .await
        .unwrap();
    assert_eq!(page.total, 7);
    let got: Vec<_> = page.items.iter().map(|w| w.id).collect();
    assert_eq!(got, vec![ids[6], ids[5], ids[4]]);
    let page = db
        .list_workloads(&crate::workload::ListRequest::page(3, 6))
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let running = db
        .list_workloads(&crate::workload::ListRequest {
            status: Some(Status::Running),
            ..crate::workload::ListRequest::page(10, 0)
        })
        .await
        .unwrap();
    assert_eq!(running.total, 1);
    assert_eq!(running.items[0].id, ids[2]);
}

#[tokio::test]
async fn batched_lines_are_read_back_in_order_after_a_seq() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let other = create(&db, &hash).await;
    let (sink, other_sink) = (
        db.line_sink(id, None).unwrap(),
        db.line_sink(other, None).unwrap(),
    );
    for seq in 0..10_000 {
        sink.send(line(id, seq));
        if seq < 5 {
            other_sink.send(line(other, seq));
        }
    }
    db.flush().await;
    let all = db.read_lines(id, None, 100_000).await.unwrap();
    assert_eq!(all.len(), 10_000);
    assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64));
    assert_eq!(all[1].stream, LogStream::Stderr);
    assert_eq!(all[3].line, "line 3");
    let page = db.read_lines(id, Some(4_999), 3).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![5000, 5001, 5002]
    );
    assert!(db.read_lines(id, Some(9_999), 10).await.unwrap().is_empty());
    assert_eq!(db.read_lines(other, None, 100).await.unwrap().len(), 5);
    assert_eq!(db.lost_lines(), 0);
}

#[tokio::test]
async fn a_log_record_keeps_its_level_and_fields_in_order() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let sink = db.line_sink(id, None).unwrap();
    let mut r = (*line(id, 0)).clone();
    (r.stream, r.level) = (LogStream::Log, Some(LogLevel::Info));
    r.fields = crate::logs::Fields(vec![
        ("zeta".into(), "1".into()),
        ("alpha".into(), "two words".into()),
    ]);
    sink.send(Arc::new(r.clone()));
    sink.send(line(id, 1));
    db.flush().await;
    let stored = db.read_lines(id, None, 10).await.unwrap();
    assert_eq!(stored[0], r);
    assert!(stored[1].fields.is_empty());
    // Counted as the store holds them: the text and the fields' JSON (the
    // sum the migration of an older database takes).
    let held: i64 = db
        .with_reader(|c| {
            Ok(c.query_row(
                "SELECT SUM(length(CAST(line AS BLOB)) + COALESCE(length(CAST(fields AS BLOB)), 0)) \
                 FROM log_records",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(db.log_bytes(None), held as u64);
    assert!(held > 2 * "line 0".len() as i64, "fields counted");
}

#[tokio::test]
async fn terminal_status_is_committed_after_the_lines_before_it() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..2_500 {
        sink.send(line(id, seq));
    }
    // No flush: the status write alone must carry every earlier line with it.
    db.finish(id, done(Status::Completed, 2_500)).await.unwrap();
    assert_eq!(db.read_lines(id, None, 10_000).await.unwrap().len(), 2_500);
}

fn new_running(id: WorkloadId, hash: &str) -> NewWorkload {
    NewWorkload {
        id,
        module_hash: hash.to_owned(),
        args: vec![],
        env: vec![],
        limits: Limits::default(),
        allowed_hosts: vec![],
        log_level: None,
        running: true,
        queued: None,
        idempotency: None,
        schedule: None,
        tenant: None,
        retry: None,
    }
}

/// Lines sent while a workload's creation has not committed wait for it,
/// even while other workloads' lines are being committed around it: none
/// is lost, and its end is committed after every one of them.
#[tokio::test]
async fn lines_sent_before_their_workloads_creation_commits_are_all_stored() {
    let (_dir, db, hash) = db_with_module().await;
    // Another workload keeps the writer busy committing lines meanwhile.
    let busy = create(&db, &hash).await;
    db.mark_running(busy).await.unwrap();
    let busy_sink = db.line_sink(busy, None).unwrap();
    let mut ids = Vec::new();
    for round in 0..50u64 {
        for seq in 0..100 {
            busy_sink.send(line(busy, round * 100 + seq));
        }
        let id = WorkloadId::new();
        let (lane, created) = db
            .create_workload_with_lane(new_running(id, &hash), None, Haste::Now)
            .unwrap();
        for seq in 0..30 {
            lane.send(line(id, seq));
        }
        // Its end is sent before its creation is known to have committed.
        let finished = db.finish(id, done(Status::Completed, 30));
        let (created, finished) = tokio::join!(created, finished);
        created.unwrap();
        assert_eq!(finished.unwrap().status, Status::Completed);
        ids.push(id);
    }
    for id in ids {
        let lines = db.read_lines(id, None, 100).await.unwrap();
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            (0..30).collect::<Vec<_>>()
        );
    }
    assert_eq!(db.lost_lines(), 0);
}

/// Creations and ends that nobody waits on (a cluster node's own copies)
/// wait for the linger and share one commit, here the one a prompt op
/// makes; each still carries its lines and answers its record.
#[tokio::test]
async fn lingering_creations_and_ends_share_the_next_commit() {
    use futures_util::FutureExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = WriterConfig {
        linger: Duration::from_secs(3600),
        ..WriterConfig::default()
    };
    let db = Db::open_with(dir.path(), config).unwrap();
    put_module(&db).await;
    let commits = db.commits();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let id = WorkloadId::new();
        let (lane, created) = db
            .create_workload_with_lane(new_running(id, MODULE), None, Haste::Linger)
            .unwrap();
        lane.send(line(id, 0));
        lane.send(line(id, 1));
        let mut ended = Box::pin(db.finish_with(id, done(Status::Completed, 2), Haste::Linger));
        // Sent, and not committed: the linger is an hour.
        assert!((&mut ended).now_or_never().is_none());
        runs.push((id, created, ended));
    }
    assert_eq!(db.commits(), commits, "nothing committed while they linger");
    // A prompt op commits at once, and takes them along.
    let prompt = create(&db, MODULE).await;
    assert_eq!(db.commits(), commits + 1);
    for (id, created, ended) in runs {
        created.await.unwrap();
        let record = ended.await.unwrap();
        assert_eq!((record.status, record.line_count), (Status::Completed, 2));
        assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 2);
    }
    assert_eq!(db.commits(), commits + 1);
    assert_eq!(db.workload(prompt).await.unwrap().status, Status::Pending);
}

/// A lingering op with the default linger commits on its own, with no
/// other op to take it along.
#[tokio::test]
async fn a_lingering_end_commits_within_the_linger_on_its_own() {
    let (_dir, db, hash) = db_with_module().await;
    let id = WorkloadId::new();
    let (lane, created) = db
        .create_workload_with_lane(new_running(id, &hash), None, Haste::Linger)
        .unwrap();
    lane.send(line(id, 0));
    let ended = db.finish_with(id, done(Status::Killed, 1), Haste::Linger);
    let (created, ended) = tokio::join!(created, ended);
    created.unwrap();
    assert_eq!(ended.unwrap().status, Status::Killed);
    assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 1);
}

/// A creation that fails (here: its module is not stored) takes nothing
/// with it: the lines that waited for it are dropped with the lane and
/// counted lost, and the writer goes on.
#[tokio::test]
async fn a_failed_creation_drops_the_lines_that_waited_for_it() {
    let (_dir, db, hash) = db_with_module().await;
    let id = WorkloadId::new();
    let (lane, created) = db
        .create_workload_with_lane(new_running(id, "sha256:missing"), None, Haste::Now)
        .unwrap();
    lane.send(line(id, 0));
    let refused = created.await;
    assert!(
        matches!(refused, Err(StoreError::ModuleNotFound(_))),
        "{refused:?}"
    );
    db.drop_lines(id);
    assert!(matches!(
        db.workload(id).await,
        Err(StoreError::NotFound(_))
    ));
    let other = create(&db, &hash).await;
    db.mark_running(other).await.unwrap();
    db.line_sink(other, None).unwrap().send(line(other, 0));
    db.finish(other, done(Status::Completed, 1)).await.unwrap();
    assert_eq!(db.read_lines(other, None, 10).await.unwrap().len(), 1);
    assert_eq!(
        db.lost_lines(),
        1,
        "the line that waited for the failed creation"
    );
}

#[tokio::test]
async fn a_line_batch_that_cannot_be_stored_fails_its_workload_not_the_others() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let bystander = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    sink.send(line(id, 0));
    sink.send(line(id, 0)); // duplicate key: this batch fails
    // The status write goes through, but it cannot say `completed`.
    db.finish(id, done(Status::Completed, 1)).await.unwrap();
    let w = db.workload(id).await.unwrap();
    assert_eq!(w.status, Status::Failed);
    assert_eq!(w.failure, Some(crate::workload::FailureKind::Store));
    assert!(w.error.unwrap().contains("UNIQUE"), "the error says why");
    assert_eq!(db.lost_lines(), 2);
    assert!(sink.failure().is_some(), "the guest's sink reports it too");
    // Another workload's lines and status are unaffected.
    db.mark_running(bystander).await.unwrap();
    db.line_sink(bystander, None)
        .unwrap()
        .send(line(bystander, 0));
    db.finish(bystander, done(Status::Completed, 1))
        .await
        .unwrap();
    assert_eq!(
        db.workload(bystander).await.unwrap().status,
        Status::Completed
    );
    assert_eq!(db.read_lines(bystander, None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn reopening_is_idempotent_and_keeps_data() {
    let (dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.line_sink(id, None).unwrap().send(line(id, 0));
    db.flush().await;
    drop(db);
    for _ in 0..2 {
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.workload(id).await.unwrap().id, id);
        assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 1);
        let version: i64 = db
            .with_reader(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(version as usize, SCHEMA_VERSION);
    }
}

#[tokio::test]
async fn stored_log_bytes_follow_inserts_and_prunes_and_survive_reopening() {
    let (dir, db, hash) = db_with_module().await;
    let (a, b) = (create(&db, &hash).await, create(&db, &hash).await);
    for id in [a, b] {
        let sink = db.line_sink(id, None).unwrap();
        for seq in 0..10 {
            sink.send(line(id, seq));
        }
    }
    db.flush().await;
    // "line 0" … "line 9", twice.
    assert_eq!(db.log_bytes(None), 120);
    assert_eq!(db.log_bytes(Some("alice")), 0);
    db.mark_running(a).await.unwrap();
    db.finish(a, done(Status::Completed, 10)).await.unwrap();
    // Only a finished workload goes; b has not ended.
    while db
        .prune_step(PruneScope::AllBut(Vec::new()), i64::MAX, 4)
        .await
        .unwrap()
        > 0
    {}
    assert_eq!(db.log_bytes(None), 60);
    assert_eq!(db.log_bytes_total(), 60);
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.log_bytes(None), 60, "summed again from the records");
    assert_eq!(db.read_lines(b, None, 20).await.unwrap().len(), 10);
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
        let w = db.workload(id).await.unwrap();
        assert_eq!(w.status, Status::Failed);
        assert_eq!(w.error.as_deref(), Some("server crashed"));
        assert_eq!(w.failure, Some(crate::workload::FailureKind::Host));
        assert!(w.finished_at.is_some());
    }
    assert_eq!(
        db.workload(finished).await.unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn lines_of_an_unknown_workload_are_counted_lost_and_spare_the_rest() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let unknown = WorkloadId::new();
    let sink = db.line_sink(id, None).unwrap();
    sink.send(line(id, 0));
    db.line_sink(unknown, None).unwrap().send(line(unknown, 0));
    sink.send(line(id, 1));
    db.flush().await;
    assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 2);
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
                rusqlite::params![
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
    let lines = db.read_lines(id, None, 10).await.unwrap();
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
    assert_eq!(db.workload(id).await.unwrap().line_count, 3);
    assert_eq!(
        db.log_bytes(None),
        3 * "old 0".len() as u64,
        "bytes counted"
    );
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
    db.line_sink(new, None).unwrap().send(line(new, 0));
    db.flush().await;
    assert_eq!(db.read_lines(new, None, 10).await.unwrap().len(), 1);
    assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_full_batch_commits_without_waiting_for_linger() {
    let dir = tempfile::tempdir().unwrap();
    let config = WriterConfig {
        max_batch: 4,
        linger: Duration::from_secs(3600),
        ..WriterConfig::default()
    };
    let db = Db::open_with(dir.path(), config).unwrap();
    put_module(&db).await;
    let id = create(&db, MODULE).await;
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..4 {
        sink.send(line(id, seq));
    }
    // A full batch: committed with no op and no flush.
    wait_until("a full batch is committed", async || {
        db.read_lines(id, None, 10).await.unwrap().len() == 4
    })
    .await;
    // A lone line waits for its (hour-long) linger, or for an op such as a flush.
    sink.send(line(id, 4));
    assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 4);
    db.flush().await;
    assert_eq!(db.read_lines(id, None, 10).await.unwrap().len(), 5);
}

/// Polls `done` until it holds; fails the test after 30 s rather than hang.
async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn recovery_takes_line_count_and_end_time_from_the_stored_lines() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let started = db.workload(id).await.unwrap().started_at.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..3 {
        let mut l = (*line(id, seq)).clone();
        l.ts_ms = started + 1_000 * (seq as i64 + 1);
        sink.send(Arc::new(l));
    }
    db.flush().await;
    // As a crash leaves it: lines stored, status still running.
    assert_eq!(db.fail_unfinished("crashed").await.unwrap(), 1);
    let w = db.workload(id).await.unwrap();
    assert_eq!(w.line_count, 3);
    assert_eq!(
        w.finished_at,
        Some(started + 3_000),
        "the last line's time, not the restart's"
    );
    assert_eq!(w.duration_ms, Some(3_000));
}

#[tokio::test]
async fn a_full_lane_makes_its_guest_wait_until_the_writer_commits() {
    use futures_util::FutureExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = WriterConfig {
        linger: Duration::from_secs(3600),
        max_batch: 1_000_000,
        lane_bytes: 10 * (LINE_OVERHEAD + 6),
        ..WriterConfig::default()
    };
    let db = Db::open_with(dir.path(), config).unwrap();
    put_module(&db).await;
    let (a, b) = (create(&db, MODULE).await, create(&db, MODULE).await);
    let (sink_a, sink_b) = (
        db.line_sink(a, None).unwrap(),
        db.line_sink(b, None).unwrap(),
    );
    for seq in 0..10 {
        assert!(sink_a.has_room(), "room for line {seq}");
        sink_a.send(line(a, seq));
    }
    assert!(!sink_a.has_room(), "ten lines fill the lane");
    assert!(sink_a.room().now_or_never().is_none(), "its guest waits");
    assert!(sink_b.has_room(), "another workload's lane is not affected");
    // The commit gives the room back and wakes the waiting guest.
    let waiting = tokio::spawn(async move { sink_a.room().await });
    db.flush().await;
    waiting.await.unwrap();
    assert_eq!(db.read_lines(a, None, 100).await.unwrap().len(), 10);
}

#[tokio::test]
async fn a_commit_takes_a_fair_share_of_each_lane() {
    let queue = Arc::new(queue::LineQueue::new(usize::MAX / 4, usize::MAX / 4, 1_000));
    let (tx, _rx) = mpsc::channel();
    let (a, b) = (WorkloadId::new(), WorkloadId::new());
    let flood = LineLane::new(a, None, Arc::clone(&queue), tx.clone(), false);
    let quiet = LineLane::new(b, None, Arc::clone(&queue), tx, false);
    for seq in 0..10_000 {
        flood.send(line(a, seq));
    }
    quiet.send(line(b, 0));
    let mut taken = queue::Taken::default();
    queue.take_fair(1_000, &mut taken);
    let count = |id| {
        taken
            .lanes
            .iter()
            .filter(|l| l.workload == id)
            .map(|l| l.lines.len())
            .sum::<usize>()
    };
    assert_eq!(
        count(b),
        1,
        "the quiet workload's line goes in the next commit"
    );
    assert!(
        count(a) <= 1_000,
        "the flood gets a share, not its backlog: {}",
        count(a)
    );
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_storage_full_and_recovers_when_space_returns() {
    let (_dir, db, hash) = db_with_module().await;
    let flooder = create(&db, &hash).await;
    db.mark_running(flooder).await.unwrap();
    let pages: i64 = db
        .with_reader(|c| Ok(c.query_row("PRAGMA page_count", [], |r| r.get(0))?))
        .unwrap();
    db.set_page_limit(Some(pages as u64)).await;

    // Lines that need new pages cannot be stored: the workload fails, never completes.
    let sink = db.line_sink(flooder, None).unwrap();
    for seq in 0..2_000 {
        let mut l = (*line(flooder, seq)).clone();
        l.line = "x".repeat(1_000);
        sink.send(Arc::new(l));
    }
    let finished = db.finish(flooder, done(Status::Completed, 2_000)).await;
    assert!(
        sink.failure().unwrap().contains("full"),
        "{:?}",
        sink.failure()
    );
    // New workloads are refused with a typed error while the disk is full.
    let mut refused = None;
    for _ in 0..1_000 {
        let new = NewWorkload {
            id: WorkloadId::new(),
            module_hash: hash.clone(),
            args: vec!["a".repeat(4_000)],
            env: vec![],
            limits: Limits::default(),
            allowed_hosts: vec![],
            log_level: None,
            running: false,
            queued: None,
            idempotency: None,
            schedule: None,
            tenant: None,
            retry: None,
        };
        if let Err(e) = db.create_workload(new).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("a full database refuses new workloads");
    assert!(matches!(refused, StoreError::StorageFull(_)), "{refused:?}");

    // Space returns: writes work again, and the flooder's end is on record
    // (written at once, or retried by the writer until it could be).
    db.set_page_limit(None).await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    db.finish(id, done(Status::Completed, 0)).await.unwrap();
    wait_until("the flooder's end is recorded", async || {
        db.workload(flooder).await.unwrap().status.is_terminal()
    })
    .await;
    let w = db.workload(flooder).await.unwrap();
    assert_eq!(w.status, Status::Failed, "finish answered {finished:?}");
    assert_eq!(w.failure, Some(crate::workload::FailureKind::Store));
    assert!(w.error.unwrap().contains("full"));
}

#[tokio::test]
async fn a_busy_database_is_retried_until_the_lock_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let config = WriterConfig {
        busy_timeout: Duration::from_millis(10),
        ..WriterConfig::default()
    };
    let db = Db::open_with(dir.path(), config).unwrap();
    put_module(&db).await;
    // Another connection holds the write lock.
    let other = Connection::open(dir.path().join(DB_FILE)).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let creating = tokio::spawn({
        let db = db.clone();
        async move { create(&db, MODULE).await }
    });
    wait_until("the writer met the held lock", async || {
        db.busy_retries() > 0
    })
    .await;
    assert!(!creating.is_finished(), "still waiting, not failed");
    other.execute_batch("COMMIT").unwrap();
    let id = creating.await.unwrap();
    assert_eq!(db.workload(id).await.unwrap().status, Status::Pending);
}

#[tokio::test]
async fn a_second_owner_of_the_data_directory_is_refused_but_readers_are_not() {
    let (dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let err = Db::open(dir.path())
        .err()
        .expect("a second owner is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains("--server"), "{message}");
    let reader = Db::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.workload(id).await.unwrap().id, id);
    drop(db);
    Db::open(dir.path()).expect("free again once the owner is gone");
}

#[tokio::test]
async fn the_wal_is_checkpointed_by_its_own_thread() {
    let (dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let sink = db.line_sink(id, None).unwrap();
    let file = dir.path().join(super::DB_FILE);
    let before = std::fs::metadata(&file).unwrap().len();
    // About 10 MB of lines: well past the checkpoint threshold.
    for seq in 0..10_000 {
        let mut r = (*line(id, seq)).clone();
        r.line = "x".repeat(1_000);
        sink.send(Arc::new(r));
    }
    db.flush().await;
    // Commits never checkpoint (the hook replaced SQLite's automatic one), so
    // the database file grows only when the checkpoint thread copies the WAL in.
    wait_until("the lines reach the database file", async || {
        std::fs::metadata(&file).unwrap().len() > before + 4_000_000
    })
    .await;
    let last = db.read_lines(id, Some(9_998), 10).await.unwrap();
    assert_eq!(last.iter().map(|r| r.seq).collect::<Vec<_>>(), [9_999]);
}

#[tokio::test]
async fn a_page_of_long_lines_stops_at_its_byte_bound() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    let sink = db.line_sink(id, None).unwrap();
    // 64 KiB lines: 200 of them are about 13 MB.
    for seq in 0..200 {
        let mut r = (*line(id, seq)).clone();
        r.line = "y".repeat(64 * 1024);
        sink.send(Arc::new(r));
    }
    db.flush().await;
    let page = db.read_lines(id, None, 1_000).await.unwrap();
    let bytes: usize = page.iter().map(|r| r.line.len()).sum();
    assert!(page.len() < 200 && !page.is_empty(), "{} lines", page.len());
    assert!(bytes <= super::PAGE_BYTES + 64 * 1024, "{bytes} bytes");
    // Paging by the last seq still reaches every line.
    let mut seen = page.len();
    let mut after = page.last().map(|r| r.seq);
    loop {
        let next = db.read_lines(id, after, 1_000).await.unwrap();
        if next.is_empty() {
            break;
        }
        seen += next.len();
        after = next.last().map(|r| r.seq);
    }
    assert_eq!(seen, 200);
}

#[test]
fn a_terminal_status_behind_a_backlog_lets_other_ops_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, queue) = writer_on_its_own(dir.path());
    let (a, b) = (new_workload(true), new_workload(false));
    let (a_id, b_id) = (a.id, b.id);
    let (created, _) = tokio::sync::oneshot::channel();
    let mut pending = vec![WriteOp::Create {
        new: a,
        reply: created,
        haste: Haste::Now,
    }];
    writer.commit(&mut pending, false);
    assert!(pending.is_empty());

    // A ends with 20,000 lines still queued; B is created meanwhile.
    let (wake, _) = mpsc::channel();
    let lane = LineLane::new(a_id, None, Arc::clone(&queue), wake, false);
    for seq in 0..20_000 {
        lane.send(line(a_id, seq));
    }
    let (finished, mut finished_rx) = tokio::sync::oneshot::channel();
    let (created, mut created_rx) = tokio::sync::oneshot::channel();
    pending = vec![
        WriteOp::Transition {
            id: a_id,
            to: Status::Completed,
            completion: Some(done(Status::Completed, 20_000)),
            reply: Some(finished),
            haste: Haste::Now,
            retry: None,
        },
        WriteOp::Create {
            new: b,
            reply: created,
            haste: Haste::Now,
        },
    ];
    writer.commit(&mut pending, false);
    assert!(matches!(created_rx.try_recv(), Ok(Ok(()))), "B went first");
    assert!(finished_rx.try_recv().is_err(), "A waits for its lines");
    assert_eq!(pending.len(), 1);
    let backlog = queue.lane_len(a_id);
    assert!(backlog > 0);

    // While another op waits, a commit of A's lines takes one chunk only, so
    // that op is not held behind thousands of lines.
    writer.stats.ops_waiting.store(1, Ordering::Release);
    writer.commit(&mut pending, false);
    assert_eq!(queue.lane_len(a_id), backlog - LINES_PER_CHUNK);
    writer.stats.ops_waiting.store(0, Ordering::Release);

    let mut commits = 0;
    while !pending.is_empty() {
        writer.commit(&mut pending, false);
        commits += 1;
        assert!(commits < 100, "the backlog drains");
    }
    let record = finished_rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(
        (record.status, record.line_count),
        (Status::Completed, 20_000)
    );
    let stored: i64 = writer
        .conn
        .query_row("SELECT COUNT(*) FROM log_lines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 20_000, "every line before the end");
    let b_status: String = writer
        .conn
        .query_row(
            "SELECT status FROM workloads WHERE id = ?1",
            [b_id.to_string()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(b_status, "pending");
}

#[test]
fn ops_that_arrive_during_a_transaction_of_lines_join_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, queue) = writer_on_its_own(dir.path());
    let (flooder, short, late) = (new_workload(true), new_workload(true), new_workload(false));
    let (flooder_id, short_id, late_id) = (flooder.id, short.id, late.id);
    // A sync run whose guest started before its creation committed: its
    // lines wait for it, and its creation and end arrive together.
    let quick = new_workload(true);
    let quick_id = quick.id;
    let mut pending = Vec::new();
    for new in [flooder, short] {
        let (reply, _) = tokio::sync::oneshot::channel();
        pending.push(WriteOp::Create {
            new,
            reply,
            haste: Haste::Now,
        });
    }
    writer.commit(&mut pending, false);
    assert!(pending.is_empty());

    // A flood of lines, and a short run's three.
    let (wake, _) = mpsc::channel();
    let flood = LineLane::new(flooder_id, None, Arc::clone(&queue), wake.clone(), false);
    for seq in 0..2_000 {
        flood.send(line(flooder_id, seq));
    }
    let few = LineLane::new(short_id, None, Arc::clone(&queue), wake.clone(), false);
    for seq in 0..3 {
        few.send(line(short_id, seq));
    }
    let held = LineLane::new(quick_id, None, Arc::clone(&queue), wake, true);
    for seq in 0..300 {
        held.send(line(quick_id, seq));
    }
    // While the writer is at it, three ops arrive: a creation, the short
    // run's end, and the flooder's end (behind its backlog).
    let (inbox_tx, inbox) = mpsc::channel();
    writer.joining.inbox = Some(inbox);
    let send = |op| {
        writer.stats.ops_waiting.fetch_add(1, Ordering::AcqRel);
        inbox_tx.send(op).unwrap();
    };
    let (created, mut created_rx) = tokio::sync::oneshot::channel();
    send(WriteOp::Create {
        new: late,
        reply: created,
        haste: Haste::Now,
    });
    let (short_end, mut short_end_rx) = tokio::sync::oneshot::channel();
    send(WriteOp::Transition {
        id: short_id,
        to: Status::Completed,
        completion: Some(done(Status::Completed, 3)),
        reply: Some(short_end),
        haste: Haste::Now,
        retry: None,
    });
    let (quick_created, mut quick_created_rx) = tokio::sync::oneshot::channel();
    send(WriteOp::Create {
        new: quick,
        reply: quick_created,
        haste: Haste::Now,
    });
    let (quick_end, mut quick_end_rx) = tokio::sync::oneshot::channel();
    send(WriteOp::Transition {
        id: quick_id,
        to: Status::Completed,
        completion: Some(done(Status::Completed, 300)),
        reply: Some(quick_end),
        haste: Haste::Now,
        retry: None,
    });
    let (flood_end, mut flood_end_rx) = tokio::sync::oneshot::channel();
    send(WriteOp::Transition {
        id: flooder_id,
        to: Status::Completed,
        completion: Some(done(Status::Completed, 2_000)),
        reply: Some(flood_end),
        haste: Haste::Now,
        retry: None,
    });
    let commits = writer.stats.commits.load(Ordering::Relaxed);
    writer.commit(&mut pending, false);

    // One commit: a chunk of lines, the creation, and the short run's end
    // after its lines; the flooder's end waits for a commit of its own.
    assert_eq!(writer.stats.commits.load(Ordering::Relaxed), commits + 1);
    assert_eq!(writer.stats.ops_waiting.load(Ordering::Acquire), 0);
    assert!(matches!(created_rx.try_recv(), Ok(Ok(()))));
    let short_record = short_end_rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(
        (short_record.status, short_record.line_count),
        (Status::Completed, 3)
    );
    assert!(matches!(quick_created_rx.try_recv(), Ok(Ok(()))));
    let quick_record = quick_end_rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(quick_record.line_count, 300);
    assert!(flood_end_rx.try_recv().is_err(), "the flooder's end waits");
    assert_eq!(pending.len(), 1);
    let count = |conn: &Connection, id: WorkloadId| -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM log_lines WHERE workload_id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        count(&writer.conn, short_id),
        3,
        "the short run's lines before its end"
    );
    assert_eq!(
        count(&writer.conn, quick_id),
        300,
        "every line of a run created and ended in that commit"
    );
    let flooded = count(&writer.conn, flooder_id);
    assert!(flooded < 2_000, "one chunk, not the whole flood: {flooded}");
    let late_status: String = writer
        .conn
        .query_row(
            "SELECT status FROM workloads WHERE id = ?1",
            [late_id.to_string()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(late_status, "pending");

    let mut rounds = 0;
    while !pending.is_empty() {
        writer.commit(&mut pending, false);
        rounds += 1;
        assert!(rounds < 1_000, "the backlog drains");
    }
    let record = flood_end_rx.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(record.line_count, 2_000);
    assert_eq!(
        count(&writer.conn, flooder_id),
        2_000,
        "every line before the end"
    );
}

/// A workload of the test module, created running or pending.
fn new_workload(running: bool) -> NewWorkload {
    NewWorkload {
        id: WorkloadId::new(),
        module_hash: MODULE.into(),
        args: Vec::new(),
        env: Vec::new(),
        limits: Limits::default(),
        allowed_hosts: Vec::new(),
        log_level: None,
        running,
        queued: None,
        idempotency: None,
        schedule: None,
        tenant: None,
        retry: None,
    }
}

/// A writer driven by hand (no thread), on a fresh database in `dir` that
/// holds the test module, and its line queue.
fn writer_on_its_own(dir: &std::path::Path) -> (Writer, Arc<LineQueue>) {
    let mut conn = Connection::open(dir.join(DB_FILE)).unwrap();
    schema::migrate(&mut conn).unwrap();
    let queue = Arc::new(LineQueue::new(64 << 20, 64 << 20, 4096));
    let mut writer = Writer {
        conn,
        config: WriterConfig::default(),
        checks_modules: true,
        queue: Arc::clone(&queue),
        stats: Default::default(),
        keys: WorkloadKeys::default(),
        retained: Vec::new(),
        usage: Default::default(),
        delta: Default::default(),
        ops_in_a_row: false,
        joining: Default::default(),
        lingering: Vec::new(),
        reserve: Arc::new(super::reserve::StorageReserve::open(dir, 0)),
        dies_at_commit: None,
    };
    let info = ModuleInfo {
        hash: MODULE.into(),
        kind: "module".into(),
        size: 3,
        created_at: 1,
    };
    let (reply, _) = tokio::sync::oneshot::channel();
    let bytes = bytes::Bytes::from_static(b"abc");
    writer.commit(&mut vec![WriteOp::PutModule { info, bytes, reply }], false);
    (writer, queue)
}

#[test]
fn lingering_ops_wait_apart_until_enough_of_them_wait() {
    use super::writer::MAX_LINGERING;
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, _queue) = writer_on_its_own(dir.path());
    let take = |writer: &mut Writer, haste, ops: &mut Vec<WriteOp>| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let new = new_running(WorkloadId::new(), MODULE);
        writer.stats.ops_waiting.fetch_add(1, Ordering::AcqRel);
        let due = writer.take(WriteOp::Create { new, reply, haste }, ops);
        (due, rx)
    };
    let mut ops = Vec::new();
    let mut replies = Vec::new();
    for i in 1..=MAX_LINGERING {
        let (due, rx) = take(&mut writer, Haste::Linger, &mut ops);
        assert_eq!(due, i == MAX_LINGERING, "lingering op {i}");
        replies.push(rx);
    }
    assert!(ops.is_empty(), "they wait apart from the ops in hand");
    writer.commit(&mut ops, false);
    for mut rx in replies {
        assert!(matches!(rx.try_recv(), Ok(Ok(()))));
    }
    let (due, _) = take(&mut writer, Haste::Now, &mut ops);
    assert!(due, "a prompt op is due at once");
    assert_eq!(ops.len(), 1);
}

#[test]
fn an_op_after_a_commit_of_lines_alone_does_not_carry_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, queue) = writer_on_its_own(dir.path());
    let create = |reply| {
        let new = new_running(WorkloadId::new(), MODULE);
        (
            new.id,
            WriteOp::Create {
                new,
                reply,
                haste: Haste::Now,
            },
        )
    };
    let (flood_create, _) = tokio::sync::oneshot::channel();
    let (flood, op) = create(flood_create);
    let mut pending = vec![op];
    writer.commit(&mut pending, false);

    // A running flood with a long backlog; a commit of lines alone.
    let (wake, _) = mpsc::channel();
    let lane = LineLane::new(flood, None, Arc::clone(&queue), wake, false);
    for seq in 0..20_000 {
        lane.send(line(flood, seq));
    }
    writer.commit(&mut pending, false);
    let backlog = queue.lane_len(flood);
    assert!(backlog < 20_000, "lines alone went in");

    // The next op goes in without the flood's lines...
    let (quiet_create, mut created) = tokio::sync::oneshot::channel();
    let (_, op) = create(quiet_create);
    pending.push(op);
    writer.commit(&mut pending, false);
    assert!(matches!(created.try_recv(), Ok(Ok(()))));
    assert_eq!(queue.lane_len(flood), backlog, "no flood lines with the op");

    // ...but ops that keep coming take a share, so the flood still moves.
    let (another_create, _) = tokio::sync::oneshot::channel();
    let (_, op) = create(another_create);
    pending.push(op);
    writer.commit(&mut pending, false);
    assert!(
        queue.lane_len(flood) < backlog,
        "ops in a row carry a share"
    );
}

/// Creates a workload of `tenant` (running) with `lines` lines committed.
async fn create_for(db: &Db, tenant: Option<&str>, lines: u64) -> WorkloadId {
    let id = WorkloadId::new();
    let new = NewWorkload {
        tenant: tenant.map(str::to_owned),
        ..new_running(id, MODULE)
    };
    db.create_workload(new).await.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..lines {
        sink.send(line(id, seq));
    }
    id
}

#[tokio::test]
async fn each_tenant_has_a_file_of_its_own_and_reads_merge_them() {
    let (dir, db, _) = db_with_module().await;
    // One stored in the main file first, as before tenants had files.
    let legacy = {
        let id = WorkloadId::new();
        let new = NewWorkload {
            tenant: Some("alice".into()),
            ..new_running(id, MODULE)
        };
        request(&db.inner.routing.main, |reply| WriteOp::Create {
            new,
            reply,
            haste: Haste::Now,
        })
        .await
        .unwrap();
        id
    };
    let alice = create_for(&db, Some("alice"), 3).await;
    let bob = create_for(&db, Some("bob"), 2).await;
    let nobody = create_for(&db, None, 1).await;
    for (id, lines) in [(alice, 3), (bob, 2), (nobody, 1)] {
        db.finish(id, done(Status::Completed, lines)).await.unwrap();
    }
    for name in ["alice", "bob"] {
        assert!(dir.path().join(format!("tenants/{name}.db")).exists());
    }
    // Each file holds its own only.
    let in_main = db
        .list_workloads(&crate::workload::ListRequest::page(10, 0))
        .await
        .unwrap();
    assert_eq!(in_main.total, 4, "everyone's, from every file");
    let ids: Vec<_> = in_main.items.iter().map(|w| w.id).collect();
    assert_eq!(
        ids,
        [nobody, bob, alice, legacy],
        "newest first across files"
    );
    let alices = db
        .list_workloads(&crate::workload::ListRequest {
            tenant: Some("alice".to_owned()),
            ..crate::workload::ListRequest::page(10, 0)
        })
        .await
        .unwrap();
    assert_eq!(alices.total, 2);
    let ids: Vec<_> = alices.items.iter().map(|w| w.id).collect();
    assert_eq!(ids, [alice, legacy], "its own file and the main file");
    let page = db
        .list_workloads(&crate::workload::ListRequest::page(1, 1))
        .await
        .unwrap();
    assert_eq!((page.total, page.items[0].id), (4, bob));
    let running = (db
        .list_workloads(&crate::workload::ListRequest {
            status: Some(Status::Running),
            ..crate::workload::ListRequest::page(10, 0)
        })
        .await)
        .unwrap();
    assert_eq!(
        running.items.iter().map(|w| w.id).collect::<Vec<_>>(),
        [legacy]
    );
    assert_eq!(db.log_bytes(Some("alice")), 18);
    assert_eq!(db.log_bytes(Some("bob")), 12);
    assert_eq!(db.log_bytes_total(), 36);

    // One left running in a tenant's file, as a crash leaves it.
    let left = create_for(&db, Some("bob"), 1).await;
    db.flush().await;
    // A new handle finds them by looking in each file.
    drop(db);
    let db = Db::open(dir.path()).unwrap();
    let record = db.workload(bob).await.unwrap();
    assert_eq!(
        (record.tenant.as_deref(), record.line_count),
        (Some("bob"), 2)
    );
    assert_eq!(db.read_lines(alice, None, 10).await.unwrap().len(), 3);
    assert!(matches!(
        db.workload(WorkloadId::new()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        db.log_bytes(Some("alice")),
        18,
        "summed again from its file"
    );
    // A restart fails what was left running, in every file.
    assert_eq!(db.fail_unfinished("stopped").await.unwrap(), 2);
    let readers = Db::open_read_only(dir.path()).unwrap();
    assert_eq!(
        readers.workload(legacy).await.unwrap().status,
        Status::Failed
    );
    let record = readers.workload(left).await.unwrap();
    assert_eq!((record.status, record.line_count), (Status::Failed, 1));
    assert_eq!(readers.read_lines(bob, None, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_tenants_commits_do_not_wait_for_another_tenants_file() {
    let (dir, db, _) = db_with_module().await;
    let alice = create_for(&db, Some("alice"), 0).await;
    // Another connection holds alice's file, as a long commit would.
    let other = Connection::open(dir.path().join("tenants/alice.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let alice_ends = tokio::spawn({
        let db = db.clone();
        async move { db.finish(alice, done(Status::Completed, 0)).await }
    });
    // Bob's whole run commits meanwhile.
    let bob = create_for(&db, Some("bob"), 5).await;
    let record = db.finish(bob, done(Status::Completed, 5)).await.unwrap();
    assert_eq!(record.status, Status::Completed);
    assert_eq!(db.read_lines(bob, None, 10).await.unwrap().len(), 5);
    assert!(!alice_ends.is_finished(), "alice's end waits for its file");
    other.execute_batch("COMMIT").unwrap();
    let record = alice_ends.await.unwrap().unwrap();
    assert_eq!(record.status, Status::Completed);
}

#[tokio::test]
async fn retention_takes_the_workload_that_ended_first_across_files() {
    let (dir, db, _) = db_with_module().await;
    let mut ended = Vec::new();
    for (n, tenant) in [Some("bob"), None, Some("alice"), Some("bob")]
        .into_iter()
        .enumerate()
    {
        let id = create_for(&db, tenant, 2).await;
        db.finish(id, done(Status::Completed, 2)).await.unwrap();
        // Ends a second apart, in this order, whatever the clock did.
        let file = match tenant {
            Some(t) => dir.path().join(format!("tenants/{t}.db")),
            None => dir.path().join(DB_FILE),
        };
        let set = "UPDATE workloads SET finished_at = ?1 WHERE id = ?2";
        let changed = (Connection::open(file).unwrap())
            .execute(
                set,
                rusqlite::params![1_000 * (n as i64 + 1), id.to_string()],
            )
            .unwrap();
        assert_eq!(changed, 1);
        ended.push(id);
    }
    let mut pruned = Vec::new();
    let everyone = || PruneScope::AllBut(Vec::new());
    while db.prune_step(everyone(), i64::MAX, 10).await.unwrap() > 0 {
        for id in &ended {
            let record = db.workload(*id).await.unwrap();
            if record.pruned_at.is_some() && !pruned.contains(id) {
                pruned.push(*id);
            }
        }
    }
    assert_eq!(pruned, ended, "oldest end first, whatever its file");
    assert_eq!(db.log_bytes_total(), 0);
    // A tenant's own scope looks in its file.
    let carol = create_for(&db, Some("carol"), 2).await;
    db.finish(carol, done(Status::Completed, 2)).await.unwrap();
    let scope = PruneScope::AllBut(vec!["carol".into()]);
    assert_eq!(db.prune_step(scope, i64::MAX, 10).await.unwrap(), 0);
    let scope = PruneScope::Tenant("carol".into());
    assert!(db.prune_step(scope, i64::MAX, 10).await.unwrap() > 0);
    assert_eq!(db.log_bytes(Some("carol")), 0);
}

/// A line of `bytes` x's.
fn long_line(id: WorkloadId, seq: u64, bytes: usize) -> Arc<LogRecord> {
    let mut l = (*line(id, seq)).clone();
    l.line = "x".repeat(bytes);
    Arc::new(l)
}

#[tokio::test]
async fn after_a_failed_batch_no_later_line_commits_and_the_count_is_what_is_stored() {
    let (_dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..100 {
        sink.send(line(id, seq));
    }
    db.flush().await;
    let pages: i64 = db
        .with_reader(|c| Ok(c.query_row("PRAGMA page_count", [], |r| r.get(0))?))
        .unwrap();
    db.set_page_limit(Some(pages as u64)).await;
    for seq in 100..2_100 {
        sink.send(long_line(id, seq, 1_000));
    }
    wait_until("a batch fails", async || sink.failure().is_some()).await;
    // Room again: lines written after the failure must not fill in after a hole.
    db.set_page_limit(None).await;
    for seq in 2_100..2_200 {
        sink.send(line(id, seq));
    }
    let record = db.finish(id, done(Status::Completed, 2_200)).await.unwrap();
    assert_eq!(record.status, Status::Failed);
    assert_eq!(record.failure, Some(crate::workload::FailureKind::Store));
    let stored: Vec<u64> = (db.read_lines(id, None, 10_000).await.unwrap())
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(
        stored,
        (0..record.line_count).collect::<Vec<_>>(),
        "a prefix, as long as the record says"
    );
    assert!(
        (100..2_100).contains(&record.line_count),
        "{}",
        record.line_count
    );
    // Other workloads write again once the disk has room.
    let other = create(&db, &hash).await;
    db.mark_running(other).await.unwrap();
    let sink = db.line_sink(other, None).unwrap();
    sink.send(line(other, 0));
    let record = db.finish(other, done(Status::Completed, 1)).await.unwrap();
    assert_eq!((record.status, record.line_count), (Status::Completed, 1));
}

#[tokio::test]
async fn a_writer_that_dies_is_reported_and_writes_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let config = WriterConfig {
        dies_at_commit: Some(2),
        ..WriterConfig::default()
    };
    let db = Db::open_with(dir.path(), config).unwrap();
    assert!(db.writer_failure().is_none());
    db.ping().await.unwrap();
    put_module(&db).await;
    let second = db
        .create_workload(new_running(WorkloadId::new(), MODULE))
        .await;
    assert!(
        matches!(second, Err(StoreError::Unavailable(_))),
        "its commit's answer is lost with the thread: {second:?}"
    );
    let why = db.writer_stopped().await;
    assert!(why.contains("test fault"), "{why}");
    assert!(matches!(db.ping().await, Err(StoreError::Unavailable(_))));
    let third = db
        .create_workload(new_running(WorkloadId::new(), MODULE))
        .await;
    assert!(
        matches!(third, Err(StoreError::Unavailable(_))),
        "{third:?}"
    );
}

/// Bytes of a database file and its WAL.
fn file_sizes(path: &std::path::Path) -> (u64, u64) {
    let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    (len(path), len(&path.with_extension("db-wal")))
}

#[tokio::test]
async fn pruning_gives_the_files_space_back() {
    let (dir, db, hash) = db_with_module().await;
    let id = create(&db, &hash).await;
    db.mark_running(id).await.unwrap();
    let sink = db.line_sink(id, None).unwrap();
    for seq in 0..20_000 {
        sink.room().await;
        sink.send(long_line(id, seq, 1_000));
    }
    db.finish(id, done(Status::Completed, 20_000))
        .await
        .unwrap();
    let path = dir.path().join(DB_FILE);
    let (full, _) = file_sizes(&path);
    assert!(full > 15 << 20, "{full}");
    while db
        .prune_step(PruneScope::AllBut(Vec::new()), i64::MAX, 5_000)
        .await
        .unwrap()
        > 0
    {}
    db.shrink_logs();
    wait_until("the WAL is truncated", async || file_sizes(&path).1 == 0).await;
    let (db_bytes, _) = file_sizes(&path);
    assert!(
        db_bytes < 2 << 20,
        "{db_bytes} bytes left of {full} after pruning"
    );
}

#[tokio::test]
async fn vacuum_turns_incremental_vacuum_on_in_an_old_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        // As made before auto_vacuum was on.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = NONE; PRAGMA journal_mode = WAL; \
             CREATE TABLE filler (x BLOB); \
             INSERT INTO filler SELECT zeroblob(10000) FROM generate_series(1, 500);",
        )
        .ok();
    }
    // generate_series may be missing from the bundled build: fill by hand.
    {
        let conn = Connection::open(&path).unwrap();
        for _ in 0..500 {
            conn.execute("INSERT INTO filler VALUES (zeroblob(10000))", [])
                .unwrap();
        }
        conn.execute("DELETE FROM filler", []).unwrap();
    }
    drop(Db::open(dir.path()).unwrap());
    let mode = |p: &std::path::Path| -> i64 {
        Connection::open(p)
            .unwrap()
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(mode(&path), 0, "opening does not change an old file");
    let done = super::vacuum(dir.path()).unwrap();
    assert_eq!(done.len(), 1);
    assert!(
        done[0].after < done[0].before / 4,
        "{} -> {}",
        done[0].before,
        done[0].after
    );
    assert_eq!(mode(&path), 2, "incremental from now on");
    // It refuses while a server owns the directory.
    let db = Db::open(dir.path()).unwrap();
    let refused = super::vacuum(dir.path()).unwrap_err();
    assert!(refused.to_string().contains("in use"), "{refused}");
    drop(db);
}

/// Deep pages across three files: every offset and every `before` gives the
/// page the merged newest-first order holds there, though only a step of
/// ids per file is read at a time; list items carry no spec.
#[tokio::test]
async fn deep_pages_across_files_match_the_merged_order_and_carry_summaries() {
    let (_dir, db, _) = db_with_module().await;
    let owners = [None, Some("alice"), Some("bob")];
    let mut ids = Vec::new();
    for i in 0..2_600 {
        let id = WorkloadId::new();
        let new = NewWorkload {
            tenant: owners[(i * 7 / 3) % 3].map(str::to_owned),
            args: vec!["a long argument".into()],
            ..new_running(id, MODULE)
        };
        db.create_workload(new).await.unwrap();
        ids.push(id);
    }
    ids.reverse();
    for (offset, before) in [
        (0, None),
        (1_023, None),
        (2_049, None),
        (2_590, None),
        (5, Some(1_500)),
    ] {
        let request = crate::workload::ListRequest {
            before: before.map(|b: usize| ids[b]),
            ..crate::workload::ListRequest::page(20, offset)
        };
        let page = db.list_workloads(&request).await.unwrap();
        let start = before.map_or(0, |b| b + 1) + offset as usize;
        let expected: Vec<_> = ids.iter().skip(start).take(20).copied().collect();
        let got: Vec<_> = page.items.iter().map(|w| w.id).collect();
        assert_eq!(got, expected, "offset {offset}, before {before:?}");
        assert_eq!(page.total, 2_600);
        assert!(
            page.items.iter().all(|w| w.args.is_empty()),
            "summaries only"
        );
    }
}

#[tokio::test]
async fn a_retried_attempt_goes_back_to_pending_with_its_history_and_runs_again() {
    use crate::workload::Attempt;
    use crate::workload::{FailureKind, QueuedInput};
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let id = super::tests_support::create_workload(&db).await;
    let failed = |lines| Completion {
        status: Status::Failed,
        exit_code: Some(3),
        error: Some("exited with code 3".into()),
        failure: Some(FailureKind::Exit),
        output: None,
        duration_ms: 5,
        line_count: lines,
    };
    let later = |n, first_seq, lines| RetryLater {
        attempt: Attempt::of(n, Some(1), first_seq, &failed(lines), 2, 3),
        queued: QueuedInput {
            stdin_base64: Some("aGk=".into()),
            not_before_ms: Some(3),
            ..QueuedInput::default()
        },
    };
    let pending = (db.retry_later(id, failed(4), later(1, 0, 4), Haste::Now))
        .await
        .unwrap();
    assert_eq!(
        (pending.status, pending.attempt, pending.line_count),
        (Status::Pending, 2, 4)
    );
    assert_eq!((pending.exit_code, pending.failure), (None, None));
    assert_eq!(pending.attempts.len(), 1);
    assert_eq!(
        (pending.attempts[0].first_seq, pending.attempts[0].lines),
        (0, 4)
    );
    // The queue finds it again after a restart, with when it may start.
    let queued = db.queued_workloads().await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(
        (queued[0].1.not_before_ms, queued[0].1.has_bytes),
        (Some(3), true)
    );
    // A pending one cannot be retried: only a running attempt ends.
    let again = db
        .retry_later(id, failed(4), later(2, 4, 6), Haste::Now)
        .await;
    assert!(
        matches!(again, Err(StoreError::IllegalTransition { .. })),
        "{again:?}"
    );
    let running = db.mark_running(id).await.unwrap();
    assert_eq!((running.attempt, running.line_count), (2, 4));
    db.retry_later(id, failed(6), later(2, 4, 6), Haste::Now)
        .await
        .unwrap();
    db.mark_running(id).await.unwrap();
    super::tests_support::complete(&db, id, 9).await;
    let done = db.workload(id).await.unwrap();
    assert_eq!(
        (done.status, done.attempt, done.line_count),
        (Status::Completed, 3, 9)
    );
    let seqs: Vec<_> = done
        .attempts
        .iter()
        .map(|a| (a.attempt, a.first_seq, a.lines))
        .collect();
    assert_eq!(seqs, vec![(1, 0, 4), (2, 4, 2)]);
    assert!(db.queued_workloads().await.unwrap().is_empty());
}
