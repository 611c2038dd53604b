//! The runner on a real node (SQLite in a temporary directory, the real
//! engine) with WAT guests from `tests/fixtures/wat/`.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::node::{Node, NodeOptions};

async fn node() -> (tempfile::TempDir, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeOptions::default())
        .await
        .unwrap();
    (dir, node)
}

async fn module(node: &Node, wat: &str) -> (String, Arc<CompiledModule>) {
    let bytes = bytes::Bytes::from(wat::parse_str(wat).unwrap());
    let (info, compiled, _) = node.registry().register(bytes).await.unwrap();
    (info.hash, compiled)
}

fn spec() -> WorkloadSpec {
    WorkloadSpec {
        args: vec!["guest.wasm".into()],
        ..WorkloadSpec::default()
    }
}

#[tokio::test]
async fn a_workload_killed_before_its_guest_starts_never_runs() {
    let (_dir, node) = node().await;
    let (hash, compiled) = module(&node, wat_fixture!("print-hello")).await;
    let runner = node.runner();
    let start = runner.start(compiled, hash, spec(), None, Creation::Committed);
    tokio::pin!(start);
    // One thread: the first poll spawns the workload's task and waits for its
    // record, and that task has not run yet.
    assert!(futures_util::poll!(&mut start).is_pending());
    runner.kill_all("killed before it started");
    let started = start.await.unwrap();
    let record = started.done.await.unwrap().unwrap();
    assert_eq!(record.status, Status::Killed);
    assert_eq!(record.failure, Some(FailureKind::Killed));
    assert_eq!(record.error.as_deref(), Some("killed before it started"));
    assert_eq!(record.duration_ms, Some(0), "its guest never ran");
    assert_eq!(
        record.line_count, 0,
        "it printed nothing (the guest prints hello)"
    );
    let stored = node.db().workload(started.id).await.unwrap();
    assert_eq!(stored, record, "the returned record is the committed one");
    assert_eq!(runner.running_count(), 0);
}

/// A terminal whose stdout panics: a host bug inside the engine's call.
struct Exploding;

impl std::io::Write for Exploding {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        panic!("the tee exploded");
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_panic_while_running_fails_the_workload_instead_of_leaving_it_running() {
    let (_dir, node) = node().await;
    let (hash, compiled) = module(&node, wat_fixture!("print-hello")).await;
    let tee = Tee {
        stdout: Box::new(Exploding),
        stderr: Box::new(std::io::sink()),
    };
    let started = node
        .runner()
        .start(compiled, hash, spec(), Some(tee), Creation::Overlapped)
        .await
        .unwrap();
    let answer = started.done.await.unwrap();
    let error = answer.expect_err("the run reports the panic").to_string();
    assert!(error.contains("internal error"), "{error}");
    let record = node.db().workload(started.id).await.unwrap();
    assert_eq!(record.status, Status::Failed);
    assert_eq!(record.failure, Some(FailureKind::Host));
    assert!(record.finished_at.is_some());
    assert_eq!(node.runner().running_count(), 0);
    assert!(
        node.broker().subscribe(started.id).is_none(),
        "its live channel is closed"
    );
}

#[tokio::test]
async fn at_capacity_a_start_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        max_concurrent: Some(1),
        ..NodeOptions::default()
    };
    let node = Node::open(dir.path(), options).await.unwrap();
    let (hash, compiled) = module(&node, wat_fixture!("spin")).await;
    let runner = node.runner();
    let spinning = runner
        .start(
            Arc::clone(&compiled),
            hash.clone(),
            spec(),
            None,
            Creation::Committed,
        )
        .await
        .unwrap();
    let refused = runner
        .start(compiled, hash, spec(), None, Creation::Committed)
        .await;
    assert!(matches!(refused, Err(StartError::AtCapacity(1))));
    let page = node
        .db()
        .list_workloads(&crate::workload::ListRequest::page(10, 0))
        .await
        .unwrap();
    assert_eq!(page.total, 1, "the refused start left no record");
    assert!(runner.kill(spinning.id, "done"));
    let record = spinning.done.await.unwrap().unwrap();
    assert_eq!(record.status, Status::Killed);
}

