//! Adapts wasmtime-wasi's stdout/stderr stream traits to a [`LogWriter`].
//!
//! Kept alone because it is the code most exposed to wasmtime-wasi API changes.
//! Backpressure lives here: while the store is behind on this workload's lines,
//! `check_write` grants nothing and `ready` waits for room, so the guest's write
//! suspends its wasm store (yielding its thread) until the writer commits. A
//! write that was granted is accepted at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::logs::{LinesNotStored, LogStream, LogWriter};

/// Largest single write a guest is granted: WASI's blocking writes come in
/// 4 KiB chunks, and a small grant keeps the overshoot of a full lane small.
const WRITE_PERMIT: usize = 4096;

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
    async fn ready(&mut self) {
        self.writer.room().await;
    }
}

impl GuestOutput {
    /// A guest whose lines cannot be stored is stopped at its next write.
    fn stored_so_far(&self) -> StreamResult<()> {
        match self.writer.store_failure() {
            Some(why) => Err(StreamError::Trap(wasmtime::Error::new(LinesNotStored(why)))),
            None => Ok(()),
        }
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.stored_so_far()?;
        self.writer
            .write(self.stream, &bytes)
            .map_err(|e| StreamError::Trap(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.stored_so_far()?;
        Ok(if self.writer.has_room() {
            WRITE_PERMIT
        } else {
            0
        })
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = self.writer.store_failure() {
            return Poll::Ready(Err(io::Error::other(LinesNotStored(why))));
        }
        if self.writer.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        let len = buf.len().min(WRITE_PERMIT);
        Poll::Ready(
            self.writer
                .write(self.stream, &buf[..len])
                .map(|()| len)
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
