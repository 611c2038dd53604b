//! Room kept back on the data directory's disk for the writes that end
//! workloads, and the store's "disk full" state.
//!
//! When SQLite reports a full disk, lines already lost cannot come back, but
//! the workloads they belong to must still end with a record that says so —
//! and on a full disk even that small update fails. So the store keeps a file
//! of [`DEFAULT_RESERVE_BYTES`] on the same disk. At the first full disk it
//! deletes that file and enters the full state: from then on log lines and
//! new workloads are refused (their workloads fail with `failure: store`),
//! while terminal statuses and other small writes use the room given back.
//! Every [`RESTORE_EVERY`] the writer tries to write the reserve again, and a
//! second file of the same size beside it; only when both fit (there is room
//! for the reserve and as much again) does the full state end, so a disk
//! that is still nearly full does not flip back and forth.
//!
//! Owns the reserve file and the full flag; no SQL.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Size of the reserve file.
pub const DEFAULT_RESERVE_BYTES: u64 = 8 << 20;

/// The reserve file's name in the data directory.
pub const RESERVE_FILE: &str = "vulcan.reserve";

/// Shortest time between two attempts to leave the full state.
pub(super) const RESTORE_EVERY: Duration = Duration::from_secs(1);

/// The reserve file and whether the disk is taken to be full.
pub(super) struct StorageReserve {
    path: PathBuf,
    bytes: u64,
    full: AtomicBool,
    /// When leaving the full state was last tried.
    last_try: Mutex<Option<Instant>>,
}

impl StorageReserve {
    /// Makes sure `dir` holds a reserve of `bytes` (0: none kept); a disk
    /// that cannot take it now starts in the full state.
    pub(super) fn open(dir: &Path, bytes: u64) -> Self {
        let reserve = Self {
            path: dir.join(RESERVE_FILE),
            bytes,
            full: AtomicBool::new(false),
            last_try: Mutex::new(None),
        };
        let present = std::fs::metadata(&reserve.path).is_ok_and(|m| m.len() >= bytes);
        if bytes > 0 && !present && fill(&reserve.path, bytes).is_err() {
            let _ = std::fs::remove_file(&reserve.path);
            tracing::warn!(
                path = %reserve.path.display(), bytes,
                "no room for the storage reserve: log lines are refused until the disk has room"
            );
            reserve.full.store(true, Ordering::Release);
        }
        reserve
    }

    /// True while log lines and new workloads are refused.
    pub(super) fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// The disk is full: gives the reserve's room to the writes that end
    /// workloads, and refuses lines from now on.
    pub(super) fn release(&self) {
        if !self.full.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
            *self.last_try.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            tracing::error!(
                "the disk of the data directory is full: log lines and new workloads are \
                 refused (their workloads fail), ends are still recorded; writes resume when \
                 there is room again"
            );
        }
    }

    /// In the full state, at most every [`RESTORE_EVERY`]: leaves it if the
    /// reserve and as much again fit on the disk. True if it left.
    pub(super) fn try_restore(&self) -> bool {
        if !self.is_full() {
            return false;
        }
        {
            let mut last = self.last_try.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RESTORE_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let probe = self.path.with_extension("probe");
        let fits = fill(&self.path, self.bytes).is_ok() && fill(&probe, self.bytes).is_ok();
        let _ = std::fs::remove_file(&probe);
        if !fits {
            let _ = std::fs::remove_file(&self.path);
            return false;
        }
        self.full.store(false, Ordering::Release);
        tracing::warn!("the data directory's disk has room again: log lines are stored again");
        true
    }

    /// Lets the next [`StorageReserve::try_restore`] try at once.
    #[cfg(test)]
    pub(super) fn try_soon(&self) {
        *self.last_try.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// When the writer should next try [`StorageReserve::try_restore`].
    pub(super) fn next_try(&self) -> Option<Instant> {
        if !self.is_full() {
            return None;
        }
        let last = *self.last_try.lock().unwrap_or_else(|p| p.into_inner());
        Some(last.map_or_else(Instant::now, |t| t + RESTORE_EVERY))
    }
}

/// Writes `bytes` of zeros to `path` (a sparse file would keep no room;
/// the file system counts written blocks as used at once, before a sync).
fn fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_frees_the_file_and_restore_takes_it_back_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = StorageReserve::open(dir.path(), 4096);
        let path = dir.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert!(!reserve.is_full());
        reserve.release();
        assert!(reserve.is_full());
        assert!(!path.exists(), "its room is given back");
        // Not before the interval: the last attempt was the release.
        assert!(!reserve.try_restore());
        *reserve.last_try.lock().unwrap() = None;
        assert!(reserve.try_restore());
        assert!(!reserve.is_full());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert!(!path.with_extension("probe").exists());
    }
}
