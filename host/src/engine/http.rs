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
//! Every request, http or https, is sent to the address that was checked
//! (the name is not resolved twice), so a name cannot be rebound to a
//! private address between check and connect; an https request's
//! certificate must still match the name, which is also its SNI.
//!
//! What a guest can make the host hold is bounded: each run has at most
//! `max_inflight_per_workload` requests in flight and the node at most
//! `max_inflight_per_node` (each one socket, held until its connection ends),
//! and at most [`CONCURRENT_LOOKUPS`] name lookups run at once on the node
//! (each takes a blocking thread). A request beyond waits for a place, inside
//! the workload's own time limit.
//!
//! Requests run inside the workload's own future, so its timeout and kill
//! switch end them too.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::logs::{Fields, LogWriter};
use crate::outbound::{Destination, OutboundPolicy, OutboundRule};
use crate::workload::LogLevel;

/// Name lookups running at once on a node: each holds a blocking thread.
pub const CONCURRENT_LOOKUPS: usize = 16;

/// Requests one run may have waiting for a place; one more fails at once
/// with `connection-limit-reached`, so a guest cannot queue unbounded work
/// (each waiting request is a task and its request) on the host.
pub const MAX_WAITING_PER_WORKLOAD: usize = 1024;

/// What a request waits for when the guest set no timeout of its own (its
/// workload's time limit still ends it).
const DEFAULT_WAIT: Duration = Duration::from_secs(600);

/// The node's share of outbound sending: its in-flight and lookup bounds and
/// its TLS client.
pub struct OutboundGate {
    policy: Arc<OutboundPolicy>,
    inflight: Arc<Semaphore>,
    lookups: Semaphore,
    tls: tokio_rustls::TlsConnector,
}

impl OutboundGate {
    /// The gate of a node under `policy`.
    pub fn new(policy: OutboundPolicy) -> Self {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            inflight: Arc::new(Semaphore::new(policy.max_inflight_per_node.max(1))),
            lookups: Semaphore::new(CONCURRENT_LOOKUPS),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            policy: Arc::new(policy),
        }
    }

    /// What the operator allows.
    pub fn policy(&self) -> &OutboundPolicy {
        &self.policy
    }
}

/// The hooks of one run: its allowed hosts, its own in-flight bound, the
/// node's gate, and its log.
pub struct OutboundHooks {
    allowed_hosts: Arc<[OutboundRule]>,
    gate: Arc<OutboundGate>,
    inflight: Arc<Semaphore>,
    /// Its requests that wait for a place.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether a request refused for waiting too many was logged (once a run).
    told_waiting: Arc<std::sync::atomic::AtomicBool>,
    log: LogWriter,
}

