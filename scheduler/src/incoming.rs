//! Accepted connections, bounded: how many may be open at once, and how long a peer may take
//! to say its first bytes. Together with HTTP/2 keepalive (set on the server), this is what
//! keeps idle, silent or dead peers from holding the scheduler's file descriptors: a peer
//! that connects and says nothing is dropped after the handshake timeout, one that stops
//! answering pings after the keepalive timeout, and past the cap new connections are closed
//! at once rather than exhausting the process's descriptor limit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::service::metrics;

/// Bounds on accepted connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Connections open at once.
    pub(crate) max_connections: usize,
    /// Time from accept to the peer's first byte.
    pub(crate) handshake_timeout: Duration,
}

/// One accepted connection: its slot under the cap is held until it closes.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Until the first byte arrives: the deadline for it.
    handshake: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.handshake = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if let Some(deadline) = this.handshake.as_mut() {
                    ready!(deadline.as_mut().poll(cx));
                    metrics::connection_dropped("handshake_timeout");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The accepted connections of `listener` under `bounds`, as the stream tonic serves. The
/// accept loop runs until the stream is dropped.
pub(crate) fn bounded(
    listener: TcpListener,
    bounds: Bounds,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors or a peer that reset before accept: keep serving
                        // the others; back off a little so a persistent error cannot spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::connection_dropped("over_cap");
                debug!(%peer, "connection cap reached; closing the new connection");
                drop(stream);
                continue;
            };
            // Without TCP_NODELAY small answers wait for delayed ACKs (tens of ms).
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                stream,
                handshake: Some(Box::pin(tokio::time::sleep(bounds.handshake_timeout))),
                _slot: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
