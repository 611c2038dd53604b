//! The requests the writer thread takes, and what applying one answers.
//! Plain data, shared by the handle that sends them, the queue that wakes the
//! writer, the writer, and the SQL that applies them.

use tokio::sync::oneshot;

use super::{ModuleInfo, NewWorkload, StoreResult};
use crate::workload::{Completion, Status, WorkloadId, WorkloadRecord};

/// Work for the writer thread.
#[expect(
    clippy::large_enum_variant,
    reason = "an op is moved once into the writer's channel; boxing each creation would cost \
              an allocation per workload"
)]
pub(super) enum WriteOp {
    /// The line queue needs the writer: its first line (which starts the linger
    /// clock) or a full batch.
    LinesQueued,
    PutModule {
        info: ModuleInfo,
        bytes: bytes::Bytes,
        reply: oneshot::Sender<StoreResult<bool>>,
    },
    OwnModule {
        tenant: String,
        hash: String,
        reply: oneshot::Sender<StoreResult<bool>>,
    },
    /// Takes `tenant`'s ownership of a module (every owner's with `None`)
    /// and, once no tenant owns it, its bytes; answers whether the bytes went.
    DeleteModule {
        hash: String,
        tenant: Option<String>,
        reply: oneshot::Sender<StoreResult<bool>>,
    },
    Create {
        new: NewWorkload,
        reply: oneshot::Sender<StoreResult<()>>,
        haste: Haste,
    },
    Transition {
        id: WorkloadId,
        to: Status,
        completion: Option<Completion>,
        /// `None` for a terminal status the writer retries on its own; a
        /// terminal status answers the final record, read in the same
        /// transaction.
        reply: Option<oneshot::Sender<StoreResult<Option<WorkloadRecord>>>>,
        haste: Haste,
        /// A failed attempt that runs again: `to` is `pending`, and the
        /// record keeps `completion` as an earlier attempt.
        retry: Option<Box<super::RetryLater>>,
    },
    FailUnfinished {
        reason: String,
        reply: oneshot::Sender<StoreResult<u64>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Deletes up to `max_lines` lines of one finished workload of `scope`
    /// that ended before `cutoff`; answers how much it did (0: nothing left).
    Prune {
        scope: PruneScope,
        cutoff: i64,
        max_lines: u64,
        reply: oneshot::Sender<StoreResult<u64>>,
    },
    /// Caps the database's size in pages, as a full disk would (tests only).
    #[cfg(test)]
    PageLimit {
        pages: Option<u64>,
        reply: oneshot::Sender<()>,
    },
}

/// How soon a workload's creation or end is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Haste {
    /// Someone waits on it: it is committed at once, with whatever else waits.
    #[default]
    Now,
    /// Nobody reads it yet (a cluster node's own copy of a record the API
    /// reads from the cluster): it waits up to the writer's linger, so that
    /// the creations and ends of many runs share one commit.
    Linger,
}

impl WriteOp {
    /// Whether the op may wait for the writer's linger (see [`Haste`]).
    pub(super) fn lingers(&self) -> bool {
        matches!(
            self,
            WriteOp::Create {
                haste: Haste::Linger,
                ..
            } | WriteOp::Transition {
                haste: Haste::Linger,
                ..
            }
        )
    }

    /// The workload whose lines must be committed with (before) this op.
    pub(super) fn ends(&self) -> Option<WorkloadId> {
        match self {
            WriteOp::Transition { id, to, retry, .. } if to.is_terminal() || retry.is_some() => {
                Some(*id)
            }
            _ => None,
        }
    }
}

/// What an applied op answers.
pub(super) enum Applied {
    Unit,
    Bool(bool),
    Count(u64),
    Record(Box<WorkloadRecord>),
}

/// Whose finished workloads a prune looks at.
#[derive(Debug, Clone)]
pub enum PruneScope {
    /// One tenant's.
    Tenant(String),
    /// Everyone's but these tenants' (which have a retention of their own).
    AllBut(Vec<String>),
}

/// The workloads a prune of a scope may take, in SQL: `?1` the cutoff and
/// `?2`, `?3` the scope's [`PruneScope::params`].
pub(super) const PRUNABLE: &str = "pruned_at IS NULL AND finished_at < ?1 \
     AND (?2 IS NULL OR tenant = ?2) \
     AND (?3 IS NULL OR tenant IS NULL OR tenant NOT IN (SELECT value FROM json_each(?3)))";

impl PruneScope {
    /// [`PRUNABLE`]'s parameters: the one tenant, or the tenants left out
    /// (a JSON array).
    pub(super) fn params(&self) -> StoreResult<(Option<&str>, Option<String>)> {
        Ok(match self {
            PruneScope::Tenant(t) => (Some(t.as_str()), None),
            PruneScope::AllBut(list) => (
                None,
                Some(serde_json::to_string(list).map_err(anyhow::Error::from)?),
            ),
        })
    }
}
