//! The data directory's owner: one process at a time opens a directory to
//! write ([`DataDirLock`]), with its pid in the lock file so that a second
//! one is told who holds it. The OS releases the lock if the holder dies.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use anyhow::Context as _;

/// The lock file that marks a data directory's owner.
pub const LOCK_FILE: &str = "vulcan.lock";

/// An exclusive lock on a data directory, with the holder's pid in the file.
pub(super) struct DataDirLock(#[expect(dead_code, reason = "held for its lock")] File);

impl DataDirLock {
    /// Takes the lock on `data_dir`, or says who holds it.
    pub(super) fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another vulcan process".to_owned(),
                    pid => format!("another vulcan process (pid {pid})"),
                };
                anyhow::bail!(
                    "the data directory {} is in use by {holder}; talk to that server with \
                     --server URL, or use another --data-dir",
                    data_dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("failed to lock {}", path.display()));
            }
        }
        // Ours now: say who holds it.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Self(file))
    }
}
