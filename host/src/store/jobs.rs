//! What the job queue keeps in the store: queued (pending) records, which a
//! restart reads back as the queue, their start, and the records of
//! idempotent submissions. Owns only these reads and transitions; the queue's
//! order and fairness are the service's.

use std::sync::Arc;

use rusqlite::{OptionalExtension as _, params};

use super::{Db, Haste, StoreResult, WriteOp, read_blocking, reads, request};
use crate::workload::Attempt;
use crate::workload::{Completion, QueuedInput, Status, WorkloadId, WorkloadRecord};

/// How long an idempotency key names its first submission.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// A workload an idempotency key named first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedWorkload {
    /// Its id.
    pub id: WorkloadId,
    /// The fingerprint of what it was submitted with.
    pub fingerprint: String,
}

/// A failed attempt that runs again, as its record keeps it.
#[derive(Debug, Clone)]
pub struct RetryLater {
    /// The attempt that failed, for the record's history.
    pub attempt: Attempt,
    /// What the next attempt needs beyond the record, with when it may start.
    pub queued: QueuedInput,
}

impl Db {
    /// Records a failed attempt that runs again, after every line it wrote
    /// (its live delivery ends as at an end): the record is `pending` again,
    /// one attempt on, and is answered as committed.
    pub async fn retry_later(
        &self,
        id: WorkloadId,
        failed: Completion,
        later: RetryLater,
        haste: Haste,
    ) -> StoreResult<WorkloadRecord> {
        let record = request(&self.inner.routing.home(id), |reply| WriteOp::Transition {
            id,
            to: Status::Pending,
            completion: Some(failed),
            reply: Some(reply),
            haste,
            retry: Some(Box::new(later)),
        })
        .await?;
        record.ok_or_else(|| anyhow::anyhow!("workload {id} was retried without its record").into())
    }

    /// Marks a pending (queued) workload running and sets `started_at`;
    /// answers the record as it starts.
    pub async fn mark_running(&self, id: WorkloadId) -> StoreResult<WorkloadRecord> {
        request(&self.inner.routing.home(id), |reply| WriteOp::Transition {
            id,
            to: Status::Running,
            completion: None,
            reply: Some(reply),
            haste: Haste::Now,
            retry: None,
        })
        .await?
        .ok_or_else(|| anyhow::anyhow!("workload {id} started without its record").into())
    }

    /// Every queued workload with what it needs to run, oldest first, from
    /// every file: the queue as a restart finds it.
    pub async fn queued_workloads(&self) -> StoreResult<Vec<(WorkloadRecord, QueuedInput)>> {
        let shards = self.inner.routing.shards();
        let found = read_blocking(move || {
            let mut found = Vec::new();
            for shard in &shards {
                let rows = shard.with_reader(|c| {
                    // Without their stdin and input, which may be large and
                    // are read back as each starts (`queued_input`).
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {}, json_remove(queued, '$.stdin_base64', '$.input_base64'), \
                         json_extract(queued, '$.stdin_base64') IS NOT NULL \
                         OR json_extract(queued, '$.input_base64') IS NOT NULL \
                         FROM workloads WHERE queued IS NOT NULL AND status = 'pending' \
                         ORDER BY id",
                        reads::WORKLOAD_COLUMNS
                    ))?;
                    let rows = stmt.query_map([], |r| {
                        let queued: String = r.get(24)?;
                        Ok((reads::row_to_workload(r)?, queued, r.get::<_, bool>(25)?))
                    })?;
                    let mut out = Vec::new();
                    for row in rows {
                        let (record, queued, has_bytes) = row?;
                        let mut queued: QueuedInput = serde_json::from_str(&queued)
                            .map_err(|e| anyhow::anyhow!("corrupt queued input: {e}"))?;
                        queued.has_bytes = has_bytes;
                        out.push((record?, queued));
                    }
                    Ok(out)
                })?;
                found.extend(rows.into_iter().map(|(r, q)| (r, q, Arc::clone(shard))));
            }
            Ok(found)
        })
        .await?;
        // Their ends must find their files.
        let mut found: Vec<_> = found
            .into_iter()
            .map(|(record, queued, shard)| {
                self.inner.routing.remember_home(record.id, &shard, true);
                (record, queued)
            })
            .collect();
        found.sort_by_key(|(r, _)| r.id);
        Ok(found)
    }

    /// What queued workload `id` needs to run beyond its record, while it
    /// is queued (`None` once it started or ended).
    pub async fn queued_input(&self, id: WorkloadId) -> StoreResult<Option<QueuedInput>> {
        self.read_workload(id, move |c| {
            let queued: Option<String> = c
                .prepare_cached("SELECT queued FROM workloads WHERE id = ?1")?
                .query_row([id.to_string()], |r| r.get(0))
                .optional()?
                .flatten();
            queued
                .map(|q| serde_json::from_str(&q))
                .transpose()
                .map_err(|e| anyhow::anyhow!("corrupt queued input: {e}").into())
        })
        .await
    }

    /// The workload `tenant` submitted with `key` within the last
    /// [`IDEMPOTENCY_WINDOW_MS`], if any.
    pub async fn keyed_workload(
        &self,
        tenant: Option<&str>,
        key: &str,
    ) -> StoreResult<Option<KeyedWorkload>> {
        let shard = match tenant {
            None => Arc::clone(&self.inner.routing.main),
            Some(t) => match self.inner.routing.tenant_shard(t) {
                Some(shard) => shard,
                None => return Ok(None),
            },
        };
        let (tenant, key) = (tenant.map(str::to_owned), key.to_owned());
        let since = crate::workload::now_ms() - IDEMPOTENCY_WINDOW_MS;
        read_blocking(move || {
            shard.with_reader(|c| {
                let found = c
                    .prepare_cached(
                        "SELECT id, fingerprint FROM workloads \
                         WHERE tenant IS ?1 AND idempotency_key = ?2 AND created_at >= ?3 \
                         ORDER BY id DESC LIMIT 1",
                    )?
                    .query_row(params![tenant, key, since], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                    })
                    .optional()?;
                let Some((id, fingerprint)) = found else {
                    return Ok(None);
                };
                let id = id
                    .parse()
                    .map_err(|e| anyhow::anyhow!("corrupt workload id: {e}"))?;
                Ok(Some(KeyedWorkload {
                    id,
                    fingerprint: fingerprint.unwrap_or_default(),
                }))
            })
        })
        .await
    }
}
