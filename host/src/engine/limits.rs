//! Per-store resource limiting whose failures can be told apart from other traps.

use wasmtime::ResourceLimiter;

/// Most table elements a guest may have; tables are small in practice and each
/// element costs host memory.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The guest tried to grow linear memory past its limit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (the guest asked for {requested} bytes)")]
pub struct MemoryLimitExceeded {
    /// The limit, in bytes.
    pub limit: u64,
    /// The size the guest wanted.
    pub requested: u64,
}

/// Enforces a workload's memory limit; a refused growth traps with
/// [`MemoryLimitExceeded`] rather than returning -1, so the outcome is exact.
#[derive(Debug, Default)]
pub struct GuestLimiter {
    max_memory: Option<u64>,
}

impl GuestLimiter {
    /// A limiter allowing at most `max_memory` bytes of linear memory.
    pub fn new(max_memory: Option<u64>) -> Self {
        Self { max_memory }
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match self.max_memory {
            Some(limit) if desired as u64 > limit => {
                Err(wasmtime::Error::new(MemoryLimitExceeded {
                    limit,
                    requested: desired as u64,
                }))
            }
            _ => Ok(true),
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
