//! Versioned schema migrations, applied in order and tracked in `PRAGMA user_version`.

use anyhow::Context as _;
use rusqlite::Connection;

/// The columns of `workloads` after its id, as versions 1 and 2 created them
/// (a macro, so that the migrations stay string literals).
macro_rules! workload_columns {
    () => {
        "
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
"
    };
}

/// Each entry moves the schema from version `index` to `index + 1`. Append only.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: modules, workloads, log lines.
    concat!(
        r#"
    CREATE TABLE modules (
        hash        TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        bytes       BLOB NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE workloads (
        id          TEXT PRIMARY KEY,"#,
        workload_columns!(),
        r#"    );
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
    "#
    ),
    // 2: lines keyed by an integer workload key and an integer stream code. A row
    // shrinks to about half (the 26-character id was repeated in every line),
    // which is most of what a line costs the writer. `log_lines` stays readable
    // with its old columns as a view.
    concat!(
        r#"
    CREATE TABLE workloads_v2 (
        key         INTEGER PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,"#,
        workload_columns!(),
        r#"    );
    INSERT INTO workloads_v2 (id, status, module_hash, args, env, limits, exit_code, error,
                              output, duration_ms, line_count, created_at, started_at, finished_at)
        SELECT id, status, module_hash, args, env, limits, exit_code, error,
               output, duration_ms, line_count, created_at, started_at, finished_at
        FROM workloads ORDER BY id;
    -- stream: 0 stdout, 1 stderr, 2 log.
    CREATE TABLE log_records (
        workload    INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        stream      INTEGER NOT NULL,
        level       TEXT,
        line        TEXT NOT NULL,
        continued   INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (workload, seq)
    ) WITHOUT ROWID;
    INSERT INTO log_records
        SELECT w.key, l.seq,
               CASE l.stream WHEN 'stdout' THEN 0 WHEN 'stderr' THEN 1 ELSE 2 END,
               l.level, l.line, l.continued, l.created_at
        FROM log_lines l JOIN workloads_v2 w ON w.id = l.workload_id;
    DROP TABLE log_lines;
    DROP INDEX workloads_by_status;
    DROP TABLE workloads;
    ALTER TABLE workloads_v2 RENAME TO workloads;
    CREATE INDEX workloads_by_status ON workloads (status, id);
    CREATE VIEW log_lines AS
        SELECT w.id AS workload_id, r.seq,
               CASE r.stream WHEN 0 THEN 'stdout' WHEN 1 THEN 'stderr' ELSE 'log' END AS stream,
               r.level, r.line, r.continued, r.created_at
        FROM log_records r JOIN workloads w ON w.key = r.workload;
    "#
    ),
    // 3: why a workload failed, as a kind callers can branch on (timeout, store, …).
    r#"
    ALTER TABLE workloads ADD COLUMN failure TEXT;
    "#,
    // 4: key/value fields of a structured log record, as a JSON object (NULL: none).
    r#"
    ALTER TABLE log_records ADD COLUMN fields TEXT;
    "#,
    // 5: what a run was allowed besides its limits: the hosts its HTTP requests
    // may reach (a JSON list; NULL: none) and its minimum SDK log level.
    r#"
    ALTER TABLE workloads ADD COLUMN allowed_hosts TEXT;
    ALTER TABLE workloads ADD COLUMN log_level TEXT;
    "#,
    // 6: tenants. A workload's tenant (NULL on a server without tenants), and
    // which tenants uploaded which module (bytes are stored once; each tenant
    // sees only its own, with its own first-seen time).
    r#"
    ALTER TABLE workloads ADD COLUMN tenant TEXT;
    CREATE INDEX workloads_by_tenant ON workloads (tenant, id);
    CREATE TABLE module_owners (
        tenant      TEXT NOT NULL,
        hash        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (tenant, hash)
    ) WITHOUT ROWID;
    "#,
    // 7: retention. When a finished workload's lines were deleted (its
    // record stays, so a reader learns they are gone rather than missing).
    r#"
    ALTER TABLE workloads ADD COLUMN pruned_at INTEGER;
    CREATE INDEX workloads_to_prune ON workloads (finished_at) WHERE pruned_at IS NULL;
    "#,
    // 8: stored log bytes per workload (its lines' text and fields), kept by
    // the writer as it inserts, so a tenant's total is a sum over records
    // rather than over lines.
    r#"
    ALTER TABLE workloads ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE workloads SET log_bytes = COALESCE((
        SELECT SUM(length(CAST(line AS BLOB)) + COALESCE(length(CAST(fields AS BLOB)), 0))
        FROM log_records WHERE workload = workloads.key), 0)
        WHERE pruned_at IS NULL;
    "#,
    // 9: the job queue. A queued workload is a `pending` record with
    // `queued_at` set and, in `queued`, what running it needs beyond the
    // record (stdin, input, its queue deadline; cleared when it starts):
    // the pending records are the queue, so it survives a restart. An
    // idempotent submission keeps its key and the fingerprint of its spec; a
    // scheduled one, the name of its schedule.
    r#"
    ALTER TABLE workloads ADD COLUMN queued_at INTEGER;
    ALTER TABLE workloads ADD COLUMN queued TEXT;
    ALTER TABLE workloads ADD COLUMN idempotency_key TEXT;
    ALTER TABLE workloads ADD COLUMN fingerprint TEXT;
    ALTER TABLE workloads ADD COLUMN schedule TEXT;
    CREATE INDEX workloads_queued ON workloads (id) WHERE queued IS NOT NULL;
    CREATE INDEX workloads_by_idempotency_key ON workloads (tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    "#,
    // 10: retries. A workload with a retry policy keeps it (`retry`, JSON),
    // the number of its current attempt and a JSON array of its earlier
    // attempts; one waiting out its backoff is `pending` with `queued`
    // naming when it may start again.
    r#"
    ALTER TABLE workloads ADD COLUMN retry TEXT;
    ALTER TABLE workloads ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE workloads ADD COLUMN attempts TEXT;
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
