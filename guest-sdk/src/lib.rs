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
//! - Errors: return any error with `?`, or make one with [`bail!`],
//!   [`ensure!`] or [`anyhow!`] (re-exported, no extra dependency); the
//!   workload ends `failed` with its message (the whole chain of causes).
//! - Logs: [`log::trace!`] … [`log::error!`] record lines of stream `log` with
//!   their level; `println!` and `eprintln!` still work and are captured as
//!   stdout and stderr lines.
//!   Messages your dependencies send through the standard `log` crate are
//!   recorded the same way, as `target: message`.
//! - The workload's id and module hash: [`metadata`]; its args and env:
//!   [`args`] and [`env`] (exactly what its spec gives, nothing of the host's).
//! - Settings: [`env_var`] looks one up by name, [`config`] parses it
//!   (`let n: u32 = config("LIMIT")?;`) and [`config_or`] gives a default; the
//!   values come from the run's env (`--env LIMIT=10`, or `env` in the API).
//! - Outbound HTTP: [`http::get`] and [`http::Request`], to the hosts the run
//!   allows (`--allow-host https://api.example.com`); every other host is
//!   refused.

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

pub mod http;

use __bindings::vulcan::workload::host;

pub use anyhow::{anyhow, bail, ensure};

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
        if bytes.iter().all(u8::is_ascii_whitespace) {
            anyhow::bail!(
                "no input was given; this workload expects JSON (pass it with --input, \
                 or as `input` in the API)"
            );
        }
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
    forward_log_crate();
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
    host::log(host_level(level), message);
}

/// Records `message` with key/value fields, stored beside it in this order
/// (`vulcan logs` shows `message user=ada n=3`). The log macros take them as
/// `log::info!(user = name, n = 3; "processed {} items", n)`.
pub fn log_fields(level: Level, message: &str, fields: &[(&str, &dyn std::fmt::Display)]) {
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_string()))
        .collect();
    host::log_fields(host_level(level), message, &fields);
}

fn host_level(level: Level) -> host::Level {
    match level {
        Level::Trace => host::Level::Trace,
        Level::Debug => host::Level::Debug,
        Level::Info => host::Level::Info,
        Level::Warn => host::Level::Warn,
        Level::Error => host::Level::Error,
    }
}

/// Sends what the standard `log` crate records (a dependency's messages, or
/// the workload's own `log::info!` from that crate) to the host as `log`
/// records with their level, as `target: message`.
struct LogCrateForwarder;

impl ::log::Log for LogCrateForwarder {
    fn enabled(&self, _: &::log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &::log::Record<'_>) {
        let level = match record.level() {
            ::log::Level::Trace => Level::Trace,
            ::log::Level::Debug => Level::Debug,
            ::log::Level::Info => Level::Info,
            ::log::Level::Warn => Level::Warn,
            ::log::Level::Error => Level::Error,
        };
        crate::log(level, &format!("{}: {}", record.target(), record.args()));
    }

    fn flush(&self) {}
}

/// Installs [`LogCrateForwarder`] once (later calls find it installed).
fn forward_log_crate() {
    static FORWARDER: LogCrateForwarder = LogCrateForwarder;
    if ::log::set_logger(&FORWARDER).is_ok() {
        ::log::set_max_level(::log::LevelFilter::Trace);
    }
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

/// The value of the variable `key` in the run's env, if it is set.
pub fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// The setting `key` from the run's env, parsed as a `T`; an error that says
/// how to set it when it is missing, and what was wrong when it does not parse.
pub fn config<T>(key: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let raw = env_var(key).ok_or_else(|| {
        anyhow!(
            "the setting `{key}` is not set; give it with --env {key}=VALUE (or in the run's `env`)"
        )
    })?;
    parse_setting(key, &raw)
}

/// The setting `key` parsed as a `T`, or `default` when it is not set.
pub fn config_or<T>(key: &str, default: T) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match env_var(key) {
        Some(raw) => parse_setting(key, &raw),
        None => Ok(default),
    }
}

fn parse_setting<T>(key: &str, raw: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    raw.parse().map_err(|e| {
        anyhow!(
            "the setting `{key}` is {raw:?}, which is not a valid {}: {e}",
            std::any::type_name::<T>()
        )
    })
}

/// Log macros, one per level: `log::info!("{} items", n)`, or with key/value
/// fields first: `log::info!(user = name, n = n; "{} items", n)`.
pub mod log {
    pub use crate::{
        __log_debug as debug, __log_error as error, __log_info as info, __log_trace as trace,
        __log_warn as warn,
    };
}

/// One log call at `$level`: `key = value, …;` fields first, if any, then the
/// format string and its arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_at {
    ($level:expr; $($key:ident = $value:expr),+ ; $($arg:tt)+) => {
        $crate::log_fields(
            $level,
            &::std::format!($($arg)+),
            &[$((::std::stringify!($key), &$value as &dyn ::std::fmt::Display)),+],
        )
    };
    ($level:expr; $($arg:tt)*) => {
        $crate::log($level, &::std::format!($($arg)*))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($t:tt)*) => { $crate::__log_at!($crate::Level::Trace; $($t)*) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($t:tt)*) => { $crate::__log_at!($crate::Level::Debug; $($t)*) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($t:tt)*) => { $crate::__log_at!($crate::Level::Info; $($t)*) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($t:tt)*) => { $crate::__log_at!($crate::Level::Warn; $($t)*) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($t:tt)*) => { $crate::__log_at!($crate::Level::Error; $($t)*) };
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
    fn missing_json_input_says_so() {
        let out = __invoke(|Json(p): Json<Pair>| Ok(Json(p.a)), Vec::new());
        let error = out.unwrap_err();
        assert!(error.contains("no input was given"), "{error}");
        assert!(!error.contains("EOF"), "{error}");
    }

    #[test]
    fn settings_parse_or_say_what_is_wrong() {
        assert_eq!(parse_setting::<u32>("N", "12").unwrap(), 12);
        let error = parse_setting::<u32>("N", "twelve").unwrap_err().to_string();
        assert!(
            error.contains("`N`") && error.contains("\"twelve\"") && error.contains("u32"),
            "{error}"
        );
        let error = config::<u32>("VULCAN_GUEST_TEST_UNSET")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--env VULCAN_GUEST_TEST_UNSET=VALUE"),
            "{error}"
        );
        assert_eq!(config_or("VULCAN_GUEST_TEST_UNSET", 5u8).unwrap(), 5);
    }

    #[test]
    fn the_error_macros_are_reexported() {
        fn check(n: i32) -> Result<i32> {
            ensure!(n >= 0, "negative: {n}");
            if n == 0 {
                bail!("zero");
            }
            Err(anyhow!("positive: {n}"))
        }
        assert_eq!(check(-1).unwrap_err().to_string(), "negative: -1");
        assert_eq!(check(0).unwrap_err().to_string(), "zero");
        assert_eq!(check(1).unwrap_err().to_string(), "positive: 1");
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
