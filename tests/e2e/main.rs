//! End-to-end tests: the real `vulcan` binary on real example guests, checked
//! against the terminal bytes, exit codes and the rows in the SQLite file.
//!
//! One test binary (links once):
//! - `run`     — `vulcan run`: output, exit codes, limits, sandbox, bad input.
//! - `local`   — `vulcan ls` / `vulcan logs` reading the local database.

mod local;
mod run;
mod support;