/// A guest started while its record's creation commits: its lines are all
/// stored, and its end after them.
#[tokio::test]
async fn an_overlapped_start_stores_every_line_and_its_end() {
    let (_dir, node) = node().await;
    let (hash, compiled) = module(&node, wat_fixture!("print-hello")).await;
    let started = node
        .runner()
        .start(compiled, hash, spec(), None, Creation::Overlapped)
        .await
        .unwrap();
    let record = started.done.await.unwrap().unwrap();
    assert_eq!(record.status, Status::Completed, "{record:?}");
    assert_eq!(record.line_count, 1);
    let lines = node.db().read_lines(started.id, None, 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(node.db().workload(started.id).await.unwrap(), record);
    assert_eq!(node.db().lost_lines(), 0);
}

/// A launch of `module_hash` as a cluster node makes one (its record here
/// a copy), and where its end is told.
fn copy_launch(
    runner: &Runner,
    module_hash: String,
) -> (Launch, tokio::sync::oneshot::Receiver<Completion>) {
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let launch = Launch {
        id: WorkloadId::new(),
        slot: runner.try_reserve().unwrap(),
        module_hash,
        spec: spec(),
        tee: None,
        also: None,
        creation: Creation::Overlapped,
        ended: Some(ended_tx),
        record: LocalRecord::Copy,
        idempotency: None,
        held: None,
    };
    (launch, ended_rx)
}

/// A run whose record here is a copy of one kept elsewhere: its end is told
/// and its slot free as soon as its guest ended, while its own creation and
/// end still wait for the writer's linger (an hour here) to commit.
#[tokio::test]
async fn a_copys_end_is_told_and_its_slot_freed_before_it_commits() {
    let dir = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        max_concurrent: Some(1),
        writer: crate::store::WriterConfig {
            linger: Duration::from_secs(3600),
            ..Default::default()
        },
        ..NodeOptions::default()
    };
    let node = Node::open(dir.path(), options).await.unwrap();
    let (hash, compiled) = module(&node, wat_fixture!("print-hello")).await;
    let runner = node.runner();
    let commits = node.db().commits();
    let (launch, ended_rx) = copy_launch(runner, hash);
    let started = runner.start_claimed(compiled, launch).await.unwrap();
    let completion = ended_rx.await.unwrap();
    assert_eq!(
        (completion.status, completion.line_count),
        (Status::Completed, 1)
    );
    // The slot comes back without a commit: the next run can take it.
    let slot = runner.try_reserve().expect("its slot is free");
    assert_eq!(node.db().commits(), commits, "nothing committed yet");
    drop(slot);
    node.db().flush().await;
    let record = started.done.await.unwrap().unwrap();
    assert_eq!(record.status, Status::Completed);
    assert_eq!(
        node.db()
            .read_lines(started.id, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A copy whose creation fails (here: a module the store does not hold)
/// still stops its guest, a tight loop included, and the end it tells says
/// why; nothing stays running, and no record is left here.
#[tokio::test]
async fn a_copy_whose_creation_fails_stops_its_guest_and_tells_why() {
    let (_dir, node) = node().await;
    let (_, compiled) = module(&node, wat_fixture!("spin")).await;
    let runner = node.runner();
    let (launch, ended_rx) = copy_launch(runner, format!("sha256:{}", "0".repeat(64)));
    let started = runner.start_claimed(compiled, launch).await.unwrap();
    let told = ended_rx.await.unwrap();
    assert_eq!(told.status, Status::Killed, "{told:?}");
    assert!(
        told.error
            .as_deref()
            .unwrap()
            .starts_with("failed to create:"),
        "{told:?}"
    );
    let id = started.id;
    let error = started.done.await.unwrap().expect_err("no record here");
    assert_never_created(&node, id, error).await;
}

/// Asserts that a start whose module was missing ended with that error,
/// left no record and nothing running.
async fn assert_never_created(node: &Node, id: WorkloadId, error: anyhow::Error) {
    assert!(
        matches!(error.downcast_ref(), Some(StartError::ModuleNotFound(_))),
        "{error:#}"
    );
    assert!(matches!(
        node.db().workload(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(node.runner().running_count(), 0);
}

/// A creation that fails after its guest started (here: a module the store
/// does not hold) stops the guest, even a tight loop, and answers the same
/// error a start that waited for it would have; nothing stays running.
#[tokio::test]
async fn an_overlapped_start_whose_creation_fails_stops_its_guest() {
    let (_dir, node) = node().await;
    let (_, compiled) = module(&node, wat_fixture!("spin")).await;
    let missing = format!("sha256:{}", "0".repeat(64));
    let started = node
        .runner()
        .start(compiled, missing, spec(), None, Creation::Overlapped)
        .await
        .unwrap();
    let error = started.done.await.unwrap().expect_err("no record, no run");
    assert_never_created(&node, started.id, error).await;
    assert!(node.broker().subscribe(started.id).is_none());
    let metrics = node.metrics().render();
    assert!(
        !metrics.contains("vulcan_workloads_finished_total{"),
        "a workload that never started is not counted as finished:\n{metrics}"
    );
}

/// Every way a run ends maps onto one status, exit code and failure kind.
#[test]
fn every_outcome_has_its_status_exit_code_and_failure_kind() {
    use crate::engine::LimitHit;
    let cases = [
        (Outcome::Exited(0), Status::Completed, Some(0), None),
        (
            Outcome::Returned(b"{}".to_vec()),
            Status::Completed,
            Some(0),
            None,
        ),
        (
            Outcome::Exited(3),
            Status::Failed,
            Some(3),
            Some(FailureKind::Exit),
        ),
        (
            Outcome::ReturnedError("no".into()),
            Status::Failed,
            Some(1),
            Some(FailureKind::ReturnedError),
        ),
        (
            Outcome::Trapped {
                message: "unreachable".into(),
                backtrace: None,
            },
            Status::Failed,
            None,
            Some(FailureKind::Trap),
        ),
        (
            Outcome::TimedOut(Duration::from_millis(5)),
            Status::Failed,
            None,
            Some(FailureKind::Timeout),
        ),
        (
            Outcome::Killed,
            Status::Killed,
            None,
            Some(FailureKind::Killed),
        ),
        (
            Outcome::LimitExceeded(LimitHit::Memory(1)),
            Status::Failed,
            None,
            Some(FailureKind::Memory),
        ),
        (
            Outcome::LimitExceeded(LimitHit::Fuel(1)),
            Status::Failed,
            None,
            Some(FailureKind::Fuel),
        ),
        (
            Outcome::LimitExceeded(LimitHit::Output(1)),
            Status::Failed,
            None,
            Some(FailureKind::Output),
        ),
        (
            Outcome::LinesNotStored("full".into()),
            Status::Failed,
            None,
            Some(FailureKind::Store),
        ),
        (
            Outcome::HostFailure("boom".into()),
            Status::Failed,
            None,
            Some(FailureKind::Host),
        ),
    ];
    for (outcome, status, exit_code, failure) in cases {
        let report = RunReport {
            outcome: outcome.clone(),
            duration: Duration::from_millis(7),
        };
        let c = completion(&report, 4);
        assert_eq!(
            (c.status, c.exit_code, c.failure),
            (status, exit_code, failure),
            "{outcome:?}"
        );
        assert_eq!((c.duration_ms, c.line_count), (7, 4));
        assert_eq!(c.error.is_some(), failure.is_some(), "{outcome:?}");
    }
}
