//! Outbound HTTP for components: `wasi:http/outgoing-handler`, behind the
//! run's `allowed_hosts` and the operator's [`OutboundPolicy`].
//!
//! Owns the decision for each request a guest sends: the destination must
//! match the spec and the operator's caps, and every address its name
//! resolves to must be public unless the operator allows otherwise. A refused
//! request fails in the guest with `HTTP-request-denied` (or
//! `destination-IP-prohibited`) and is recorded as an `error` record in the
//! workload's log, so the author sees why. Sending itself is wasmtime's.
//!
//! A plain-http request is sent to the address that was checked (the name is
//! not resolved twice), so a name cannot be rebound to a private address
//! between check and connect; an https request is checked the same way, and
//! its certificate must then match the name.
//!
//! Requests run inside the workload's own future, so its timeout and kill
//! switch end them too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::Request;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::logs::{Fields, LogWriter};
use crate::outbound::{Destination, OutboundPolicy, OutboundRule};
use crate::workload::LogLevel;

/// The hooks of one run: its allowed hosts, the node's policy, and its log.
pub struct OutboundHooks {
    allowed_hosts: Arc<[OutboundRule]>,
    policy: Arc<OutboundPolicy>,
    log: LogWriter,
}

impl OutboundHooks {
    /// Hooks for a run allowed to reach `allowed_hosts` under `policy`.
    pub fn new(
        allowed_hosts: &[OutboundRule],
        policy: Arc<OutboundPolicy>,
        log: LogWriter,
    ) -> Self {
        Self {
            allowed_hosts: allowed_hosts.into(),
            policy,
            log,
        }
    }
}

/// What sending answers: the response and the connection's driver.
type Sent = Result<
    (
        hyper::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        // It would tell how the guest's processing of the response ended;
        // like wasmtime's own sender, this one does not need to know.
        drop(fut);
        let allowed_hosts = Arc::clone(&self.allowed_hosts);
        let policy = Arc::clone(&self.policy);
        let log = self.log.clone();
        Box::new(async move {
            let request = match admit(request, &allowed_hosts, &policy).await {
                Ok(request) => request,
                Err(refused) => {
                    record(&log, &refused).await;
                    return Err(refused.code);
                }
            };
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// A request the policy refused: what the guest gets and what the log says.
struct Refused {
    code: HttpError,
    method: String,
    url: String,
    reason: String,
}

/// Checks `request` and, for plain http, points it at the checked address.
async fn admit(
    mut request: Request<WasiBody>,
    allowed_hosts: &[OutboundRule],
    policy: &OutboundPolicy,
) -> Result<Request<WasiBody>, Refused> {
    // Owned copies: the body is not `Sync`, so no borrow of the request may
    // live across the name lookup.
    let uri = request.uri().clone();
    let method = request.method().to_string();
    let refused = |code, reason: String| Refused {
        code,
        method: method.clone(),
        url: uri.to_string(),
        reason,
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(refused(
            HttpError::HttpRequestUriInvalid,
            "the request has no scheme or host".into(),
        ));
    };
    let Some(to) = Destination::new(scheme, host, uri.port_u16()) else {
        return Err(refused(
            HttpError::HttpRequestDenied,
            format!("scheme `{scheme}` is not http or https"),
        ));
    };
    if let Some(reason) = policy.refusal(allowed_hosts, &to) {
        return Err(refused(HttpError::HttpRequestDenied, reason));
    }
    let addresses: Vec<SocketAddr> = match to.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, to.port)],
        Err(_) => match tokio::net::lookup_host((to.host.as_str(), to.port)).await {
            Ok(found) => found.collect(),
            Err(e) => {
                return Err(refused(
                    HttpError::DnsError {
                        rcode: Some(e.to_string()),
                        info_code: None,
                    },
                    format!("{} did not resolve: {e}", to.host),
                ));
            }
        },
    };
    let Some(first) = addresses.first().copied() else {
        return Err(refused(
            HttpError::DestinationNotFound,
            format!("{} resolved to no address", to.host),
        ));
    };
    // One bad address refuses the name: a name that points at both public and
    // private addresses is not to be trusted with either.
    let name = to
        .host
        .parse::<IpAddr>()
        .is_err()
        .then_some(to.host.as_str());
    for address in &addresses {
        if let Some(reason) = policy.address_refusal(address.ip(), name) {
            return Err(refused(HttpError::DestinationIpProhibited, reason));
        }
    }
    if !to.https {
        let pinned = hyper::Uri::builder()
            .scheme("http")
            .authority(first.to_string())
            .path_and_query(uri.path_and_query().map_or("/", |p| p.as_str()))
            .build()
            .map_err(|e| refused(HttpError::HttpRequestUriInvalid, e.to_string()))?;
        *request.uri_mut() = pinned;
    }
    Ok(request)
}

/// Puts a refusal in the workload's log, at `error` so that no minimum level
/// hides why a request failed.
async fn record(log: &LogWriter, refused: &Refused) {
    tracing::info!(method = %refused.method, url = %refused.url, reason = %refused.reason,
        "outbound request refused");
    log.room().await;
    let message = format!("outbound request refused: {}", refused.reason);
    let fields = Fields(vec![
        ("method".into(), refused.method.clone()),
        ("url".into(), refused.url.clone()),
    ]);
    // Past the output limit the record is dropped; the guest still gets the error.
    let _ = log.log(LogLevel::Error, &message, fields);
}
