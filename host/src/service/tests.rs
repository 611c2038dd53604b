//! Admission and scoping through the service, in process, on the single-node
//! backend over a real store: every refusal once, each changing nothing.
//! (The cluster backend is driven by the same calls in the end-to-end tests
//! `cluster_tenants`, against a real NATS.)

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::node::NodeOptions;
use crate::tenants::{LogQuotaAction, TenantEntry, TenantsFile, token_hash};
use crate::view::KillOutcome;
use crate::workload::{Limits, ListRequest, Status, WorkloadSpec};

struct Fixture {
    _dir: tempfile::TempDir,
    service: Service,
}

/// alice: low maxima, one run at a time, refuses runs at 1 byte of logs;
/// bob: no quotas; root: admin.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        max_concurrent: Some(8),
        outbound: crate::outbound::OutboundPolicy {
            caps: Some(vec!["https://*.example.com".parse().unwrap()]),
            ..Default::default()
        },
        ..NodeOptions::default()
    };
    let node = Node::open(dir.path(), options).await.unwrap();
    let file = TenantsFile {
        tenants: vec![
            TenantEntry {
                max_concurrent: Some(1),
                max_timeout_ms: Some(10_000),
                max_log_bytes: Some(1),
                on_log_quota: Some(LogQuotaAction::Refuse),
                ..TenantEntry::new("alice", token_hash("a"))
            },
            TenantEntry::new("bob", token_hash("b")),
            TenantEntry {
                admin: true,
                ..TenantEntry::new("root", token_hash("r"))
            },
        ],
    };
    let config = ServiceConfig {
        tenants: Arc::new(Tenants::from_file(file).unwrap()),
        ..ServiceConfig::default()
    };
    Fixture {
        _dir: dir,
        service: Service::local(node, config),
    }
}

fn wasm(wat: &str) -> Bytes {
    Bytes::from(wat::parse_str(wat).unwrap())
}

fn submission(module: ModuleRef) -> Submission {
    Submission::new(module, WorkloadSpec::default())
}

impl Fixture {
    fn caller(&self, token: &str) -> Caller {
        self.service.authenticate(token).expect("a known token")
    }

    async fn upload(&self, who: &Caller, wat: &str) -> String {
        (self.service.upload_module(who, wasm(wat)).await.unwrap().0).hash
    }

    async fn count(&self) -> u64 {
        let request = ListRequest {
            limit: 1,
            ..Default::default()
        };
        let all = self.caller("r");
        self.service.list(&all, request).await.unwrap().total
    }
}

#[tokio::test]
async fn every_refusal_of_admission_has_its_error_and_creates_nothing() {
    let f = fixture().await;
    let (alice, bob) = (f.caller("a"), f.caller("b"));
    assert!(f.service.authenticate("nobody").is_none(), "unknown token");
    let hello = f.upload(&bob, wat_fixture!("print-hello")).await;
    let by_hash = || submission(ModuleRef::Hash(hello.clone()));

    let over_server = Submission {
        spec: WorkloadSpec {
            limits: Limits {
                timeout_ms: Some(24 * 3600 * 1000),
                ..Limits::default()
            },
            ..WorkloadSpec::default()
        },
        ..by_hash()
    };
    let refused = f.service.run(&bob, over_server).await.unwrap_err();
    assert!(
        matches!(&refused, ServiceError::BadRequest(m) if m.contains("this server's maximum")),
        "{refused:?}"
    );

    let over_tenant = Submission {
        spec: WorkloadSpec {
            limits: Limits {
                timeout_ms: Some(20_000),
                ..Limits::default()
            },
            ..WorkloadSpec::default()
        },
        module: ModuleRef::Bytes(wasm(wat_fixture!("print-hello"))),
        queue_timeout_ms: None,
        idempotency_key: None,
    };
    let refused = f.service.run(&alice, over_tenant).await.unwrap_err();
    assert!(
        matches!(&refused, ServiceError::BadRequest(m) if m.contains("for tenant `alice`")),
        "{refused:?}"
    );

    let outbound = Submission {
        spec: WorkloadSpec {
            allowed_hosts: vec!["https://api.elsewhere.net".parse().unwrap()],
            ..WorkloadSpec::default()
        },
        ..by_hash()
    };
    let refused = f.service.submit(&bob, outbound).await.unwrap_err();
    assert!(
        matches!(&refused, ServiceError::OutboundNotPermitted(_)),
        "{refused:?}"
    );

    // Bob's module is, to alice, no module at all.
    let refused = f.service.submit(&alice, by_hash()).await.unwrap_err();
    assert!(matches!(&refused, ServiceError::NotFound(_)), "{refused:?}");
    let refused = f.service.module(&alice, &hello).await.unwrap_err();
    assert!(matches!(&refused, ServiceError::NotFound(_)), "{refused:?}");
    let unknown = format!("sha256:{}", "0".repeat(64));
    let refused = (f.service)
        .submit(&bob, submission(ModuleRef::Hash(unknown)))
        .await
        .unwrap_err();
    assert!(matches!(&refused, ServiceError::NotFound(_)), "{refused:?}");

    assert_eq!(
        f.count().await,
        0,
        "no refused submission created a workload"
    );
}

