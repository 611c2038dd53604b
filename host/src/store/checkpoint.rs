//! Checkpoints off the writer: WAL frames are copied into the database file
//! by a thread and connection of their own.
//!
//! SQLite's automatic checkpoint runs inside whichever commit crosses its
//! threshold, so that commit — and the request waiting on it — pays for
//! copying and syncing megabytes. Here the writer's commit only notes the
//! WAL's size; past [`CHECKPOINT_PAGES`] it wakes this thread, whose PASSIVE
//! checkpoint takes no lock a writer or reader waits on. After retention
//! freed space, [`Checkpointer::truncate`] asks for a TRUNCATE checkpoint,
//! which also gives the WAL file's space back (and the writer's
//! `journal_size_limit` keeps a WAL that grew behind a reader from staying
//! large). Owns nothing else.

use std::path::Path;
use std::sync::mpsc;

use anyhow::Context as _;
use rusqlite::Connection;

/// WAL size, in pages, past which a checkpoint is started (SQLite's own
/// automatic threshold).
pub(super) const CHECKPOINT_PAGES: i32 = 1000;

/// Most bytes a WAL keeps once it has been checkpointed and restarted.
pub(super) const WAL_SIZE_LIMIT: i64 = 16 << 20;

/// Asks the checkpoint thread for more than its passive checkpoints.
pub(super) struct Checkpointer {
    wake: mpsc::SyncSender<Kind>,
}

/// Which checkpoint to run.
#[derive(Clone, Copy)]
enum Kind {
    Passive,
    Truncate,
}

impl Checkpointer {
    /// Checkpoints everything and truncates the WAL to nothing, when no
    /// reader holds it (else a passive checkpoint; the next one retries).
    pub(super) fn truncate(&self) {
        let _ = self.wake.try_send(Kind::Truncate);
    }
}

/// Starts the checkpointer for `path` and makes `writer` wake it after any
/// commit that leaves the WAL at [`CHECKPOINT_PAGES`] or more. The thread
/// ends when `writer` is closed.
pub(super) fn start(path: &Path, writer: &mut Connection) -> anyhow::Result<Checkpointer> {
    let conn = Connection::open(path)
        .with_context(|| format!("failed to open {} for checkpoints", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // One pending wake-up is enough: a checkpoint copies every frame it can.
    let (wake, woken) = mpsc::sync_channel::<Kind>(2);
    // Replaces SQLite's automatic checkpoint, which is itself a WAL hook.
    let passive = wake.clone();
    writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            let _ = passive.try_send(Kind::Passive);
        }
        Ok(())
    }))?;
    writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    std::thread::Builder::new()
        .name("vulcan-db-checkpoint".into())
        .spawn(move || {
            while let Ok(kind) = woken.recv() {
                let sql = match kind {
                    Kind::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
                    Kind::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
                };
                if let Err(e) = conn.query_row(sql, [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next commit retries it");
                }
            }
        })
        .context("failed to start the checkpoint thread")?;
    Ok(Checkpointer { wake })
}
