//! The compiled modules a node keeps, in memory and as artifacts on disk,
//! bounded together by `--max-cache-bytes`.
//!
//! Each compiled module counts as the size of its artifact (what its code
//! takes mapped in memory, and on disk). Past the bound, the module used
//! least recently goes: out of memory, and its artifact file deleted; a run
//! that needs it again loads or compiles it anew. A module in use stays
//! alive in its runs (they hold it) whatever the cache drops. At start,
//! artifacts on disk beyond the bound are deleted oldest first. Owns no
//! compiling and no module bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::CompiledModule;

/// Default `--max-cache-bytes`.
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 2 << 30;

struct Entry {
    module: Arc<CompiledModule>,
    bytes: u64,
    path: PathBuf,
    used: u64,
}

/// Compiled modules by hash, least recently used first to go.
pub(super) struct CompiledCache {
    entries: HashMap<String, Entry>,
    total: u64,
    max: u64,
    tick: u64,
}

impl CompiledCache {
    /// An empty cache of at most `max` bytes; deletes artifacts in `dir`
    /// beyond that, oldest first.
    pub(super) fn new(dir: &Path, max: u64) -> Self {
        trim_dir(dir, max);
        Self {
            entries: HashMap::new(),
            total: 0,
            max,
            tick: 0,
        }
    }

    /// The module of `hash`, marked as just used.
    pub(super) fn get(&mut self, hash: &str) -> Option<Arc<CompiledModule>> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(hash)?;
        entry.used = tick;
        Some(Arc::clone(&entry.module))
    }

    /// True when `hash` is in memory.
    pub(super) fn contains(&self, hash: &str) -> bool {
        self.entries.contains_key(hash)
    }

    /// Keeps `module` (whose artifact is at `path`), then drops the least
    /// recently used others while the cache is over its bound.
    pub(super) fn insert(&mut self, hash: &str, module: Arc<CompiledModule>, path: PathBuf) {
        self.tick += 1;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        if let Some(old) = self.entries.insert(
            hash.to_owned(),
            Entry {
                module,
                bytes,
                path,
                used: self.tick,
            },
        ) {
            self.total -= old.bytes;
        }
        self.total += bytes;
        while self.total > self.max && self.entries.len() > 1 {
            let Some(oldest) = (self.entries.iter())
                .filter(|(h, _)| h.as_str() != hash)
                .min_by_key(|(_, e)| e.used)
                .map(|(h, _)| h.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }

    /// Drops `hash` from memory and deletes its artifact; true if it was kept.
    pub(super) fn remove(&mut self, hash: &str) -> bool {
        match self.entries.remove(hash) {
            Some(entry) => {
                self.total -= entry.bytes;
                let _ = std::fs::remove_file(&entry.path);
                true
            }
            None => false,
        }
    }

    /// Bytes of the modules kept.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.total
    }
}

/// Deletes the oldest artifacts in `dir` until the rest fit in `max` bytes.
fn trim_dir(dir: &Path, max: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}
