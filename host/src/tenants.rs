//! Who may call the API: tenants, their tokens (kept as SHA-256 hashes) and
//! their quotas, from the tenants file (`--tenants FILE`).
//!
//! Owns parsing and checking that file, turning a bearer token into a
//! [`Tenant`] in time independent of the token, and writing new tenants.
//! It knows nothing of HTTP or of workloads: the API decides what a tenant
//! may see.
//!
//! ```toml
//! [[tenants]]
//! name = "alice"
//! token_sha256 = "…64 hex digits…"   # `vulcan tenant add alice` writes this
//! admin = false                       # sees and acts on every tenant's work
//! max_concurrent = 4                  # workloads at once (beyond: 429)
//! max_timeout_ms = 60000              # the most its workloads may ask for
//! max_memory_bytes = 268435456
//! max_fuel = 1000000000
//! max_output_bytes = 10485760
//! retain_for_ms = 86400000            # its lines kept a day after it ends
//! max_log_bytes = 1073741824          # its stored lines, at most
//! on_log_quota = "prune_oldest"       # or "refuse": new runs get 429
//! max_followers = 64                  # log streams open at once per node (beyond: 429)
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::workload::Limits;

/// One tenant as the file describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    /// Its name: what records and `whoami` show.
    pub name: String,
    /// Hex SHA-256 of its token; the token itself is never stored.
    pub token_sha256: String,
    /// Sees and acts on every tenant's workloads and modules, and reads `/metrics`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// Most of its workloads running at once (more wait in the queue);
    /// none: no quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Its share of the node's slots against other tenants with queued
    /// work (default 1): the next free slot goes to the tenant with the
    /// fewest running workloads per unit of weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The longest timeout its workloads may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_ms: Option<u64>,
    /// The most memory its workloads may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    /// The most fuel its workloads may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fuel: Option<u64>,
    /// The most output its workloads may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// How long its finished workloads' lines are kept (instead of the
    /// server's `--retain-for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_for_ms: Option<u64>,
    /// The most bytes of log lines its workloads may keep stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_log_bytes: Option<u64>,
    /// What happens when its stored lines reach `max_log_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_log_quota: Option<LogQuotaAction>,
    /// Most of its log followers (SSE streams) open at once on a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_followers: Option<usize>,
}

/// What a tenant's stored-log quota does when it is reached.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogQuotaAction {
    /// Retention deletes the lines of its oldest finished workloads until it
    /// is under quota again; runs are never refused for it.
    #[default]
    PruneOldest,
    /// Its new runs are refused (429) until retention by age frees room;
    /// nothing is deleted early.
    Refuse,
}

impl TenantEntry {
    /// A tenant with this token hash, no role and no quotas.
    pub fn new(name: impl Into<String>, token_sha256: String) -> Self {
        Self {
            name: name.into(),
            token_sha256,
            admin: false,
            max_concurrent: None,
            weight: None,
            max_timeout_ms: None,
            max_memory_bytes: None,
            max_fuel: None,
            max_output_bytes: None,
            retain_for_ms: None,
            max_log_bytes: None,
            on_log_quota: None,
            max_followers: None,
        }
    }
}

/// The tenants file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    /// Every tenant.
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
}

/// A tenant the server knows, with its live quota.
#[derive(Debug)]
pub struct Tenant {
    /// What the file says.
    pub entry: TenantEntry,
    hash: [u8; 32],
    /// One permit per workload it may run at once.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// One permit per log follower it may have open at once.
    pub followers: Option<Arc<tokio::sync::Semaphore>>,
}

impl Tenant {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// Whether it sees and acts on everything.
    pub fn is_admin(&self) -> bool {
        self.entry.admin
    }

    /// The most its workloads may ask for, limit by limit.
    pub fn max_limits(&self) -> Limits {
        Limits {
            timeout_ms: self.entry.max_timeout_ms,
            max_memory_bytes: self.entry.max_memory_bytes,
            fuel: self.entry.max_fuel,
            max_output_bytes: self.entry.max_output_bytes,
        }
    }

