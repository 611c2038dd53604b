//! Vulcan: a WebAssembly-sandboxed workload host.
//!
//! # Layout
//!
//! Modules in the order data moves through them:
//!
//! - [`cli`] — the `vulcan` command line (`run`, `serve`, and the client commands).
//! - [`api`] — the HTTP edge of `vulcan serve`: uploads, runs, SSE, history.
//! - [`registry`] — content-addressed modules and the compile cache.
//! - [`runner`] — takes a workload from `pending` to its terminal status.
//! - [`engine`] — the wasmtime backend: preview1 modules, preview2 commands and
//!   `vulcan:workload` components; sandbox, limits, outcomes.
//! - [`logs`] — guest bytes → lines → numbered records → [`logs::LogBroker`] (live).
//! - [`store`] — SQLite: modules, workloads, batched log lines (durable, history).
//! - [`workload`] — the plain data every stage shares.
//! - [`metrics`] — Prometheus counters every stage reports into.

pub mod api;
pub mod cli;
pub mod engine;
pub mod logs;
pub mod metrics;
pub mod registry;
pub mod runner;
pub mod store;
pub mod workload;
