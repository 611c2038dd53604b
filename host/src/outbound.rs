//! Outbound HTTP policy: which hosts a workload may call.
//!
//! A run may send requests only to the hosts its spec lists in
//! `allowed_hosts`; an operator may cap those lists with `--allow-outbound`
//! and decides whether private and loopback addresses are reachable at all.
//! This module owns the rule syntax, matching, and the address classes that
//! count as private. Plain data, no I/O: the engine's `wasi:http` hooks
//! resolve names and apply it; the API and CLI use it to refuse bad specs.
//!
//! A rule is `scheme://host[:port]`:
//! - scheme `http`, `https` or `*`;
//! - host a DNS name, an IPv4 address, an `[IPv6]` address, `*.domain`
//!   (any name under `domain`, not `domain` itself) or `*`;
//! - port a number or `*`; left out, it is the scheme's default (80 or 443).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A URL scheme a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeRule {
    /// `http` only.
    Http,
    /// `https` only.
    Https,
    /// Either.
    Any,
}

/// The hosts a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// Exactly this name or address (lowercase; IPv6 without brackets).
    Exact(String),
    /// Any name ending in `.<suffix>`.
    Subdomains(String),
    /// Any host.
    Any,
}

/// The ports a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRule {
    /// The request scheme's default port: 80 for http, 443 for https.
    Default,
    /// Exactly this port.
    Exact(u16),
    /// Any port.
    Any,
}

/// One allowed destination, e.g. `https://api.example.com` or `http://127.0.0.1:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    /// Which schemes.
    pub scheme: SchemeRule,
    /// Which hosts.
    pub host: HostRule,
    /// Which ports.
    pub port: PortRule,
}

/// A rule that does not parse; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{rule}` is not an allowed host: {why} (expected scheme://host[:port], e.g. https://api.example.com or http://127.0.0.1:8080)"
)]
pub struct BadRule {
    rule: String,
    why: &'static str,
}

impl FromStr for OutboundRule {
    type Err = BadRule;

    fn from_str(text: &str) -> Result<Self, BadRule> {
        let bad = |why| BadRule {
            rule: text.chars().take(200).collect(),
            why,
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => SchemeRule::Http,
            "https" => SchemeRule::Https,
            "*" => SchemeRule::Any,
            _ => return Err(bad("the scheme must be http, https or *")),
        };
        // A trailing slash is harmless; any other path is a mistake, since
        // rules allow whole hosts.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad("a rule names a host, not a path"));
        }
        if authority.contains('@') {
            return Err(bad("a rule cannot carry a user name or password"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
        let port = match port {
            None => PortRule::Default,
            Some("*") => PortRule::Any,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => PortRule::Exact(p),
                _ => return Err(bad("the port must be 1-65535 or *")),
            },
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostRule::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !is_dns_name(suffix) {
                return Err(bad("`*.` must be followed by a domain name"));
            }
            HostRule::Subdomains(suffix.to_owned())
        } else if host.parse::<IpAddr>().is_ok() || is_dns_name(&host) {
            HostRule::Exact(host)
        } else {
            return Err(bad(
                "the host must be a DNS name, an IP address, *.domain or *",
            ));
        };
        Ok(OutboundRule { scheme, host, port })
    }
}

/// Splits `host[:port]` and `[v6][:port]`; the host keeps no brackets.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    (!host.is_empty() && !host.contains(':')).then_some((host, port))
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl fmt::Display for OutboundRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            SchemeRule::Http => "http",
            SchemeRule::Https => "https",
            SchemeRule::Any => "*",
        };
        write!(f, "{scheme}://")?;
        match &self.host {
            HostRule::Exact(h) if h.contains(':') => write!(f, "[{h}]")?,
            HostRule::Exact(h) => f.write_str(h)?,
            HostRule::Subdomains(s) => write!(f, "*.{s}")?,
            HostRule::Any => f.write_str("*")?,
        }
        match self.port {
            PortRule::Default => Ok(()),
            PortRule::Exact(p) => write!(f, ":{p}"),
            PortRule::Any => f.write_str(":*"),
        }
    }
}

impl Serialize for OutboundRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OutboundRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a request is going, as the guest addressed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `true` for https.
    pub https: bool,
    /// The host, lowercase, IPv6 without brackets.
    pub host: String,
    /// The port, the scheme's default filled in.
    pub port: u16,
}