impl OutboundHooks {
    /// Hooks for a run allowed to reach `allowed_hosts` through `gate`.
    pub fn new(allowed_hosts: &[OutboundRule], gate: Arc<OutboundGate>, log: LogWriter) -> Self {
        let own = gate.policy.max_inflight_per_workload.max(1);
        Self {
            allowed_hosts: allowed_hosts.into(),
            gate,
            inflight: Arc::new(Semaphore::new(own)),
            waiting: Arc::default(),
            told_waiting: Arc::default(),
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
        let gate = Arc::clone(&self.gate);
        let own = Arc::clone(&self.inflight);
        let log = self.log.clone();
        let waiting = Waiting::enter(&self.waiting);
        let told_waiting = Arc::clone(&self.told_waiting);
        Box::new(async move {
            if waiting.count > MAX_WAITING_PER_WORKLOAD {
                let refused = Refused {
                    code: HttpError::ConnectionLimitReached,
                    method: request.method().to_string(),
                    url: request.uri().to_string(),
                    reason: format!(
                        "this run already has {} requests in flight and \
                         {MAX_WAITING_PER_WORKLOAD} waiting for a place (--max-outbound-inflight)",
                        gate.policy.max_inflight_per_workload
                    ),
                };
                // Logged once: a guest in a loop would otherwise fill its log.
                if !told_waiting.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    record(&log, &refused).await;
                }
                return Err(refused.code);
            }
            // The run's own place first, so one run waiting for the node's
            // holds at most one place of its own.
            let closed = |_| HttpError::InternalError(Some("the outbound gate is closed".into()));
            let own = own.acquire_owned().await.map_err(closed)?;
            let node = Arc::clone(&gate.inflight)
                .acquire_owned()
                .await
                .map_err(closed)?;
            drop(waiting);
            let admitted = match admit(request, &allowed_hosts, &gate).await {
                Ok(admitted) => admitted,
                Err(refused) => {
                    record(&log, &refused).await;
                    return Err(refused.code);
                }
            };
            let tls = admitted.tls_name.map(|name| (&gate.tls, name));
            let (response, io) = send_to(admitted.request, admitted.address, tls, options).await?;
            let io = async move {
                let ended = io.await;
                // The socket is closed: its places are free.
                drop((own, node));
                ended
            };
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// A request counted among its run's waiting ones until dropped.
struct Waiting {
    counter: Arc<std::sync::atomic::AtomicUsize>,
    /// How many waited, this one included, when it came.
    count: usize,
}

impl Waiting {
    fn enter(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        let count = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Self {
            counter: Arc::clone(counter),
            count,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.counter
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request the policy refused: what the guest gets and what the log says.
struct Refused {
    code: HttpError,
    method: String,
    url: String,
    reason: String,
}

/// A request that may go, and where to.
struct Admitted {
    request: Request<WasiBody>,
    /// The checked address to connect to.
    address: SocketAddr,
    /// For https: the name the certificate must match (also the SNI).
    tls_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// Checks `request` against the spec and the policy, and picks the checked
/// address it will be sent to.
async fn admit(
    request: Request<WasiBody>,
    allowed_hosts: &[OutboundRule],
    gate: &OutboundGate,
) -> Result<Admitted, Refused> {
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
    let policy = &gate.policy;
    if let Some(reason) = policy.refusal(allowed_hosts, &to) {
        return Err(refused(HttpError::HttpRequestDenied, reason));
    }
    let literal = to.host.parse::<IpAddr>().ok();
    let addresses: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, to.port)],
        None => {
            let _turn = gate.lookups.acquire().await;
            match tokio::net::lookup_host((to.host.as_str(), to.port)).await {
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
            }
        }
    };
    let Some(first) = addresses.first().copied() else {
        return Err(refused(
            HttpError::DestinationNotFound,
            format!("{} resolved to no address", to.host),
        ));
    };
    // One bad address refuses the name: a name that points at both public and
    // private addresses is not to be trusted with either.
    let name = literal.is_none().then_some(to.host.as_str());
    for address in &addresses {
        if let Some(reason) = policy.address_refusal(address.ip(), name) {
            return Err(refused(HttpError::DestinationIpProhibited, reason));
        }
    }
    let tls_name = match to.https {
        false => None,
        true => Some(
            rustls::pki_types::ServerName::try_from(to.host.clone()).map_err(|e| {
                refused(
                    HttpError::HttpRequestUriInvalid,
                    format!("{} is not a name a certificate can match: {e}", to.host),
                )
            })?,
        ),
    };
    Ok(Admitted {
        request,
        address: first,
        tls_name,
    })
}

/// A connection's byte stream, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Sends `request` over a new connection to `address` (TLS with the given
/// name when there is one), honouring the guest's timeouts; returns the
/// response and the future that drives the connection until it ends.
async fn send_to(
    mut request: Request<WasiBody>,
    address: SocketAddr,
    tls: Option<(
        &tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    options: Option<RequestOptions>,
) -> Result<
    (
        hyper::Response<WasiBody>,
        impl Future<Output = Result<(), HttpError>> + Send + 'static,
    ),
    HttpError,
> {
    let wait = |pick: fn(&RequestOptions) -> Option<Duration>| {
        options.as_ref().and_then(pick).unwrap_or(DEFAULT_WAIT)
    };
    let connect_within = wait(|o| o.connect_timeout);
    let first_byte_within = wait(|o| o.first_byte_timeout);
    // A zero would make the interval below panic; it means "at once".
    let between_bytes_within = wait(|o| o.between_bytes_timeout).max(Duration::from_nanos(1));

    let tcp = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    let stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some((connector, name)) => Box::new(
            tokio::time::timeout(connect_within, connector.connect(name, tcp))
                .await
                .map_err(|_| HttpError::ConnectionTimeout)?
                .map_err(HttpError::Tls)?,
        ),
    };
    let (mut sender, connection) = tokio::time::timeout(
        connect_within,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;
    // The request line names only the path (origin form); `Host` says the rest.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() =
        hyper::Uri::try_from(path).map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let mut connection = Some(Box::pin(connection));
    let answer = async {
        let sending = sender.send_request(request);
        tokio::pin!(sending);
        loop {
            // The connection must be driven for the answer to arrive.
            let Some(driving) = connection.as_mut() else {
                return sending.await.map_err(HttpError::from);
            };
            tokio::select! {
                answer = &mut sending => return answer.map_err(HttpError::from),
                ended = driving => {
                    connection = None;
                    ended?;
                }
            }
        }
    };
    let response = tokio::time::timeout(first_byte_within, answer)
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??;
    let mut pace = tokio::time::interval(between_bytes_within);
    pace.reset();
    let response = response.map(|incoming| PacedBody { incoming, pace }.boxed_unsync());
    let io = async move {
        match connection {
            None => Ok(()),
            Some(connection) => connection.await.map_err(|e| match e.is_timeout() {
                true => HttpError::HttpResponseTimeout,
                false => HttpError::from(e),
            }),
        }
    };
    Ok((response, io))
}

/// A response body that fails when the gap between two frames is longer
/// than the guest's `between-bytes-timeout`.
struct PacedBody {
    incoming: hyper::body::Incoming,
    pace: tokio::time::Interval,
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.pace.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(match e.is_timeout() {
                true => HttpError::HttpResponseTimeout,
                false => HttpError::from(e),
            }))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.pace.poll_tick(cx) {
                Poll::Ready(_) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn request(uri: &str) -> Request<WasiBody> {
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        Request::get(uri).body(body).unwrap()
    }

    #[tokio::test]
    async fn a_request_goes_to_the_checked_address_with_the_name_as_sni() {
        // What the name would resolve to now, and the address that was checked.
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let checked = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = elsewhere.local_addr().unwrap().port();
        let address = checked.local_addr().unwrap();
        let gate = OutboundGate::new(OutboundPolicy::default());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let sending = tokio::spawn(async move {
            send_to(
                request(&format!("https://localhost:{port}/")),
                address,
                Some((&gate.tls, name)),
                None,
            )
            .await
            .map(|_| ())
        });
        // Whichever listener the connection reaches first says where it went.
        let mut conn = tokio::select! {
            accepted = checked.accept() => accepted.unwrap().0,
            _ = elsewhere.accept() => panic!("a connection reached the unchecked address"),
        };
        let mut hello = vec![0; 4096];
        let n = conn.read(&mut hello).await.unwrap();
        // A TLS ClientHello whose server name is the request's host.
        assert_eq!(hello[0], 0x16, "not a TLS handshake");
        assert!(
            hello[..n].windows(9).any(|w| w == b"localhost"),
            "the SNI is not the request's name"
        );
        drop(conn);
        assert!(matches!(sending.await.unwrap(), Err(HttpError::Tls(_))));
    }

    #[tokio::test]
    async fn a_plain_request_goes_to_the_checked_address_with_its_host_header() {
        let checked = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = checked.local_addr().unwrap();
        let mut req = request("http://api.example.com/v1/items?x=1");
        req.headers_mut()
            .insert(hyper::header::HOST, "api.example.com".parse().unwrap());
        let sending =
            tokio::spawn(async move { send_to(req, address, None, None).await.map(|_| ()) });
        let (mut conn, _) = checked.accept().await.unwrap();
        let mut head = vec![0; 4096];
        let n = conn.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("get /v1/items?x=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("host: api.example.com\r\n"), "{head}");
        drop(conn);
        assert!(sending.await.unwrap().is_err());
    }
}
