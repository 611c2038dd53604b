//! Who is calling, and what that caller may see.
//!
//! Owns the rule that a tenant sees only its own workloads and modules (and
//! that anything else answers 404, so ids cannot be probed), and that an
//! admin, or anyone on a server without tenants, sees everything. It does
//! not read tokens (the HTTP edge does) nor run anything.

use std::sync::Arc;

use super::ServiceError as ApiError;
use crate::tenants::Tenant;

/// The caller of one request: a tenant, or anyone on an open server.
#[derive(Clone)]
pub struct Caller(pub Option<Arc<Tenant>>);

impl Caller {
    /// The tenant, when the server has tenants.
    pub fn tenant(&self) -> Option<&Arc<Tenant>> {
        self.0.as_ref()
    }

    /// Sees and acts on everything: an admin, or an open server's caller.
    pub fn sees_all(&self) -> bool {
        self.0.as_ref().is_none_or(|t| t.is_admin())
    }

    /// The tenant whose things a list shows; `None`: all.
    pub fn scope(&self) -> Option<&str> {
        match self.sees_all() {
            true => None,
            false => self.0.as_deref().map(Tenant::name),
        }
    }

    /// The name recorded on what this caller creates.
    pub fn owner(&self) -> Option<String> {
        self.0.as_deref().map(|t| t.name().to_owned())
    }

    /// 404 unless the caller may see workload `id`, which belongs to `owner`.
    pub fn check_workload(
        &self,
        id: impl std::fmt::Display,
        owner: Option<&str>,
    ) -> Result<(), ApiError> {
        match self.sees_all() || owner == self.scope() {
            true => Ok(()),
            false => Err(ApiError::NotFound(format!("workload {id} not found"))),
        }
    }

    /// 403 unless the caller is an admin (or the server is open).
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self.sees_all() {
            true => Ok(()),
            false => Err(ApiError::Forbidden(format!("{what} is for admins only"))),
        }
    }
}
