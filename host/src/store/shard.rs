//! One database file with its own writer thread, checkpointer and readers:
//! the main file, or a tenant's.
//!
//! SQLite lets one transaction write a file at a time, so whoever shares a
//! file shares its writer's queue: a tenant's commit would wait for the
//! chunk of another tenant's flood in hand and its commit. Each tenant's
//! workloads and lines therefore live in a file of their own
//! (`tenants/<name>.db` in the data directory), written by a thread of its
//! own; modules, their owners and workloads without a tenant stay in the
//! main file. Owns the opening of a file and its connections; which file a
//! workload lives in is [`super::Db`]'s choice.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};

use super::health::{StoreHealth, supervised};
use super::queue::LineQueue;
use super::reserve::StorageReserve;
use super::usage::LogUsage;
use super::writer::{Writer, WriterConfig, WriterStats};
use super::{SCHEMA_VERSION, StoreResult, WriterHandle, checkpoint, schema};

/// The folder of the data directory that holds tenants' files.
pub const TENANTS_DIR: &str = "tenants";

/// What every file's writer shares with the others of its data directory.
#[derive(Clone)]
pub(super) struct SharedByWriters {
    /// Room kept on the disk for ends.
    pub(super) reserve: Arc<StorageReserve>,
    /// Where a writer that stops says so.
    pub(super) health: Arc<StoreHealth>,
}

/// One database file and the connections to it.
pub(super) struct Shard {
    path: PathBuf,
    /// Whose workloads it holds: `None` for the main file.
    pub(super) tenant: Option<String>,
    /// `None` for a read-only handle.
    pub(super) writer: Option<WriterHandle>,
    /// `None` for a read-only handle.
    pub(super) checkpointer: Option<checkpoint::Checkpointer>,
    readers: Mutex<Vec<Connection>>,
}

impl Shard {
    /// Opens (creating and migrating if needed) the file at `path` with a
    /// writer thread of its own; `tenant` names whose file it is (`None`:
    /// the main one, which alone holds modules).
    pub(super) fn open(
        path: PathBuf,
        tenant: Option<String>,
        config: WriterConfig,
        shared: &SharedByWriters,
    ) -> anyhow::Result<Arc<Self>> {
        let mut conn = Connection::open(&path)
            .with_context(|| format!("failed to open database {}", path.display()))?;
        conn.busy_timeout(config.busy_timeout)?;
        // Room for every statement the writer repeats, line inserts of each
        // size included (SQLite's default keeps 16).
        conn.set_prepared_statement_cache_capacity(64);
        // Only takes on a new, empty database: retention then gives the
        // pages of deleted lines back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("failed to switch the database to WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        schema::migrate(&mut conn)
            .with_context(|| format!("failed to migrate database {}", path.display()))?;
        let checkpointer = checkpoint::start(&path, &mut conn)?;
        let usage = Arc::new(LogUsage::load(&conn).context("failed to sum stored log bytes")?);

        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(LineQueue::new(
            config.lane_bytes,
            config.total_bytes,
            config.max_batch,
        ));
        let stats = Arc::new(WriterStats::default());
        let writer = Writer {
            conn,
            config,
            // A tenant's file has no modules: the caller checked the module
            // in the main file (a tenant runs only modules it owns).
            checks_modules: tenant.is_none(),
            queue: Arc::clone(&queue),
            stats: Arc::clone(&stats),
            keys: Default::default(),
            retained: Vec::new(),
            usage: Arc::clone(&usage),
            delta: Default::default(),
            ops_in_a_row: false,
            joining: Default::default(),
            lingering: Vec::new(),
            reserve: Arc::clone(&shared.reserve),
            dies_at_commit: config.dies_at_commit.filter(|_| tenant.is_none()),
        };
        let (health, name) = (Arc::clone(&shared.health), path.display().to_string());
        thread::Builder::new()
            .name("vulcan-db-writer".into())
            .spawn(move || supervised(&name, &health, move || writer.run(rx)))
            .context("failed to start the database writer")?;
        Ok(Arc::new(Self {
            // One reader ready, so the first request after a start does
            // not pay for opening it.
            readers: Mutex::new(vec![open_reader(&path)?]),
            path,
            tenant,
            checkpointer: Some(checkpointer),
            writer: Some(WriterHandle {
                health: Arc::clone(&shared.health),
                tx,
                queue,
                stats,
                usage,
            }),
        }))
    }