impl Destination {
    /// The destination of a `scheme://authority` request; `None` for a scheme
    /// other than http and https.
    pub fn new(scheme: &str, host: &str, port: Option<u16>) -> Option<Self> {
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some(Destination {
            https,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(if https { 443 } else { 80 }),
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}", self.host, self.port),
            false => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

impl OutboundRule {
    /// Whether a request to `to` is allowed by this rule.
    pub fn allows(&self, to: &Destination) -> bool {
        let scheme = match self.scheme {
            SchemeRule::Http => !to.https,
            SchemeRule::Https => to.https,
            SchemeRule::Any => true,
        };
        let port = match self.port {
            PortRule::Default => to.port == if to.https { 443 } else { 80 },
            PortRule::Exact(p) => to.port == p,
            PortRule::Any => true,
        };
        scheme && port && self.host_allows(&to.host)
    }

    fn host_allows(&self, host: &str) -> bool {
        match &self.host {
            HostRule::Exact(h) => h == host,
            HostRule::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            HostRule::Any => true,
        }
    }

    /// Whether every request `other` allows is also allowed by `self`: how an
    /// operator's cap is checked against a spec's rule.
    pub fn covers(&self, other: &OutboundRule) -> bool {
        let scheme = match (self.scheme, other.scheme) {
            (SchemeRule::Any, _) => true,
            (a, b) => a == b,
        };
        // A default port means 80 or 443 depending on the scheme, so it is
        // covered by another default, by `*`, or by the number when the scheme
        // is fixed.
        let default = match other.scheme {
            SchemeRule::Http => Some(80),
            SchemeRule::Https => Some(443),
            SchemeRule::Any => None,
        };
        let port = match (self.port, other.port) {
            (PortRule::Any, _) => true,
            (a, b) if a == b => true,
            (PortRule::Exact(p), PortRule::Default) | (PortRule::Default, PortRule::Exact(p)) => {
                default == Some(p)
            }
            _ => false,
        };
        let host = match (&self.host, &other.host) {
            (HostRule::Any, _) => true,
            (_, HostRule::Any) => false,
            (mine, HostRule::Exact(h)) => {
                matches!(mine, HostRule::Exact(m) if m == h) || self.host_allows(h)
            }
            (HostRule::Subdomains(mine), HostRule::Subdomains(theirs)) => {
                theirs == mine || theirs.ends_with(&format!(".{mine}"))
            }
            (HostRule::Exact(_), HostRule::Subdomains(_)) => false,
        };
        scheme && port && host
    }
}

/// What the operator allows every run on this node.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    /// `--allow-outbound`: when set, a spec may only list hosts these rules
    /// cover, and requests must match one of them too. `None`: no cap.
    pub caps: Option<Vec<OutboundRule>>,
    /// `--allow-private-outbound`: loopback, private, link-local and other
    /// non-public addresses may be reached.
    pub allow_private: bool,
    /// `--max-outbound-inflight`: requests one run may have in flight (each
    /// a socket until its connection ends); more wait for a place.
    pub max_inflight_per_workload: usize,
    /// `--max-outbound-inflight-node`: requests all runs on the node may have
    /// in flight together.
    pub max_inflight_per_node: usize,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        Self {
            caps: None,
            allow_private: false,
            max_inflight_per_workload: 32,
            max_inflight_per_node: 1024,
        }
    }
}

impl OutboundPolicy {
    /// Refuses a spec that lists a host this operator does not allow; the
    /// message names the rule and the cap.
    pub fn check_spec(&self, allowed_hosts: &[OutboundRule]) -> Result<(), String> {
        let Some(caps) = &self.caps else {
            return Ok(());
        };
        for rule in allowed_hosts {
            if !caps.iter().any(|cap| cap.covers(rule)) {
                let caps = match caps.is_empty() {
                    true => "none".to_owned(),
                    false => caps
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                return Err(format!(
                    "allowed host `{rule}` is not permitted on this server \
                     (--allow-outbound: {caps})"
                ));
            }
        }
        Ok(())
    }

    /// Why a request to `to` is refused by the spec's `allowed_hosts` or the
    /// operator's caps; `None` when it may go ahead (addresses are checked
    /// separately, once resolved).
    pub fn refusal(&self, allowed_hosts: &[OutboundRule], to: &Destination) -> Option<String> {
        if !allowed_hosts.iter().any(|rule| rule.allows(to)) {
            return Some(match allowed_hosts.is_empty() {
                true => format!(
                    "{to} is not in this run's allowed_hosts, which is empty: outbound \
                     requests are denied unless the spec lists the host"
                ),
                false => format!(
                    "{to} is not in this run's allowed_hosts ({})",
                    allowed_hosts
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        if let Some(caps) = &self.caps
            && !caps.iter().any(|cap| cap.allows(to))
        {
            return Some(format!(
                "{to} is not permitted on this server (--allow-outbound)"
            ));
        }
        None
    }

    /// Why `ip`, which `name` resolved to (if it was a name), may not be
    /// reached, or `None` when it may.
    pub fn address_refusal(&self, ip: IpAddr, name: Option<&str>) -> Option<String> {
        if self.allow_private {
            return None;
        }
        let class = non_public(ip)?;
        let what = match name {
            Some(name) => format!("{name} resolves to {ip}, a {class} address"),
            None => format!("{ip} is a {class} address"),
        };
        Some(format!(
            "{what}; this server does not allow requests to non-public addresses \
             (--allow-private-outbound)"
        ))
    }
}

/// The class of a non-public address (loopback, private, …), or `None` for a
/// public one.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_broadcast() || v4.is_multicast() || a >= 240 {
                Some("broadcast, multicast or reserved")
            } else if v4.is_documentation() || (a == 198 && (18..20).contains(&b)) {
                Some("documentation or benchmarking")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("broadcast, multicast or reserved")
            } else if first == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("documentation or benchmarking")
            } else if v6.segments()[..6] == [0; 6] {
                // IPv4-compatible (`::a.b.c.d`), deprecated: never a public route.
                Some("reserved (IPv4-compatible)")
            } else if first == 0x0064 && v6.segments()[1] == 0xff9b && v6.segments()[2] == 1 {
                // Local-use NAT64 (RFC 8215) translates to the site's own network.
                Some("private (local-use NAT64)")
            } else if first == 0x0064 && v6.segments()[1] == 0xff9b {
                // NAT64 embeds an IPv4 address; judge that one.
                let [.., c, d] = v6.segments();
                let v4 = std::net::Ipv4Addr::from(((c as u32) << 16) | d as u32);
                non_public(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

/// Parses rules, naming the first one that does not parse.
pub fn parse_rules<S: AsRef<str>>(texts: &[S]) -> Result<Vec<OutboundRule>, BadRule> {
    texts.iter().map(|t| t.as_ref().trim().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> OutboundRule {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn to(url: &str) -> Destination {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (host, port) = split_host_port(rest).unwrap();
        Destination::new(scheme, host, port.map(|p| p.parse().unwrap())).unwrap()
    }

    #[test]
    fn rules_parse_and_print_back() {
        for text in [
            "https://api.example.com",
            "http://127.0.0.1:8080",
            "*://*.example.com:*",
            "https://[::1]:8443",
            "http://*",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
        assert_eq!(
            rule("HTTPS://API.Example.com/").to_string(),
            "https://api.example.com"
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, why) in [
            ("api.example.com", "no scheme"),
            ("ftp://example.com", "scheme must be"),
            ("https://example.com/v1", "not a path"),
            ("https://user:pw@example.com", "user name"),
            ("https://example.com:0", "port must be"),
            ("https://example.com:http", "port must be"),
            ("https://", "bad host"),
            ("https://*.", "domain name"),
            ("https://exa mple.com", "DNS name"),
            ("https://[::1", "bad host"),
        ] {
            let err = text.parse::<OutboundRule>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains("scheme://host[:port]"), "{err}");
        }
    }

    #[test]
    fn a_rule_allows_its_scheme_host_and_port_only() {
        let r = rule("https://api.example.com");
        assert!(r.allows(&to("https://api.example.com")));
        assert!(r.allows(&to("https://API.example.com:443")));
        assert!(!r.allows(&to("http://api.example.com")));
        assert!(!r.allows(&to("https://api.example.com:8443")));
        assert!(!r.allows(&to("https://evil.example.com")));
        assert!(!r.allows(&to("https://api.example.com.evil.net")));

        let sub = rule("*://*.example.com:*");
        assert!(sub.allows(&to("http://a.example.com:1234")));
        assert!(sub.allows(&to("https://a.b.example.com")));
        assert!(!sub.allows(&to("https://example.com")));
        assert!(!sub.allows(&to("https://badexample.com")));

        let v6 = rule("http://[::1]:8080");
        assert!(v6.allows(&to("http://[::1]:8080")));
        assert!(!v6.allows(&to("http://[::2]:8080")));
    }

    #[test]
    fn caps_cover_only_narrower_rules() {
        let cap = rule("https://*.example.com");
        assert!(cap.covers(&rule("https://api.example.com")));
        assert!(cap.covers(&rule("https://api.example.com:443")));
        assert!(cap.covers(&rule("https://*.eu.example.com")));
        assert!(!cap.covers(&rule("https://example.com")));
        assert!(!cap.covers(&rule("http://api.example.com")));
        assert!(!cap.covers(&rule("https://api.example.com:8443")));
        assert!(!cap.covers(&rule("https://*")));
        assert!(!cap.covers(&rule("*://api.example.com")));
        assert!(rule("*://*:*").covers(&rule("http://10.0.0.1:9")));

        let policy = OutboundPolicy {
            caps: Some(vec![cap]),
            allow_private: false,
            ..OutboundPolicy::default()
        };
        assert!(
            policy
                .check_spec(&[rule("https://api.example.com")])
                .is_ok()
        );
        let err = policy.check_spec(&[rule("https://evil.net")]).unwrap_err();
        assert!(
            err.contains("`https://evil.net`") && err.contains("*.example.com"),
            "{err}"
        );
        let none = OutboundPolicy {
            caps: Some(vec![]),
            allow_private: true,
            ..OutboundPolicy::default()
        };
        assert!(
            none.check_spec(&[rule("https://a.b")])
                .unwrap_err()
                .contains("none")
        );
        assert!(
            OutboundPolicy::default()
                .check_spec(&[rule("http://*:*")])
                .is_ok()
        );
    }

    #[test]
    fn requests_are_refused_outside_the_spec_and_the_caps() {
        let policy = OutboundPolicy {
            caps: Some(vec![rule("https://*.example.com")]),
            allow_private: false,
            ..OutboundPolicy::default()
        };
        let allowed = [rule("*://api.example.com:*")];
        assert_eq!(
            policy.refusal(&allowed, &to("https://api.example.com")),
            None
        );
        let why = policy
            .refusal(&allowed, &to("http://api.example.com"))
            .unwrap();
        assert!(why.contains("--allow-outbound"), "{why}");
        let why = policy
            .refusal(&allowed, &to("https://other.example.com"))
            .unwrap();
        assert!(
            why.contains("not in this run's allowed_hosts (*://api.example.com:*)"),
            "{why}"
        );
        let why = policy.refusal(&[], &to("https://api.example.com")).unwrap();
        assert!(why.contains("empty"), "{why}");
    }

    #[test]
    fn non_public_addresses_are_named() {
        for (ip, class) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "shared"),
            ("224.0.0.1", "multicast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique local"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("::7f00:1", "IPv4-compatible"),
            ("::808:808", "IPv4-compatible"),
            ("64:ff9b:1::808:808", "local-use NAT64"),
            ("64:ff9b:1:ffff::1", "local-use NAT64"),
        ] {
            let got = non_public(ip.parse().unwrap());
            assert!(got.is_some_and(|c| c.contains(class)), "{ip}: {got:?}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
        let open = OutboundPolicy {
            allow_private: true,
            ..OutboundPolicy::default()
        };
        assert_eq!(
            open.address_refusal("127.0.0.1".parse().unwrap(), None),
            None
        );
        let closed = OutboundPolicy::default();
        let why = closed
            .address_refusal("127.0.0.1".parse().unwrap(), None)
            .unwrap();
        assert!(why.starts_with("127.0.0.1 is a loopback address;"), "{why}");
        assert!(why.contains("--allow-private-outbound"), "{why}");
        let why = closed
            .address_refusal("10.0.0.7".parse().unwrap(), Some("db.internal"))
            .unwrap();
        assert!(
            why.starts_with("db.internal resolves to 10.0.0.7, a private address;"),
            "{why}"
        );
    }
}
