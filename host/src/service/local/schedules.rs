//! One node's schedules: their definitions in a SQLite file of their own
//! (`schedules.db` in the data directory), one row per tenant and name.
//! Small and rarely written, so it has a connection of its own rather than
//! a place in the store's writer.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::super::ServiceError;
use crate::schedule::Schedule;

/// The schedules file in a data directory.
pub const FILE: &str = "schedules.db";

/// The node's schedule definitions.
#[derive(Clone)]
pub(super) struct ScheduleBook {
    conn: Arc<Mutex<Connection>>,
}

impl ScheduleBook {
    /// Opens (or makes) the book in `data_dir`.
    pub(super) fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS schedules (
                 tenant TEXT NOT NULL,
                 name   TEXT NOT NULL,
                 body   TEXT NOT NULL,
                 PRIMARY KEY (tenant, name)
             ) WITHOUT ROWID;",
        )
        .with_context(|| format!("failed to set up {}", path.display()))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the schedules' thread failed: {e}"))?
        .map_err(ServiceError::Internal)
    }

    /// Adds `schedule`; 409 if its tenant has one of that name.
    pub(super) async fn create(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        let (tenant, name) = key(schedule.tenant.as_deref(), &schedule.name);
        let body = serde_json::to_string(schedule).map_err(anyhow::Error::from)?;
        let added = self
            .with(move |c| {
                Ok(c.execute(
                    "INSERT OR IGNORE INTO schedules (tenant, name, body) VALUES (?1, ?2, ?3)",
                    params![tenant, name, body],
                )?)
            })
            .await?;
        match added {
            1 => Ok(()),
            _ => Err(ServiceError::Conflict(format!(
                "a schedule named {} exists",
                schedule.name
            ))),
        }
    }

    /// Writes `schedule` over the one of its tenant and name.
    pub(super) async fn put(&self, schedule: &Schedule) -> Result<(), ServiceError> {
        let (tenant, name) = key(schedule.tenant.as_deref(), &schedule.name);
        let body = serde_json::to_string(schedule).map_err(anyhow::Error::from)?;
        self.with(move |c| {
            c.execute(
                "UPDATE schedules SET body = ?3 WHERE tenant = ?1 AND name = ?2",
                params![tenant, name, body],
            )?;
            Ok(())
        })
        .await
    }

    /// `tenant`'s schedule `name`.
    pub(super) async fn get(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Schedule>, ServiceError> {
        let (tenant, name) = key(tenant, name);
        self.with(move |c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM schedules WHERE tenant = ?1 AND name = ?2",
                    params![tenant, name],
                    |r| r.get(0),
                )
                .optional()?;
            body.map(|b| serde_json::from_str(&b).context("corrupt schedule"))
                .transpose()
        })
        .await
    }

    /// Every schedule.
    pub(super) async fn list(&self) -> Result<Vec<Schedule>, ServiceError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT body FROM schedules")?;
            let bodies = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            bodies
                .iter()
                .map(|b| serde_json::from_str(b).context("corrupt schedule"))
                .collect()
        })
        .await
    }

    /// Deletes `tenant`'s schedule `name`.
    pub(super) async fn delete(
        &self,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<(), ServiceError> {
        let (tenant, name) = key(tenant, name);
        self.with(move |c| {
            c.execute(
                "DELETE FROM schedules WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )?;
            Ok(())
        })
        .await
    }
}

/// The row key: a server without tenants keeps its schedules under "".
fn key(tenant: Option<&str>, name: &str) -> (String, String) {
    (tenant.unwrap_or("").to_owned(), name.to_owned())
}
