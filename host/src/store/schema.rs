//! Versioned schema migrations, applied in order and tracked in `PRAGMA user_version`.

use anyhow::Context as _;
use rusqlite::Connection;

/// Each entry moves the schema from version `index` to `index + 1`. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: modules, workloads, log lines.
    r#"
    CREATE TABLE modules (
        hash        TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        bytes       BLOB NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE workloads (
        id          TEXT PRIMARY KEY,
        status      TEXT NOT NULL,
        module_hash TEXT NOT NULL,
        args        TEXT NOT NULL,
        env         TEXT NOT NULL,
        limits      TEXT NOT NULL,
        exit_code   INTEGER,
        error       TEXT,
        output      BLOB,
        duration_ms INTEGER,
        line_count  INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        started_at  INTEGER,
        finished_at INTEGER
    );
    CREATE INDEX workloads_by_status ON workloads (status, id);
    -- Clustered on (workload, seq): appends are sequential and history reads are range scans.
    CREATE TABLE log_lines (
        workload_id TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        stream      TEXT NOT NULL,
        level       TEXT,
        line        TEXT NOT NULL,
        continued   INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (workload_id, seq)
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Brings the database up to [`SCHEMA_VERSION`]; a no-op when it is there already.
pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let current: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .context("failed to read the schema version")?
        .try_into()
        .context("negative schema version")?;
    anyhow::ensure!(
        current <= SCHEMA_VERSION,
        "the database has schema version {current}, newer than this vulcan ({SCHEMA_VERSION}); upgrade vulcan"
    );
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("failed to apply schema migration {}", index + 1))?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
