//! A consumer whose job bodies stay within a memory budget.
//!
//! RabbitMQ bounds a consumer's prefetch by message count only (`basic.qos`'s
//! `prefetch-size` is not implemented), and lapin reads every delivery the broker
//! sends into an unbounded buffer. With a prefetch of 64 and jobs of up to ~47 MB
//! (35 MB of attachments, base64 in JSON), that is 3 GB before the worker has
//! looked at any of them.
//!
//! So the consumer's connection goes through a relay inside the process. The relay
//! forwards the broker's frames to lapin unchanged, but holds a delivery back (its
//! `basic.deliver` and content header) until the [`MemoryBudget`] has room for its
//! body, counted [`MemoryBudget::charge_for`] times for the working copies a job
//! makes while it is decoded and rendered. While a delivery is held back the relay
//! reads nothing more from the broker, so TCP flow control stops the broker's
//! sends; lapin gets a heartbeat frame every few seconds so it does not take the
//! quiet for a dead connection. The charge is released when the job's
//! [`BodyCharge`] is dropped.
//!
//! Only the consumer's connection is relayed. Publisher confirms come back on the
//! publisher's own connection, so a held-back delivery never stalls the jobs whose
//! end frees the budget.
//!
//! A single delivery larger than the whole budget is let through when nothing else
//! is held, so it is processed alone rather than never.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::BrokerError;

/// How many bytes of memory a job takes per byte of its body, at its peak: the
/// body, its decoded attachments and the rendered message (measured with
/// 30 MB attachments, see BENCHMARKS.md).
pub const WORKING_COPIES: u64 = 4;

/// Bytes of job memory a worker may hold, shared by all its consumer connections.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    capacity: u64,
    held: std::sync::Mutex<u64>,
    freed: Notify,
}

impl MemoryBudget {
    /// A budget of `capacity` bytes (at least 1).
    pub fn new(capacity: u64) -> Self {
        MemoryBudget {
            inner: Arc::new(BudgetInner {
                capacity: capacity.max(1),
                held: std::sync::Mutex::new(0),
                freed: Notify::new(),
            }),
        }
    }

    /// What a body of `body_bytes` costs the budget.
    pub fn charge_for(body_bytes: u64) -> u64 {
        body_bytes.saturating_mul(WORKING_COPIES)
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        *self.lock()
    }

    /// The budget's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `charge` if it fits (or if nothing is held: a job larger than the
    /// whole budget runs alone).
    fn try_admit(&self, charge: u64) -> bool {
        let mut held = self.lock();
        if *held == 0 || held.saturating_add(charge) <= self.inner.capacity {
            *held = held.saturating_add(charge);
            true
        } else {
            false
        }
    }

    /// Waits until `charge` fits, then takes it. Cancel-safe: nothing is taken
    /// unless it returns.
    async fn admit(&self, charge: u64) {
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_admit(charge) {
                return;
            }
            freed.await;
        }
    }

    fn release(&self, charge: u64) {
        {
            let mut held = self.lock();
            *held = held.saturating_sub(charge);
        }
        self.inner.freed.notify_waiters();
    }
}

/// A delivery's share of the budget, released when dropped.
#[derive(Debug)]
pub struct BodyCharge {
    budget: MemoryBudget,
    charge: u64,
}

impl BodyCharge {
    /// Bytes charged.
    pub fn bytes(&self) -> u64 {
        self.charge
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        self.budget.release(self.charge);
    }
}

/// Charges admitted by the relay and charges handed to jobs, for one connection:
/// what was admitted but never handed out (deliveries lapin still buffered when the
/// connection ended) is given back when the connection is dropped.
#[derive(Debug, Default)]
struct Counts {
    admitted: AtomicU64,
    taken: AtomicU64,
}

/// A consumer on its own connection, through the budgeted relay.
pub struct BoundedConsumer {
    pub connection: Connection,
    pub channel: Channel,
    pub consumer: Consumer,
    budget: MemoryBudget,
    counts: Arc<Counts>,
    relay: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for BoundedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedConsumer").finish_non_exhaustive()
    }
}