    /// Its stored-log quota when reaching it refuses new runs.
    pub fn refuses_at_log_bytes(&self) -> Option<u64> {
        match self.entry.on_log_quota.unwrap_or_default() {
            LogQuotaAction::Refuse => self.entry.max_log_bytes,
            LogQuotaAction::PruneOldest => None,
        }
    }

    /// How many of its workloads hold a quota slot now.
    pub fn running(&self) -> usize {
        match (&self.slots, self.entry.max_concurrent) {
            (Some(slots), Some(max)) => max - slots.available_permits(),
            _ => 0,
        }
    }
}

/// Every tenant the server accepts tokens of.
#[derive(Debug, Default)]
pub struct Tenants {
    all: Vec<Arc<Tenant>>,
}

impl Tenants {
    /// Reads and checks the tenants file; with `admin_token` (`--token`) an
    /// admin tenant named `admin` is added.
    pub fn load(path: Option<&Path>, admin_token: Option<&str>) -> anyhow::Result<Self> {
        let mut file = match path {
            Some(path) => read_file(path)?,
            None => TenantsFile::default(),
        };
        if let Some(token) = admin_token {
            if file.tenants.iter().any(|t| t.name == "admin") {
                bail!("--token adds a tenant named `admin`, and the tenants file has one too");
            }
            file.tenants.push(TenantEntry {
                admin: true,
                ..TenantEntry::new("admin", token_hash(token))
            });
        }
        Self::from_file(file)
    }

    /// Checks `file`: names well-formed and unique, hashes well-formed and unique.
    pub fn from_file(file: TenantsFile) -> anyhow::Result<Self> {
        let (mut names, mut hashes) = (HashSet::new(), HashSet::new());
        let mut all = Vec::new();
        for entry in file.tenants {
            check_name(&entry.name)?;
            if !names.insert(entry.name.clone()) {
                bail!("tenant `{}` is listed twice", entry.name);
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&entry.token_sha256, &mut hash).with_context(|| {
                format!(
                    "tenant `{}`: token_sha256 must be 64 hex digits",
                    entry.name
                )
            })?;
            if !hashes.insert(hash) {
                bail!(
                    "tenant `{}` has the same token as another tenant",
                    entry.name
                );
            }
            if entry.weight == Some(0) {
                bail!("tenant `{}`: weight must be at least 1", entry.name);
            }
            if entry.max_concurrent == Some(0) {
                bail!("tenant `{}`: max_concurrent must be at least 1", entry.name);
            }
            let slots = entry
                .max_concurrent
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
            if entry.max_followers == Some(0) {
                bail!("tenant `{}`: max_followers must be at least 1", entry.name);
            }
            let followers = entry
                .max_followers
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
            all.push(Arc::new(Tenant {
                entry,
                hash,
                slots,
                followers,
            }));
        }
        Ok(Self { all })
    }

    /// The tenant named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.all.iter().find(|t| t.name() == name)
    }

    /// Tenants with a retention of their own: (name, how long).
    pub fn retentions(&self) -> Vec<(String, std::time::Duration)> {
        self.all
            .iter()
            .filter_map(|t| {
                let ms = t.entry.retain_for_ms?;
                Some((t.name().to_owned(), std::time::Duration::from_millis(ms)))
            })
            .collect()
    }

    /// Tenants whose oldest lines are pruned above a stored size: (name, bytes).
    pub fn log_caps(&self) -> Vec<(String, u64)> {
        self.all
            .iter()
            .filter(|t| t.entry.on_log_quota.unwrap_or_default() == LogQuotaAction::PruneOldest)
            .filter_map(|t| Some((t.name().to_owned(), t.entry.max_log_bytes?)))
            .collect()
    }

    /// The names of the tenants with a `max_concurrent`.
    pub fn with_quota(&self) -> Vec<String> {
        (self.all.iter())
            .filter(|t| t.entry.max_concurrent.is_some())
            .map(|t| t.name().to_owned())
            .collect()
    }

    /// True when no token is asked for (no tenants and no `--token`).
    pub fn is_open(&self) -> bool {
        self.all.is_empty()
    }

    /// The tenant whose token this is. Every tenant's hash is compared, each
    /// in constant time, so the time taken says nothing about which (if any)
    /// matched or how much of a hash did.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Tenant>> {
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for tenant in &self.all {
            let diff = given
                .iter()
                .zip(tenant.hash.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(Arc::clone(tenant));
            }
        }
        found
    }
}

