//! Write [Vulcan](https://github.com/) workloads in Rust.
//!
//! A workload is a function from its input to its output, exported with one
//! line. Build it for `wasm32-wasip2` as a `cdylib` and run it with
//! `vulcan run --input '{"a":1,"b":2}' target/wasm32-wasip2/release/sum.wasm`,
//! or upload it unchanged to `vulcan serve`.
//!
//! ```no_run
//! use vulcan_guest::{Json, log};
//!
//! #[derive(serde::Deserialize)]
//! struct In {
//!     a: i64,
//!     b: i64,
//! }
//!
//! #[derive(serde::Serialize)]
//! struct Out {
//!     sum: i64,
//! }
//!
//! fn run(Json(input): Json<In>) -> vulcan_guest::Result<Json<Out>> {
//!     log::info!("adding {} and {}", input.a, input.b);
//!     Ok(Json(Out { sum: input.a + input.b }))
//! }
//!
//! vulcan_guest::workload!(run);
//! # fn main() {}
//! ```
//!
//! - Input and output: [`Json<T>`] (through serde), `Vec<u8>`, `String` or
//!   `()`; see [`Input`] and [`Output`].
//! - Errors: return any error with `?`; the workload ends `failed` with its
//!   message (the whole chain of causes).
//! - Logs: [`log::trace!`] … [`log::error!`] record lines of stream `log` with
//!   their level; `println!` and `eprintln!` still work and are captured as
//!   stdout and stderr lines.
//! - The workload's id and module hash: [`metadata`]; its args and env:
//!   [`args`] and [`env`] (exactly what its spec gives, nothing of the host's).

#![deny(missing_docs)]

// Generated ABI glue for the `vulcan:workload` world; it has to use `unsafe`
// to move values across the component boundary.
#[allow(unsafe_code, missing_docs)]
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "workload",
        pub_export_macro: true,
        export_macro_name: "__export_workload",
        default_bindings_module: "vulcan_guest::__bindings",
    });
}

use __bindings::vulcan::workload::host;

/// What a workload returns: its output, or an error that fails it.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any error; `?` converts every `std::error::Error` into it.
pub type Error = anyhow::Error;

/// A value carried as JSON: `Json<T>` as input parses the input with serde,
/// as output serializes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Json<T>(pub T);

/// Types a workload can take as its input.
pub trait Input: Sized {
    /// Builds the value from the input bytes.
    fn from_input(bytes: Vec<u8>) -> Result<Self>;
}

/// Types a workload can return as its output.
pub trait Output {
    /// The output bytes.
    fn into_output(self) -> Result<Vec<u8>>;
}

impl Input for Vec<u8> {
    fn from_input(bytes: Vec<u8>) -> Result<Self> {
        Ok(bytes)
    }
}

impl Input for String {
    fn from_input(bytes: Vec<u8>) -> Result<Self> {
        String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("the input is not UTF-8: {e}"))
    }
}

impl Input for () {
    fn from_input(_: Vec<u8>) -> Result<Self> {
        Ok(())
    }
}

impl<T: serde::de::DeserializeOwned> Input for Json<T> {
    fn from_input(bytes: Vec<u8>) -> Result<Self> {
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| anyhow::anyhow!("the input is not the JSON this workload expects: {e}"))
    }
}

impl Output for Vec<u8> {
    fn into_output(self) -> Result<Vec<u8>> {
        Ok(self)
    }
}

impl Output for String {
    fn into_output(self) -> Result<Vec<u8>> {
        Ok(self.into_bytes())
    }
}

impl Output for () {
    fn into_output(self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

impl<T: serde::Serialize> Output for Json<T> {
    fn into_output(self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(&self.0)?)
    }
}

/// Calls a workload function on raw input and turns its result into the
/// world's `result<list<u8>, string>`. Used by [`workload!`].
#[doc(hidden)]
pub fn __invoke<I: Input, O: Output>(
    f: impl FnOnce(I) -> Result<O>,
    input: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    I::from_input(input)
        .and_then(f)
        .and_then(O::into_output)
        .map_err(|e| format!("{e:#}"))
}

/// Exports `f` as the workload's `run`: `fn f(input: I) -> vulcan_guest::Result<O>`
/// where `I:` [`Input`] and `O:` [`Output`].
#[macro_export]
macro_rules! workload {
    ($f:path) => {
        struct __VulcanWorkload;

        impl $crate::__bindings::Guest for __VulcanWorkload {
            fn run(input: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $crate::__invoke($f, input)
            }
        }

        $crate::__bindings::__export_workload!(__VulcanWorkload with_types_in $crate::__bindings);
    };
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Finest-grained tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal information.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// A failure.
    Error,
}

/// Records `message` as one log line with `level` (newlines are kept).
pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => host::Level::Trace,
        Level::Debug => host::Level::Debug,
        Level::Info => host::Level::Info,
        Level::Warn => host::Level::Warn,
        Level::Error => host::Level::Error,
    };
    host::log(level, message);
}

/// Facts about the running workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The workload's id, as the API and `vulcan logs` show it.
    pub id: String,
    /// `sha256:<hex>` of its module.
    pub module_hash: String,
}

/// This workload's metadata.
pub fn metadata() -> Metadata {
    let m = host::metadata();
    Metadata {
        id: m.id,
        module_hash: m.module_hash,
    }
}

/// The workload's arguments (argv[0] first), as its spec gives them.
pub fn args() -> Vec<String> {
    std::env::args().collect()
}

/// The workload's environment: exactly its spec's variables.
pub fn env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Log macros, one per level: `log::info!("{} items", n)`.
pub mod log {
    pub use crate::{
        __log_debug as debug, __log_error as error, __log_info as info, __log_trace as trace,
        __log_warn as warn,
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($arg:tt)*) => { $crate::log($crate::Level::Trace, &::std::format!($($arg)*)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($arg)*)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($arg:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($arg)*)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($arg:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Pair {
        a: i64,
        b: i64,
    }

    #[test]
    fn json_input_and_output_round_trip() {
        let out = __invoke(
            |Json(p): Json<Pair>| Ok(Json(p.a + p.b)),
            br#"{"a":2,"b":3}"#.to_vec(),
        );
        assert_eq!(out.unwrap(), b"5");
    }

    #[test]
    fn bad_input_and_errors_become_messages() {
        let out = __invoke(|Json(p): Json<Pair>| Ok(Json(p.a)), b"nope".to_vec());
        assert!(out.unwrap_err().contains("not the JSON"));
        let out = __invoke(
            |s: String| -> Result<String> {
                let n: i32 = s.parse()?;
                Ok(n.to_string())
            },
            b"x".to_vec(),
        );
        assert!(out.unwrap_err().contains("invalid digit"));
    }
}
