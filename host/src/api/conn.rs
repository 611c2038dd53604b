//! Accepting connections: HTTP/1 and HTTP/2 with timeouts against clients that
//! stall, and a graceful shutdown.
//!
//! A client holds server memory only while it makes progress: a connection
//! that sends nothing at all within the client timeout is closed by
//! [`StallGuard`]; one that sends no complete request header in that time (an
//! idle keep-alive connection included) is closed by hyper; one that stops reading
//! what the server writes (e.g. a live log follower) is closed by
//! [`StallGuard`] once a write has waited that long; a request body that pauses
//! that long fails with 408 (the body timeout layer in [`super::router`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish (for at most `drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    client_timeout: Duration,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pass, do not spin.
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(StallGuard::new(stream, client_timeout));
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                // What a connection may buffer of a response the client does
                // not read (hyper's default is ~400 KiB): with thousands of
                // log followers that is what memory is made of. It also caps
                // a request head at 64 KiB.
                .max_buf_size(64 * 1024)
                .timer(TokioTimer::new())
                .header_read_timeout(client_timeout);
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    stop.cancel();
    connections.close();
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after shutdown; closing them");
    }
}

/// A TCP stream whose writes fail once one has waited `timeout` for the
/// client to read, so a client that stops reading is disconnected.
pub struct StallGuard {
    inner: TcpStream,
    timeout: Duration,
    /// Running while a write waits for the client.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Running until the client's first byte arrives (hyper's header timeout
    /// only starts once it knows the protocol, which takes a first byte).
    first_byte: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    /// Guards `inner` with `timeout`.
    pub fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
            first_byte: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }

    /// Called when a write is pending: pending until the timeout, then an error.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        expired(sleep, cx, "the client stopped reading")
    }

    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => match &mut self.first_byte {
                Some(deadline) => expired(deadline, cx, "the client sent nothing"),
                None => Poll::Pending,
            },
            ready => {
                if buf.filled().len() > before {
                    self.first_byte = None;
                }
                ready
            }
        }
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Pending until `deadline`, then a `TimedOut` error saying `why`.
fn expired<T>(
    deadline: &mut Pin<Box<Sleep>>,
    cx: &mut Context<'_>,
    why: &str,
) -> Poll<io::Result<T>> {
    match deadline.as_mut().poll(cx) {
        Poll::Ready(()) => {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why.to_owned())))
        }
        Poll::Pending => Poll::Pending,
    }
}