impl BoundedConsumer {
    /// Connects to `url` through a relay bound by `budget` and starts consuming
    /// `queue` with manual acks and `prefetch`.
    pub async fn open(
        url: &str,
        connection_name: &str,
        queue: &str,
        prefetch: u16,
        budget: MemoryBudget,
    ) -> Result<Self, BrokerError> {
        let upstream: AMQPUri = url
            .parse()
            .map_err(|e: String| BrokerError::Relay(format!("AMQP URL: {e}")))?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| BrokerError::Relay(format!("relay listener: {e}")))?;
        let local_port = listener
            .local_addr()
            .map_err(|e| BrokerError::Relay(e.to_string()))?
            .port();
        let counts = Arc::new(Counts::default());
        let relay = tokio::spawn(relay(
            listener,
            upstream.clone(),
            budget.clone(),
            counts.clone(),
        ));
        let mut local = upstream;
        local.scheme = AMQPScheme::AMQP;
        local.authority.host = "127.0.0.1".into();
        local.authority.port = local_port;
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let opened = async {
            let connection = Connection::connect_uri(local, properties).await?;
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.into(),
                    connection_name.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((connection, channel, consumer))
        }
        .await;
        match opened {
            Ok((connection, channel, consumer)) => Ok(BoundedConsumer {
                connection,
                channel,
                consumer,
                budget,
                counts,
                relay,
            }),
            Err(e) => {
                relay.abort();
                Err(e.into())
            }
        }
    }

    /// The budget share of a delivery taken from this consumer. Hold it for as long
    /// as the job's data is in memory.
    pub fn charge(&self, delivery: &Delivery) -> BodyCharge {
        let charge = MemoryBudget::charge_for(delivery.data.len() as u64);
        self.counts.taken.fetch_add(charge, Ordering::Relaxed);
        BodyCharge {
            budget: self.budget.clone(),
            charge,
        }
    }

    /// Whether the connection and channel are open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes the channel (which returns what is still prefetched) and the connection.
    pub async fn close(&self) {
        if self.connection.status().connected() {
            let _ = self.channel.close(200, "bye".into()).await;
            let _ = self.connection.close(200, "bye".into()).await;
        }
    }
}

impl Drop for BoundedConsumer {
    fn drop(&mut self) {
        self.relay.abort();
        let admitted = self.counts.admitted.load(Ordering::Relaxed);
        let taken = self.counts.taken.load(Ordering::Relaxed);
        self.budget.release(admitted.saturating_sub(taken));
    }
}

/// Accepts lapin's connection, connects to the broker, and relays both ways until
/// either side closes.
async fn relay(
    listener: TcpListener,
    upstream: AMQPUri,
    budget: MemoryBudget,
    counts: Arc<Counts>,
) {
    let accepted = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await;
    drop(listener);
    let Ok(Ok((client, _))) = accepted else {
        return;
    };
    let _ = client.set_nodelay(true);
    let broker = match connect_upstream(&upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, host = %upstream.authority.host, "AMQP relay could not reach the broker");
            return;
        }
    };
    let (client_read, client_write) = tokio::io::split(client);
    let (broker_read, broker_write) = tokio::io::split(broker);
    tokio::select! {
        r = up(client_read, broker_write) => if let Err(e) = r { tracing::debug!(error = %e, "AMQP relay: client side ended"); },
        r = down(broker_read, client_write, &budget, &counts) => if let Err(e) = r { tracing::debug!(error = %e, "AMQP relay: broker side ended"); },
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

async fn connect_upstream(uri: &AMQPUri) -> std::io::Result<Box<dyn Stream>> {
    let host = uri.authority.host.as_str();
    let tcp = TcpStream::connect((host, uri.authority.port)).await?;
    tcp.set_nodelay(true)?;
    match uri.scheme {
        AMQPScheme::AMQP => Ok(Box::new(tcp)),
        AMQPScheme::AMQPS => {
            // The same trust as lapin's own TLS (its `rustls-webpki-roots-certs`
            // feature): the Mozilla roots.
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// lapin → broker: unchanged.
async fn up(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    tokio::io::copy(&mut from, &mut to).await?;
    Ok(())
}

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
/// A heartbeat frame (type 8, channel 0, empty).
const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, FRAME_END];
/// lapin closes a connection after two heartbeat intervals without a frame; the
/// shortest interval RabbitMQ negotiates in practice is well above this.
const HEARTBEAT_WHILE_HELD: Duration = Duration::from_secs(5);
/// Far above RabbitMQ's `frame_max` (128 KiB by default, 1 MiB at most in practice).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// broker → lapin, frame by frame, holding deliveries back while the budget is full.
async fn down(
    from: impl AsyncRead + Unpin,
    to: impl AsyncWrite + Unpin,
    budget: &MemoryBudget,
    counts: &Counts,
) -> std::io::Result<()> {
    let mut from = BufReader::with_capacity(256 * 1024, from);
    let mut to = BufWriter::with_capacity(256 * 1024, to);
    let mut head = [0u8; 7];
    // A `basic.deliver` waiting for its content header, which says the body's size.
    let mut deliver: Option<Vec<u8>> = None;
    loop {
        if from.buffer().is_empty() {
            to.flush().await?;
        }
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                to.flush().await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if &head[..4] == b"AMQP" {
            // The broker refused our protocol version: pass its answer on as is.
            to.write_all(&head).await?;
            tokio::io::copy(&mut from, &mut to).await?;
            to.flush().await?;
            return Ok(());
        }
        let kind = head[0];
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        if size > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("AMQP frame of {size} bytes"),
            ));
        }
        if kind == FRAME_BODY {
            if let Some(held) = deliver.take() {
                to.write_all(&held).await?;
            }
            to.write_all(&head).await?;
            let mut rest = (&mut from).take(size as u64 + 1);
            let copied = tokio::io::copy(&mut rest, &mut to).await?;
            if copied != size as u64 + 1 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            continue;
        }
        let mut frame = Vec::with_capacity(7 + size + 1);
        frame.extend_from_slice(&head);
        frame.resize(7 + size + 1, 0);
        from.read_exact(&mut frame[7..]).await?;
        if frame[7 + size] != FRAME_END {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "AMQP frame without its end octet",
            ));
        }
        if kind == FRAME_METHOD && is_basic_deliver(&frame[7..7 + size]) {
            if let Some(held) = deliver.replace(frame) {
                to.write_all(&held).await?;
            }
            continue;
        }
        if kind == FRAME_HEADER && size >= 12 {
            let body = u64::from_be_bytes(frame[11..19].try_into().expect("8 bytes"));
            let charge = MemoryBudget::charge_for(body);
            if !budget.try_admit(charge) {
                to.flush().await?;
                let mut beat = tokio::time::interval(HEARTBEAT_WHILE_HELD);
                beat.tick().await;
                loop {
                    tokio::select! {
                        () = budget.admit(charge) => break,
                        _ = beat.tick() => {
                            to.write_all(&HEARTBEAT).await?;
                            to.flush().await?;
                        }
                    }
                }
            }
            counts.admitted.fetch_add(charge, Ordering::Relaxed);
        }
        if let Some(held) = deliver.take() {
            to.write_all(&held).await?;
        }
        to.write_all(&frame).await?;
    }
}

