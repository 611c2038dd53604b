//! Admission: what a submission must pass before any backend sees it, and
//! the limits it runs under — the server's defaults and maxima, the
//! tenant's maxima, its stored-log quota and the operator's outbound rules.
//!
//! Written once for both backends; it reads no store and starts nothing (the
//! backend counts a tenant's running workloads and stored bytes, see
//! [`super::Service`]).

use std::sync::Arc;

use super::ServiceError as ApiError;
use super::caller::Caller;
use crate::outbound::OutboundPolicy;
use crate::tenants::{Tenant, Tenants};
use crate::workload::{Limits, WorkloadSpec};

/// The limits a server gives a workload that asks for none, and the most one
/// may ask for (`None`: unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitPolicy {
    /// Limits of a request that names none.
    pub default: Limits,
    /// The most a request may ask for, limit by limit.
    pub max: Limits,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        Self {
            default: Limits {
                timeout_ms: Some(5 * 60 * 1000),
                max_memory_bytes: Some(256 << 20),
                fuel: None,
                max_output_bytes: Some(256 << 20),
            },
            max: Limits {
                timeout_ms: Some(60 * 60 * 1000),
                max_memory_bytes: Some(4 << 30),
                fuel: None,
                max_output_bytes: Some(4 << 30),
            },
        }
    }
}

impl LimitPolicy {
    /// Checks that every default is within its maximum.
    pub fn validate(&self) -> Result<(), String> {
        for (name, default, max) in self.each(&self.default) {
            match (default, max) {
                (_, None) => {}
                (None, Some(max)) => {
                    return Err(format!(
                        "--default-{name} is unlimited but --max-{name} is {max}"
                    ));
                }
                (Some(d), Some(m)) if d > m => {
                    return Err(format!("--default-{name} ({d}) exceeds --max-{name} ({m})"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `asked`, with defaults for what it leaves open; a limit above its
    /// maximum is refused.
    pub fn apply(&self, asked: &Limits) -> Result<Limits, ApiError> {
        for (name, value, max) in self.each(asked) {
            if let (Some(v), Some(m)) = (value, max)
                && v > m
            {
                return Err(ApiError::BadRequest(format!(
                    "limits.{} of {v} exceeds this server's maximum of {m}",
                    api_name(name)
                )));
            }
        }
        Ok(Limits {
            timeout_ms: asked.timeout_ms.or(self.default.timeout_ms),
            max_memory_bytes: asked.max_memory_bytes.or(self.default.max_memory_bytes),
            fuel: asked.fuel.or(self.default.fuel),
            max_output_bytes: asked.max_output_bytes.or(self.default.max_output_bytes),
        })
    }

    /// Each limit of `limits` by its flag name, with its maximum.
    fn each(&self, limits: &Limits) -> [(&'static str, Option<u64>, Option<u64>); 4] {
        [
            ("timeout", limits.timeout_ms, self.max.timeout_ms),
            ("memory", limits.max_memory_bytes, self.max.max_memory_bytes),
            ("fuel", limits.fuel, self.max.fuel),
            ("output", limits.max_output_bytes, self.max.max_output_bytes),
        ]
    }
}

/// How the API (in bytes and milliseconds) names a limit.
fn api_name(flag: &str) -> &'static str {
    match flag {
        "timeout" => "timeout_ms (ms)",
        "memory" => "max_memory (bytes)",
        "fuel" => "fuel",
        _ => "max_output_bytes",
    }
}

/// The limits a run of `tenant` gets: what it `asked` for is refused above
/// the tenant's maximum; the server's defaults (`applied`) are lowered to it,
/// and a limit left open gets it.
fn tenant_limits(tenant: &Tenant, asked: &Limits, applied: &Limits) -> Result<Limits, ApiError> {
    let max = tenant.max_limits();
    let fit = |name: &str, asked: Option<u64>, applied: Option<u64>, max: Option<u64>| match (
        asked, applied, max,
    ) {
        (Some(v), _, Some(m)) if v > m => Err(ApiError::BadRequest(format!(
            "limits.{} of {v} exceeds the maximum of {m} for tenant `{}`",
            api_name(name),
            tenant.name()
        ))),
        (_, Some(v), Some(m)) => Ok(Some(v.min(m))),
        (_, None, Some(m)) => Ok(Some(m)),
        (_, v, None) => Ok(v),
    };
    Ok(Limits {
        timeout_ms: fit(
            "timeout",
            asked.timeout_ms,
            applied.timeout_ms,
            max.timeout_ms,
        )?,
        max_memory_bytes: fit(
            "memory",
            asked.max_memory_bytes,
            applied.max_memory_bytes,
            max.max_memory_bytes,
        )?,
        fuel: fit("fuel", asked.fuel, applied.fuel, max.fuel)?,
        max_output_bytes: fit(
            "output",
            asked.max_output_bytes,
            applied.max_output_bytes,
            max.max_output_bytes,
        )?,
    })
}

/// What every submission is checked against.
pub struct Admission {
    /// Whose tokens the service accepts, with their quotas.
    pub tenants: Arc<Tenants>,
    /// The server's defaults and maxima.
    pub limits: LimitPolicy,
}

impl Admission {
    /// Fills in `spec`'s limits and tenant for `caller`, refusing what asks
    /// for more than the server or the tenant allows, or an outbound host
    /// the operator does not. `stored_log_bytes` is what the caller's tenant
    /// stores now, when the backend knows it.
    pub fn admit(
        &self,
        caller: &Caller,
        spec: &mut WorkloadSpec,
        outbound: &OutboundPolicy,
        stored_log_bytes: impl FnOnce(&str) -> Option<u64>,
    ) -> Result<(), ApiError> {
        let asked = spec.limits.clone();
        spec.limits = self.limits.apply(&asked)?;
        if let Some(tenant) = caller.tenant() {
            spec.limits = tenant_limits(tenant, &asked, &spec.limits)?;
            spec.tenant = Some(tenant.name().to_owned());
            if let Some(max) = tenant.refuses_at_log_bytes()
                && let Some(stored) = stored_log_bytes(tenant.name())
                && stored >= max
            {
                return Err(ApiError::LogQuotaExceeded(format!(
                    "tenant `{}` stores {stored} bytes of logs, its quota is {max}; \
                     runs are refused until retention deletes old logs",
                    tenant.name()
                )));
            }
        }
        outbound
            .check_spec(&spec.allowed_hosts)
            .map_err(ApiError::OutboundNotPermitted)
    }
}

/// The refusal of a run over `tenant`'s `max_concurrent`.
pub fn over_quota(tenant: &Tenant) -> ApiError {
    ApiError::QuotaExceeded(format!(
        "tenant `{}` already runs {} workloads, its quota",
        tenant.name(),
        tenant.entry.max_concurrent.unwrap_or(0)
    ))
}
