//! A TCP listener for axum that bounds what clients can hold: at most
//! `max_connections` at once (further connections wait in the kernel's backlog),
//! and a connection that sends nothing for `idle` or lives longer than `lifetime`
//! is closed. axum's `serve` sets no header-read timeout, so without this a client
//! trickling a request (slowloris) or opening thousands of sockets holds the
//! listener's tasks and memory for as long as it likes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Limits of a [`GuardedListener`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Longest wait for the client's next bytes.
    pub idle: Duration,
    /// Longest life of one connection, requests in flight included.
    pub lifetime: Duration,
}

impl ConnectionLimits {
    /// The admin API. The idle limit also runs while a request is being answered
    /// (the server keeps reading), and a save and test may take a minute and a half
    /// (two attempts at a provider, a token refresh): it is above that.
    pub const ADMIN: ConnectionLimits = ConnectionLimits {
        max_connections: 256,
        idle: Duration::from_secs(120),
        lifetime: Duration::from_secs(300),
    };
    /// `/metrics`, `/healthz`, `/readyz`: scrapes and probes answer at once.
    pub const METRICS: ConnectionLimits = ConnectionLimits {
        max_connections: 64,
        idle: Duration::from_secs(15),
        lifetime: Duration::from_secs(60),
    };
}

/// A TCP listener enforcing [`ConnectionLimits`].
pub struct GuardedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: ConnectionLimits) -> Self {
        GuardedListener {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            limits,
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Waiting for a slot before accepting leaves further clients in the backlog.
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let now = Instant::now();
        (
            GuardedStream {
                inner: stream,
                _permit: permit,
                idle: self.limits.idle,
                idle_timer: Box::pin(tokio::time::sleep_until(now + self.limits.idle)),
                end_of_life: Box::pin(tokio::time::sleep_until(now + self.limits.lifetime)),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot until dropped.
pub struct GuardedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    end_of_life: Pin<Box<Sleep>>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.end_of_life.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(timed_out("connection lifetime over")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.idle_timer.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.idle_timer.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(timed_out("client idle")))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.end_of_life.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(timed_out("connection lifetime over")));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