    /// Opens an existing file for reading only, beside whoever writes it.
    pub(super) fn open_read_only(
        path: PathBuf,
        tenant: Option<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let reader = open_reader(&path)?;
        let version: i64 = reader.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        anyhow::ensure!(
            version as usize == SCHEMA_VERSION,
            "the database {} has schema version {version}, this vulcan reads {SCHEMA_VERSION}; \
             run a workload or the server once to migrate it",
            path.display()
        );
        Ok(Arc::new(Self {
            readers: Mutex::new(vec![reader]),
            path,
            tenant,
            checkpointer: None,
            writer: None,
        }))
    }

    /// Runs `f` on a pooled read-only connection (blocking).
    pub(super) fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }
}

/// The file of tenant `name` in `data_dir`. A valid tenant name
/// ([`crate::tenants::is_valid_name`]) is a file name, but for case: an
/// upper-case letter is written `^` and its lower case, so that `Alice` and
/// `alice` have files of their own on a file system that ignores case. A
/// name that is not valid stays in the main file.
pub(super) fn tenant_path(data_dir: &Path, name: &str) -> Option<PathBuf> {
    if !crate::tenants::is_valid_name(name) {
        return None;
    }
    let mut file = String::with_capacity(name.len() + 3);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            file.push('^');
        }
        file.push(c.to_ascii_lowercase());
    }
    file.push_str(".db");
    Some(data_dir.join(TENANTS_DIR).join(file))
}

/// The tenant whose file is named `file` (see [`tenant_path`]).
fn tenant_of(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".db")?;
    let mut name = String::with_capacity(stem.len());
    let mut upper = false;
    for c in stem.chars() {
        match c {
            '^' if !upper => upper = true,
            c if upper => {
                name.push(c.to_ascii_uppercase());
                upper = false;
            }
            c => name.push(c),
        }
    }
    Some(name)
}

/// Tenants whose files exist in `data_dir`, with their paths.
pub(super) fn existing_tenants(data_dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let dir = data_dir.join(TENANTS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = (path.file_name())
            .and_then(|n| n.to_str())
            .and_then(tenant_of);
        // Only what `tenant_path` makes (not `-wal`, `-shm` or strays).
        if let Some(name) = name
            && tenant_path(data_dir, &name).as_ref() == Some(&path)
        {
            found.push((name, path));
        }
    }
    found.sort();
    Ok(found)
}

pub(super) fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("failed to open {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_file_name_keeps_its_case_apart_and_reads_back() {
        let dir = Path::new("/data");
        let file = |name| {
            let path = tenant_path(dir, name)?;
            Some(path.file_name()?.to_str()?.to_owned())
        };
        assert_eq!(file("alice").as_deref(), Some("alice.db"));
        assert_eq!(file("Alice.B-2").as_deref(), Some("^alice.^b-2.db"));
        for name in ["alice", "Alice.B-2", "ALL_CAPS", "a.b"] {
            assert_eq!(tenant_of(&file(name).unwrap()).as_deref(), Some(name));
        }
        assert_eq!(file(".x").as_deref(), Some(".x.db"));
        let long = "a".repeat(65);
        for odd in ["", "a/b", "../x", "é", "a^b", &long] {
            assert_eq!(tenant_path(dir, odd), None, "{odd:?}");
        }
        assert_eq!(tenant_of("alice.db-wal"), None);
    }
}