/// Hex SHA-256 of a token, as the tenants file keeps it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: 32 bytes from the operating system, in hex.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!("vlc_{}", hex::encode(bytes)))
}

/// Adds `entry` to the tenants file at `path` (created if missing) after
/// checking the result as the server would.
pub fn add_to_file(path: &Path, entry: TenantEntry) -> anyhow::Result<()> {
    let mut file = match path.exists() {
        true => read_file(path)?,
        false => TenantsFile::default(),
    };
    if file.tenants.iter().any(|t| t.name == entry.name) {
        bail!(
            "tenant `{}` already exists in {}",
            entry.name,
            path.display()
        );
    }
    file.tenants.push(entry);
    let text = toml::to_string(&file).context("failed to write the tenants file")?;
    Tenants::from_file(toml::from_str(&text)?)?;
    // Written beside and renamed, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))
}

fn read_file(path: &Path) -> anyhow::Result<TenantsFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the tenants file {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let parsed = match is_json {
        true => serde_json::from_str(&text).map_err(anyhow::Error::from),
        false => toml::from_str(&text).map_err(anyhow::Error::from),
    };
    parsed.with_context(|| format!("the tenants file {} does not parse", path.display()))
}

/// True when `name` can name a tenant: 1-64 ASCII letters, digits, `-`, `_`
/// or `.` (so it is also a file name).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !is_valid_name(name) {
        bail!("tenant name `{name}` must be 1-64 letters, digits, `-`, `_` or `.`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, token: &str) -> TenantEntry {
        TenantEntry::new(name, token_hash(token))
    }

    #[test]
    fn a_token_names_its_tenant_and_no_other() {
        let tenants = Tenants::from_file(TenantsFile {
            tenants: vec![entry("alice", "a-token"), entry("bob", "b-token")],
        })
        .unwrap();
        assert_eq!(tenants.authenticate("a-token").unwrap().name(), "alice");
        assert_eq!(tenants.authenticate("b-token").unwrap().name(), "bob");
        assert!(tenants.authenticate("a-toke").is_none());
        assert!(tenants.authenticate("").is_none());
    }

    #[test]
    fn duplicate_names_and_tokens_and_bad_hashes_are_refused() {
        let twice = |a: TenantEntry, b: TenantEntry| {
            Tenants::from_file(TenantsFile {
                tenants: vec![a, b],
            })
            .unwrap_err()
            .to_string()
        };
        assert!(twice(entry("a", "t1"), entry("a", "t2")).contains("listed twice"));
        assert!(twice(entry("a", "t1"), entry("b", "t1")).contains("same token"));
        let mut bad = entry("c", "t");
        bad.token_sha256 = "abc".into();
        assert!(twice(entry("a", "t1"), bad).contains("64 hex digits"));
        assert!(twice(entry("a", "t1"), entry("no spaces", "t2")).contains("tenant name"));
    }

    #[test]
    fn added_tenants_are_written_hashed_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        let token = new_token().unwrap();
        assert_eq!(token.len(), 4 + 64);
        add_to_file(&path, entry("alice", &token)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself is never stored");
        let err = add_to_file(&path, entry("alice", "other")).unwrap_err();
        assert!(err.to_string().contains("already exists"));
        let tenants = Tenants::load(Some(&path), Some("admin-token")).unwrap();
        assert_eq!(tenants.authenticate(&token).unwrap().name(), "alice");
        assert!(tenants.authenticate("admin-token").unwrap().is_admin());
    }
}