#[tokio::test]
async fn a_tenant_at_its_cap_queues_and_its_defaults_are_lowered_to_its_maxima() {
    let f = fixture().await;
    let alice = f.caller("a");
    let spin = f.upload(&alice, wat_fixture!("spin")).await;
    let spinning = (f.service)
        .submit(&alice, submission(ModuleRef::Hash(spin.clone())))
        .await
        .unwrap();
    let record = f.service.workload(&alice, spinning).await.unwrap();
    assert_eq!(record.summary.tenant.as_deref(), Some("alice"));
    assert_eq!(
        record.limits.timeout_ms,
        Some(10_000),
        "the server's default is lowered to the tenant's maximum"
    );
    // At her cap, a second run waits in the queue (bob's would not).
    let waiting = (f.service)
        .submit(&alice, submission(ModuleRef::Hash(spin.clone())))
        .await
        .unwrap();
    let record = f.service.workload(&alice, waiting).await.unwrap();
    assert_eq!(record.summary.status, Status::Pending);
    assert!(record.summary.queued_at.is_some());
    let whoami = f.service.whoami(&alice).await;
    assert_eq!(whoami["running"], 1, "{whoami}");
    let queue = f.service.queue(&alice).await.unwrap();
    assert_eq!(queue.queued, 1);
    let line = &queue.tenants[0];
    assert_eq!(
        (line.tenant.as_deref(), line.queued, line.running),
        (Some("alice"), 1, 1)
    );
    // A kill takes it out before it ever starts.
    match f
        .service
        .kill(&alice, waiting, Duration::from_secs(30))
        .await
    {
        Ok(KillOutcome::Ended(view)) => {
            assert_eq!(view.summary.status, Status::Killed);
            assert_eq!(view.summary.started_at, None, "it never started");
        }
        _ => panic!("the queued run was not killed"),
    }
    assert_eq!(f.service.queue(&alice).await.unwrap().queued, 0);

    match f
        .service
        .kill(&alice, spinning, Duration::from_secs(30))
        .await
    {
        Ok(KillOutcome::Ended(view)) => assert_eq!(view.summary.status, Status::Killed),
        _ => panic!("the spinner was not killed"),
    }
    // Its place is back; its few stored bytes reach the 1-byte log quota,
    // which refuses new runs.
    let hello = f.upload(&alice, wat_fixture!("print-hello")).await;
    let ran = (f.service)
        .run(&alice, submission(ModuleRef::Hash(hello.clone())))
        .await
        .unwrap();
    assert_eq!(ran.summary.status, Status::Completed);
    let refused = (f.service)
        .run(&alice, submission(ModuleRef::Hash(hello)))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ServiceError::LogQuotaExceeded(_)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn another_tenants_workload_is_unknown_to_every_call_and_the_admin_sees_all() {
    let f = fixture().await;
    let (alice, bob, root) = (f.caller("a"), f.caller("b"), f.caller("r"));
    let hello = f.upload(&bob, wat_fixture!("print-hello")).await;
    let ran = (f.service)
        .run(&bob, submission(ModuleRef::Hash(hello)))
        .await
        .unwrap();
    let id = ran.summary.id;

    let unknown = |e: ServiceError| matches!(e, ServiceError::NotFound(m) if m == format!("workload {id} not found"));
    assert!(unknown(f.service.workload(&alice, id).await.unwrap_err()));
    assert!(unknown(
        f.service
            .kill(&alice, id, Duration::ZERO)
            .await
            .err()
            .unwrap()
    ));
    assert!(unknown(
        f.service
            .history(&alice, id, None, 10, None)
            .await
            .unwrap_err()
    ));
    let followed = f.service.follow(&alice, id, None, Plain).await;
    assert!(unknown(followed.err().unwrap()));

    let lines = f.service.history(&root, id, None, 10, None).await.unwrap();
    assert_eq!(lines.len(), 1, "the admin reads it");
    let mut chunks = f.service.follow(&bob, id, None, Plain).await.unwrap();
    let mut followed = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        followed.extend_from_slice(&chunk);
    }
    assert_eq!(
        followed, b"line 0 hello\nend\n",
        "its owner follows it to its end"
    );

    let everything = ListRequest {
        limit: 10,
        ..Default::default()
    };
    let list = |who| f.service.list(who, everything.clone());
    assert_eq!(
        list(&alice).await.unwrap().total,
        0,
        "a tenant's list is its own"
    );
    assert_eq!(list(&bob).await.unwrap().total, 1);
    assert_eq!(list(&root).await.unwrap().total, 1, "the admin lists all");
    let alices = ListRequest {
        tenant: Some("alice".into()),
        ..everything.clone()
    };
    assert_eq!(f.service.list(&root, alices).await.unwrap().total, 0);
    // A tenant's filter cannot reach past its own.
    let bobs = ListRequest {
        tenant: Some("bob".into()),
        ..everything
    };
    assert_eq!(f.service.list(&alice, bobs).await.unwrap().total, 0);
}

/// A follower's events as plain lines, to compare.
#[derive(Clone, Copy)]
struct Plain;

impl LineEncoding for Plain {
    fn line(self, buf: &mut bytes::BytesMut, r: &crate::logs::LogRecord) {
        buf.extend_from_slice(format!("line {} {}\n", r.seq, r.line).as_bytes());
    }

    fn end(self, buf: &mut bytes::BytesMut, _record: &str) {
        buf.extend_from_slice(b"end\n");
    }

    fn error(self, buf: &mut bytes::BytesMut, error: &str) {
        buf.extend_from_slice(format!("error {error}\n").as_bytes());
    }

    fn keep_alive(self, _buf: &mut bytes::BytesMut) {}
}
