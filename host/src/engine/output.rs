//! Adapts wasmtime-wasi's stdout/stderr stream traits to a [`LogWriter`].
//!
//! Kept alone because it is the code most exposed to wasmtime-wasi API changes.
//! Writes are accepted synchronously and never wait: the LogWriter only splits,
//! numbers and queues, so a guest is never blocked by persistence.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::logs::{LogStream, LogWriter};

/// Largest single write a guest is granted (matches WASI's usual stream permit).
const WRITE_PERMIT: usize = 64 * 1024;

/// One of a guest's output streams, feeding its workload's [`LogWriter`].
#[derive(Clone)]
pub struct GuestOutput {
    writer: LogWriter,
    stream: LogStream,
}

impl GuestOutput {
    /// The guest's `stream` (stdout or stderr), written into `writer`.
    pub fn new(writer: LogWriter, stream: LogStream) -> Self {
        Self { writer, stream }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.writer
            .write(self.stream, &bytes)
            .map_err(|e| StreamError::Trap(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(
            self.writer
                .write(self.stream, buf)
                .map(|()| buf.len())
                .map_err(io::Error::other),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
