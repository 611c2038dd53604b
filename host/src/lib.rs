//! Vulcan: a WebAssembly-sandboxed workload host.
//!
//! # Layout
//!
//! Modules in the order data moves through them:
//!
//! - [`cli`] — the `vulcan` command line (`run`, `serve`, and the client commands).
//! - [`api`] — the HTTP edge of `vulcan serve`: the browser boundary (which
//!   hosts it answers for, which pages may change state), uploads, runs, SSE,
//!   history.
//! - [`service`] — what clients ask of a deployment, written once: admission,
//!   quotas and tenant scoping over one backend per deployment (one node, or
//!   a cluster), and the deployment's housekeeping.
//! - [`view`] — the read model every client shares: workloads and log lines
//!   as the API sends them and the CLI prints them.
//! - [`node`] — the composition root: one data directory's parts, wired once.
//! - [`cluster`] — cluster mode: a node joined to NATS JetStream (its
//!   credentials and signed control messages, shared records, dispatch, the
//!   cluster's copy of every line, kills, failover).
//! - [`registry`] — content-addressed modules and the compile cache (one
//!   compile at a time, tenants served in turn).
//! - [`runner`] — takes a workload from `pending` to its terminal status.
//! - [`engine`] — the wasmtime backend: preview1 modules, preview2 commands and
//!   `vulcan:workload` components; sandbox, limits, outcomes.
//! - [`outbound`] — which hosts a component's HTTP requests may reach.
//! - [`logs`] — guest bytes → lines → numbered records → [`logs::LogBroker`] (live).
//! - [`store`] — SQLite: modules, workloads, batched log lines (durable, history).
//! - [`workload`] — the plain data every stage shares.
//! - [`schedule`] — what a schedule is, and its cron arithmetic.
//! - [`metrics`] — Prometheus counters every stage reports into.
//! - [`diagnostics`] — the server's own log on stderr, which never stops a
//!   thread when stderr fails.

/// The text of a WAT guest in `tests/fixtures/wat/`, shared by the unit tests
/// and the end-to-end tests.
#[cfg(test)]
macro_rules! wat_fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/wat/",
            $name,
            ".wat"
        ))
    };
}

mod api;
pub mod cli;
pub mod cluster;
pub mod diagnostics;
pub mod engine;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod registry;
pub mod retention;
pub mod retry;
pub mod runner;
pub mod schedule;
pub mod service;
pub mod store;
pub mod tenants;
mod view;
pub mod vital;
pub mod workload;
