//! Checkpoints off the writer: WAL frames are copied into the database file
//! by a thread and connection of their own.
//!
//! SQLite's automatic checkpoint runs inside whichever commit crosses its
//! threshold, so that commit — and the request waiting on it — pays for
//! copying and syncing megabytes. Here the writer's commit only notes the
//! WAL's size; past [`CHECKPOINT_PAGES`] it wakes this thread, whose PASSIVE
//! checkpoint takes no lock a writer or reader waits on. Owns nothing else.

use std::path::Path;
use std::sync::mpsc;

use anyhow::Context as _;
use rusqlite::Connection;

/// WAL size, in pages, past which a checkpoint is started (SQLite's own
/// automatic threshold).
pub(super) const CHECKPOINT_PAGES: i32 = 1000;

/// Starts the checkpointer for `path` and makes `writer` wake it after any
/// commit that leaves the WAL at [`CHECKPOINT_PAGES`] or more. The thread
/// ends when `writer` is closed.
pub(super) fn start(path: &Path, writer: &mut Connection) -> anyhow::Result<()> {
    let conn = Connection::open(path)
        .with_context(|| format!("failed to open {} for checkpoints", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // One pending wake-up is enough: a checkpoint copies every frame it can.
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    // Replaces SQLite's automatic checkpoint, which is itself a WAL hook.
    writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            let _ = wake.try_send(());
        }
        Ok(())
    }))?;
    std::thread::Builder::new()
        .name("vulcan-db-checkpoint".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next commit retries it");
                }
            }
        })
        .context("failed to start the checkpoint thread")?;
    Ok(())
}
