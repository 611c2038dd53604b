//! Vulcan: a WebAssembly-sandboxed workload host.
//!
//! # Layout
//!
//! Modules in the order data moves through them:
//!
//! - [`cli`] — the `vulcan` command line (`run`, `ls`, `logs`).
//! - [`registry`] — content-addressed modules and the compile cache.
//! - [`runner`] — takes a workload from `pending` to its terminal status.
//! - [`engine`] — the wasmtime backend: sandbox, limits, outcomes.
//! - [`logs`] — guest bytes → lines → numbered records → [`logs::LogBroker`] (live).
//! - [`store`] — SQLite: modules, workloads, batched log lines (durable, history).
//! - [`workload`] — the plain data every stage shares.

pub mod api;
pub mod cli;
pub mod engine;
pub mod logs;
pub mod metrics;
pub mod registry;
pub mod runner;
pub mod store;
pub mod workload;
