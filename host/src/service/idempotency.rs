//! Idempotent submissions: a submission with a key that the same tenant
//! used within the last 24 hours answers the first one's workload and
//! creates nothing; the same key with another spec is a conflict.
//!
//! Written once: this node's claims in flight are kept here (so that
//! concurrent repeats on one node wait for one another); who used a key
//! before is the backend's (the records' keys in SQLite, a KV bucket with a
//! 24-hour age in a cluster, whose atomic create decides between nodes).

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};

use super::{Backend, Caller, ModuleRef, Service, ServiceError, Submission, Terms};
use crate::store::KeyedWorkload;
use crate::workload::{IdempotencyKey, Stdin, WorkloadId, now_ms};

/// Longest key accepted.
pub const MAX_KEY_CHARS: usize = 255;

/// What a submission's key decided.
pub(super) enum Claim {
    /// A new submission: it goes ahead with these terms.
    New(Terms),
    /// A repeat of this workload's submission.
    Repeat(WorkloadId),
}

/// This node's keys claimed by submissions still being accepted.
#[derive(Default)]
pub(super) struct KeyClaims {
    claimed: tokio::sync::Mutex<HashMap<(Option<String>, String), KeyedWorkload>>,
}

/// Checks a client's key: 1 to [`MAX_KEY_CHARS`] visible ASCII characters.
pub fn check_key(key: &str) -> Result<(), ServiceError> {
    let visible = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_KEY_CHARS || !visible {
        return Err(ServiceError::BadRequest(format!(
            "an idempotency key must be 1 to {MAX_KEY_CHARS} visible ASCII characters"
        )));
    }
    Ok(())
}

/// A digest of what a submission asks for: module, spec and queue timeout.
fn fingerprint(submission: &Submission) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    match &submission.module {
        ModuleRef::Hash(hash) => field(hash.trim_start_matches("sha256:").as_bytes()),
        ModuleRef::Bytes(bytes) => field(hex::encode(Sha256::digest(bytes)).as_bytes()),
    }
    let spec = &submission.spec;
    let json = serde_json::json!({
        "args": spec.args,
        "env": spec.env,
        "limits": spec.limits,
        "log_level": spec.log_level,
        "allowed_hosts": spec.allowed_hosts,
        "queue_timeout_ms": submission.queue_timeout_ms,
        "retry": spec.retry,
    });
    field(json.to_string().as_bytes());
    match &spec.stdin {
        Stdin::Bytes(b) => field(b),
        _ => field(b"-"),
    }
    field(spec.input.as_deref().unwrap_or(b"-"));
    hex::encode(h.finalize())
}

impl Service {
    /// Decides whether `submission` (to become workload `id`) is new or a
    /// repeat of a keyed one; a new keyed one holds its key claimed until
    /// [`Service::settle_key`].
    pub(super) async fn claim_key(
        &self,
        caller: &Caller,
        id: WorkloadId,
        submission: &Submission,
    ) -> Result<Claim, ServiceError> {
        let deadline_ms = (submission.queue_timeout_ms)
            .map(|ms| now_ms().saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)));
        let Some(key) = &submission.idempotency_key else {
            return Ok(Claim::New(Terms {
                deadline_ms,
                idempotency: None,
            }));
        };
        check_key(key)?;
        let (tenant, fingerprint) = (caller.owner(), fingerprint(submission));
        let mut claimed = self.inner.keys.claimed.lock().await;
        let slot = (tenant.clone(), key.clone());
        let first = match claimed.get(&slot) {
            Some(first) => Some(first.clone()),
            None => {
                let tenant = tenant.as_deref();
                on_backend!(self, b => b.claim_key(tenant, key, &fingerprint, id).await)?
            }
        };
        match first {
            Some(first) if first.fingerprint == fingerprint => Ok(Claim::Repeat(first.id)),
            Some(first) => Err(ServiceError::IdempotencyConflict(format!(
                "idempotency key `{key}` was used for workload {} with another spec \
                 within the last 24 hours",
                first.id
            ))),
            None => {
                let keyed = KeyedWorkload {
                    id,
                    fingerprint: fingerprint.clone(),
                };
                claimed.insert(slot, keyed);
                Ok(Claim::New(Terms {
                    deadline_ms,
                    idempotency: Some(IdempotencyKey {
                        key: key.clone(),
                        fingerprint,
                    }),
                }))
            }
        }
    }

    /// Ends a claim of [`Service::claim_key`]: the backend knows the key
    /// from now (`accepted`), or it is given back (the submission was
    /// refused, so a repeat may try again).
    pub(super) async fn settle_key(
        &self,
        caller: &Caller,
        key: Option<IdempotencyKey>,
        accepted: bool,
    ) {
        let Some(key) = key else { return };
        let tenant = caller.owner();
        let mut claimed = self.inner.keys.claimed.lock().await;
        if !accepted {
            on_backend!(self, b => b.release_key(tenant.as_deref(), &key.key).await);
        }
        claimed.remove(&(tenant, key.key));
    }
}
