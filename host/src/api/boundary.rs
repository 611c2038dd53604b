//! The browser boundary: which `Host` the server answers for, and which
//! browser pages may change anything.
//!
//! Owns two checks made before any route runs, token or no token:
//! - **DNS rebinding.** A page at `http://evil.test:8080/` whose name is made
//!   to resolve to 127.0.0.1 is same-origin with the API as far as the
//!   browser knows, and could read everything. Browsers always send the name
//!   they connected by as `Host`, so a request whose `Host` is a name the
//!   server was not told it answers for is refused (421). An IP literal
//!   cannot be rebound, so any IP `Host` is accepted, as are `localhost` and
//!   the names of `--allowed-host` and `--public-url`.
//! - **Cross-site requests.** A page on another origin can POST a
//!   `multipart/form-data` body without a CORS preflight (a form, or `fetch`
//!   with `mode: 'no-cors'`). Such a page cannot read the answer, but the
//!   request would run. A state-changing request (any method but GET, HEAD
//!   and OPTIONS) whose `Sec-Fetch-Site` says it came from another site or
//!   origin, or whose `Origin` is not the server's own, is refused (403).
//!   Clients that are not browsers send neither header and are not affected.
//!
//! It must not look at tokens or tenants: that is `require_token`'s, after it.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The names (besides IP literals and `localhost`) this server answers for.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Lower-case host names, without port or trailing dot.
    names: Vec<String>,
    /// Origins (`scheme://host[:port]`, lower case) of `--public-url`, which
    /// a browser sends as `Origin` when the server sits behind a proxy.
    public_origins: Vec<String>,
}

impl AllowedHosts {
    /// The server's names: `names` (from `--allowed-host`, each a host name
    /// or `host:port`), the host of each public URL, and the host of the
    /// listen address when it is a name.
    pub fn new(names: &[String], public_urls: &[String], listen: &str) -> Result<Self, String> {
        let mut hosts = Self::default();
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let host = host_of(name).filter(|h| !h.is_empty() && !h.contains('/'));
            let Some(host) = host else {
                return Err(format!(
                    "--allowed-host `{name}` is not a host name (give e.g. vulcan.example.com)"
                ));
            };
            hosts.names.push(host);
        }
        for url in public_urls
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
        {
            let parsed: axum::http::Uri = url
                .parse()
                .map_err(|e| format!("--public-url `{url}` is not a URL: {e}"))?;
            let (Some(scheme), Some(authority)) = (parsed.scheme_str(), parsed.authority()) else {
                return Err(format!(
                    "--public-url `{url}` needs a scheme and a host (e.g. https://vulcan.example.com)"
                ));
            };
            if !matches!(scheme, "http" | "https") {
                return Err(format!("--public-url `{url}` is not http or https"));
            }
            hosts.names.push(normalise(authority.host()));
            hosts
                .public_origins
                .push(format!("{scheme}://{authority}").to_ascii_lowercase());
        }
        if let Some(host) = host_of(listen) {
            hosts.names.push(host);
        }
        Ok(hosts)
    }

    /// Whether a request with this `Host` value is for this server.
    fn answers_for(&self, host_header: &str) -> bool {
        let Some(host) = host_of(host_header) else {
            return false;
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok() || host == "localhost" || self.names.contains(&host)
    }
}

/// The lower-case host of a `host[:port]` or `[v6][:port]` value, without a
/// trailing dot; `None` when it is malformed.
fn host_of(value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let authority: axum::http::uri::Authority = value.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    Some(normalise(authority.host()))
}

fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Refuses requests for another host (421) and state-changing requests from
/// another site's pages (403), before anything else runs.
pub async fn guard(State(hosts): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // HTTP/2 carries the host in the URI instead of a `Host` header.
    let host = headers
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(host) = &host
        && !hosts.answers_for(host)
    {
        return ApiError::MisdirectedHost(format!(
            "this server does not answer for host `{}`; an operator can add the name \
             with --allowed-host or --public-url",
            host.escape_default()
        ))
        .into_response();
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state && let Some(why) = cross_site(headers, host.as_deref(), &hosts) {
        return ApiError::CrossSite(why).into_response();
    }
    next.run(req).await
}

/// Why a request from a browser came from a page that is not this server's
/// own, or `None` when it did not (or did not come from a browser at all).
fn cross_site(headers: &HeaderMap, host: Option<&str>, hosts: &AllowedHosts) -> Option<String> {
    // Sent by every current browser, and not settable by a page.
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !matches!(site, "same-origin" | "none") {
            return Some(format!(
                "a page of another origin may not change anything here \
                 (Sec-Fetch-Site: {})",
                site.escape_default()
            ));
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let own = host.is_some_and(|host| {
        let host = host.trim().to_ascii_lowercase();
        origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|authority| authority == host)
    });
    if own || hosts.public_origins.contains(&origin) {
        return None;
    }
    Some(format!(
        "a page of another origin ({}) may not change anything here",
        origin.escape_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> AllowedHosts {
        AllowedHosts::new(
            &["Vulcan.internal".into()],
            &["https://vulcan.example.com".into()],
            "0.0.0.0:8080",
        )
        .unwrap()
    }

    #[test]
    fn ip_literals_localhost_and_configured_names_are_answered_for() {
        let hosts = hosts();
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "10.0.0.7:8080",
            "localhost:8080",
            "LOCALHOST",
            "localhost.:8080",
            "vulcan.internal:9000",
            "vulcan.example.com",
        ] {
            assert!(hosts.answers_for(ok), "{ok}");
        }
        for refused in [
            "rebind.attacker.test:8080",
            "localhost.attacker.test",
            "127.0.0.1.nip.io:8080",
            "evil.vulcan.internal",
            "",
            "user@127.0.0.1",
            "a b",
        ] {
            assert!(!hosts.answers_for(refused), "{refused}");
        }
    }

    #[test]
    fn a_listen_name_is_answered_for() {
        let hosts = AllowedHosts::new(&[], &[], "box.lan:8080").unwrap();
        assert!(hosts.answers_for("box.lan:8080"));
        assert!(!hosts.answers_for("other.lan:8080"));
    }

    #[test]
    fn bad_names_and_urls_are_refused_with_the_flag_named() {
        let e = AllowedHosts::new(&["http://x/y".into()], &[], "127.0.0.1:1").unwrap_err();
        assert!(e.contains("--allowed-host"), "{e}");
        let e = AllowedHosts::new(&[], &["vulcan.example.com".into()], "127.0.0.1:1").unwrap_err();
        assert!(e.contains("--public-url"), "{e}");
        let e = AllowedHosts::new(&[], &["ftp://x".into()], "127.0.0.1:1").unwrap_err();
        assert!(e.contains("not http or https"), "{e}");
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_the_servers_own_pages_and_non_browsers_may_change_state() {
        let hosts = hosts();
        let own = Some("127.0.0.1:8080");
        for ok in [
            vec![],
            vec![("origin", "http://127.0.0.1:8080")],
            vec![
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "same-origin"),
            ],
            vec![("sec-fetch-site", "none")],
            vec![("origin", "https://vulcan.example.com")],
        ] {
            assert_eq!(cross_site(&headers(&ok), own, &hosts), None, "{ok:?}");
        }
        for refused in [
            vec![("origin", "http://127.0.0.1:9999")],
            vec![("origin", "null")],
            vec![("origin", "http://localhost:8080")],
            vec![("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "same-site")],
            vec![
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site"),
            ],
        ] {
            assert!(
                cross_site(&headers(&refused), own, &hosts).is_some(),
                "{refused:?}"
            );
        }
    }
}
