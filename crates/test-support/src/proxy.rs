//! A TCP proxy that injects network faults between a client and a real server.
//!
//! Tests put it between the worker and PostgreSQL to see what the program does
//! when the network misbehaves in the ways a real network does:
//!
//! - [`FaultProxy::pass`]: bytes flow both ways.
//! - [`FaultProxy::blackhole`]: connections, old and new, are accepted and kept
//!   open, but nothing is forwarded in either direction: a partition that leaves
//!   sockets half-open, where every request goes unanswered. Bytes already read
//!   are held, not dropped, so when traffic passes again a connection resumes
//!   where it stopped (as TCP retransmission would make it).
//! - [`FaultProxy::slow`]: every chunk of bytes is forwarded after a delay.
//! - [`FaultProxy::deaf`]: what the client sends still reaches the server, but
//!   nothing comes back (held, as for a blackhole): a request the server
//!   carried out whose answer is lost.
//! - [`FaultProxy::reset`]: every open connection is closed at once, and new ones
//!   are closed as soon as they are accepted (a restarted server, a failover).
//!
//! Everything the proxy runs is one task per connection plus the accept loop, all
//! aborted when the proxy is dropped, with at most [`MAX_CONNECTIONS`] connections
//! open at once (more are closed on accept).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

/// Connections a proxy keeps open at most.
pub const MAX_CONNECTIONS: usize = 256;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Slow(Duration),
    /// Client to server passes; server to client is held.
    Deaf,
    Reset,
}

/// A fault-injecting proxy to one upstream address; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    open: Arc<AtomicUsize>,
    _accept: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("mode", &*self.mode.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, passing traffic.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("bound address");
        let (mode, watcher) = watch::channel(Mode::Pass);
        let open = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(listener, upstream, watcher, open.clone()));
        FaultProxy {
            addr,
            mode,
            open,
            _accept: AbortOnDropHandle::new(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    pub fn slow(&self, delay: Duration) {
        self.mode.send_replace(Mode::Slow(delay));
    }

    pub fn deaf(&self) {
        self.mode.send_replace(Mode::Deaf);
    }

    pub fn reset(&self) {
        self.mode.send_replace(Mode::Reset);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    open: Arc<AtomicUsize>,
) {
    // Owned here so that aborting this task (the proxy dropped) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *mode.borrow() == Mode::Reset || connections.len() >= MAX_CONNECTIONS {
                    drop(client);
                    continue;
                }
                let (mode, open) = (mode.clone(), open.clone());
                connections.spawn(async move {
                    open.fetch_add(1, Ordering::Relaxed);
                    let _ = connection(client, upstream, mode).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One proxied connection; returns when either side closes or the proxy resets.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
) -> std::io::Result<()> {
    // A blackhole also swallows connection attempts: the client's connect
    // succeeds (the proxy accepted it) but the upstream hears nothing until
    // traffic passes again.
    let mut waiting = mode.clone();
    wait_until_open(&mut waiting, Direction::ToServer).await?;
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        r = pump(client_read, server_write, mode.clone(), Direction::ToServer) => r,
        r = pump(server_read, client_write, mode.clone(), Direction::ToClient) => r,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Waits while the proxy holds traffic going `toward`; `Err` once it resets.
async fn wait_until_open(
    mode: &mut watch::Receiver<Mode>,
    toward: Direction,
) -> std::io::Result<()> {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Reset => return Err(std::io::ErrorKind::ConnectionReset.into()),
            Mode::Blackhole => {}
            Mode::Deaf if toward == Direction::ToClient => {}
            Mode::Pass | Mode::Slow(_) | Mode::Deaf => return Ok(()),
        }
        if mode.changed().await.is_err() {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
    }
}

/// Copies one direction, applying the mode to every chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    toward: Direction,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Not reading while blackholed leaves the bytes with the sender's socket:
        // nothing is lost, nothing arrives.
        wait_until_open(&mut mode, toward).await?;
        let n = tokio::select! {
            n = from.read(&mut buf) => n?,
            changed = mode.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        if n == 0 {
            return Ok(());
        }
        // The chunk was read: it goes out once the mode lets it (after a slow
        // delay, or when a blackhole passes again), or never if the proxy resets.
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::Pass => break,
                Mode::Deaf if toward == Direction::ToServer => break,
                Mode::Blackhole | Mode::Deaf | Mode::Reset => {
                    wait_until_open(&mut mode, toward).await?
                }
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> (SocketAddr, AbortOnDropHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, AbortOnDropHandle::new(task))
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        stream.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(within, stream.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf.to_vec())
    }

    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn passes_then_blackholes_then_resumes_without_losing_bytes() {
        let (upstream, _server) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut stream, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );

        proxy.blackhole();
        assert_eq!(
            round_trip(&mut stream, SHORT).await,
            None,
            "nothing comes back"
        );
        // A new connection is accepted but hears nothing either.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, SHORT).await, None);

        proxy.pass();
        // The ping sent during the blackhole arrives now, then the new one.
        let mut buf = [0u8; 8];
        tokio::time::timeout(LONG, stream.read_exact(&mut buf[..4]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            round_trip(&mut stream, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );
        tokio::time::timeout(LONG, fresh.read_exact(&mut buf[..4]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(proxy.open_connections(), 2);
    }

    #[tokio::test]
    async fn slow_delays_every_chunk() {
        let (upstream, _server) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.slow(Duration::from_millis(200));
        let started = std::time::Instant::now();
        assert!(round_trip(&mut stream, LONG).await.is_some());
        // One delay each way.
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn reset_closes_every_connection_and_refuses_new_ones_until_passing() {
        let (upstream, _server) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut stream, LONG).await.is_some());
        proxy.reset();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(LONG, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        let read = tokio::time::timeout(LONG, again.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "closed on accept: {read:?}");

        proxy.pass();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut fresh, LONG).await.is_some());
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let (upstream, _server) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await;
        let addr = proxy.addr();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut stream, LONG).await.is_some());
        drop(proxy);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(LONG, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer listening"
        );
    }
}
