//! Outbound HTTP requests, through `wasi:http/outgoing-handler`.
//!
//! A run may only reach the hosts its spec lists (`--allow-host
//! https://api.example.com` with `vulcan run` or `submit`, `allowed_hosts` in
//! the API); any other request fails with an error that says so, and the
//! host records why in the workload's log. Requests count against the
//! workload's timeout.
//!
//! ```no_run
//! use vulcan_guest::http;
//!
//! # fn main() -> vulcan_guest::Result<()> {
//! let page = http::get("https://api.example.com/v1/items")?.error_for_status()?.text()?;
//! let created = http::Request::post("https://api.example.com/v1/items")
//!     .header("content-type", "application/json")
//!     .body(r#"{"name":"ada"}"#)
//!     .send()?;
//! println!("{} {}", created.status, page.len());
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use anyhow::Context as _;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// Sends a `GET` request to `url` and reads the whole response.
pub fn get(url: &str) -> crate::Result<Response> {
    Request::get(url).send()
}

/// A request being built; [`Request::send`] sends it.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A request with any method (`"PATCH"`, `"HEAD"`, …).
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_owned(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: &str) -> Self {
        Self::new("PUT", url)
    }

    /// A `DELETE` request.
    pub fn delete(url: &str) -> Self {
        Self::new("DELETE", url)
    }

    /// Adds a header (repeat a name to send it more than once).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and its content type.
    pub fn json<T: serde::Serialize>(self, value: &T) -> crate::Result<Self> {
        let body = serde_json::to_vec(value).context("failed to encode the request body")?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Gives up connecting, or waiting for the response to start, after
    /// `timeout` (the workload's own timeout applies regardless).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response body.
    pub fn send(self) -> crate::Result<Response> {
        self.start()?.wait()
    }

    /// Sends the request (its body included) without waiting for the
    /// response: start several, then [`Sent::wait`] for each, and they are
    /// in flight together. See [`send_all`].
    pub fn start(mut self) -> crate::Result<Sent> {
        let target = Target::parse(&self.url)?;
        let headers = Fields::from_list(&self.headers)
            .map_err(|e| anyhow::anyhow!("bad header for {}: {e:?}", self.url))?;
        let request = OutgoingRequest::new(headers);
        let refused = |what: &str| anyhow::anyhow!("{} {}: bad {what}", self.method, self.url);
        request
            .set_method(&method(&self.method))
            .map_err(|()| refused("method"))?;
        request
            .set_scheme(Some(&target.scheme))
            .map_err(|()| refused("scheme"))?;
        request
            .set_authority(Some(&target.authority))
            .map_err(|()| refused("host"))?;
        request
            .set_path_with_query(Some(&target.path))
            .map_err(|()| refused("path"))?;
        let body = request.body().map_err(|()| refused("body"))?;
        let options = self.timeout.map(|t| {
            let options = RequestOptions::new();
            let nanos = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            let _ = options.set_connect_timeout(Some(nanos));
            let _ = options.set_first_byte_timeout(Some(nanos));
            options
        });
        let pending =
            outgoing_handler::handle(request, options).map_err(|code| self.failed(&code))?;
        let content = std::mem::take(&mut self.body);
        if !content.is_empty() {
            let stream = body.write().map_err(|()| refused("body"))?;
            // The host accepts at most 4 KiB per blocking write.
            for chunk in content.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| self.stream_failed(e, "sending the body"))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(|code| self.failed(&code))?;
        Ok(Sent {
            request: self,
            pending,
        })
    }

    fn read_body(&self, incoming: &IncomingBody) -> crate::Result<Vec<u8>> {
        let stream = incoming
            .stream()
            .map_err(|()| anyhow::anyhow!("{} {}: no response body", self.method, self.url))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => return Ok(body),
                Err(e) => return Err(self.stream_failed(e, "reading the response")),
            }
        }
    }

    fn stream_failed(&self, error: StreamError, doing: &str) -> anyhow::Error {
        match error {
            StreamError::Closed => {
                anyhow::anyhow!(
                    "{} {}: the connection closed while {doing}",
                    self.method,
                    self.url
                )
            }
            StreamError::LastOperationFailed(e) => match wasip2::http::types::http_error_code(&e) {
                Some(code) => self.failed(&code),
                None => anyhow::anyhow!(
                    "{} {}: failed while {doing}: {}",
                    self.method,
                    self.url,
                    e.to_debug_string()
                ),
            },
        }
    }

    fn failed(&self, code: &ErrorCode) -> anyhow::Error {
        let why = match code {
            ErrorCode::HttpRequestDenied => "the host refused it: the host is not in this \
                 run's allowed hosts or the server does not permit it (the workload's log says \
                 which; allow it with --allow-host or `allowed_hosts`)"
                .to_owned(),
            ErrorCode::DestinationIpProhibited => "the host refused it: the address is \
                 loopback, private or otherwise non-public, which this server does not allow"
                .to_owned(),
            ErrorCode::DnsError(payload) => format!(
                "the name did not resolve ({})",
                payload.rcode.as_deref().unwrap_or("no detail")
            ),
            ErrorCode::ConnectionRefused => "the connection was refused".to_owned(),
            ErrorCode::ConnectionTimeout => "connecting timed out".to_owned(),
            ErrorCode::ConnectionReadTimeout => "the response did not start in time".to_owned(),
            ErrorCode::InternalError(Some(message)) => message.clone(),
            other => format!("{other:?}"),
        };
        anyhow::anyhow!("{} {}: {why}", self.method, self.url)
    }
}