/// Class 60 (basic), method 60 (deliver).
fn is_basic_deliver(payload: &[u8]) -> bool {
    payload.len() >= 4 && payload[..4] == [0, 60, 0, 60]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_charge_waits_until_the_budget_has_room() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_admit(60));
        assert!(!budget.try_admit(60), "60 + 60 is over 100");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit(60).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        budget.release(60);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("admitted once released")
            .unwrap();
        assert_eq!(budget.held(), 60);
    }

    #[test]
    fn a_body_larger_than_the_budget_runs_alone() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_admit(500), "nothing held: it goes alone");
        assert!(!budget.try_admit(1), "and nothing else meanwhile");
        budget.release(500);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_delivery_is_held_back_until_its_body_fits() {
        // broker → relay → lapin over in-memory pipes: a deliver + header + body,
        // with the budget full, then released.
        let budget = MemoryBudget::new(10);
        assert!(budget.try_admit(10));
        let (mut broker, relay_in) = tokio::io::duplex(1 << 16);
        let (relay_out, mut lapin) = tokio::io::duplex(1 << 16);
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn({
            let (budget, counts) = (budget.clone(), counts.clone());
            async move { down(relay_in, relay_out, &budget, &counts).await }
        });
        let deliver = frame(FRAME_METHOD, 1, &[0, 60, 0, 60, 1, 2, 3]);
        let mut header_payload = vec![0, 60, 0, 0];
        header_payload.extend_from_slice(&3u64.to_be_bytes());
        header_payload.extend_from_slice(&[0, 0]);
        let header = frame(FRAME_HEADER, 1, &header_payload);
        let body = frame(FRAME_BODY, 1, b"abc");
        let heartbeat_from_broker = frame(8, 0, &[]);
        broker.write_all(&heartbeat_from_broker).await.unwrap();
        broker.write_all(&deliver).await.unwrap();
        broker.write_all(&header).await.unwrap();
        broker.write_all(&body).await.unwrap();

        let mut got = vec![0u8; heartbeat_from_broker.len()];
        lapin.read_exact(&mut got).await.unwrap();
        assert_eq!(
            got, heartbeat_from_broker,
            "frames before the delivery pass"
        );
        let mut one = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), lapin.read(&mut one)).await;
        assert!(
            early.is_err(),
            "the delivery is held while the budget is full"
        );

        budget.release(10);
        let mut rest = vec![0u8; deliver.len() + header.len() + body.len()];
        tokio::time::timeout(Duration::from_secs(1), lapin.read_exact(&mut rest))
            .await
            .expect("released: the delivery passes")
            .unwrap();
        assert_eq!(rest, [deliver, header, body].concat(), "unchanged");
        assert_eq!(budget.held(), MemoryBudget::charge_for(3));
        assert_eq!(
            counts.admitted.load(Ordering::Relaxed),
            MemoryBudget::charge_for(3)
        );
        drop(broker);
        task.await.unwrap().unwrap();
    }

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(FRAME_END);
        f
    }
}
