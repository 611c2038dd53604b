//! Parsers for command-line values: durations, sizes, `K=V`, `HOST::GUEST`,
//! allowed hosts.

use std::path::PathBuf;
use std::time::Duration;

use crate::outbound::{BadRule, OutboundRule};
use crate::workload::Preopen;

/// `5s`, `250ms`, `2m`, `1h 30m` (anything humantime accepts).
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); try e.g. 500ms, 5s or 2m"))?;
    if d.is_zero() {
        return Err("a duration here must be longer than zero".into());
    }
    Ok(d)
}

/// `1048576`, `64K`, `64KiB`, `512M`, `512MiB`, `1G`, `1GiB` (powers of 1024), or
/// `64KB`, `1MB`, `1GB` (powers of 1000).
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a size; try e.g. 65536, 64KiB, 512MiB or 1GiB");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// A server limit: a value, or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub Option<u64>);

impl Cap {
    fn parse(s: &str, value: impl FnOnce(&str) -> Result<u64, String>) -> Result<Self, String> {
        match s.trim() {
            "unlimited" | "none" => Ok(Cap(None)),
            other => value(other).map(|v| Cap(Some(v))),
        }
    }
}

/// A duration limit in milliseconds, or `unlimited`.
pub fn cap_duration(s: &str) -> Result<Cap, String> {
    Cap::parse(s, |s| duration(s).map(|d| d.as_millis() as u64))
}

/// A size limit in bytes, or `unlimited`.
pub fn cap_size(s: &str) -> Result<Cap, String> {
    Cap::parse(s, size)
}

/// A count (e.g. fuel), or `unlimited`.
pub fn cap_count(s: &str) -> Result<Cap, String> {
    Cap::parse(s, |s| {
        s.parse()
            .map_err(|_| format!("`{s}` is not a whole number or `unlimited`"))
    })
}

/// An allowed host, `scheme://host[:port]` (see [`crate::outbound`]).
pub fn outbound_rule(s: &str) -> Result<OutboundRule, String> {
    s.trim().parse().map_err(|e: BadRule| e.to_string())
}

/// `KEY=VALUE`; the value may contain `=`, quotes and newlines.
pub fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// `HOST[::GUEST]`; the guest path defaults to the host path as written.
pub fn preopen(s: &str, writable: bool) -> Result<Preopen, String> {
    let (host, guest) = match s.split_once("::") {
        Some((h, g)) => (h, g),
        None => (s, s),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("`{s}` is not HOST[::GUEST]"));
    }
    let host_path = PathBuf::from(host);
    if !host_path.is_dir() {
        return Err(format!("`{host}` is not a directory"));
    }
    Ok(Preopen {
        host: host_path,
        guest: guest.to_owned(),
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("1024"), Ok(1024));
        assert_eq!(size("64KiB"), Ok(65536));
        assert_eq!(size("2M"), Ok(2 << 20));
        assert_eq!(size("1gib"), Ok(1 << 30));
        assert_eq!(size("5MB"), Ok(5_000_000));
        assert!(size("lots").is_err());
        assert!(size("12XB").is_err());
        assert!(size("99999999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("soon").is_err());
        assert!(duration("0s").is_err());
    }

    #[test]
    fn env_pairs_keep_everything_after_the_first_equals() {
        assert_eq!(
            env_pair("A=b=c \"q\"\nx"),
            Ok(("A".into(), "b=c \"q\"\nx".into()))
        );
        assert_eq!(env_pair("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(env_pair("NOEQUALS").is_err());
        assert!(env_pair("=v").is_err());
    }

    #[test]
    fn preopens() {
        let dir = std::env::temp_dir();
        let d = dir.to_str().unwrap();
        let p = preopen(&format!("{d}::/"), false).unwrap();
        assert_eq!((p.guest.as_str(), p.writable), ("/", false));
        assert_eq!(preopen(d, true).unwrap().guest, d);
        assert!(preopen("/definitely/not/here::/x", true).is_err());
    }
}

/// The bytes of an `--input` (a type of its own: clap would read a `Vec<u8>`
/// as many values).
#[derive(Debug, Clone)]
pub struct InputBytes(pub Vec<u8>);

/// `--input`: a JSON value (validated, passed as its text) or `@FILE` (raw bytes).
pub fn input(s: &str) -> Result<InputBytes, String> {
    if let Some(path) = s.strip_prefix('@') {
        return std::fs::read(path)
            .map(InputBytes)
            .map_err(|e| format!("cannot read {path}: {e}"));
    }
    serde_json::from_str::<serde_json::Value>(s)
        .map(|_| InputBytes(s.as_bytes().to_vec()))
        .map_err(|e| format!("not JSON ({e}); use @FILE for other input"))
}

/// Reads a module file; a missing one gets an error that says how to build it.
pub fn read_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    std::fs::read(path).with_context(|| match path.exists() {
        true => format!("cannot read module {}", path.display()),
        false => format!(
            "cannot read module {}: there is no such file; build it first with \
             `cargo build --release --target wasm32-wasip2` (an SDK workload, whose Cargo.toml \
             needs `crate-type = [\"cdylib\"]`) or `--target wasm32-wasip1` (a plain program), \
             and give the .wasm under target/<target>/release/",
            path.display()
        ),
    })
}