/// A request that was sent, whose response is still to be read.
pub struct Sent {
    request: Request,
    pending: wasip2::http::types::FutureIncomingResponse,
}

impl Sent {
    /// Waits for the response and reads its whole body.
    pub fn wait(self) -> crate::Result<Response> {
        let refused = |what: &str| {
            anyhow::anyhow!("{} {}: bad {what}", self.request.method, self.request.url)
        };
        let pending = &self.pending;
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(self.request.failed(&code)),
            Some(Err(())) | None => {
                anyhow::bail!(
                    "{} {}: the response was already taken",
                    self.request.method,
                    self.request.url
                )
            }
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|()| refused("response body"))?;
        let body = self.request.read_body(&incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Sends every request at once, then reads each response: `n` requests to
/// slow hosts take about as long as the slowest, not their sum. The host
/// keeps a bounded number in flight per workload (32 by default); the rest
/// wait for a place. A request that could not be sent is an error in its
/// place of the answer.
pub fn send_all(requests: impl IntoIterator<Item = Request>) -> Vec<crate::Result<Response>> {
    let sent: Vec<_> = requests.into_iter().map(Request::start).collect();
    sent.into_iter().map(|s| s.and_then(Sent::wait)).collect()
}

/// A whole response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 200.
    pub status: u16,
    /// Headers as received (names lowercase).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(self) -> crate::Result<String> {
        String::from_utf8(self.body).context("the response body is not UTF-8 text")
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_json::from_slice(&self.body).context("the response body is not the expected JSON")
    }

    /// This response, or an error naming its status when it is not 2xx.
    pub fn error_for_status(self) -> crate::Result<Self> {
        match self.status {
            200..=299 => Ok(self),
            status => {
                let text = String::from_utf8_lossy(&self.body);
                let excerpt: String = text.chars().take(200).collect();
                anyhow::bail!("the server answered {status}: {excerpt}")
            }
        }
    }
}

/// A URL split the way `wasi:http` wants it.
struct Target {
    scheme: Scheme,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> crate::Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("`{url}` is not a URL (expected http:// or https://)"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => anyhow::bail!("`{url}`: scheme `{other}` is not http or https"),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        anyhow::ensure!(!authority.is_empty(), "`{url}` has no host");
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Target {
            scheme,
            authority: authority.to_owned(),
            path,
        })
    }
}

fn method(name: &str) -> Method {
    match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let t = Target::parse("https://api.example.com:8443/v1/x?a=1#frag").unwrap();
        assert!(matches!(t.scheme, Scheme::Https));
        assert_eq!(t.authority, "api.example.com:8443");
        assert_eq!(t.path, "/v1/x?a=1");
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/")
        );
        assert_eq!(Target::parse("http://h?q=1").unwrap().path, "/?q=1");
        for bad in ["example.com", "ftp://example.com/", "https:///path"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_2xx_statuses_become_errors_that_name_them() {
        let response = Response {
            status: 404,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"no such item".to_vec(),
        };
        assert_eq!(response.header("Content-Type"), Some("text/plain"));
        let err = response.error_for_status().unwrap_err().to_string();
        assert_eq!(err, "the server answered 404: no such item");
    }
}
