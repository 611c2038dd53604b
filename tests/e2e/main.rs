//! End-to-end tests: the real `vulcan` binary on real example guests, checked
//! against the terminal bytes, exit codes and the rows in the SQLite file.
//!
//! One test binary (links once):
//! - `run`     — `vulcan run`: output, exit codes, limits, sandbox, bad input.
//! - `local`   — `vulcan ls` / `vulcan logs` reading the local database.
//! - `api`     — `vulcan serve` over HTTP: uploads, runs, SSE, errors, restarts.
//! - `authors` — what a workload author meets: end messages, build-mistake
//!   errors, settings, the `log` crate, log levels, output as returned.
//! - `boundary` — the browser boundary attacked from Chromium: cross-origin
//!   posts and a rebinding page.
//! - `client`  — the CLI against a running server.
//! - `console` — the web console in a real headless Chromium (WebDriver):
//!   runs, live lines, kill, HTML as text, the token, a long log.
//! - `cluster` — several `vulcan serve` nodes on one real NATS JetStream:
//!   dispatch, slots, logs across nodes, kills, node loss, NATS loss.
//! - `cluster_auth` — nodes authenticating to NATS (user and password, TLS
//!   with a client certificate), secrets never printed, forged kills refused.
//! - `cluster_tenants` — tenants and retention on three nodes: every
//!   endpoint scoped on every node, `max_concurrent` cluster-wide, a lost
//!   node's quota places given back, 410 after retention on every node.
//! - `cluster_faults` — a stalled NATS, two nodes with one id, a copied data
//!   directory, SIGTERM with NATS gone, log readers that must not pile up.
//! - `outbound` — components' HTTP requests: allowed hosts, operator caps,
//!   private addresses, refusals recorded, timeout and kill.
//! - `read_model` — the same bytes from `status`/`ls`/`logs` locally and remotely;
//!   the same exit codes from `run` and `submit`.
//! - `components` — SDK workloads and WASI preview2 commands, locally and via the API.
//! - `tenants` — tokens naming tenants: isolation on every endpoint, quotas,
//!   `whoami`, `tenant add`, bad tenants files.
//! - `faults` — a full disk (tmpfs), stdout and stderr on `/dev/full`, a
//!   store writer that dies.
//! - `jobs`    — the job queue: work beyond capacity queued, fair share
//!   between tenants, the queue across a restart, idempotent submits, on
//!   one node and on three.
//! - `retries` — retry policies: a job failing twice then succeeding, each
//!   attempt's lines, a kill during a backoff, a backoff across a restart.
//! - `hardening` — hostile guests and clients, faults, crashes: bounded memory,
//!   no stuck workload, no lost line.

mod api;
mod authors;
mod boundary;
mod browser;
mod client;
mod cluster;
mod cluster_auth;
mod cluster_faults;
mod cluster_tenants;
mod components;
mod console;
mod faults;
mod hardening;
mod jobs;
mod local;
mod outbound;
mod read_model;
mod retries;
mod run;
mod support;
mod tenants;
